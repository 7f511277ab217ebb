"""Cost of a model: mult-adds, parameters and (optionally) measured latency.

Mult-adds come from `torch.utils.flop_counter.FlopCounterMode`, which counts 2 FLOPs per
multiply-accumulate of convolutions and matrix products (so mult-adds = FLOPs / 2) and ignores
BatchNorm, activations and pooling, as the MobileNet paper does.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["Profile", "profile", "student_cost"]


@dataclass(frozen=True)
class Profile:
    """Cost of one model. `mult_adds` is per image; `latency_ms` is the median per batch."""

    mult_adds: int
    params: int
    trainable_params: int
    input_size: tuple[int, int, int]  # (C, H, W)
    batch_size: int = 1
    latency_ms: float | None = None
    device: str = "cpu"

    @property
    def mult_adds_m(self) -> float:
        return self.mult_adds / 1e6

    @property
    def params_m(self) -> float:
        return self.params / 1e6

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self) -> dict[str, str]:
        """Display strings, e.g. for a table: mult-adds and params in millions."""
        c, h, w = self.input_size
        return {
            "input": f"{c}x{h}x{w}",
            "mult_adds_M": f"{self.mult_adds_m:.1f}",
            "params_M": f"{self.params_m:.3f}",
            "trainable_M": f"{self.trainable_params / 1e6:.3f}",
            "latency_ms": "-" if self.latency_ms is None else f"{self.latency_ms:.2f}",
        }

    def __str__(self) -> str:
        r = self.row()
        text = (
            f"input {r['input']}: {r['mult_adds_M']}M mult-adds, {r['params_M']}M params "
            f"({r['trainable_M']}M trainable)"
        )
        if self.latency_ms is not None:
            text += f", {r['latency_ms']} ms per batch of {self.batch_size} on {self.device}"
        return text


def profile(
    model: nn.Module,
    input_size: int | Sequence[int] | None = None,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    latency: bool = False,
    warmup: int = 3,
    repeats: int = 10,
) -> Profile:
    """Count `model`'s mult-adds for one (C, H, W) input and its parameters; optionally time it.

    input_size: R (square), (H, W) or (C, H, W); None takes `model.pretrained_cfg["input_size"]`
    (our students and timm models carry one), else 224. Channels default to the model's.
    device: where to run (default: where the model's parameters are). The model is moved there
    for the measurement and moved back afterwards. It runs in eval mode under no_grad, and each
    module's train/eval mode is restored. A model on the "meta" device is counted without
    computing anything (latency needs a real device).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if latency and (warmup < 0 or repeats < 1):
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    size = _input_size(model, input_size)
    params = list(model.parameters())
    home = params[0].device if params else torch.device("cpu")
    run_on = torch.device(device) if device is not None else home
    if latency and run_on.type == "meta":
        raise ValueError("latency needs a real device; pass device='cpu' or 'cuda'")
    if run_on.type == "meta" and home.type != "meta":
        raise ValueError(
            "moving a model to the meta device would drop its weights; build it under "
            "`with torch.device('meta'):` instead, or profile it where it is"
        )
    dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    modes = {m: m.training for m in model.modules()}
    moved = run_on != home
    try:
        if moved:
            model.to(run_on)
        model.eval()
        x = torch.randn(batch_size, *size, device=run_on, dtype=dtype)
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                model(x)
            latency_ms = _time(model, x, warmup, repeats) if latency else None
    finally:
        if moved:
            model.to(home)
        for m, training in modes.items():
            m.training = training
    return Profile(
        mult_adds=counter.get_total_flops() // (2 * batch_size),
        params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        input_size=size,
        batch_size=batch_size,
        latency_ms=latency_ms,
        device=str(run_on),
    )


def _input_size(model: nn.Module, input_size: int | Sequence[int] | None) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None)
    cfg_size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if input_size is None:
        input_size = tuple(cfg_size) if cfg_size else 224
    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    dims = tuple(int(d) for d in input_size)
    if len(dims) == 2:
        dims = (_channels(model, cfg_size), *dims)
    if len(dims) != 3 or min(dims) < 1:
        raise ValueError(
            f"input_size must be R, (H, W) or (C, H, W) with positive sizes, got {input_size!r}"
        )
    return dims[0], dims[1], dims[2]


def _channels(model: nn.Module, cfg_size: Sequence[int] | None) -> int:
    if cfg_size:
        return int(cfg_size[0])
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first_conv.in_channels if first_conv is not None else 3


def _time(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    def sync() -> None:
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    for _ in range(warmup):
        model(x)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def student_cost(student: nn.Module, input_shape: Sequence[int] | None) -> dict[str, int | None]:
    """{"mult_adds", "params"} of `student` on one (C, H, W) input, for a run's record; None
    where they cannot be measured (no image input; a model FlopCounterMode cannot run). A
    finished run never fails over it: the problem is logged."""
    if input_shape is None or len(input_shape) != 3:
        return {"mult_adds": None, "params": None}
    try:
        prof = profile(student, tuple(input_shape))
        return {"mult_adds": int(prof.mult_adds), "params": int(prof.params)}
    except Exception as e:  # profiling is informative
        logging.getLogger(__name__).warning("could not profile the student: %s", e)
        return {"mult_adds": None, "params": sum(p.numel() for p in student.parameters())}
