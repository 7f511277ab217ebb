"""One run of the demo through the Distiller, its teacher network, and what is measured."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.data.digits import DigitsDataset
from distill.demo.data import InMemoryLoader
from distill.tracking import RunInfo

EXPERIMENT = "digits-demo"
DATASET = "sklearn-digits"
TEACHER_NAME = "digits_cnn"
STUDENT_NAME = "mobilenet_v1"


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def digits_cnn(width: int = 64, num_classes: int = 10, dropout: float = 0.2) -> nn.Sequential:
    """The demo's teacher: six 3x3 conv-BN-ReLU layers (w, w, 2w, 2w, 4w, 4w channels) with
    two 2x2 max-pools, global average pooling and a linear head. At w=64: 1.14M parameters,
    more than any demo student; 9.5M mult-adds at 8 px, 38M at 16 px."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    w = width
    return nn.Sequential(
        *_conv_bn_relu(3, w),
        *_conv_bn_relu(w, w),
        nn.MaxPool2d(2),
        *_conv_bn_relu(w, 2 * w),
        *_conv_bn_relu(2 * w, 2 * w),
        nn.MaxPool2d(2),
        *_conv_bn_relu(2 * w, 4 * w),
        *_conv_bn_relu(4 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * w, num_classes),
    )


@dataclass
class TrainSettings:
    """How one model is trained: SGD with Nesterov momentum and a one-cycle schedule."""

    steps: int = 240  # optimizer steps (batches), whatever the training set's size
    batch_size: int = 64
    lr: float = 0.1
    weight_decay: float = 5e-4
    temperature: float = 4.0
    kd_weight: float = 0.9  # KDLoss alpha: weight of the teacher term

    def problems(self) -> list[str]:
        p = []
        if self.steps < 1:
            p.append(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            p.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            p.append(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            p.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.kd_weight <= 1:
            p.append(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        return p


@dataclass
class RunResult:
    """What a finished run reports: its metrics.json record plus demo-only measurements."""

    info: RunInfo
    record: dict[str, Any]
    model: nn.Module
    agreement: float | None = None  # % of test images where it predicts what the teacher does
    infer_images_per_s: float | None = None
    test_inputs: Tensor | None = None  # the test images at this model's resolution (shared)

    @property
    def error(self) -> float:
        return 100.0 - float(self.record["metrics"]["top1"])


def train_run(
    model: nn.Module,
    info: RunInfo,
    train: DigitsDataset,
    test: DigitsDataset,
    out_dir: str | Path,
    settings: TrainSettings,
    *,
    teacher: nn.Module | None = None,
    objective: nn.Module | None = None,
    report_to: Literal["none", "wandb"] = "none",
    wandb_dir: str | Path | None = None,
    project: str = "mobiledistill-demo",
) -> dict[str, Any]:
    """Train `model` with the Distiller and return the metrics.json record it wrote into
    `out_dir`: with `objective` (its learnable parameters train too), else KD from `teacher`
    if given, else cross-entropy."""
    from distill.distiller import Distiller, DistillerConfig
    from distill.losses import CrossEntropy, KDLoss

    bad = settings.problems()
    if bad:
        raise ValueError("invalid TrainSettings: " + "; ".join(bad))
    if objective is None:
        objective = (
            CrossEntropy()
            if teacher is None
            else KDLoss(temperature=settings.temperature, alpha=settings.kd_weight)
        )
    total = settings.steps
    optimizer = torch.optim.SGD(
        [*model.parameters(), *objective.parameters()],
        lr=settings.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=settings.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings.lr, total_steps=total, pct_start=0.15
    )
    run_info: dict[str, Any] = {
        k: v for k, v in asdict(info).items() if k != "seed" and v is not None
    }
    run_info.update(
        lr=settings.lr,
        batch_size=settings.batch_size,
        train_images=len(train),
        weight_decay=settings.weight_decay,
    )
    tracker_kwargs: dict[str, Any] = info.wandb_init_kwargs()
    if wandb_dir is not None:
        Path(wandb_dir).mkdir(parents=True, exist_ok=True)
        tracker_kwargs["dir"] = str(wandb_dir)
    config = DistillerConfig(
        output_dir=str(out_dir),
        max_steps=settings.steps,
        log_every=max(1, min(10, total // 4)),
        save_at_epoch_end=False,
        eval_at_epoch_end=False,
        keep_checkpoints=1,
        seed=info.seed,
        report_to=report_to,
        project=project,
        run_name=info.run_name(),
        progress=False,
        run_info=run_info,
        tracker_init_kwargs=tracker_kwargs,
    )
    distiller = Distiller(model, teacher, objective, optimizer, scheduler, config=config)
    distiller.fit(
        InMemoryLoader(train, settings.batch_size, train=True, seed=info.seed),
        InMemoryLoader(test, 256, train=False),
    )
    return dict(distiller.summary)


@torch.no_grad()
def predictions(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """argmax class of `model` (eval mode) for every image of x (N, C, H, W)."""
    was = model.training
    model.eval()
    try:
        return torch.cat(
            [_logits(model(x[i : i + batch_size])).argmax(-1) for i in range(0, len(x), batch_size)]
        )
    finally:
        model.train(was)


def _logits(out: Any) -> Tensor:
    from distill.types import Outputs

    return out.output if isinstance(out, Outputs) else out


def agreement(student: nn.Module, teacher: nn.Module, x: Tensor) -> float:
    """% of images where the student's top-1 class is the teacher's (`teacher` is a
    `distill.Teacher`, which resizes `x` to its own resolution)."""
    s = predictions(student, x)
    t = predictions(teacher, x)  # Teacher.forward returns Outputs
    return float((s == t).float().mean() * 100.0)


@torch.no_grad()
def measure_inference(
    results: Sequence[RunResult], *, rounds: int = 5, batch_size: int = 256
) -> None:
    """Set `infer_images_per_s` of every result: eval-mode throughput on a batch of its test
    images, the median over `rounds`. Architectures (model class, alpha, resolution) are timed
    once, round-robin, so that load from other processes hits all of them alike."""
    groups: dict[tuple[Any, ...], list[RunResult]] = {}
    inputs: dict[tuple[Any, ...], Tensor] = {}
    for r in results:
        if r.test_inputs is not None:
            key = (r.info.student, r.info.alpha, r.info.resolution, r.info.role == "teacher")
            groups.setdefault(key, []).append(r)
            inputs.setdefault(key, r.test_inputs[:batch_size])
    timed = [(rs[0].model, inputs[key]) for key, rs in groups.items()]
    times: list[list[float]] = [[] for _ in timed]
    modes = [m.training for m, _ in timed]
    try:
        for m, x in timed:
            m.eval()
            m(x)  # warm-up
        for _ in range(rounds):
            for i, (m, x) in enumerate(timed):
                t = time.perf_counter()
                m(x)
                times[i].append(time.perf_counter() - t)
    finally:
        for (m, _), mode in zip(timed, modes, strict=True):
            m.train(mode)
    for rs, (_, x), ts in zip(groups.values(), timed, times, strict=True):
        speed = len(x) / max(statistics.median(ts), 1e-9)
        for r in rs:
            r.infer_images_per_s = speed
