"""`compare` over real run folders: a run without evaluation metrics is left out with a note
(the report is still written), and copies of one run with the same seed count once."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from distill.__main__ import main
from distill.run_record import RunRecord, write_run_record
from distill.tracking import RunInfo


def _run(folder: Path, *, seed: int, top1: float, metrics: bool = True, date: str = "") -> Path:
    info = RunInfo(
        experiment="e", role="distilled", method="kd", student="mobilenet_v1", dataset="digits",
        teacher="cnn", alpha=0.5, resolution=32, temperature=4.0, kd_weight=0.9, seed=seed,
    )  # fmt: skip
    record = RunRecord.from_info(
        info, metrics={"top1": top1} if metrics else {}, mult_adds=10**6, params=10**5
    )
    if date:
        record.date = date
    write_run_record(folder / "metrics.json", record)
    return folder


def test_runs_without_metrics_are_left_out_and_copies_count_once(
    tmp_path: Path, capsys: Any
) -> None:
    _run(tmp_path / "runs" / "a", seed=0, top1=90.0, date="2026-01-01T00:00:00+00:00")
    _run(tmp_path / "runs" / "b", seed=1, top1=80.0)
    _run(tmp_path / "runs" / "no_eval", seed=2, top1=0.0, metrics=False)
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "a_copy")
    _run(tmp_path / "runs" / "a_copy", seed=0, top1=92.0, date="2026-02-01T00:00:00+00:00")
    out = tmp_path / "report.html"
    assert main(["compare", str(tmp_path / "runs"), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "left out" in captured.err and "no_eval" in captured.err
    assert "counted once, the newest" in captured.err and "a_copy" in captured.err
    assert "(2 runs;" in captured.out  # seeds 0 (the newer copy) and 1
    html = out.read_text()
    assert "92.00" in html and "90.00" not in html  # the newer copy of seed 0 counts
