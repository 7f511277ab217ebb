"""The Teacher wrapper: a frozen model fed the input it expects.

A Teacher owns freezing, eval mode and input conversion, so neither the loop nor the losses
need to know about them. A student trained at 128 px against a 224 px teacher is the paper's
resolution multiplier at work: the Teacher resizes and re-normalises the student's batch on
the device it is already on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.types import IMAGENET_MEAN, IMAGENET_STD, TASK_KINDS, Outputs, TaskKind

OutputKind = TaskKind  # what the teacher outputs is the task kind its student is evaluated on
OUTPUT_KINDS = TASK_KINDS
__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OUTPUT_KINDS",
    "FeatureHooks",
    "OutputKind",
    "Teacher",
    "as_teacher",
    "check_teacher_outputs",
]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    s = tuple(int(v) for v in size)
    if len(s) == 3:  # (C, H, W)
        s = s[1:]
    if len(s) != 2:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W); got {size!r}")
    return (s[0], s[1])


def extract_output(out: Any) -> Tensor:
    """The tensor a classifier/embedder produced: plain tensors, HF outputs, dicts, tuples."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "embeddings", "pooler_output"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(key)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"cannot find the output tensor in a {type(out).__name__}; make the model return a "
        "tensor, or an object with .logits"
    )


class FeatureHooks:
    """Forward hooks that capture named intermediate activations of a model.

    `features` maps a name of your choice to a module path (`"layer3"`, `"blocks.10"`); the
    model itself is not edited. Captured tensors live until the next `clear()`.
    """

    def __init__(self, model: nn.Module, features: Mapping[str, str] | None) -> None:
        self.captured: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        self.features = dict(features or {})
        modules = dict(model.named_modules())
        missing = [path for path in self.features.values() if path not in modules]
        if missing:
            names = [n for n in modules if n][:40]
            raise ValueError(
                f"no module named {missing} in {type(model).__name__}; some of its module "
                f"names: {names}"
            )
        for name, path in self.features.items():
            self._handles.append(modules[path].register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.captured[name] = extract_output(output)

        return hook

    def pop(self) -> dict[str, Tensor]:
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class Teacher(nn.Module):
    """A frozen teacher that converts the student's batch into what it expects.

    Args:
        model: any `nn.Module`; its parameters are frozen and it stays in eval mode.
        input_size: the teacher's own resolution (int or (H, W)); None leaves inputs unresized
            (non-image inputs).
        mean, std: the teacher's normalisation in 0..1 pixel units; None means the teacher
            takes the student's normalisation as is.
        output: what the model's output is: "logits", "multilabel" (per-attribute logits) or
            "embedding".
        features: {name: module path} of intermediate activations to capture for feature
            methods (FitNets, AT).
        student_mean, student_std: the normalisation of the batches the loop feeds in.
        num_outputs, label_names, source, name: metadata, kept in `meta`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        output: OutputKind = "logits",
        features: Mapping[str, str] | None = None,
        student_mean: Sequence[float] = IMAGENET_MEAN,
        student_std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        num_outputs: int | None = None,
        label_names: Sequence[str] | None = None,
        source: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Teacher needs an nn.Module, got {type(model).__name__}")
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std for the teacher, or neither")
        if interpolation not in {"bilinear", "bicubic", "nearest", "area"}:
            raise ValueError(
                f"interpolation must be bilinear, bicubic, nearest or area, not {interpolation!r}"
            )
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.input_size = _pair(input_size) if input_size is not None else None
        self.output_kind: OutputKind = output
        self.interpolation = interpolation
        self.num_outputs = num_outputs
        self.label_names = list(label_names) if label_names is not None else None
        self.source = source
        self.name = name or type(model).__name__
        self.mean = tuple(float(v) for v in mean) if mean is not None else None
        self.std = tuple(float(v) for v in std) if std is not None else None
        self.student_mean = tuple(float(v) for v in student_mean)
        self.student_std = tuple(float(v) for v in student_std)
        if self.std is not None and any(s <= 0 for s in (*self.std, *self.student_std)):
            raise ValueError("std values must be > 0")
        # x_teacher = x_student * scale + shift: undo the student's normalisation, apply ours.
        # (1, C, 1, 1) non-persistent buffers: they follow .to(device) but stay out of checkpoints.
        scale, shift = self._affine()
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)
        self._identity_norm = bool(torch.all(scale == 1) and torch.all(shift == 0))
        self._hooks = FeatureHooks(self.model, features)

    def _affine(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            return torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
        if len(self.mean) != len(self.student_mean):
            raise ValueError(
                f"teacher mean has {len(self.mean)} channels, student mean "
                f"{len(self.student_mean)}: give matching normalisations"
            )
        tm, ts = torch.tensor(self.mean), torch.tensor(self.std)
        sm, ss = torch.tensor(self.student_mean), torch.tensor(self.student_std)
        return (ss / ts).view(1, -1, 1, 1), ((sm - tm) / ts).view(1, -1, 1, 1)

    @property
    def features(self) -> dict[str, str]:
        return dict(self._hooks.features)

    def add_features(self, features: Mapping[str, str]) -> None:
        """Capture more named activations (used by the Distiller for an objective's needs)."""
        merged = {**self._hooks.features, **features}
        self._hooks.remove()
        self._hooks = FeatureHooks(self.model, merged)

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "output": self.output_kind,
            "num_outputs": self.num_outputs,
            "label_names": self.label_names,
            "source": self.source,
        }

    def train(self, mode: bool = True) -> Teacher:
        # A teacher never trains: BatchNorm statistics and dropout stay in inference behaviour
        # even when a surrounding module calls .train().
        super().train(False)
        return self

    def convert(self, x: Tensor) -> Tensor:
        """Re-normalise and resize a student batch (B, C, H, W) into the teacher's format."""
        if x.dim() == 4:
            if not self._identity_norm:
                scale, shift = cast(Tensor, self._scale), cast(Tensor, self._shift)
                x = x * scale.to(x.dtype) + shift.to(x.dtype)
            if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
                down = x.shape[-2] > self.input_size[0] or x.shape[-1] > self.input_size[1]
                x = F.interpolate(
                    x,
                    size=self.input_size,
                    mode=self.interpolation,
                    **(
                        {"align_corners": False, "antialias": down}
                        if self.interpolation in {"bilinear", "bicubic"}
                        else {}
                    ),
                )
        return x

    def forward(self, x: Any, *, prepared: bool = False) -> Outputs:
        """Run the teacher on a student batch (or on `x` already prepared for it)."""
        with torch.inference_mode():
            inp = x if prepared or not isinstance(x, Tensor) else self.convert(x)
            self._hooks.pop()
            out = extract_output(self.model(inp))
            feats = self._hooks.pop()
        # Inference tensors cannot be saved for backward; the losses need plain tensors.
        return Outputs(out.clone(), {k: v.clone() for k, v in feats.items()})

    @torch.no_grad()
    def check_compatible(
        self, student: nn.Module, example_input: Any, *, same_dim: bool | None = None
    ) -> None:
        """Run one dry batch through both models and say which shapes disagree.

        `same_dim` (default: True except for embeddings, which a projection may map) requires
        the last output dimension to match.
        """
        was_training = student.training
        student.eval()
        try:
            s_out = extract_output(student(example_input))
        finally:
            student.train(was_training)
        t_out = self(example_input).output
        if same_dim is None:
            same_dim = self.output_kind != "embedding"
        if s_out.shape[0] != t_out.shape[0]:
            raise ValueError(
                f"student returned a batch of {s_out.shape[0]} but the teacher {t_out.shape[0]}"
            )
        if same_dim and s_out.shape[1:] != t_out.shape[1:]:
            what = {"logits": "classes", "multilabel": "attributes", "embedding": "dimensions"}
            raise ValueError(
                f"student output {tuple(s_out.shape)} does not match teacher output "
                f"{tuple(t_out.shape)} ({self.output_kind}): the student has "
                f"{s_out.shape[-1]} {what[self.output_kind]}, the teacher {t_out.shape[-1]}. "
                "Build the student with num_classes matching the teacher, or give the teacher "
                "a head for your label set (teachers.load(..., num_classes=N))."
            )
        if self.num_outputs is None:
            self.num_outputs = int(t_out.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, input_size={self.input_size}, output={self.output_kind!r}, "
            f"features={self.features}"
        )


def check_teacher_outputs(
    teacher: Teacher, expected: int, what: str, unit: str = "classes"
) -> None:
    """The teacher must produce one output per class/attribute of the dataset (`what`)."""
    n = teacher.num_outputs
    if n is not None and n != expected:
        raise ValueError(
            f"the teacher {teacher.name} has {n} outputs but {what} has {expected} {unit}: the "
            "teacher must have been trained on this label set. Point --teacher at such a "
            f"checkpoint, or add num_classes={expected} to the teacher options to replace its "
            "head (which re-initialises it: fine-tune it first)"
        )


def as_teacher(model: nn.Module | Teacher | None, **kwargs: Any) -> Teacher | None:
    """Wrap a bare module in a Teacher (pass-through for Teachers and None)."""
    if model is None or isinstance(model, Teacher):
        return model
    return Teacher(cast(nn.Module, model), **kwargs)
