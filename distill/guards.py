"""Checks that stop a run early and say why: preflight of the output folder, and non-finite
losses and weights.

- `check_writable` and `preflight` run before any data or weights are read: an unwritable
  output folder, or a disk that cannot hold the checkpoints the run keeps, is an error then,
  not hours later. Recipes call the same functions.
- `NonFiniteWatch` records the first optimizer step whose loss was NaN/inf *on the device*
  (no host sync per step) and raises `NonFiniteLossError` naming the step, the loss parts and
  the last good checkpoint when the loop next looks (at log points, before saving).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill import checkpoint as ckpt

__all__ = [
    "NonFiniteLossError",
    "NonFiniteWatch",
    "all_finite",
    "check_weights_finite",
    "check_writable",
    "preflight",
]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the part and the last checkpoint."""


def check_writable(folder: str | Path, flag: str = "output_dir") -> Path:
    """Create `folder` and write a probe file in it; PermissionError naming `flag` if that fails."""
    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"cannot write to {flag} {out} ({e.strerror}); choose a writable folder"
        ) from None
    return out


def preflight(output_dir: str | Path, trained: nn.Module, exported: nn.Module, keep: int) -> None:
    """Fail before any work when `output_dir` cannot be written, or its disk cannot hold the
    checkpoints of `trained` the run will keep (an estimate: weights + two optimizer moments)
    plus the exported weights of `exported`."""
    out = check_writable(output_dir)
    exported_bytes = sum(
        t.numel() * t.element_size() for t in [*exported.parameters(), *exported.buffers()]
    )
    ckpt.check_free_space(
        out / "checkpoints", ckpt.estimate_bytes(trained), keep, extra=exported_bytes
    )


def _last_good(root: Path) -> str:
    last = ckpt.find_latest(root)
    return f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"


class NonFiniteWatch:
    """The first non-finite step and which loss parts were non-finite then, kept on `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.bad_step = torch.tensor(-1, device=device)
        self.bad_parts: dict[str, Tensor] = {}

    def record(self, step: int, parts: dict[str, Tensor]) -> None:
        """Note `parts` of optimizer step `step` (1-based); only the first bad step is kept."""
        newly_bad = (self.bad_step < 0) & ~torch.isfinite(parts["loss"].detach())
        # filled on the device: no host-to-device copy per step
        self.bad_step = torch.where(newly_bad, torch.full_like(self.bad_step, step), self.bad_step)
        for k, v in parts.items():
            prev = self.bad_parts.get(k)
            if prev is None:
                prev = torch.zeros((), dtype=torch.bool, device=self.device)
            self.bad_parts[k] = prev | (newly_bad & ~torch.isfinite(v.detach()))

    def raise_if_bad(self, checkpoints: Path, accelerator: Any = None) -> None:
        """Raise NonFiniteLossError if a non-finite step was recorded, on every process at once
        when one of them recorded it (one host sync; a gather under several processes)."""
        world = accelerator.num_processes if accelerator is not None else 1
        steps = [int(self.bad_step.item())]
        if world > 1:
            steps = [int(s) for s in accelerator.gather(self.bad_step.reshape(1)).tolist()]
        bad = [(s, rank) for rank, s in enumerate(steps) if s >= 0]
        if not bad:
            return
        step, rank = min(bad)
        names = [k for k, v in self.bad_parts.items() if bool(v)]
        if world > 1:
            import torch.distributed as dist

            everyone: list[Any] = [None] * world
            dist.all_gather_object(everyone, names)
            names = everyone[rank]
            where = f" on rank {rank} of {world} (ranks {', '.join(str(r) for _, r in bad)})"
        else:
            where = ""
        raise NonFiniteLossError(
            f"loss became non-finite at step {step} (parts: {', '.join(names or ['loss'])})"
            f"{where}; {_last_good(checkpoints)}. Lower the learning rate or temperature, check "
            "the inputs, or set on_nonfinite='skip' to drop such batches."
        )


def all_finite(loss: Tensor, accelerator: Any) -> bool:
    """Whether the loss is finite on every process (one gather: every process must agree, or
    DDP's gradient all-reduce would hang)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.gather(finite).min() >= 1)


def check_weights_finite(module: nn.Module, step: int, checkpoints: Path) -> None:
    """A finite loss can still end in an overflowing update: never save such weights."""
    params = [t.detach() for t in module.parameters()]
    if params and not bool(torch.stack([torch.isfinite(t).all() for t in params]).all()):
        raise NonFiniteLossError(
            f"the weights became non-finite at step {step} (parts: weights; the loss was "
            f"finite, the update overflowed); {_last_good(checkpoints)}. Lower the learning "
            "rate or set max_grad_norm."
        )
