"""The compare report's accuracy-vs-latency plot: runs with an export.json (written by
distill.export's one writer, in the layout `python -m distill export` leaves) get a third plot
beside accuracy vs mult-adds, checked in headless Chromium like tests/test_compare_html.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from distill.cli.compare import main as compare_main
from distill.compare import load_runs
from distill.export.record import headline_latency_ms, read_export_json, write_export_record
from tests.test_compare_html import CHROMIUM, _chromium, make_runs


def _latency_rows(ms: float) -> list[dict]:
    rows = []
    for runtime, precision, scale in (("onnxruntime", "fp32", 1.0), ("onnxruntime", "int8", 0.6),
                                      ("pytorch", "fp32", 9.0)):  # fmt: skip
        for batch, threads in ((1, 1), (1, 2), (8, 1), (8, 2)):
            med = ms * scale * (batch**0.8) / (1.6 if threads == 2 else 1.0)
            rows.append({"runtime": runtime, "precision": precision, "batch_size": batch,
                         "threads": threads, "median_ms": med, "p90_ms": med * 1.2,
                         "repeats": 20})  # fmt: skip
    return rows


def export_some(paths: list[Path]) -> list[Path]:
    """export.json beside every student's metrics.json: latency ~ mult-adds, as measured."""
    shipped = []
    for p in paths:
        record = json.loads(p.read_text())
        if record["role"] == "teacher":
            continue
        ms = 0.02 + record["mult_adds"] / 2e8
        write_export_record(p.parent, {"run_name": record["run_name"], "formats": {},
                                       "latency": {"device": "cpu", "rows": _latency_rows(ms)}})  # fmt: skip
        shipped.append(p.parent)
    return shipped


def test_export_record_round_trip_and_headline(tmp_path: Path) -> None:
    rec = write_export_record(tmp_path, {"formats": {"onnx": {"file": "a"}},
                                         "latency": {"rows": _latency_rows(2.0)}})  # fmt: skip
    assert headline_latency_ms(rec) == pytest.approx(2.0)
    # a later export keeps the formats it did not redo, and the earlier latency
    later = write_export_record(tmp_path, {"formats": {"hf": {"folder": "b"}}, "latency": None})
    assert set(later["formats"]) == {"onnx", "hf"} and headline_latency_ms(later) == 2.0
    assert read_export_json(tmp_path) == later
    (tmp_path / "export.json").write_text('{"schema": 7}')
    with pytest.raises(ValueError, match="'schema' must be 1"):
        read_export_json(tmp_path)


def test_unreadable_export_json_is_left_off_with_a_warning(tmp_path: Path) -> None:
    paths = make_runs(tmp_path / "runs", seeds=(0,), resolutions=(16,))
    export_some(paths)
    (paths[1].parent / "export.json").write_text("{not json")
    with pytest.warns(UserWarning, match="left off the latency plot"):
        runs = load_runs([tmp_path / "runs"])
    latencies = {r["run_name"]: r["_latency_ms"] for r in runs}
    assert latencies[json.loads(paths[1].read_text())["run_name"]] is None
    assert sum(v is not None for v in latencies.values()) == len(paths) - 2  # teacher, broken


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it)")
def test_latency_plot_renders_beside_mult_adds(tmp_path: Path) -> None:
    from PIL import Image

    paths = make_runs(tmp_path / "runs")
    shipped = export_some(paths)
    html_path = tmp_path / "site" / "report.html"
    assert compare_main([str(tmp_path / "runs"), "-o", str(html_path), "--title", "shipped"]) == 0
    assert (html_path.parent / "report-digits-top1-latency_ms.png").is_file()

    dom = _chromium(tmp_path, "--dump-dom", html_path.as_uri()).stdout
    assert dom.count('src="data:image/png;base64,') == 3
    order = [dom.index(f'data-file="report-digits-top1-{x}.png"')
             for x in ("mult_adds", "latency_ms", "params")]  # fmt: skip
    assert order == sorted(order), "latency must sit beside mult-adds, before params"
    assert 'alt="top1 vs CPU latency on digits"' in dom
    assert f"export.json of the {len(shipped)} exported runs" in dom
    assert "1 run without one left off that plot" in dom  # the teacher was not exported

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", html_path.as_uri())
    img = np.asarray(Image.open(shot).convert("RGB"))
    # 600 px plots, two per row: mult-adds on the left, latency on the right (~x 640..1240)
    right = img[80:620, 650:1240]
    assert (right < 235).any(axis=-1).mean() > 0.05, "the latency plot looks blank"
    for hex_colour in ("#1967d2", "#e8710a"):  # distilled and scratch lines
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        close = (np.abs(right.astype(int) - rgb).sum(axis=-1) < 60).sum()
        assert close > 50, f"{hex_colour} barely drawn in the latency plot ({close} px)"
