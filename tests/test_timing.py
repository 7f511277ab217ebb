"""images/s counts training steps only: an evaluation that sleeps is reported as eval_s and
leaves the training rate alone (it made a small run's images/s 17x lower before)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch import Tensor
from torch.utils.data import DataLoader

from tests.test_distiller import NoisyImages, make


class SlowImages(NoisyImages):
    """An evaluation set whose every image takes 50 ms to load."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        time.sleep(0.05)
        return super().__getitem__(i)


def test_training_rate_leaves_out_evaluation_and_checkpoints(tmp_path: Path) -> None:
    d = make(tmp_path, max_steps=6, eval_every=1, save_every=1)
    d.fit(DataLoader(NoisyImages(), batch_size=8), DataLoader(SlowImages(8), batch_size=8))
    r = json.loads((tmp_path / "metrics.json").read_text())
    # 7 evaluations (one per step + the final one) of 8 images at >= 50 ms each
    assert r["eval_s"] >= 7 * 8 * 0.05
    assert r["checkpoint_s"] > 0 and r["train_s"] > 0
    # the rate is the timed steps' images over training time alone (steps 2..6: 5 x 8 images)
    assert abs(r["images_per_s"] * r["train_s"] - 5 * 8) < 1e-6 * 40
    assert r["train_s"] < r["wall_s"] - r["eval_s"]
    # what the old rate (all images over the wall time) would have said is far lower
    assert r["images_per_s"] > 3 * r["images_seen"] / r["wall_s"]
