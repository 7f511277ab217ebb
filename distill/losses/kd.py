"""Hinton knowledge distillation on logits (Hinton, Vinyals & Dean, 2015).

Convention (the same as timm's `LogitDistillationTask`):

    soft = T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch ("batchmean")
    loss = alpha · soft + (1 − alpha) · CE(s, target)

computed as `kl_div(log_softmax(s/T), log_softmax(t/T), reduction="batchmean",
log_target=True) * T**2`. The T² factor keeps the soft term's gradient,
alpha·T·(softmax(s/T) − softmax(t/T))/B, on the same scale for every temperature.

`alpha` is the weight of the teacher term (torchdistill calls the CE weight alpha; map theirs
as alpha_td = 1 − alpha, beta_td = alpha). `target=None` is pure teacher emulation on
unlabelled data and requires alpha == 1: with alpha < 1 it raises instead of silently
re-weighting the terms.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import (
    Objective,
    as_float,
    check_class_target,
    check_fraction,
    check_pair,
    check_positive,
)
from distill.types import Outputs


def soft_kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean; the teacher side is detached."""
    check_positive("temperature", temperature, "try 1-8; Hinton et al. used up to 20")
    check_pair(student_logits, teacher_logits)
    t = float(temperature)
    s_log = F.log_softmax(as_float(student_logits) / t, dim=1)  # (B, K)
    t_log = F.log_softmax(as_float(teacher_logits).detach() / t, dim=1)  # (B, K)
    return F.kl_div(s_log, t_log, reduction="batchmean", log_target=True) * (t * t)


def kd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
) -> dict[str, Tensor]:
    """{"loss", "kd" (T²·KL), "ce" (only when a target is given)}; see the module docstring."""
    check_fraction("alpha", alpha, "alpha weighs the teacher term, 1 − alpha the labels")
    kd = soft_kd_loss(student_logits, teacher_logits, temperature=temperature)
    if target is None:
        if alpha < 1.0:
            raise ValueError(
                f"target=None (unlabelled data) but alpha={alpha} gives the label term weight "
                f"{1.0 - alpha:g}: pass the labels, or set alpha=1.0 for pure teacher emulation"
            )
        return {"loss": kd, "kd": kd}
    check_class_target(target, student_logits)
    s = as_float(student_logits)
    ce = F.cross_entropy(s, target if not target.is_floating_point() else as_float(target))
    return {"loss": alpha * kd + (1.0 - alpha) * ce, "kd": kd, "ce": ce}


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
) -> Tensor:
    """alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, target).

    Logits are (B, K); `target` holds class indices (B,) or class probabilities (B, K).
    `target=None` requires alpha=1.0 (pure teacher emulation); see the module docstring.
    """
    return kd_parts(student_logits, teacher_logits, target, temperature=temperature, alpha=alpha)[
        "loss"
    ]


class KDLoss(Objective):
    """Hinton KD objective: parts "kd" (T²·KL) and "ce"; loss = alpha·kd + (1 − alpha)·ce."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature, "try 1-8")
        self.alpha = check_fraction("alpha", alpha, "alpha weighs the teacher term")

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        return kd_parts(
            student.output,
            self._teacher(teacher).output,
            target,
            temperature=self.temperature,
            alpha=self.alpha,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
