"""Offline distillation end to end: digits cached with random shifts, trained by the Distiller."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from distill.data.digits import load_digits_splits
from distill.data.teacher_cache import CachedDataset, ReplayableShifts, build_cache
from distill.distiller import Distiller, DistillerConfig
from distill.losses import KDLoss
from distill.teacher import Teacher


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


class Recording(CachedDataset):
    used: ClassVar[list[tuple[int, int]]] = []

    def draw_for(self, index: int) -> int:
        d = super().draw_for(index)
        self.used.append((self.epoch, d))
        return d


def test_distiller_replays_cached_draws_without_the_teacher(tmp_path: Path) -> None:
    train, _ = load_digits_splits(8, max_shift=1)
    data = ReplayableShifts(
        train.images[:16], train.targets[:16], max_shift=1, background=train.background
    )
    torch.manual_seed(0)
    teacher = Teacher(Tiny(16))
    cache = build_cache(
        teacher, data, tmp_path / "cache", crops=3, topk=4, batch_size=8, progress=False
    )
    # a different shift changes the teacher's answer: the cache must hold per-draw outputs
    i = next(i for i in range(16) if cache.params(i, 0) != cache.params(i, 1))
    assert not torch.equal(cache.logits(i, 0), cache.logits(i, 1))

    calls = []
    teacher.model.register_forward_hook(lambda *_: calls.append(1))
    ds = Recording(data, cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    student = Tiny(8)
    cfg = DistillerConfig(
        output_dir=str(tmp_path / "run"), epochs=3, progress=False, check_compatible=False,
        export_student=False, save_at_epoch_end=False,
    )  # fmt: skip
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    Distiller(student, teacher, KDLoss(temperature=4.0, alpha=0.9), opt, config=cfg).fit(loader)
    assert calls == []  # every batch carried teacher_logits
    assert sorted(set(Recording.used)) == [(0, 0), (1, 1), (2, 2)]  # epoch e replays draw e mod 3
