"""The throughput benchmark runs every method for one step at a tiny size (no timing claims)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load() -> object:
    spec = importlib.util.spec_from_file_location(
        "throughput", ROOT / "benchmarks" / "throughput.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["throughput"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_method_runs_and_is_reported(tmp_path: Path) -> None:
    pytest.importorskip("torchdistill")  # installed by `make bench` (benchmark-only dependency)
    tp = _load()
    out = tmp_path / "rows.json"
    results = tmp_path / "RESULTS.md"
    argv = [
        "--device", "cpu", "--resolution", "32", "--batch-size", "4", "--num-classes", "10",
        "--steps", "1", "--warmup", "1", "--repeats", "1", "--json", str(out),
        "--results", str(results),
    ]  # fmt: skip
    assert tp.main(argv) == 0  # type: ignore[attr-defined]
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"naive", "online", "cached", "student", "torchdistill", "timm"}
    assert all(r["images_per_s"] > 0 and r["peak_mem_mib"] > 0 for r in rows.values())
    assert rows["naive"]["ratio_to_naive"] == pytest.approx(1.0)
    text = results.read_text()
    assert "| online |" in text and "python benchmarks/throughput.py --device cpu" in text
