"""The demo's last step: ship its best distilled student as ONNX and INT8, and say what that
costs (latency on this CPU, the INT8 accuracy change), with `distill.export`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from distill.demo.train import RunResult

__all__ = ["best_distilled", "ship_best"]

_NEEDS = ("onnx", "onnxruntime", "onnxscript")


def best_distilled(students: Sequence[RunResult]) -> RunResult | None:
    """The distilled run with the highest test top-1 (the cheaper one on a tie)."""
    distilled = [r for r in students if r.info.role == "distilled"]
    if not distilled:
        return None
    return max(
        distilled,
        key=lambda r: (r.record["metrics"]["top1"], -(r.record.get("mult_adds") or 0)),
    )


def _latency(record: dict[str, Any], runtime: str, precision: str) -> float | None:
    for row in (record.get("latency") or {}).get("rows", []):
        key = (row["runtime"], row["precision"], row["batch_size"], row["threads"])
        if key == (runtime, precision, 1, 1):
            return float(row["median_ms"])
    return None


def ship_best(
    out: str | Path,
    students: Sequence[RunResult],
    log: Callable[[str], None] = print,
    *,
    repeats: int = 20,
) -> dict[str, Any] | None:
    """Export the best distilled student of the study in `out` to ONNX + INT8 (files under its
    run folder's export/, results in its export.json); None when there is nothing to ship or
    the export extra is not installed (said in the log)."""
    from distill.export.api import ExportOptions, export_run
    from distill.export.latency import LatencySettings

    best = best_distilled(students)
    if best is None:
        return None
    missing = [m for m in _NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        log(f"not shipping the student: {', '.join(missing)} missing "
            "(pip install 'mobiledistill[export]')")  # fmt: skip
        return None
    run_dir = Path(out) / "runs" / best.info.run_name()
    options = ExportOptions(
        formats=("onnx",),
        int8=True,
        latency_settings=LatencySettings(batch_sizes=(1, 32), warmup=3, repeats=repeats),
    )
    record = export_run(run_dir, options)
    onnx, int8 = record["formats"]["onnx"], record["formats"]["int8"]
    log(f"shipped the best distilled student, {best.info.run_name()}:")
    log(f"  {run_dir / onnx['file']} ({onnx['size_mb']:.2f} MB; ONNX Runtime matches PyTorch "
        f"within {onnx['check']['max_abs_diff']:.1g}, top-1 agreement "
        f"{onnx['check']['top1_agreement']:.0f}%)")  # fmt: skip
    log(f"  {run_dir / int8['file']} ({int8['size_mb']:.2f} MB): INT8 {int8['metric']} "
        f"{int8['before']:.2f}% -> {int8['after']:.2f}% ({-int8['drop']:+.2f} points)"
        + (f" -- MORE than the {int8['max_drop']:g}-point budget" if int8["over_threshold"] else ""))  # fmt: skip
    fp32_ms = _latency(record, "onnxruntime", "fp32")
    int8_ms = _latency(record, "onnxruntime", "int8")
    eager_ms = _latency(record, "pytorch", "fp32")
    if fp32_ms and int8_ms and eager_ms:
        log(f"  CPU latency, batch 1, one thread (median): ONNX Runtime fp32 {fp32_ms:.2f} ms, "
            f"INT8 {int8_ms:.2f} ms, eager PyTorch {eager_ms:.2f} ms "
            f"({record['latency']['device']}; all rows in export.json)")  # fmt: skip
    return record
