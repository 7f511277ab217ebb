"""Cross-entropy on labels alone: the from-scratch baseline every distilled run is compared to."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import Objective, as_float, check_class_target, check_fraction
from distill.types import Outputs


class CrossEntropy(Objective):
    """Parts: "ce". Needs no teacher (the Distiller may skip the teacher's forward)."""

    needs_teacher = False
    common_args: ClassVar[Mapping[str, str]] = {"label_smoothing": "label_smoothing"}

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = check_fraction("label_smoothing", label_smoothing, "typical: 0.1")

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        if target is None:
            raise ValueError(
                "CrossEntropy needs labels but the batch has no target: yield (input, target) "
                "batches, or distill from a teacher with KDLoss(alpha=1.0) for unlabelled data"
            )
        logits = as_float(student.output)
        if logits.dim() != 2:
            raise ValueError(f"logits must have shape (N, K), got {tuple(logits.shape)}")
        check_class_target(target, logits)
        if target.is_floating_point():
            target = as_float(target)
        ce = F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)
        return {"loss": ce, "ce": ce}

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}"
