"""`recipes/imagenet.py` with faults injected from the outside, for the fault suite.

The library has no fault hooks: this script wraps what the recipe calls, then runs it.

- `PAUSE_BEFORE_RENAME=SECONDS@STEP`: the main process sleeps SECONDS after checkpoint STEP's
  files (manifest included) are written into `.tmp-step_*`, before the rename that publishes it
  (it wraps `distill.checkpoint._move_into_place`), so a kill lands mid-write deterministically.
- `POISON=STEP:PART`: loss part PART (and so the total loss) is NaN while optimizer step STEP
  is computed (it wraps the recipe's objective, see `PoisonedObjective`).

    accelerate launch tests/scripts/faulty_recipe.py RECIPE ARGS...
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PAUSE_ENV = "PAUSE_BEFORE_RENAME"
POISON_ENV = "POISON"


class PoisonedObjective(nn.Module):
    """Wraps an objective: on its `step`-th training call, loss part `part` becomes NaN (and
    so does the total). Attributes of the wrapped objective (features, schedules) show through."""

    def __init__(self, objective: nn.Module, step: int, part: str) -> None:
        super().__init__()
        self.inner = objective
        self.at, self.part, self.calls = step, part, 0

    def forward(self, *args: Any) -> dict[str, Tensor]:
        parts = self.inner(*args)
        self.calls += 1
        if self.calls != self.at:
            return parts
        if self.part not in parts:
            raise KeyError(f"no loss part {self.part!r}; parts: {sorted(parts)}")
        bad = parts[self.part] * torch.tensor(float("nan"))
        loss = parts["loss"] + bad if self.part != "loss" else bad
        return {**parts, self.part: bad, "loss": loss}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def poison_build(module: Any, step: int, part: str) -> None:
    """Make `module.build` (a recipe's) return its objective wrapped in PoisonedObjective."""
    build = module.build

    def poisoned(cfg: Any, ctx: Any) -> Any:
        parts = build(cfg, ctx)
        parts.objective = PoisonedObjective(parts.objective, step, part)
        return parts

    module.build = poisoned


def pause_before_rename(seconds: float, step: int) -> None:
    from distill import checkpoint

    move = checkpoint._move_into_place

    def paused(tmp: Path, final: Path) -> None:
        if final.name == checkpoint.step_dir(final.parent, step).name:
            time.sleep(seconds)
        move(tmp, final)

    checkpoint._move_into_place = paused  # type: ignore[assignment]


def main() -> int:
    import recipes.imagenet as recipe

    if os.environ.get(PAUSE_ENV):
        seconds, _, step = os.environ[PAUSE_ENV].partition("@")
        pause_before_rename(float(seconds), int(step))
    if os.environ.get(POISON_ENV):
        step, _, part = os.environ[POISON_ENV].partition(":")
        poison_build(recipe, int(step), part or "loss")
    return recipe.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
