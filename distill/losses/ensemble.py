"""One objective per teacher of an ensemble: `PerTeacher`, for `distill.ensemble.Teachers`
with combine="losses", whose outputs carry each member's under the reserved feature names
"teacher0", "teacher1", ... (`member_key`); and the check of ensemble weights both use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from distill.losses.base import Objective
from distill.types import Outputs

__all__ = ["MEMBER_PREFIX", "PerTeacher", "check_weights", "is_member_key", "member_key"]

MEMBER_PREFIX = "teacher"


def member_key(i: int) -> str:
    """The reserved feature name of member i's output under combine="losses": "teacher<i>"."""
    return f"{MEMBER_PREFIX}{i}"


def is_member_key(name: str) -> bool:
    """Whether `name` is one of the reserved member names ("teacher0", "teacher1", ...)."""
    return name.startswith(MEMBER_PREFIX) and name[len(MEMBER_PREFIX) :].isdigit()


def check_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """The weights of `n` teachers, normalised to sum 1: equal ones for None, else one finite
    number > 0 per teacher, in member order."""
    if weights is None:
        return (1.0 / n,) * n
    values = list(weights)
    if len(values) != n:
        raise ValueError(
            f"got {len(values)} weights for {n} teachers: give one weight per teacher, in "
            "member order (or none, for equal weights)"
        )
    ok = [isinstance(w, (int, float)) and not isinstance(w, bool) for w in values]
    if not all(ok) or not all(math.isfinite(w) and w > 0 for w in values):
        raise ValueError(
            f"teacher weights must be finite numbers > 0, got {values}: leave a teacher out "
            "of the ensemble rather than giving it weight 0"
        )
    total = math.fsum(values)
    return tuple(float(w) / total for w in values)


class PerTeacher(Objective):
    """Σ_i w_i · objective(student, member i): one objective applied to each member's output of
    a `Teachers(combine="losses")` (its features "teacher0", "teacher1", ...).

    Every entry the inner objective returns is weighted and summed: "loss" is the weighted sum
    of the members' losses, and a part such as "kd" is the weighted mean (the weights sum to 1)
    of the members' unweighted kd terms, so it keeps base.py's meaning (the objective's own
    term, averaged over the teachers) and KDLoss's loss = alpha·kd + (1 − alpha)·ce still holds.
    An entry that does not depend on the teacher ("ce", a logged temperature) comes out as it
    is (up to rounding). The inner objective's `student_features`, `batch_keys` and
    `on_progress` are kept; it is reachable as `.inner` (the run record reports its method and
    temperature).
    """

    def __init__(self, objective: nn.Module, weights: Sequence[float]) -> None:
        super().__init__()
        if not isinstance(objective, nn.Module) or isinstance(objective, PerTeacher):
            raise TypeError(
                f"PerTeacher wraps one objective module (KDLoss(), ...), got "
                f"{type(objective).__name__}"
            )
        if getattr(objective, "teacher_features", None):
            raise ValueError(
                f"{type(objective).__name__} reads teacher features, and feature distillation "
                "from an ensemble is not defined: use an output method (KD, DKD, DIST, ...)"
            )
        values = list(weights)
        if not values:
            raise ValueError("PerTeacher needs one weight per member: pass teachers.weights")
        self.inner = objective
        self.weights = check_weights(values, len(values))
        self.student_features = dict(getattr(objective, "student_features", None) or {})
        self.batch_keys = tuple(getattr(objective, "batch_keys", ()))

    def on_progress(self, step: int, epoch: float) -> None:
        hook = getattr(self.inner, "on_progress", None)
        if callable(hook):
            hook(step, epoch)

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None, **extra: Any
    ) -> dict[str, Tensor]:
        t = self._teacher(teacher)
        shared = {k: v for k, v in t.features.items() if not is_member_key(k)}
        total: dict[str, Tensor] = {}
        for w, z in zip(self.weights, self._member_outputs(t)):
            for k, v in self.inner(student, Outputs(z, shared), target, **extra).items():
                total[k] = total[k] + w * v if k in total else w * v
        return total

    def _member_outputs(self, teacher: Outputs) -> list[Tensor]:
        keys = [k for k in teacher.features if is_member_key(k)]
        if not keys:
            raise ValueError(
                "PerTeacher reads each member's output from the teacher's features 'teacher0', "
                f"'teacher1', ..., and these teacher outputs have none (features: "
                f"{sorted(teacher.features) or 'none'}): use Teachers(..., combine='losses'), "
                "run online (a teacher cache keeps only the combined output: cache a "
                "combine='probs' ensemble and use the objective itself)"
            )
        expected = [member_key(i) for i in range(len(self.weights))]
        if sorted(keys) != sorted(expected):
            raise ValueError(
                f"PerTeacher has {len(self.weights)} weights but the teacher outputs hold "
                f"{len(keys)} members ({sorted(keys)}): give one weight per member, e.g. "
                "PerTeacher(objective, teachers.weights)"
            )
        return [teacher.features[k] for k in expected]

    def extra_repr(self) -> str:
        return "weights=(" + ", ".join(f"{w:.4g}" for w in self.weights) + ")"
