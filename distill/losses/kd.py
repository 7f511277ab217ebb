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

`standardize=True` is logit standardisation (Sun et al., CVPR 2024, "Logit Standardization in
Knowledge Distillation"; the authors' sunshangquan/logit-standardization-KD `normalize`, and
torchdistill's `LogitStdKDLoss`): each sample's logits are z-scored,
Z(z) = (z − mean(z)) / (std(z) + 1e-7) with the unbiased std, before the tempered softmax, so T
becomes a base temperature and the per-sample temperature is T·std. The T² factor stays (as in
the authors' code); the CE term uses the raw logits. The paper pairs it with a larger KD weight
(CIFAR-100: CE 0.1, KD 9; alpha here is a convex weight, so scale `loss` or the learning rate).

`learnable_temperature=True` is CTKD (Li et al., AAAI 2023, "Curriculum Temperature for
Knowledge Distillation"; see `distill.losses.ctkd`): T becomes t_start + t_range·σ(p) for a
learnable scalar p trained through a gradient-reversal layer (it *maximises* the KD loss) whose
strength follows a cosine curriculum over the first `ctkd_warmup_epochs` epochs. `temperature`
is then where the learned temperature starts (the authors start at 1 + 20·σ(1) ≈ 15.62,
`AUTHORS_INITIAL_TEMPERATURE`), and it stays the objective's `temperature` attribute, the value
the run record shows; "temperature" in the parts is the current one (logged, not a loss term).
p is a parameter of the objective: build the optimizer over list(student.parameters()) +
list(objective.parameters()) (the Distiller's check_optimizer refuses otherwise; the authors'
SGD applies the student's learning rate and weight decay to it). The authors' KD weights with
CTKD are CE 0.1 + KD 0.9 on CIFAR-100 and CE 1 + KD 1 on ImageNet (ResNet-34 -> ResNet-18,
scripts/run_imagenet_distill.sh), i.e. alpha=0.5 there with `loss` doubled. Combined with
`standardize=True` it is CTKD + logit standardisation (the LS authors' CTKD/ folder).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import ClassVar

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
from distill.losses.ctkd import CurriculumTemperature, LambdaSchedule
from distill.types import Outputs


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """(z − mean(z)) / (std(z) + eps) per row of (B, K), unbiased std (Sun et al. 2024)."""
    centred = logits - logits.mean(dim=1, keepdim=True)
    # the clamp keeps the gradient finite for tied logits (std 0); it changes std only below
    # 1e-12, where eps dominates the denominator
    var = centred.pow(2).sum(dim=1, keepdim=True) / max(logits.shape[1] - 1, 1)
    return centred / (var.clamp_min(1e-24).sqrt() + eps)


def _temperature(temperature: float | Tensor) -> float | Tensor:
    """A float T > 0, or a one-element floating tensor (a learned T, e.g. CTKD's) as 0-dim; a
    tensor's value is not checked (that would sync the host every step): its maker keeps it > 0."""
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1 or not temperature.is_floating_point():
            raise ValueError(
                "a tensor temperature must be one floating-point value (a learned global T), got "
                f"shape {tuple(temperature.shape)} {temperature.dtype}"
            )
        return temperature.reshape(())
    return check_positive("temperature", temperature, "try 1-8; Hinton et al. used up to 20")


def soft_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float | Tensor,
    standardize: bool = False,
) -> Tensor:
    """T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean; the teacher side is detached.
    `standardize=True` z-scores each row of logits first (logit standardisation). A 0-dim
    tensor `temperature` (a learned one) keeps its gradient."""
    t = _temperature(temperature)
    check_pair(student_logits, teacher_logits)
    s, tl = as_float(student_logits), as_float(teacher_logits).detach()
    if standardize:
        s, tl = standardize_logits(s), standardize_logits(tl)
    s_log = F.log_softmax(s / t, dim=1)  # (B, K)
    t_log = F.log_softmax(tl / t, dim=1)  # (B, K)
    return F.kl_div(s_log, t_log, reduction="batchmean", log_target=True) * (t * t)


def kd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float | Tensor,
    alpha: float,
    standardize: bool = False,
) -> dict[str, Tensor]:
    """{"loss", "kd" (T²·KL), "ce" (only when a target is given)}; see the module docstring."""
    check_fraction("alpha", alpha, "alpha weighs the teacher term, 1 − alpha the labels")
    kd = soft_kd_loss(
        student_logits, teacher_logits, temperature=temperature, standardize=standardize
    )
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
    temperature: float | Tensor,
    alpha: float,
    standardize: bool = False,
) -> Tensor:
    """alpha · T² · KL(softmax(t/T) ‖ softmax(s/T)) + (1 − alpha) · CE(s, target).

    Logits are (B, K); `target` holds class indices (B,) or class probabilities (B, K).
    `target=None` requires alpha=1.0 (pure teacher emulation); see the module docstring.
    """
    return kd_parts(
        student_logits,
        teacher_logits,
        target,
        temperature=temperature,
        alpha=alpha,
        standardize=standardize,
    )["loss"]


class KDLoss(Objective):
    """Hinton KD objective: parts "kd" (T²·KL) and "ce"; loss = alpha·kd + (1 − alpha)·ce.
    `standardize=True`: logit standardisation (Sun et al. 2024), T is then the base temperature.
    `learnable_temperature=True`: CTKD's curriculum temperature (module docstring), starting at
    `temperature`, with a learnable parameter (`objective.parameters()` must be optimised) and
    the extra logged entry "temperature"; the ctkd_* options are `CurriculumTemperature`'s."""

    common_args: ClassVar[Mapping[str, str]] = {"temperature": "temperature", "kd_weight": "alpha"}

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.9,
        *,
        standardize: bool = False,
        learnable_temperature: bool = False,
        ctkd_t_start: float = 1.0,
        ctkd_t_range: float = 20.0,
        ctkd_lambda_max: float = 1.0,
        ctkd_warmup_epochs: float = 10.0,
        ctkd_schedule: LambdaSchedule = "epoch",
    ) -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature, "try 1-8")
        self.alpha = check_fraction("alpha", alpha, "alpha weighs the teacher term")
        for name, flag in (
            ("standardize", standardize),
            ("learnable_temperature", learnable_temperature),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.standardize = standardize
        ctkd = {
            "ctkd_t_start": ctkd_t_start,
            "ctkd_t_range": ctkd_t_range,
            "ctkd_lambda_max": ctkd_lambda_max,
            "ctkd_warmup_epochs": ctkd_warmup_epochs,
            "ctkd_schedule": ctkd_schedule,
        }
        defaults = inspect.signature(KDLoss.__init__).parameters
        changed = sorted(k for k, v in ctkd.items() if v != defaults[k].default)
        if changed and not learnable_temperature:
            raise ValueError(
                f"{changed} set the learnable (CTKD) temperature, but learnable_temperature is "
                "False: pass learnable_temperature=True, or drop those options"
            )
        self.ctkd: CurriculumTemperature | None = None
        if learnable_temperature:
            self.ctkd = CurriculumTemperature(
                self.temperature,
                t_start=ctkd_t_start,
                t_range=ctkd_t_range,
                lambda_max=ctkd_lambda_max,
                warmup_epochs=ctkd_warmup_epochs,
                schedule=ctkd_schedule,
            )

    def on_progress(self, step: int, epoch: float) -> None:
        if self.ctkd is not None:
            self.ctkd.set_epoch(epoch)

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        temperature = self.temperature if self.ctkd is None else self.ctkd()
        parts = kd_parts(
            student.output,
            self._teacher(teacher).output,
            target,
            temperature=temperature,
            alpha=self.alpha,
            standardize=self.standardize,
        )
        if isinstance(temperature, Tensor):  # logged, not a loss term
            parts["temperature"] = temperature.detach()
        return parts

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, standardize={self.standardize}, "
            f"learnable_temperature={self.ctkd is not None}"
        )
