"""The per-method view: every method of a student network with its mean ± std over seeds, its
gain over scratch and over KD (signed so > 0 is better, also for lower-is-better metrics) and
its training speed, in report.html and as the Markdown the methods benchmark writes."""

from __future__ import annotations

import statistics
from pathlib import Path

from distill.compare import load_runs, sections, write_report
from distill.compare_methods import html_table, markdown_table, method_rows
from distill.run_record import RunRecord, write_run_record
from distill.tracking import RunInfo

SCORES = {  # method -> top-1 per seed
    "ce": [80.0, 82.0],
    "kd": [85.0, 86.0],
    "dist": [88.0, 87.0],
    "at": [79.0, 80.0],
}


def _write(root: Path, method: str, seed: int, top1: float, speed: float) -> None:
    info = RunInfo(
        experiment="e", role="scratch" if method == "ce" else "distilled", method=method,
        student="mobilenet_v1", dataset="digits", teacher=None if method == "ce" else "resnet18",
        alpha=0.25, resolution=32, seed=seed,
    )  # fmt: skip
    record = RunRecord.from_info(
        info, metrics={"top1": top1}, mult_adds=10**6, params=10**5, images_per_s=speed
    )
    write_run_record(root / f"{method}-{seed}" / "metrics.json", record)


def _runs(tmp_path: Path) -> Path:
    for method, scores in SCORES.items():
        for seed, top1 in enumerate(scores):
            _write(tmp_path / "runs", method, seed, top1, speed=100.0 + seed)
    return tmp_path / "runs"


def test_rows_give_each_method_its_gains_over_scratch_and_kd(tmp_path: Path) -> None:
    (section,) = sections(load_runs([_runs(tmp_path)]))
    rows = {r.method: r for r in method_rows(section)}
    assert list(rows) == ["ce (scratch)", "dist", "kd", "at"]  # scratch, then best first
    mean = {m: statistics.fmean(v) for m, v in SCORES.items()}
    assert rows["dist"].vs_scratch == mean["dist"] - mean["ce"]
    assert rows["dist"].vs_kd == mean["dist"] - mean["kd"]
    assert rows["at"].vs_kd == mean["at"] - mean["kd"] < 0  # a method that does not help
    assert rows["kd"].vs_kd is None and rows["ce (scratch)"].vs_scratch is None
    assert rows["at"].std == statistics.stdev(SCORES["at"])
    assert rows["at"].images_per_s == 100.5
    text = markdown_table(list(rows.values()), "top1", as_error=True)
    assert "| mobilenet_v1 a0.25 @32 | dist | 12.50 ± 0.71 | 2 | +6.50 | +2.00 | 100 |" in text


def test_report_html_has_the_method_table(tmp_path: Path) -> None:
    out = write_report(load_runs([_runs(tmp_path)]), tmp_path / "report.html")
    page = out.read_text()
    assert "<h3>By method</h3>" in page
    assert 'data-method="dist"' in page and 'data-method="at"' in page
    (section,) = sections(load_runs([_runs(tmp_path)]))
    assert html_table(section) in page


def test_one_method_needs_no_method_table(tmp_path: Path) -> None:
    for seed in (0, 1):
        _write(tmp_path / "runs", "ce", seed, 80.0 + seed, 100.0)
        _write(tmp_path / "runs", "kd", seed, 85.0 + seed, 100.0)
    (section,) = sections(load_runs([tmp_path / "runs"]))
    assert html_table(section) == ""
