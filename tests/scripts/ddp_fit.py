"""Launched by tests with `accelerate launch`: a tiny distillation run on N gloo ranks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distill import Distiller, DistillerConfig
from distill.losses import KDLoss
from tests.test_distiller import NoisyImages, tiny_student, tiny_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("output_dir")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--resume", default=None)
    args = ap.parse_args()
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    cfg = DistillerConfig(
        output_dir=args.output_dir,
        epochs=args.epochs,
        resume=args.resume,
        progress=False,
        log_every=1,
    )
    d = Distiller(student, tiny_teacher(), KDLoss(temperature=2.0, alpha=0.7), opt, config=cfg)
    d.fit(
        DataLoader(NoisyImages(), batch_size=8, shuffle=True),
        DataLoader(NoisyImages(16), batch_size=8),
    )
    assert not isinstance(d.teacher, nn.parallel.DistributedDataParallel)


if __name__ == "__main__":
    main()
