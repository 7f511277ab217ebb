"""benchmarks/methods.py end to end at toy size (a real teacher, real runs, the per-method
table and report.html), so the benchmark `make bench` runs cannot rot unnoticed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, launch_env


@pytest.mark.slow
def test_methods_benchmark_writes_its_table_and_report(tmp_path: Path) -> None:
    results, report = tmp_path / "RESULTS.md", tmp_path / "methods" / "report.html"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "methods.py"), "--methods", "kd", "crd",
        "--seeds", "0", "--fractions", "0.1", "--steps", "3", "--teacher-steps", "3",
        "--results", str(results), "--report", str(report), "--args", "kd={temperature: 2.0}",
    ]  # fmt: skip
    r = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = results.read_text()
    assert "| student | method | error % (mean ± std) | seeds | gain over scratch |" in text
    for method in ("ce (scratch)", "kd", "crd"):
        assert f"| mobilenet_v1 a0.25 @32 | {method} |" in text
    assert "--args {'kd': {'temperature': 2.0}}" in text
    page = (tmp_path / "methods" / "report-0.1.html").read_text()
    assert "<h3>By method</h3>" in page and 'data-method="crd"' in page
