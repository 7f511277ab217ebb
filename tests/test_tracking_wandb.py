"""A real offline W&B run through accelerate, read back from its `.wandb` file."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.tracking import (
    RunInfo,
    log_summary,
    read_wandb_run,
    summary_fields,
)

pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    yield tmp_path
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_offline_run_through_accelerate_reads_back(offline_wandb: Path) -> None:
    from accelerate import Accelerator

    info = RunInfo(
        experiment="digits-ab",
        role="distilled",
        method="kd",
        student="mobilenet_v1",
        dataset="digits",
        teacher="resnet18",
        alpha=0.5,
        resolution=16,
        temperature=4.0,
        kd_weight=0.9,
        seed=1,
    )
    # A long config value spans several 32 KiB blocks of the log (FIRST/MIDDLE/LAST chunks).
    notes = "x" * 70_000
    accelerator = Accelerator(log_with="wandb", cpu=True)
    accelerator.init_trackers(
        "mobiledistill-test",
        config=info.config({"lr": 0.05, "notes": notes}),
        init_kwargs={"wandb": {**info.wandb_init_kwargs(), "dir": str(offline_wandb)}},
    )
    for step in range(5):
        accelerator.log(
            {"train/loss": 2.0 / (step + 1), "train/kd": 1.0 / (step + 1), "train/lr": 0.05},
            step=step,
        )
    accelerator.log({"eval/top1": 71.5, "eval/loss": 0.9}, step=5)
    log_summary(
        accelerator,
        summary_fields(
            {"top1": 71.5},
            mult_adds=1_234_567,
            params=45_678,
            images_per_s=321.0,
            peak_mem_bytes=4096,
            teacher_metrics={"top1": 90.0},
        ),
    )
    accelerator.end_training()

    runs = list(offline_wandb.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    run = read_wandb_run(runs[0], wait_s=30)  # wandb-core may still be flushing the file

    assert run["project"] == "mobiledistill-test"
    assert run["group"] == "digits-ab" and run["job_type"] == "distilled"
    assert run["name"] == "distilled-kd-mobilenet_v1-a0.5-r16-T4-w0.9-s1"
    assert set(run["tags"]) == set(info.tags())
    cfg = run["config"]
    for key in ("experiment", "role", "method", "student", "teacher", "dataset", "seed"):
        assert cfg[key] == getattr(info, key)
    assert cfg["alpha"] == 0.5 and cfg["resolution"] == 16 and cfg["temperature"] == 4.0
    assert cfg["kd_weight"] == 0.9 and cfg["lr"] == 0.05 and cfg["notes"] == notes

    train = [r for r in run["history"] if "train/loss" in r]
    assert [r["_step"] for r in train] == [0, 1, 2, 3, 4]
    assert [r["train/loss"] for r in train] == pytest.approx([2.0, 1.0, 2 / 3, 0.5, 0.4])
    assert all(r["train/lr"] == 0.05 for r in train)
    evals = [r for r in run["history"] if "eval/top1" in r]
    assert len(evals) == 1 and evals[0]["_step"] == 5 and evals[0]["eval/loss"] == 0.9

    summary = run["summary"]
    assert summary["mult_adds"] == 1_234_567 and summary["params"] == 45_678
    assert summary["images_per_s"] == 321.0 and summary["peak_mem"] == 4096
    assert summary["eval/top1"] == 71.5 and summary["teacher/top1"] == 90.0
    assert summary["gap_to_teacher/top1"] == pytest.approx(-18.5)
    assert summary["train/loss"] == pytest.approx(0.4)  # last logged value
    assert run["exit_code"] == 0
    # the .wandb file itself is also accepted
    assert read_wandb_run(run["file"])["summary"] == summary
    # a run cut short (still writing, or crashed) reads up to its last whole record
    data = Path(run["file"]).read_bytes()
    partial = offline_wandb / "partial" / "run-partial.wandb"
    partial.parent.mkdir()
    partial.write_bytes(data[: len(data) // 2])
    half = read_wandb_run(partial.parent)
    assert half["exit_code"] is None and half["group"] == "digits-ab"


def test_read_wandb_run_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no \.wandb run file"):
        read_wandb_run(tmp_path)
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="not a W&B run file"):
        read_wandb_run(bad)
    # a valid header and a chunk whose checksum does not match
    corrupt = tmp_path / "c" / "run-y.wandb"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b":W&B\xe1\xbe\x00" + b"\x00\x00\x00\x00\x03\x00\x01abc")
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_wandb_run(corrupt.parent)
