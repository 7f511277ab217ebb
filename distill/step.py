"""What one training step is made of, apart from the loop that runs it: the student and the
objective as one module (so DDP syncs both), the checks that the optimizer holds what trains,
and the window of loss parts averaged into each log row."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill.guards import NonFiniteWatch
from distill.teacher import FeatureHooks, extract_output
from distill.types import Outputs

__all__ = [
    "FunctionObjective",
    "LossWindow",
    "StudentStep",
    "channels_last",
    "check_optimizer",
    "epoch_length",
    "total_steps",
]


class FunctionObjective(nn.Module):
    """Lets a plain function `(student, teacher, target) -> dict` serve as an objective."""

    def __init__(self, fn: Callable[..., dict[str, Tensor]]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, student: Outputs, teacher: Outputs | None, target: Any) -> dict[str, Tensor]:
        return self.fn(student, teacher, target)


class StudentStep(nn.Module):
    """Student + objective in one module, so DDP syncs the gradients of both (an objective
    may own parameters: FitNets adapters, embedding projections)."""

    def __init__(self, student: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.hooks = FeatureHooks(student, getattr(objective, "student_features", None))

    def forward(self, x: Any, teacher: Outputs | None, target: Any) -> dict[str, Tensor]:
        self.hooks.pop()
        out = Outputs(extract_output(self.student(x)), {})
        out.features = self.hooks.pop()
        parts = self.objective(out, teacher, target)
        if not isinstance(parts, dict) or "loss" not in parts:
            raise TypeError(
                f"objective {type(self.objective).__name__} must return a dict with a 'loss' "
                f"entry, got {type(parts).__name__}"
            )
        return parts


def channels_last(x: Any) -> Any:
    """A 4-D image batch in channels-last memory order; anything else as it is."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class LossWindow:
    """Loss parts summed since the last log row, and the run's first non-finite step."""

    watch: NonFiniteWatch
    sums: dict[str, Tensor] = field(default_factory=dict)
    n: int = 0

    def add(self, step: int, parts: dict[str, Tensor]) -> None:
        self.watch.record(step, parts)
        for k, v in parts.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1  # skipped batches (agreed by all ranks) are not averaged

    def take(self) -> tuple[dict[str, Tensor], int]:
        out, self.sums, n, self.n = self.sums, {}, self.n, 0
        return out, n


def check_optimizer(student: nn.Module, objective: nn.Module, optimizer: Any) -> None:
    """The optimizer must hold the student's and the objective's trainable parameters."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [
        n for n, p in objective.named_parameters() if p.requires_grad and id(p) not in in_opt
    ]
    if missing:
        raise ValueError(
            f"the objective has trainable parameters {missing[:5]} that are not in the "
            "optimizer: build it over list(student.parameters()) + list(objective.parameters())"
        )
    if not any(id(p) in in_opt for p in student.parameters()):
        raise ValueError("the optimizer holds none of the student's parameters")


def epoch_length(loader: Any) -> int:
    """Batches per epoch (0 for a stream, which has no length)."""
    try:
        return len(loader)
    except TypeError:
        return 0


def total_steps(loader: Any, config: Any) -> int:
    """Optimizer steps of a run: `config.max_steps`, else `epochs` over `loader`."""
    if config.max_steps is not None:
        return int(config.max_steps)
    try:
        n = len(loader)
    except TypeError:
        raise ValueError("this data loader has no length (streaming data): set max_steps") from None
    return int(config.epochs * math.ceil(n / config.grad_accum_steps))
