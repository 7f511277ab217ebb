"""Multi-label (face attribute) distillation: one temperature-softened sigmoid per attribute.

    soft = T² · mean over (B, A) of BCE(sigmoid(s/T), sigmoid(t/T))
    hard = mean over labelled entries of BCE(sigmoid(s), y)
    loss = alpha · soft + (1 − alpha) · hard

The soft term is binary cross-entropy with the teacher's softened probabilities as targets,
i.e. the per-attribute binary KL plus the teacher's entropy (a constant for the student), so it
does not reach 0 when the student matches; its gradient is T·(sigmoid(s/T) − sigmoid(t/T))/(B·A).

Labels are 0/1 (or probabilities in [0, 1]). CelebA's attribute file writes -1/1: map it with
(y + 1) / 2 in the data layer. Missing labels are excluded from the hard term through `mask`
(1 = labelled, 0 = missing; the target value there is ignored); the teacher term uses every
attribute, since the teacher has an opinion where the annotator had none. Label values are
checked on every call for CPU tensors, and on the first batch an objective sees on other devices
(checking every step there would cost a host sync).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import Objective, as_float, check_fraction, check_pair, check_positive
from distill.types import Outputs


def _check_labels(target: Tensor, logits: Tensor, mask: Tensor | None) -> Tensor:
    """Return a float mask (B, A); on CPU, raise on labels outside [0, 1] where labelled.

    On accelerators the value check would cost a host sync every step; the objectives run it
    on their first batch instead (see `check_label_values`).
    """
    if target.shape != logits.shape:
        raise ValueError(
            f"multi-label target must match the logits' shape {tuple(logits.shape)}, got "
            f"{tuple(target.shape)}"
        )
    if mask is None:
        m = torch.ones_like(logits)
    else:
        if mask.shape != logits.shape:
            raise ValueError(
                f"mask must match the logits' shape {tuple(logits.shape)}, got {tuple(mask.shape)}"
            )
        m = mask.to(logits.dtype)
    if target.device.type == "cpu":
        check_label_values(target, m)
    return m


def check_label_values(target: Tensor, mask: Tensor | None = None) -> None:
    """Raise unless labels are in [0, 1] wherever mask != 0 (training on -1 is silently wrong)."""
    y = target.float()
    labelled = torch.ones_like(y, dtype=torch.bool) if mask is None else mask != 0
    if bool((labelled & ((y < 0) | (y > 1) | torch.isnan(y))).any()):
        raise ValueError(
            "multi-label targets must be 0/1 (or probabilities in [0, 1]) wherever mask is 1; "
            "found values outside [0, 1]. CelebA's -1/1 labels: use (y + 1) / 2. Missing "
            "labels: pass mask=0 there (MultiLabelKDLoss(missing_label=-1) builds it)"
        )


def _masked_bce(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    y = torch.where(mask != 0, target.to(logits.dtype), torch.zeros_like(logits))
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # (B, A)
    # clamp: a batch with no labelled entry contributes 0 instead of 0/0
    return (per * mask).sum() / mask.sum().clamp_min(1.0)


def soft_multilabel_kd_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float
) -> Tensor:
    """T² · mean BCE(sigmoid(s/T), sigmoid(t/T)) over all (B, A) entries; teacher detached."""
    check_positive("temperature", temperature, "try 1-4")
    check_pair(student_logits, teacher_logits, what="attribute logits")
    t = float(temperature)
    s = as_float(student_logits) / t
    p_t = torch.sigmoid(as_float(teacher_logits).detach() / t).to(s.dtype)
    return F.binary_cross_entropy_with_logits(s, p_t) * (t * t)


def multilabel_bce_loss(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """BCE on 0/1 labels, averaged over the entries where mask is 1 (all when mask is None)."""
    s = as_float(logits)
    if s.dim() != 2:
        raise ValueError(f"attribute logits must have shape (N, A), got {tuple(s.shape)}")
    m = _check_labels(target, s, mask)
    return _masked_bce(s, target, m)


def multilabel_kd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """{"loss", "kd" (soft term), "bce" (hard term, only when a target is given)}."""
    check_fraction("alpha", alpha, "alpha weighs the teacher term")
    kd = soft_multilabel_kd_loss(student_logits, teacher_logits, temperature=temperature)
    if target is None:
        if alpha < 1.0:
            raise ValueError(
                f"target=None but alpha={alpha} gives the label term weight {1.0 - alpha:g}: "
                "pass the labels, or set alpha=1.0 for pure teacher emulation"
            )
        return {"loss": kd, "kd": kd}
    bce = multilabel_bce_loss(student_logits, target, mask)
    return {"loss": alpha * kd + (1.0 - alpha) * bce, "kd": kd, "bce": bce}


def multilabel_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float,
    alpha: float,
    mask: Tensor | None = None,
) -> Tensor:
    """alpha · T² · BCE(sigmoid(s/T), sigmoid(t/T)) + (1 − alpha) · masked BCE(s, y).

    Logits and target are (B, A); mask (B, A) is 1 where a label exists. `target=None`
    requires alpha=1.0. See the module docstring for the label format.
    """
    return multilabel_kd_parts(
        student_logits, teacher_logits, target, temperature=temperature, alpha=alpha, mask=mask
    )["loss"]


def _mask_from(target: Tensor, missing_label: float | None) -> Tensor | None:
    if missing_label is None:
        return None
    if missing_label != missing_label:  # NaN marks missing labels
        return (~torch.isnan(target)).to(torch.float32)
    return (target != missing_label).to(torch.float32)


class MultiLabelKDLoss(Objective):
    """Attribute KD: parts "kd" and "bce"; loss = alpha·kd + (1 − alpha)·bce.

    `missing_label`: the target value that marks a missing label (e.g. -1 if the data layer
    writes 0/1 labels and -1 for unknown, or float("nan")); those entries leave the hard term. None: every
    label must be present.
    """

    tasks: ClassVar[tuple[str, ...]] = ("multilabel",)
    common_args: ClassVar[Mapping[str, str]] = {"temperature": "temperature", "kd_weight": "alpha"}

    def __init__(
        self, temperature: float = 2.0, alpha: float = 0.9, missing_label: float | None = None
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature, "try 1-4")
        self.alpha = check_fraction("alpha", alpha, "alpha weighs the teacher term")
        if missing_label is not None and 0.0 <= missing_label <= 1.0:
            raise ValueError(
                f"missing_label={missing_label} collides with real labels in [0, 1]; use a value "
                "outside it, e.g. -1"
            )
        self.missing_label = missing_label
        self._labels_checked = False

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        mask = None if target is None else _mask_from(target, self.missing_label)
        if target is not None and not self._labels_checked:
            check_label_values(target, mask)  # once: every step would cost a host sync
            self._labels_checked = True
        return multilabel_kd_parts(
            student.output,
            self._teacher(teacher).output,
            target,
            temperature=self.temperature,
            alpha=self.alpha,
            mask=mask,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, "
            f"missing_label={self.missing_label}"
        )


class MultiLabelBCE(Objective):
    """From-scratch attribute baseline: part "bce"; needs no teacher."""

    needs_teacher = False
    tasks: ClassVar[tuple[str, ...]] = ("multilabel",)

    def __init__(self, missing_label: float | None = None) -> None:
        super().__init__()
        if missing_label is not None and 0.0 <= missing_label <= 1.0:
            raise ValueError(
                f"missing_label={missing_label} collides with real labels in [0, 1]; use e.g. -1"
            )
        self.missing_label = missing_label
        self._labels_checked = False

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        if target is None:
            raise ValueError("MultiLabelBCE needs attribute labels but the batch has no target")
        mask = _mask_from(target, self.missing_label)
        if not self._labels_checked:
            check_label_values(target, mask)  # once: every step would cost a host sync
            self._labels_checked = True
        bce = multilabel_bce_loss(student.output, target, mask)
        return {"loss": bce, "bce": bce}
