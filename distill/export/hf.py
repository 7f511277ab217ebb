"""A Hugging Face model folder: config.json, model.safetensors and a README.md model card.

How it loads depends on the student:

- MobileNetV1 (standard variant) at a width timm registers — alpha 1.0 (`mobilenetv1_100`)
  or 1.25 (`mobilenetv1_125`): timm's MobileNetV1 (efficientnet.py, `dsa` blocks without skip)
  is the same network once its ReLU6 is set back to ReLU (`act_layer="relu"`, stored in
  config.json's model_args) and the stage/block names are mapped (stem.conv -> conv_stem,
  blocks.i.dw/pw -> blocks.s.j.conv_dw/bn1/conv_pw/bn2). The weights are written under timm's
  names, so `timm.create_model("local-dir:FOLDER", pretrained=True)` (or `hf-hub:REPO` once
  pushed) builds and loads it, outputs equal to ours.
- timm:<name> students are timm models already: the folder is timm's layout as is.
- MobileNetV1 at any other width, its variants, torchvision and registered students: timm
  has no architecture with these shapes (its MobileNetV1 builders fix the multiplier, and
  round channels to multiples of 8 where the paper does not), so the card shows how to load
  the weights with our builder (or torchvision's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.export.card import model_card
from distill.export.run import ExportError, LoadedRun
from distill.files import write_json_atomic, write_text_atomic

__all__ = ["HfFolder", "export_hf", "push_to_hub", "timm_mobilenet_v1_keys"]

# timm MobileNetV1 builders by width multiplier, and its five stages' block counts
TIMM_MOBILENET_V1 = {1.0: "mobilenetv1_100", 1.25: "mobilenetv1_125"}
_TIMM_STAGES = (1, 2, 2, 6, 2)
_TIMM_PARTS = {"dw.conv": "conv_dw", "dw.bn": "bn1", "pw.conv": "conv_pw", "pw.bn": "bn2"}


@dataclass(frozen=True)
class HfFolder:
    folder: Path
    loader: str  # "timm", "mobiledistill" or "torchvision"
    architecture: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "loader": self.loader,
            "architecture": self.architecture,
        }


def timm_mobilenet_v1_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our MobileNetV1 state_dict under timm's mobilenetv1_* names (same tensors)."""
    where = [(s, j) for s, n in enumerate(_TIMM_STAGES) for j in range(n)]
    out = {}
    for key, value in state_dict.items():
        if key.startswith("stem.conv."):
            new = "conv_stem." + key.removeprefix("stem.conv.")
        elif key.startswith("stem.bn."):
            new = "bn1." + key.removeprefix("stem.bn.")
        elif key.startswith("blocks."):
            _, i, part, layer, rest = key.split(".", 4)
            stage, j = where[int(i)]
            new = f"blocks.{stage}.{j}.{_TIMM_PARTS[f'{part}.{layer}']}.{rest}"
        else:
            new = key  # classifier.weight / classifier.bias
        out[new] = value
    return out


def _timm_architecture(run: LoadedRun) -> str | None:
    cfg = getattr(run.model, "pretrained_cfg", None) or {}
    if run.student == "mobilenet_v1" and cfg.get("variant") == "standard":
        return TIMM_MOBILENET_V1.get(float(cfg.get("alpha", 0)))
    return None


def _timm_config(run: LoadedRun, architecture: str, model_args: dict[str, Any]) -> dict[str, Any]:
    pre = run.preprocess
    return {
        "architecture": architecture,
        "num_classes": run.num_classes,
        "num_features": int(getattr(run.model, "num_features", 0)) or None,
        "model_args": model_args,
        "label_names": list(pre.label_names) if pre.label_names else None,
        "pretrained_cfg": {
            "input_size": list(pre.input_size),
            "mean": list(pre.mean),
            "std": list(pre.std),
            "interpolation": pre.interpolation,
            "crop_pct": pre.crop_pct,
            "crop_mode": "center",
            "num_classes": run.num_classes,
        },
        "mobiledistill": run.describe(),
    }


def export_hf(run: LoadedRun, folder: str | Path, *, export: dict[str, Any]) -> HfFolder:
    """Write the folder (see the module docstring); `export` is the export record so far
    (metric, latency, INT8) for the model card."""
    from distill.serialization import save_safetensors

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    weights = dict(run.model.state_dict())
    arch = _timm_architecture(run)
    if arch is not None:
        loader, sd = "timm", timm_mobilenet_v1_keys(weights)
        in_chans = run.preprocess.input_size[0]
        args = {"act_layer": "relu", **({"in_chans": in_chans} if in_chans != 3 else {})}
        config = _timm_config(run, arch, args)
    elif run.student.startswith("timm:"):
        arch = run.student.removeprefix("timm:")
        loader, sd, config = "timm", weights, _timm_config(run, arch, {})
    else:
        loader = "torchvision" if run.student.startswith("torchvision:") else "mobiledistill"
        arch, sd = run.student, weights
        config = {
            "architecture": arch,
            "library_name": loader,
            "num_classes": run.num_classes,
            "preprocess": run.preprocess.to_dict(),
            "mobiledistill": run.describe(),
        }
    save_safetensors(sd, out / "model.safetensors", metadata={"format": "pt"})
    write_json_atomic(out / "config.json", config, sort_keys=False, allow_nan=False)
    result = HfFolder(out, loader, arch)
    write_text_atomic(out / "README.md", model_card(run, result, export))
    return result


def check_hf_folder(folder: HfFolder, model: nn.Module, inputs: Tensor) -> Any:
    """Load the folder back the way its card says (timm's local-dir, or our builder) and
    compare with `model` on `inputs`."""
    import torch

    from distill.export.check import compare_outputs, torch_outputs

    if folder.loader == "timm":
        import timm

        loaded = timm.create_model(f"local-dir:{folder.folder.resolve()}", pretrained=True)
    else:
        from distill.models import build_student
        from distill.serialization import load_state_dict

        cfg = json.loads((folder.folder / "config.json").read_text())
        info = cfg["mobiledistill"]
        loaded = build_student(info["student"], num_classes=cfg["num_classes"], alpha=info["alpha"])
        loaded.load_state_dict(load_state_dict(folder.folder / "model.safetensors"))
    with torch.no_grad():
        got = torch_outputs(loaded, inputs)
    return compare_outputs(torch_outputs(model, inputs), got, runtime=f"{folder.loader} folder")


def push_to_hub(
    folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None
) -> str:
    """Upload the folder to the Hub as `repo_id` (created if needed); returns its URL.

    Needs the network and a token (`huggingface-cli login`, or HF_TOKEN)."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise ExportError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from e
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, exist_ok=True, private=private, repo_type="model")
        info = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, commit_message="Add distilled student"
        )
    except Exception as e:  # offline, no token, no permission: the hub's own message says which
        raise ExportError(
            f"could not push {folder} to the Hub as {repo_id}: {e}. It needs the network "
            "(HF_HUB_OFFLINE must be unset) and a token with write access "
            "(`huggingface-cli login` or HF_TOKEN). The folder is complete: upload it later "
            f"with `huggingface-cli upload {repo_id} {folder}`."
        ) from e
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
