"""Optimisers and learning-rate schedules in the published recipes' form.

    optimizer = make_optimizer(params, "sgd", lr=0.2, momentum=0.9, weight_decay=1e-4)
    scheduler = make_scheduler(optimizer, LRSchedule("step", lr_steps=[30, 60, 90]),
                               steps_per_epoch=spe, total_steps=total)

The scheduler is a `LambdaLR` stepped once per optimizer step by the Distiller, so its length is
in optimizer steps whatever the number of processes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "LRSchedule",
    "lr_factor",
    "make_optimizer",
    "make_scheduler",
    "steps_per_epoch",
]

OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["step", "cosine", "constant"]


@dataclass(frozen=True)
class LRSchedule:
    """step: lr *= gamma at each epoch of `lr_steps`; cosine: to 0 over the run; constant.
    A linear warm-up over `warmup_epochs` comes first in each case."""

    kind: ScheduleName = "step"
    lr_steps: Sequence[int] = field(default_factory=tuple)
    gamma: float = 0.1
    warmup_epochs: float = 0.0


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: OptimizerName,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """SGD (with momentum, optionally Nesterov) or AdamW over the trainable `params`."""
    trainable = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(
        trainable,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov and momentum > 0,
    )


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    schedule: str,
    lr_steps: Sequence[int],
    gamma: float,
    warmup_epochs: float,
) -> float:
    """The learning-rate multiplier after `step` optimizer steps."""
    warmup = warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        epoch = step / steps_per_epoch
        return float(gamma ** sum(1 for m in lr_steps if epoch >= m))
    if schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1.0, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    *,
    steps_per_epoch: int,
    total_steps: int,
) -> Any:
    """A LambdaLR following `schedule` (see `lr_factor`)."""

    def factor(step: int) -> float:
        return lr_factor(
            step,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
            schedule=schedule.kind,
            lr_steps=schedule.lr_steps,
            gamma=schedule.gamma,
            warmup_epochs=schedule.warmup_epochs,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(loader: Any, num_processes: int, grad_accum: int) -> int | None:
    """Optimizer steps in one epoch of `loader` split over `num_processes` (None: a stream)."""
    try:
        n = len(loader)
    except TypeError:
        return None
    return max(1, math.ceil(math.ceil(n / num_processes) / grad_accum))
