"""`python -m distill table` and `python -m distill profile`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill.cli import profile as profile_cli
from distill.cli import table as table_cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "distill", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_table_command_prints_the_16_model_grid() -> None:
    proc = _run("table", "--check")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if "MobileNet-" in line]
    assert len(rows) == 16
    names = [row.split()[0] + " " + row.split()[1] for row in rows]
    assert names[0] == "1.0 MobileNet-224" and names[-1] == "0.25 MobileNet-128"
    first = rows[0].split()
    assert first[2:4] == ["568.7", "569"]
    assert "arXiv:1704.04861" in proc.stdout


def test_grid_rows_within_tolerance() -> None:
    rows = table_cli.grid_rows()
    assert len(rows) == 16
    with_paper = [r for r in rows if r.paper is not None]
    assert len(with_paper) == 8  # Table 6 (4), Table 7 (3 more), Table 9 (0.5-160)
    assert all(r.within_tolerance for r in rows)
    assert "| model |" in table_cli.format_table(rows, markdown=True)


def test_profile_command() -> None:
    proc = _run("profile", "mobilenet_v1", "--alpha", "0.5", "--resolution", "160")
    assert proc.returncode == 0, proc.stderr
    assert "76.5 M" in proc.stdout and "3x160x160" in proc.stdout
    assert "Table 9" in proc.stdout


def test_profile_main_json_and_latency(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["mobilenet_v1", "--alpha", "0.25", "--resolution", "64", "--num-classes", "10"]
    assert profile_cli.main([*argv, "--json", "--latency", "--repeats", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_size"] == [3, 64, 64] and out["latency_ms"] > 0
    assert out["alpha"] == 0.25 and out["mult_adds"] > 0


def test_profile_main_prefixed_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert profile_cli.main(["torchvision:mobilenet_v2", "--resolution", "64"]) == 0
    assert "3x64x64" in capsys.readouterr().out
    assert profile_cli.main(["no_such_student"]) == 2
    assert "mobilenet_v1_fullconv" in capsys.readouterr().err
    assert profile_cli.main(["mobilenet_v1", "--alpha", "0"]) == 2
    assert "alpha" in capsys.readouterr().err
