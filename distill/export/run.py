"""A finished run folder back as a model: which student, at which width and size, with what
preprocessing, read from `metrics.json` and `config.json`, rebuilt with
`distill.models.build_student` and loaded from `student.safetensors` (safetensors only)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from distill.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ExportError", "LoadedRun", "Preprocess", "load_run", "student_input_size"]

WEIGHTS_FILE = "student.safetensors"
DIGITS_DATASET = "sklearn-digits"


class ExportError(RuntimeError):
    """Something a person can fix stops the export; the message says what."""


@dataclass(frozen=True)
class Preprocess:
    """What the exported model expects: (C, H, W) input normalised as (x/255 - mean) / std."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float | None = 0.875
    label_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "label_names": None if self.label_names is None else list(self.label_names),
        }


@dataclass
class LoadedRun:
    """A run's student, rebuilt and loaded (eval mode), and what the run says about it."""

    run_dir: Path
    record: dict[str, Any]  # metrics.json, validated
    config: dict[str, Any]  # config.json ({} when absent)
    student: str  # a create_student name
    alpha: float | None
    resolution: int | None
    num_classes: int
    model: nn.Module
    preprocess: Preprocess
    notes: list[str] = field(default_factory=list)  # what was inferred, for the user

    @property
    def run_name(self) -> str:
        return str(self.record["run_name"])

    @property
    def metric(self) -> str:
        return str(self.record["primary_metric"])

    @property
    def on_digits(self) -> bool:
        return self.record.get("dataset") == DIGITS_DATASET and self.num_classes == 10

    def describe(self) -> dict[str, Any]:
        """What the model card and the ONNX metadata say about where the model comes from."""
        r = self.record
        return {
            "run_name": r["run_name"],
            "student": self.student,
            "alpha": self.alpha,
            "resolution": self.resolution,
            "num_classes": self.num_classes,
            "teacher": r.get("teacher"),
            "method": r.get("method"),
            "role": r.get("role"),
            "dataset": r.get("dataset"),
            "metric": self.metric,
            "metric_value": r["metrics"].get(self.metric),
            "higher_is_better": r.get("higher_is_better", True),
            "mult_adds": r.get("mult_adds"),
            "params": r.get("params"),
            "temperature": r.get("temperature"),
            "kd_weight": r.get("kd_weight"),
        }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: cannot read it as JSON ({e})") from e


def _recipe(config: dict[str, Any]) -> dict[str, Any]:
    recipe = config.get("recipe")
    return recipe if isinstance(recipe, dict) else {}


def _pick(name: str, *sources: dict[str, Any]) -> Any:
    return next((s[name] for s in sources if s.get(name) is not None), None)


def _student_name(
    record: dict[str, Any], config: dict[str, Any], weights: dict[str, Tensor]
) -> str:
    """The create_student name: recipe config, then metrics.json; a bare Distiller run records
    the class name, which maps back for our MobileNetV1 (the variant follows from the keys)."""
    from distill.models import list_students

    name = str(_pick("student", _recipe(config), record, config))
    if ":" in name or name in list_students():
        return name
    if name == "MobileNetV1":
        if any(k.endswith(".dw.conv.weight") for k in weights):
            blocks = {k.split(".")[1] for k in weights if k.startswith("blocks.")}
            return "mobilenet_v1_shallow" if len(blocks) == 8 else "mobilenet_v1"
        return "mobilenet_v1_fullconv"
    raise ExportError(
        f"the run names its student {name!r}, which is not a registered student "
        f"({', '.join(list_students())}) nor a timm:/torchvision: name, so it cannot be rebuilt. "
        "Pass the student's name (`--student NAME`, or student=... in Python), pass the model "
        "itself (model=... in Python), or record it when training: "
        "DistillerConfig(run_info={'student': 'mobilenet_v1', 'alpha': ..., 'resolution': ...})."
    )


def _infer_num_classes(name: str, weights: dict[str, Tensor], alpha: float | None) -> int:
    """Build the student with one class and read the class count off the tensors whose shape
    differs (the classifier's); one class if none differs."""
    from distill.models import build_student

    probe = build_student(name, num_classes=1, alpha=alpha)
    counts = {
        int(weights[k].shape[0])
        for k, v in probe.state_dict().items()
        if k in weights and weights[k].dim() >= 1 and tuple(weights[k].shape) != tuple(v.shape)
    }
    return counts.pop() if len(counts) == 1 else 1


def _infer_alpha(name: str, weights: dict[str, Tensor]) -> float | None:
    """A MobileNetV1 run that recorded no alpha: the stem's width / 32."""
    from distill.models.mobilenet import STEM_CHANNELS

    stem = weights.get("stem.conv.weight")
    if name.startswith("mobilenet_v1") and stem is not None:
        return int(stem.shape[0]) / STEM_CHANNELS
    return None


def student_input_size(model: nn.Module, resolution: int | None) -> tuple[int, int, int]:
    """(C, H, W): the run's resolution (square), else the model's pretrained_cfg, else 224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    chans = int(size[0]) if size else (first.in_channels if first is not None else 3)
    if resolution is not None:
        return chans, int(resolution), int(resolution)
    if size:
        return chans, int(size[1]), int(size[2])
    return chans, 224, 224


def _preprocess(model: nn.Module, run: dict[str, Any], resolution: int | None) -> Preprocess:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = student_input_size(model, resolution)
    mean = tuple(cfg.get("mean") or (IMAGENET_MEAN if size[0] == 3 else (0.5,) * size[0]))
    std = tuple(cfg.get("std") or (IMAGENET_STD if size[0] == 3 else (0.5,) * size[0]))
    labels = run.get("label_names")
    if labels is None and run.get("dataset") == DIGITS_DATASET:
        from distill.data.digits import CLASSES

        labels = CLASSES
    return Preprocess(
        input_size=size,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        interpolation=str(cfg.get("interpolation") or "bilinear"),
        crop_pct=float(cfg["crop_pct"]) if cfg.get("crop_pct") else None,
        label_names=None if labels is None else tuple(str(v) for v in labels),
    )


def load_run(
    run_dir: str | Path, *, student: str | None = None, model: nn.Module | None = None
) -> LoadedRun:
    """Rebuild and load the student of a finished run folder (see the module docstring).

    student: the create_student name when the run did not record a usable one.
    model: the student itself (its weights are still loaded from student.safetensors).
    """
    from distill.run_record import MetricsFileError, validate_metrics
    from distill.serialization import load_state_dict

    root = Path(run_dir)
    if not root.is_dir():
        raise ExportError(f"{root}: no such run folder")
    if not (root / "metrics.json").is_file():
        raise ExportError(f"{root} is not a finished run folder: it has no metrics.json")
    try:  # a run trained without an evaluation set (empty metrics) still ships
        source = str(root / "metrics.json")
        record = validate_metrics(_read_json(root / "metrics.json"), source, require_metrics=False)
    except MetricsFileError as e:
        raise ExportError(f"{root} is not a finished run folder: {e}") from None
    weights_file = root / WEIGHTS_FILE
    if not weights_file.is_file():
        raise ExportError(
            f"{root} has no {WEIGHTS_FILE}: the run was trained with "
            "DistillerConfig(export_student=False) or did not finish. Its checkpoints hold the "
            "weights under 'student.' (checkpoints/step_*/model.safetensors): save them with "
            "distill.serialization.save_safetensors(load_state_dict(file, prefix='student.'), "
            f"'{weights_file}')."
        )
    config = _read_json(root / "config.json") if (root / "config.json").is_file() else {}
    config = config if isinstance(config, dict) else {}
    weights = load_state_dict(weights_file)
    notes: list[str] = []
    name = student or (None if model is not None else _student_name(record, config, weights))
    alpha = _pick("alpha", _recipe(config), record)
    resolution = _pick("resolution", _recipe(config), record)
    if name is not None and alpha is None and (inferred := _infer_alpha(name, weights)):
        alpha = inferred
        notes.append(f"alpha {alpha:g} inferred from the stem's width")
    if model is None:
        assert name is not None
        model = _build(name, weights, alpha, notes)
    _load(model, weights, weights_file)
    model.eval()
    return LoadedRun(
        run_dir=root,
        record=record,
        config=config,
        student=name or type(model).__name__,
        alpha=None if alpha is None else float(alpha),
        resolution=None if resolution is None else int(resolution),
        num_classes=_num_outputs(model, weights),
        model=model,
        preprocess=_preprocess(model, {**record, **config}, resolution),
        notes=notes,
    )


def _build(name: str, weights: dict[str, Tensor], alpha: Any, notes: list[str]) -> nn.Module:
    from distill.models import build_student

    try:
        num_classes = _infer_num_classes(name, weights, alpha)
        notes.append(f"{num_classes} classes, read off the weights")
        return build_student(name, num_classes=num_classes, alpha=alpha)
    except (KeyError, TypeError, ValueError, ImportError) as e:
        raise ExportError(f"cannot rebuild the student {name!r}: {e}") from e


def _load(model: nn.Module, weights: dict[str, Tensor], file: Path) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:6]
        raise ExportError(
            f"{file} does not fit the rebuilt student {type(model).__name__}: "
            + " ".join(line.strip() for line in first)
            + " -- pass the right --student, or model=... in Python."
        ) from None


def _num_outputs(model: nn.Module, weights: dict[str, Tensor]) -> int:
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0
