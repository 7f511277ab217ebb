"""Curriculum temperature (Li et al., AAAI 2023, "Curriculum Temperature for Knowledge
Distillation", CTKD): a learnable global temperature trained *against* the student.

The temperature is T = t_start + t_range · σ(p) for one learnable scalar p. The student
minimises the KD loss; p receives the reversed gradient through a gradient-reversal layer
(GRL, Ganin & Lempitsky 2015), −λ · ∂L/∂p, so T moves to make distillation harder. λ follows an
easy-to-hard cosine curriculum over the first `warmup_epochs` epochs,

    λ(e) = λ_max · (1 − cos(π · min(e, E) / E)) / 2        from 0 to λ_max,

which is the paper's λ_min + ½(λ_max − λ_min)(1 + cos((1 + min(e, E)/E)·π)) with λ_min = 0.

Read against the authors' code (zhengli97/CTKD: models/temp_global.py `Global_T`,
`GradientReversalFunction`; train_student.py `CosineDecay`; helper/loops.py):

- Their parameter starts at 1 and T = t_start + t_end · σ(p) with t_start=1, t_end=20 (t_end is
  a range: T lies in (1, 21)), so their first temperature is 1 + 20·σ(1) ≈ 15.62. Here the
  starting temperature is an argument (`initial`), and p starts at logit((initial − t_start) /
  t_range); `AUTHORS_INITIAL_TEMPERATURE` is theirs.
- Their GRL multiplies the gradient by a value that decays from decay_max=0 to decay_min=−1;
  here λ ≥ 0 and the GRL multiplies by −λ (the same number, with the sign in one place).
- Their λ is set once per epoch from the 1-based integer epoch (`for epoch in range(1, ...)`),
  E = decay_loops = 10 on CIFAR-100 and 5 on ImageNet. schedule="epoch" (the default) does the
  same from the loop's 0-based fractional epoch: e = floor(epoch) + 1, held for the epoch;
  schedule="step" uses e = epoch itself, updated every step (smoother, not what they ran).
- p sits in the same SGD parameter group as the student there, so their weight decay (5e-4 on
  CIFAR-100, 1e-4 on ImageNet) also pulls p towards 0, i.e. T towards t_start + t_range / 2.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.losses.base import check_non_negative, check_positive

LambdaSchedule = Literal["epoch", "step"]
LAMBDA_SCHEDULES: tuple[str, ...] = ("epoch", "step")
# the authors' Global_T starts its parameter at 1: T = 1 + 20·σ(1)
AUTHORS_INITIAL_TEMPERATURE = 1.0 + 20.0 / (1.0 + math.exp(-1.0))


class _GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by −λ."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lambda_: float) -> Tensor:
        ctx.lambda_ = lambda_
        return x.clone()  # a new tensor, so autograd records this node even for a leaf

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * (-ctx.lambda_), None


def reverse_gradient(x: Tensor, lambda_: float) -> Tensor:
    """x in the forward pass; −λ · (the gradient) in the backward pass (λ ≥ 0)."""
    return _GradientReversal.apply(x, float(lambda_))  # type: ignore[no-any-return]


def ctkd_lambda(
    epoch: float,
    *,
    lambda_max: float = 1.0,
    warmup_epochs: float = 10.0,
    schedule: LambdaSchedule = "epoch",
) -> float:
    """The GRL strength λ at the loop's 0-based fractional `epoch`: a cosine ramp from 0 to
    `lambda_max` over `warmup_epochs` (see the module docstring for the two schedules)."""
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(
            f"schedule must be one of {LAMBDA_SCHEDULES}, got {schedule!r}: 'epoch' is the "
            "authors' per-epoch value from the 1-based epoch, 'step' a per-step ramp from 0"
        )
    if warmup_epochs <= 0:
        return float(lambda_max)
    done = max(float(epoch), 0.0)
    e = math.floor(done) + 1.0 if schedule == "epoch" else done
    return float(lambda_max) * (1.0 - math.cos(math.pi * min(e / warmup_epochs, 1.0))) / 2.0


class CurriculumTemperature(nn.Module):
    """T = t_start + t_range · σ(GRL(p)): one learnable scalar p behind a gradient-reversal
    layer whose strength λ follows `ctkd_lambda`. Call `set_epoch` before each step (KDLoss's
    `on_progress` does); `forward()` returns T as a 0-dim tensor that carries p's gradient.

    p is a parameter of whichever objective holds this module: the optimizer must include
    `objective.parameters()` (the Distiller's check refuses to train otherwise).
    """

    def __init__(
        self,
        initial: float = AUTHORS_INITIAL_TEMPERATURE,
        *,
        t_start: float = 1.0,
        t_range: float = 20.0,
        lambda_max: float = 1.0,
        warmup_epochs: float = 10.0,
        schedule: LambdaSchedule = "epoch",
    ) -> None:
        super().__init__()
        self.t_start = check_positive("t_start", t_start, "the lowest temperature; CTKD uses 1")
        self.t_range = check_positive("t_range", t_range, "T lies in (t_start, t_start + t_range)")
        self.lambda_max = check_non_negative("lambda_max", lambda_max, "CTKD ramps λ up to 1")
        self.warmup_epochs = check_non_negative(
            "warmup_epochs", warmup_epochs, "epochs of the λ ramp: 10 on CIFAR-100, 5 on ImageNet"
        )
        ctkd_lambda(0.0, schedule=schedule)  # validates the name
        self.schedule: LambdaSchedule = schedule
        low, high = self.t_start, self.t_start + self.t_range
        if not isinstance(initial, (int, float)) or not low < initial < high:
            raise ValueError(
                f"the starting temperature must lie strictly between t_start={low:g} and "
                f"t_start + t_range={high:g}, got {initial!r}: the learned temperature is "
                f"t_start + t_range·σ(p) (the authors start at {AUTHORS_INITIAL_TEMPERATURE:.4f})"
            )
        u = (float(initial) - low) / self.t_range
        self.raw = nn.Parameter(torch.tensor(math.log(u / (1.0 - u))))  # p, 0-dim
        self.epoch: float | None = None

    def set_epoch(self, epoch: float) -> None:
        self.epoch = float(epoch)

    @property
    def lambda_(self) -> float:
        """The current GRL strength λ (needs `set_epoch`)."""
        if self.epoch is None:
            raise RuntimeError(
                "the curriculum temperature was never told the epoch: call "
                "objective.on_progress(step, epoch) before each step (the Distiller does)"
            )
        return ctkd_lambda(
            self.epoch,
            lambda_max=self.lambda_max,
            warmup_epochs=self.warmup_epochs,
            schedule=self.schedule,
        )

    def forward(self) -> Tensor:
        return self.t_start + self.t_range * torch.sigmoid(reverse_gradient(self.raw, self.lambda_))

    def extra_repr(self) -> str:
        return (
            f"t_start={self.t_start}, t_range={self.t_range}, lambda_max={self.lambda_max}, "
            f"warmup_epochs={self.warmup_epochs}, schedule={self.schedule!r}"
        )
