"""Pieces every teacher builder shares: metadata defaults, head replacement, strict loading."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, OUTPUT_KINDS, Teacher

# Keyword arguments of `teachers.load` that go to the Teacher wrapper (overriding what the
# weights say, where the name is a metadata field).
TEACHER_KWARGS = (
    "input_size",
    "mean",
    "std",
    "interpolation",
    "label_names",
    "features",
    "student_mean",
    "student_std",
    "name",
)


@dataclass
class TeacherMeta:
    """What a builder learned about its model, before user overrides."""

    name: str
    source: str
    input_size: int | tuple[int, int] = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    output: str = "logits"
    num_outputs: int | None = None
    label_names: list[str] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "mean": tuple(round(v, 4) for v in self.mean),
            "std": tuple(round(v, 4) for v in self.std),
            "interpolation": self.interpolation,
            "output": self.output,
            "num_outputs": self.num_outputs,
        }


def check_kwargs(spec: str, kwargs: Mapping[str, Any], own: Sequence[str]) -> None:
    """Reject keyword arguments no one will read, naming the accepted ones."""
    known = set(own) | set(TEACHER_KWARGS)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(
            f"teachers.load({spec!r}) got unexpected keyword argument(s) {unknown}; it accepts "
            f"{', '.join(sorted(known))}"
        )


def resolve_output(output: str | None, *, default: str) -> str:
    out = default if output is None else output
    if out not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
    return out


def make_teacher(model: nn.Module, meta: TeacherMeta, overrides: Mapping[str, Any]) -> Teacher:
    """Wrap `model` in a Teacher with `meta`, user overrides taking precedence."""
    fields = {k: v for k, v in overrides.items() if k in TEACHER_KWARGS and v is not None}
    meta = replace(
        meta,
        **{k: fields.pop(k) for k in ("input_size", "mean", "std", "interpolation") if k in fields},
    )
    if "label_names" in fields:
        meta.label_names = list(fields.pop("label_names"))
    names, n = meta.label_names, meta.num_outputs
    if names is not None and n is not None and len(names) != n:
        meta.label_names = None  # the head was replaced: the old names no longer apply
    return Teacher(
        model,
        input_size=meta.input_size,
        mean=meta.mean,
        std=meta.std,
        output=meta.output,  # type: ignore[arg-type]
        interpolation=meta.interpolation,
        num_outputs=meta.num_outputs,
        label_names=meta.label_names,
        source=meta.source,
        name=fields.pop("name", meta.name),
        **fields,
    )


def find_classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """The final classification layer: the last Linear, else the last 1x1 Conv2d (SqueezeNet).

    timm models name it in `pretrained_cfg["classifier"]`; torchvision ones are found by order
    of registration (`fc`, `classifier.N`, `heads.head`, `head`).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, Mapping) and isinstance(cfg.get("classifier"), str):
        try:
            return cfg["classifier"], model.get_submodule(cfg["classifier"])
        except AttributeError:
            pass
    last: tuple[str, nn.Module] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        for name, module in model.named_modules():
            if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
                last = (name, module)
    if last is None:
        raise ValueError(
            f"cannot find a classifier layer in {type(model).__name__} to replace; build the "
            "teacher with the right number of classes instead"
        )
    return last


def replace_classifier(model: nn.Module, num_classes: int) -> str:
    """Swap the final layer for a freshly initialised one with `num_classes` outputs.

    Returns the layer's module path. Models with `reset_classifier` (timm, our FaceNet) use it.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    reset = getattr(model, "reset_classifier", None)
    if callable(reset):
        reset(num_classes)
        name, _ = find_classifier(model)
        return name
    name, old = find_classifier(model)
    new: nn.Module
    if isinstance(old, nn.Linear):
        new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        assert isinstance(old, nn.Conv2d)
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    model.set_submodule(name, new)
    if isinstance(getattr(model, "num_classes", None), int):
        setattr(model, "num_classes", num_classes)  # noqa: B010 - not an nn.Module attribute
    return name


def classifier_outputs(model: nn.Module) -> int:
    _, layer = find_classifier(model)
    if isinstance(layer, nn.Linear):
        return layer.out_features
    if isinstance(layer, nn.Conv2d):
        return layer.out_channels
    weight = getattr(layer, "weight", None)
    if isinstance(weight, Tensor):
        return int(weight.shape[0])
    raise ValueError(f"cannot tell the output size of {type(layer).__name__}")


def load_strict(model: nn.Module, state_dict: Mapping[str, Tensor], *, what: str) -> None:
    """`load_state_dict(strict=True)` with an error that lists what disagrees, briefly."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}")
        raise ValueError(
            f"{what} does not fit the model {type(model).__name__}: " + "; ".join(parts) + ". "
            "Check arch= (the architecture the file was trained with), num_classes=, and "
            "prefix= for checkpoints that hold several models."
        )
    model.load_state_dict(state_dict, strict=True)
