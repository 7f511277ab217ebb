"""`python -m distill demo --quick`: the whole demo pipeline on the real digits, in seconds.

Checks what the demo promises to leave behind: a metrics.json per run (through the
Distiller), report.html from `distill.compare`, the printed table, and one offline W&B run
per training run that `distill.tracking.read_wandb_run` parses (group, job type, summary).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from distill.cli.demo import main
from distill.demo import DemoConfig, Row, format_gains, gains, prepare_out
from tests.conftest import ROOT, launch_env


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    monkeypatch.setenv("WANDB_DISABLE_CODE", "true")
    monkeypatch.setenv("WANDB__DISABLE_STATS", "true")
    return tmp_path


def test_quick_demo_writes_runs_report_and_offline_wandb(offline_wandb: Path, capsys: Any) -> None:
    from distill.tracking import read_metrics_json, read_wandb_run

    out = offline_wandb / "demo"
    assert main(["--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert "| digits_cnn | teacher | 16 |" in printed
    assert "| mobilenet_v1 a0.25 | scratch | 32 |" in printed
    assert "| mobilenet_v1 a0.25 | distilled | 32 |" in printed
    assert "average gain from KD:" in printed and re.search(r"in [01] of 1 pairs", printed)

    records = {}
    for f in sorted((out / "runs").glob("*/metrics.json")):
        m = read_metrics_json(f)
        records[m["role"]] = m
        assert (f.parent / "student.safetensors").is_file()
    assert set(records) == {"teacher", "scratch", "distilled"}
    assert records["distilled"]["teacher"] == "digits_cnn"
    assert records["distilled"]["teacher_metrics"]["top1"] > 0
    for role in ("scratch", "distilled"):
        assert (records[role]["alpha"], records[role]["resolution"]) == (0.25, 32)
        assert records[role]["experiment"] == "digits-demo-quick"
    assert records["distilled"]["temperature"] == 4.0 and records["distilled"]["kd_weight"] == 0.9

    html = (out / "report.html").read_text()
    assert "<img" in html and "digits_cnn" in html and "mobilenet_v1" in html
    assert "| model | role |" in (out / "summary.md").read_text()
    summary = json.loads((out / "demo.json").read_text())
    assert len(summary["runs"]) == 3 and len(summary["gains"]) == 1

    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 3
    seen = {}
    for run_dir in runs:
        run = read_wandb_run(run_dir, wait_s=30)  # wandb-core may still be flushing
        assert run["exit_code"] == 0 and run["group"] == "digits-demo-quick"
        seen[run["job_type"]] = run
        m = records[run["job_type"]]
        assert run["name"] == m["run_name"]
        assert run["summary"]["mult_adds"] == m["mult_adds"] > 0
        assert run["summary"]["params"] == m["params"]
        assert run["summary"]["eval/top1"] == pytest.approx(m["metrics"]["top1"])
        assert run["config"]["role"] == run["job_type"]
        assert any("train/loss" in row for row in run["history"])
    assert set(seen) == {"teacher", "scratch", "distilled"}
    assert seen["distilled"]["config"]["temperature"] == 4.0
    assert "teacher/top1" in seen["distilled"]["summary"]

    # a second demo into the same folder replaces the first; a foreign folder is refused
    prepare_out(out)
    assert list(out.iterdir()) == []
    foreign = offline_wandb / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    assert main(["--out", str(foreign), "--quick", "--no-wandb"]) == 2
    assert "was not written by the demo" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_command_is_registered_and_options_are_checked(tmp_path: Path, capsys: Any) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "distill", "demo", "--help"],
        cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and "--quick" in r.stdout and "report.html" in r.stdout
    assert main(["--out", str(tmp_path / "x"), "--resolutions", "16"]) == 2
    assert "resolutions must be >= 32" in capsys.readouterr().err
    assert DemoConfig().problems() == [] and DemoConfig.quick().problems() == []


def test_gains_pair_scratch_and_distilled_of_the_same_student() -> None:
    def row(alpha: float, role: str, errors: list[float]) -> Row:
        return Row("m", role, alpha, 32, errors, [], 1, 1, None)

    table = [
        row(0.5, "scratch", [4.0, 6.0]),
        row(0.5, "distilled", [3.0, 3.0]),
        row(0.25, "scratch", [8.0, 8.0]),
        row(0.25, "distilled", [9.0, 7.0]),
        row(1.0, "distilled", [1.0]),  # no scratch twin: not a gain
    ]
    g = gains(table)
    assert [(x.alpha, x.points) for x in g] == [(0.5, 2.0), (0.25, 0.0)]
    assert "gain from KD: +1.00 error points over 2" in format_gains(table)
    assert "distilled better in 1 of 2" in format_gains(table)


def test_in_memory_loader_shifts_like_the_per_image_augmentation() -> None:
    import torch

    from distill.data.digits import load_digits_splits
    from distill.demo import InMemoryLoader, random_shift

    x = torch.rand(5, 3, 8, 8)
    bg = torch.tensor([-1.0, -2.0, -3.0]).view(3, 1, 1)
    out = random_shift(x, 2, bg, torch.Generator().manual_seed(0))
    dy, dx = torch.randint(0, 5, (2, 5), generator=torch.Generator().manual_seed(0))
    for i in range(5):
        padded = bg.expand(3, 12, 12).clone()
        padded[:, 2:10, 2:10] = x[i]
        assert torch.equal(out[i], padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8])

    train, test = load_digits_splits(32, seed=0)
    loader = InMemoryLoader(train, 64, train=True, seed=3)
    assert len(loader) == len(train) // 64  # drop_last
    first = [b["target"] for b in loader]
    again = [b["target"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # same epoch, same
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))["target"], first[0])  # reshuffled per epoch
    ev = list(InMemoryLoader(test, 256, train=False))
    assert len(ev) == 2 and torch.equal(torch.cat([b["input"] for b in ev]), test.images)
