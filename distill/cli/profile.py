"""`python -m distill profile NAME`: mult-adds, parameters and optional latency of a student.

python -m distill profile mobilenet_v1 --alpha 0.5 --resolution 160
python -m distill profile timm:resnet18 --resolution 224 --latency --device cpu
python -m distill profile runs/kd-a0.5-r160 --latency        # a run folder's student

--latency on the CPU also exports the model to ONNX (a temporary file) and times it with ONNX
Runtime next to eager PyTorch: batch 1 and batch --latency-batch, one thread and all of them,
median and p90 (distill.export.latency; the ONNX rows need the `export` extra).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from distill.models import create_student, get_student_builder, list_students
from distill.paper import find_figure
from distill.profiling import profile


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distill profile",
        description="Mult-adds (FlopCounterMode FLOPs / 2), parameters and optional latency.",
    )
    p.add_argument(
        "name",
        help=f"registered student ({', '.join(list_students())}), timm:<model> / "
        "torchvision:<model>, or a run folder",
    )
    p.add_argument("--alpha", type=float, help="width multiplier (MobileNet students)")
    p.add_argument(
        "--resolution", type=int, help="input size in px (default: the model's own, else 224)"
    )
    p.add_argument("--num-classes", type=int, help="classifier outputs (default: the builder's)")
    p.add_argument("--in-chans", type=int, help="input channels (MobileNet students)")
    p.add_argument("--batch-size", type=int, default=1, help="batch for the latency measurement")
    p.add_argument("--latency", action="store_true", help="also measure the forward latency")
    p.add_argument("--device", default="cpu", help="device for --latency (default: cpu)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument(
        "--latency-batch", type=int, default=32, help="batch N of the ONNX Runtime/PyTorch table"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when the cost is more than 1%% (mult-adds) or 0.05M (params) off the "
        "paper's figure for this alpha x resolution (an error when the paper has none)",
    )
    return p


def _from_run(args: argparse.Namespace) -> tuple[Any, dict[str, object]] | int:
    from distill.export.run import ExportError, load_run

    try:
        run = load_run(args.name)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.resolution is None:
        args.resolution = run.preprocess.input_size[1]
    return run.model, {"student": run.student, "alpha": run.alpha}


def _latency_table(model: Any, prof: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    if not args.latency or str(args.device) != "cpu":
        return None
    from distill.export.latency import LatencySettings, model_latency

    settings = LatencySettings(
        batch_sizes=tuple(dict.fromkeys((1, args.latency_batch))),
        warmup=args.warmup,
        repeats=max(2, args.repeats),
    )
    return model_latency(model, prof.input_size, settings=settings)


def _print_table(table: dict[str, Any] | None) -> None:
    if table is None:
        return
    from distill.export.latency import format_latency_table

    print(f"  CPU latency on {table['device']}, ms per batch (median, p90 of {table['repeats']}):")
    print("    " + format_latency_table(table["rows"]).replace("\n", "\n    "))
    if table.get("note"):
        print(f"  note: {table['note']}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if Path(args.name).is_dir():
        built = _from_run(args)
        if isinstance(built, int):
            return built
        return _report(args, *built)
    prefixed = ":" in args.name
    kwargs: dict[str, object] = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    for flag, value in (("alpha", args.alpha), ("in_chans", args.in_chans)):
        if value is not None:
            kwargs[flag] = value
    if args.resolution is not None and not prefixed:
        try:
            accepts = "resolution" in inspect.signature(get_student_builder(args.name)).parameters
        except KeyError as e:
            print(f"error: {e.args[0]}", file=sys.stderr)
            return 2
        if accepts:
            kwargs["resolution"] = args.resolution
    try:
        model = create_student(args.name, **kwargs)
    except (KeyError, TypeError, ValueError, ImportError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 2
    return _report(args, model, kwargs)


def _check(prof: Any, figure: Any) -> int:
    """--check: the paper's tolerance, 1% on mult-adds and 0.05M on parameters."""
    if figure is None:
        print("error: the paper has no figure for this model (MobileNetV1 at one of its "
              "alpha x resolution points only)", file=sys.stderr)  # fmt: skip
        return 2
    dev = 100.0 * (prof.mult_adds_m / figure.mult_adds_m - 1.0)
    off = prof.params_m - figure.params_m
    ok = abs(dev) <= 1.0 and abs(off) <= 0.05
    print(
        f"{'ok' if ok else 'FAIL'}: {prof.mult_adds_m:.1f}M mult-adds vs the paper's "
        f"{figure.mult_adds_m:g}M ({dev:+.2f}%, limit 1%), {prof.params_m:.3f}M params vs "
        f"{figure.params_m:g}M ({off:+.3f}M, limit 0.05M) (Table {figure.table})"
    )
    return 0 if ok else 1


def _report(args: argparse.Namespace, model: Any, kwargs: dict[str, object]) -> int:
    prof = profile(
        model,
        args.resolution,
        batch_size=args.batch_size,
        device=args.device if args.latency else None,
        latency=args.latency,
        warmup=args.warmup,
        repeats=args.repeats,
    )
    table = _latency_table(model, prof, args)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    figure = None
    if "alpha" in cfg and "variant" in cfg and prof.input_size[1] == prof.input_size[2]:
        figure = find_figure(float(cfg["alpha"]), prof.input_size[1], str(cfg["variant"]))
    if args.check:
        return _check(prof, figure)
    if args.json:
        out = {"name": args.name, **kwargs, **prof.to_dict()}
        if table is not None:
            out["latency_table"] = table
        if figure is not None:
            out["paper"] = {
                "table": figure.table,
                "mult_adds_m": figure.mult_adds_m,
                "params_m": figure.params_m,
                "top1": figure.top1,
            }
        print(json.dumps(out))
        return 0
    settings = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    print(f"{args.name}" + (f" ({settings})" if settings else ""))
    c, h, w = prof.input_size
    print(f"  input       {c}x{h}x{w}")
    print(f"  mult-adds   {prof.mult_adds_m:.1f} M ({prof.mult_adds:,})")
    print(f"  params      {prof.params_m:.3f} M ({prof.params:,})")
    print(f"  trainable   {prof.trainable_params / 1e6:.3f} M ({prof.trainable_params:,})")
    if prof.latency_ms is not None:
        print(
            f"  latency     {prof.latency_ms:.2f} ms per batch of {prof.batch_size} on "
            f"{prof.device} (median of {args.repeats})"
        )
    _print_table(table)
    if figure is not None:
        dev = 100.0 * (prof.mult_adds_m / figure.mult_adds_m - 1.0)
        print(
            f"  paper       Table {figure.table} '{figure.name}': {figure.mult_adds_m:g} M mult-adds "
            f"({dev:+.1f}%), {figure.params_m:g} M params, {figure.top1:g}% ImageNet top-1"
        )
    return 0
