"""The README.md model card of an exported student: where it comes from (teacher, method,
dataset), what it scores and costs (metric, mult-adds, params, latency, INT8), and how to
load it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from distill.export.run import LoadedRun

if TYPE_CHECKING:
    from distill.export.hf import HfFolder

__all__ = ["model_card"]


def _count(n: Any) -> str:
    return "–" if n is None else f"{n / 1e6:.2f} M"


def _front_matter(run: LoadedRun, folder: HfFolder) -> str:
    tags = ["image-classification", "knowledge-distillation", "mobiledistill"]
    if folder.loader == "timm":
        tags.insert(0, "timm")
    lines = ["---", f"library_name: {folder.loader}", "license: apache-2.0", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines.append("pipeline_tag: image-classification")
    lines.append("---")
    return "\n".join(lines)


def _loading(run: LoadedRun, folder: HfFolder) -> str:
    pre = run.preprocess
    c, h, w = pre.input_size
    prep = (
        f"Input: {c}x{h}x{w}, RGB scaled to 0..1 then normalised with mean {list(pre.mean)} and "
        f"std {list(pre.std)} (resize the shorter side to {h}/{pre.crop_pct or 1:g} px, "
        f"{pre.interpolation}, centre-crop {h}x{w})."
    )
    if folder.loader == "timm":
        code = f"""```python
import timm, torch

model = timm.create_model("local-dir:path/to/this/folder", pretrained=True).eval()
# after `--push-to-hub`: timm.create_model("hf-hub:<user>/<repo>", pretrained=True)
cfg = timm.data.resolve_data_config({{}}, model=model)
transform = timm.data.create_transform(**cfg)      # the preprocessing below
logits = model(transform(image).unsqueeze(0))      # (1, {run.num_classes})
```"""
        why = (
            f"timm's `{folder.architecture}` is this network (config.json sets "
            "`act_layer=relu`: timm's MobileNetV1 defaults to ReLU6, the paper uses ReLU)."
            if run.student.startswith("mobilenet_v1")
            else ""
        )
    else:
        code = _builder_snippet(run, folder)
        why = (
            "timm has no architecture with this student's shapes (its MobileNetV1 builders fix "
            "the width multiplier at 1.0 or 1.25 and round channels to multiples of 8), so the "
            "weights load through the builder below."
            if folder.loader == "mobiledistill"
            else ""
        )
    return "\n\n".join(p for p in ("## How to load it", why, code, prep) if p)


def _builder_snippet(run: LoadedRun, folder: HfFolder) -> str:
    if folder.loader == "torchvision":
        name = run.student.removeprefix("torchvision:")
        build = (
            f"import torchvision\nmodel = torchvision.models.get_model({name!r}, weights=None, "
            f"num_classes={run.num_classes})"
        )
    else:
        alpha = "" if run.alpha is None else f", alpha={run.alpha:g}"
        build = (
            "from distill.models import build_student   # pip install mobiledistill\n"
            f"model = build_student({run.student!r}, num_classes={run.num_classes}{alpha})"
        )
    return f"""```python
from safetensors.torch import load_file
{build}
model.load_state_dict(load_file("path/to/this/folder/model.safetensors"))
model.eval()
```"""


def _latency_lines(export: dict[str, Any]) -> list[str]:
    rows = (export.get("latency") or {}).get("rows", [])
    out = []
    for r in rows:
        if r["batch_size"] == 1:
            out.append(
                f"| {r['runtime']} {r['precision']} | {r['threads']} | {r['median_ms']:.2f} ms "
                f"| {r['p90_ms']:.2f} ms |"
            )
    if not out:
        return []
    device = (export.get("latency") or {}).get("device", "CPU")
    return [
        f"Batch-1 latency on {device}:",
        "",
        "| runtime | threads | median | p90 |",
        "|---|---|---|---|",
        *out,
    ]


def model_card(run: LoadedRun, folder: HfFolder, export: dict[str, Any]) -> str:
    """The card's Markdown (YAML front matter for the Hub first)."""
    d = run.describe()
    value = d["metric_value"]
    score = "–" if value is None else f"{value:.2f}"
    teacher = d["teacher"] or "none (trained from labels)"
    alpha = "" if run.alpha is None else f", width multiplier α = {run.alpha:g}"
    lines = [
        _front_matter(run, folder),
        "",
        f"# {run.student}{alpha}, {run.preprocess.input_size[1]} px — {d['role']} ({d['method']})",
        "",
        f"A student trained with mobiledistill (run `{d['run_name']}`).",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | {teacher} |",
        f"| method | {d['method']} (T = {d['temperature']}, teacher weight {d['kd_weight']}) |",
        f"| dataset | {d['dataset'] or '–'} |",
        f"| {d['metric']} | {score} |",
        f"| mult-adds | {_count(d['mult_adds'])} |",
        f"| params | {_count(d['params'])} |",
        f"| classes | {run.num_classes} |",
    ]
    int8 = (export.get("formats") or {}).get("int8")
    if int8:
        lines.append(
            f"| INT8 (ONNX, QDQ) | {int8['metric']} {int8['before']:.2f} -> {int8['after']:.2f}, "
            f"{int8['fp32_size_mb']:.2f} MB -> {int8['int8_size_mb']:.2f} MB |"
        )
    lines += ["", *_latency_lines(export), "", _loading(run, folder), ""]
    return "\n".join(lines)
