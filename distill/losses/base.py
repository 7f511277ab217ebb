"""The objective contract shared by every distillation method, and argument checks.

An objective maps one batch's student and teacher outputs to a dict with a required "loss"
(the scalar to back-propagate) and named parts for logging. By convention every part is the
*unweighted* term (e.g. "kd" = T²·KL, "ce" = cross-entropy) and "loss" is their weighted sum,
so a logged curve keeps its meaning when a weight changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from distill.types import Outputs


class Objective(nn.Module):
    """Base class: a distillation method is an objective, never a new training loop.

    Subclasses set `student_features` / `teacher_features` ({name: module path}) to ask the
    Distiller for hooked intermediate activations, which then arrive in `Outputs.features`
    under the same names. Objectives may own learnable parameters (adapters, projections):
    the optimizer must include `objective.parameters()`.
    """

    needs_teacher: bool = True
    # Batch entries besides the input and target that the objective reads (e.g. CRD's
    # dataset "index"): the loop passes them as keyword arguments to forward.
    batch_keys: tuple[str, ...] = ()
    # Buffers the objective keeps identical on every process itself (CRD's memory banks), which
    # DDP then does not broadcast before each forward.
    synced_buffers: tuple[str, ...] = ()
    # Whether some of the objective's parameters get no gradient in a step (then DDP must look
    # for unused parameters, which costs a graph traversal per step).
    ddp_unused_parameters: bool = False
    # The task kinds (distill.constants.TaskKind) whose students this objective trains.
    tasks: ClassVar[tuple[str, ...]] = ("logits",)
    # Which constructor argument each shared recipe setting sets (registry.COMMON_SETTINGS):
    # e.g. KD {"temperature": "temperature", "kd_weight": "alpha"}.
    common_args: ClassVar[Mapping[str, str]] = {}

    def __init__(self) -> None:
        super().__init__()
        self.student_features: dict[str, str] = {}
        self.teacher_features: dict[str, str] = {}

    def forward(  # type: ignore[override]
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def __call__(  # type: ignore[override]
        self,
        student: Outputs,
        teacher: Outputs | None,
        target: Tensor | None = None,
        **extra: Any,
    ) -> dict[str, Tensor]:
        return super().__call__(student, teacher, target, **extra)  # type: ignore[no-any-return]

    @classmethod
    def from_models(
        cls, student: nn.Module, teacher: nn.Module | None, **options: Any
    ) -> Objective:
        """Build the objective for this student/teacher pair. Feature methods override it to
        read the default stage maps (`distill.models.stages`) for module paths and channels
        (the teacher may be a `distill.Teacher`, whose `.model` is read); the others take
        `options` as they are."""
        return cls(**options)

    def on_progress(self, step: int, epoch: float) -> None:
        """Called by the loop before every optimisation step (epoch is fractional)."""

    def _teacher(self, teacher: Outputs | None) -> Outputs:
        if teacher is None:
            raise ValueError(
                f"{type(self).__name__} needs teacher outputs but got teacher=None: pass a Teacher "
                "to the Distiller (or cached teacher outputs), or use CrossEntropy() to train "
                "from scratch"
            )
        return teacher


def feature(outputs: Outputs, name: str, side: str, path: str) -> Tensor:
    """Fetch a hooked feature by name with an error that says how to provide it."""
    try:
        return outputs.features[name]
    except KeyError:
        have = sorted(outputs.features) or "none"
        raise KeyError(
            f"the {side}'s feature '{name}' (module '{path}') is missing; captured features: "
            f"{have}. Hook it: {side}_features={{'{name}': '{path}'}} (the Distiller reads "
            "objective.student_features / objective.teacher_features)"
        ) from None


def as_float(x: Tensor) -> Tensor:
    """Half/bfloat16 -> float32; float32/float64 stay as they are (losses never run in 16 bit)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    if not x.is_floating_point():
        raise TypeError(f"expected floating-point outputs, got dtype {x.dtype}")
    return x


@contextmanager
def full_precision(x: Tensor) -> Iterator[None]:
    """Disable autocast around learnable layers inside a loss (adapters, projections)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def check_positive(name: str, value: float, hint: str = "") -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}{extra}")
    return float(value)


def check_non_negative(name: str, value: float, hint: str = "") -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}{extra}")
    return float(value)


def check_fraction(name: str, value: float, hint: str = "") -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        extra = f" ({hint})" if hint else ""
        raise ValueError(f"{name} must lie in [0, 1], got {value!r}{extra}")
    return float(value)


def check_pair(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    """Student and teacher outputs must both be (N, K) with the same N and K."""
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 2:
            raise ValueError(
                f"{side} {what} must have shape (N, K), got {tuple(x.shape)}; flatten extra "
                "dimensions into N first (e.g. x.flatten(0, -2))"
            )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher {what} have different batch sizes: {student.shape[0]} vs "
            f"{teacher.shape[0]}; feed both models the same batch"
        )
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"student {what} have {student.shape[1]} outputs but the teacher's have "
            f"{teacher.shape[1]}: build the student with num_classes={teacher.shape[1]}, or "
            "map the teacher's classes onto the student's before distilling"
        )


def check_class_target(target: Tensor, logits: Tensor) -> None:
    """Hard labels (N,) in [0, K) or soft labels (N, K) (e.g. from mixup).

    The label range is checked for CPU tensors only: on an accelerator the check would cost a
    host sync every step, and the device's own assert fires instead (the data layer validates
    labels when it reads them).
    """
    n, k = logits.shape
    if target.dim() == 1 and not target.is_floating_point():
        if target.shape[0] != n:
            raise ValueError(f"target has {target.shape[0]} labels for a batch of {n} logits")
        on_cpu = target.device.type == "cpu"
        if on_cpu and target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
            raise ValueError(
                f"class labels must lie in [0, {k}), got range [{int(target.min())}, "
                f"{int(target.max())}]: check the dataset's label mapping or num_classes"
            )
        return
    if target.shape == logits.shape and target.is_floating_point():
        return
    raise ValueError(
        f"target must be class indices (N,) of an integer dtype or class probabilities (N, K) "
        f"matching logits {tuple(logits.shape)}; got {tuple(target.shape)} {target.dtype}"
    )
