"""Decoupled knowledge distillation (Zhao et al., CVPR 2022).

KD splits into a target-class term and a non-target-class term:

    TCKD = T² · KL(b_t ‖ b_s),  b = (p_gt, 1 − p_gt) from softmax(z/T)      (binary)
    NCKD = T² · KL(p̂_t ‖ p̂_s),  p̂ = softmax over the non-target classes of z/T
    dkd  = alpha · TCKD + beta · NCKD                                        (batch means)

computed from log-softmax/log-sum-exp values (never log of a probability), so logits of ±1e4
stay finite (mdistiller masks the target logit by subtracting 1000 instead; the two agree for
logits of ordinary size). Published settings (megvii-research/mdistiller, the authors' code):
CIFAR-100 alpha=1, T=4, warm-up 20 epochs, beta=8 (2 or 6 for some pairs, configs/cifar100/dkd/);
ImageNet T=1, warm-up 1 epoch, beta=0.5 for ResNet-34 -> ResNet-18
(configs/imagenet/r34_r18/dkd.yaml) and beta=2 for ResNet-50 -> MobileNetV1
(configs/imagenet/r50_mv1/dkd.yaml).

`DKDLoss` adds cross-entropy and warms the DKD term up over `warmup_epochs`. The default,
warmup_schedule="epoch", follows mdistiller: factor = min(e / warmup_epochs, 1) with e the
integer epoch counted from 1 and held for the whole epoch, so warmup_epochs=1 gives full DKD from
the first step and 20 gives 1/20 in the first epoch. The loop reports a 0-based fractional epoch
through `on_progress` (the Distiller: epoch + batch / batches per epoch), so e = floor(epoch) + 1.
warmup_schedule="linear" ramps per step instead, min(epoch / warmup_epochs, 1) from 0 at the
first step: smoother, but not the schedule the published numbers used. Forgetting to report
progress raises instead of silently training without the DKD term.

`standardize=True` is DKD with logit standardisation (Sun et al., CVPR 2024, "Logit
Standardization in Knowledge Distillation"; their sunshangquan/logit-standardization-KD
mdistiller/distillers/DKD.py): student and teacher logits are z-scored per sample
(`distill.losses.kd.standardize_logits`, the same function as KD's) before everything above,
the target/non-target split included; the cross-entropy keeps the raw logits. Their command
line (tools/train.py --logit-stand --base-temp 2 --kd-weight 9) then sets T = 2 and multiplies
alpha and beta by 9 (CIFAR-100: alpha=9, beta=72 for beta 8); the repository has no separate
ImageNet DKD+LS config, where the same flags on configs/imagenet/r50_mv2/dkd.yaml (beta 2,
T 1, warm-up 1, CE 1) would give alpha=9, beta=18, T=2.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import (
    Objective,
    as_float,
    check_class_target,
    check_non_negative,
    check_pair,
    check_positive,
)
from distill.losses.kd import standardize_logits
from distill.types import Outputs

WarmupSchedule = Literal["epoch", "linear"]
WARMUP_SCHEDULES: tuple[str, ...] = ("epoch", "linear")


def _non_target(z: Tensor, target: Tensor) -> Tensor:
    """(B, K) -> (B, K − 1): every column but the target's, in class order (no host sync)."""
    b, k = z.shape
    cols = torch.arange(k - 1, device=z.device).expand(b, k - 1)
    cols = cols + (cols >= target.unsqueeze(1)).long()  # skip the target column
    return z.gather(1, cols)


def dkd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 4.0,
    standardize: bool = False,
) -> dict[str, Tensor]:
    """{"tckd", "nckd"}, each T²-scaled and averaged over the batch; `standardize=True`
    z-scores each row of both logits first (logit standardisation)."""
    check_positive("temperature", temperature, "DKD uses 4 on CIFAR-100, 1 on ImageNet")
    check_pair(student_logits, teacher_logits)
    k = student_logits.shape[1]
    if k < 2:
        raise ValueError(f"DKD needs at least 2 classes, the logits have {k}")
    if target is None or target.dim() != 1 or target.is_floating_point():
        raise ValueError(
            "DKD needs hard class labels (N,) of an integer dtype to split the target class "
            "from the others; soft/mixup labels are not supported: use KDLoss instead"
        )
    check_class_target(target, student_logits)
    t = float(temperature)
    target = target.long()
    s, tl = as_float(student_logits), as_float(teacher_logits).detach()
    if standardize:
        s, tl = standardize_logits(s), standardize_logits(tl)
    parts = {}
    for side, logits in (("s", s), ("t", tl)):
        z = logits / t  # (B, K)
        lse_all = torch.logsumexp(z, dim=1)  # (B,)
        others = _non_target(z, target)  # (B, K-1)
        log_gt = z.gather(1, target.unsqueeze(1)).squeeze(1) - lse_all  # log p_gt
        log_rest = torch.logsumexp(others, dim=1) - lse_all  # log (1 - p_gt)
        parts[side + "_bin"] = torch.stack([log_gt, log_rest], dim=1)  # (B, 2)
        parts[side + "_nt"] = F.log_softmax(others, dim=1)  # (B, K-1)
    tckd = F.kl_div(parts["s_bin"], parts["t_bin"], reduction="batchmean", log_target=True)
    nckd = F.kl_div(parts["s_nt"], parts["t_nt"], reduction="batchmean", log_target=True)
    return {"tckd": tckd * (t * t), "nckd": nckd * (t * t)}


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    standardize: bool = False,
) -> Tensor:
    """alpha · TCKD + beta · NCKD (both T²-scaled, batch mean); logits (B, K), target (B,).
    `standardize=True`: on z-scored logits (logit standardisation)."""
    check_non_negative("alpha", alpha, "the TCKD weight; the paper uses 1")
    check_non_negative(
        "beta",
        beta,
        "the NCKD weight; 8 on CIFAR, 0.5 (R34->R18) or 2 (R50->MobileNetV1) on ImageNet",
    )
    p = dkd_parts(
        student_logits, teacher_logits, target, temperature=temperature, standardize=standardize
    )
    return alpha * p["tckd"] + beta * p["nckd"]


class DKDLoss(Objective):
    """DKD objective; parts "ce", "tckd", "nckd";
    loss = ce_weight·ce + warm-up factor·(alpha·tckd + beta·nckd), the warm-up factor by
    default mdistiller's (see the module docstring; `warmup_factor` is the current value).
    `standardize=True`: tckd and nckd on z-scored logits (logit standardisation), ce on raw.
    """

    common_args: ClassVar[Mapping[str, str]] = {"temperature": "temperature"}

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 8.0,
        temperature: float = 4.0,
        *,
        ce_weight: float = 1.0,
        warmup_epochs: float = 20.0,
        warmup_schedule: WarmupSchedule = "epoch",
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.alpha = check_non_negative("alpha", alpha, "the TCKD weight; the paper uses 1")
        self.beta = check_non_negative(
            "beta", beta, "the NCKD weight; 8 on CIFAR, 0.5 or 2 on ImageNet"
        )
        self.temperature = check_positive("temperature", temperature, "the paper uses 4 or 1")
        self.ce_weight = check_non_negative("ce_weight", ce_weight)
        self.warmup_epochs = check_non_negative(
            "warmup_epochs", warmup_epochs, "0 disables the warm-up; 20 on CIFAR, 1 on ImageNet"
        )
        if warmup_schedule not in WARMUP_SCHEDULES:
            raise ValueError(
                f"warmup_schedule must be one of {WARMUP_SCHEDULES}, got {warmup_schedule!r}: "
                "'epoch' is mdistiller's min(epoch / warmup_epochs, 1) with the epoch counted "
                "from 1, 'linear' a per-step ramp from 0"
            )
        self.warmup_schedule: WarmupSchedule = warmup_schedule
        if not isinstance(standardize, bool):
            raise TypeError(f"standardize must be True or False, got {standardize!r}")
        self.standardize = standardize
        self.epoch: float | None = None

    def on_progress(self, step: int, epoch: float) -> None:
        self.epoch = float(epoch)

    @property
    def warmup_factor(self) -> float:
        if self.warmup_epochs == 0:
            return 1.0
        if self.epoch is None:
            raise RuntimeError(
                f"DKDLoss(warmup_epochs={self.warmup_epochs:g}) was never told the epoch: call "
                "objective.on_progress(step, epoch) before each step (the Distiller does), or "
                "pass warmup_epochs=0"
            )
        done = max(self.epoch, 0.0)  # 0-based, fractional
        if self.warmup_schedule == "epoch":  # mdistiller: the 1-based integer epoch, whole epochs
            return min((math.floor(done) + 1) / self.warmup_epochs, 1.0)
        return min(done / self.warmup_epochs, 1.0)

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        if target is None:
            raise ValueError("DKD needs class labels but the batch has no target")
        s = student.output
        p = dkd_parts(
            s,
            self._teacher(teacher).output,
            target,
            temperature=self.temperature,
            standardize=self.standardize,
        )
        ce = F.cross_entropy(as_float(s), target.long())  # raw logits, also when standardized
        dkd = self.alpha * p["tckd"] + self.beta * p["nckd"]
        loss = self.ce_weight * ce + self.warmup_factor * dkd
        return {"loss": loss, "ce": ce, "tckd": p["tckd"], "nckd": p["nckd"]}

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}, "
            f"ce_weight={self.ce_weight}, warmup_epochs={self.warmup_epochs}, "
            f"warmup_schedule={self.warmup_schedule!r}, standardize={self.standardize}"
        )
