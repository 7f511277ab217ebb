"""`--report-to tensorboard` through accelerate's tracker: a real recipe run writes TensorBoard
event files under its run folder, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_recipes_common import TINY_TEACHER_OPTIONS, save_teacher, tiny_args


def test_recipe_logs_to_tensorboard_offline(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from recipes.imagenet import main
    from tests.datagen import make_imagenet

    root = tmp_path / "imnet"
    make_imagenet(root, n_classes=2, per_class=4, val_per_class=2, size=32)
    teacher = save_teacher(tmp_path / "t.safetensors", 2)
    out = tmp_path / "run"
    args = [
        "--data-dir", str(root), "--teacher", f"file:{teacher}",
        "--teacher-options", TINY_TEACHER_OPTIONS, *tiny_args(out, steps=3),
        "--report-to", "tensorboard",
    ]  # fmt: skip
    assert main(args) == 0
    events = sorted((out / "mobiledistill").glob("events.out.tfevents.*"))
    assert events, sorted(p.name for p in out.rglob("*"))
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/kd", "train/lr", "eval/top1"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
