"""`export.json`: what `distill.export` produced from a run folder, and its one writer.

metrics.json belongs to the training run (distill.run_record writes it, once); the export
step never reopens it. What shipping adds (files, their checks, INT8 accuracy, latency) goes
into `export.json` beside it, written only by `write_export_record`:

    {"schema": 1, "run_name", "student", "alpha", "resolution", "num_classes", "date",
     "versions": {"torch", "onnx", "onnxruntime", ...},
     "preprocess": {"input_size", "mean", "std", "interpolation", "crop_pct", "label_names"},
     "evaluation": {"data", "images", "metric", "pytorch"},
     "formats": {"onnx" | "pt2" | "int8" | "hf": {... "file", "size_mb", checks ...}},
     "latency": {"device", "threads_all", "warmup", "repeats", "rows": [
         {"runtime", "precision", "batch_size", "threads", "median_ms", "p90_ms"}, ...]}}

A later export of the same run keeps the formats it did not redo (the record is this module's
own; nothing else writes it). `headline_latency_ms` is the number the compare report plots:
ONNX Runtime, fp32, batch 1, one thread (the phone-like setting), median.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from distill.files import write_json_atomic

__all__ = [
    "EXPORT_FILE",
    "EXPORT_SCHEMA",
    "ExportRecordError",
    "headline_latency_ms",
    "read_export_json",
    "run_latency_ms",
    "write_export_record",
]

EXPORT_FILE = "export.json"
EXPORT_SCHEMA = 1


class ExportRecordError(ValueError):
    """An export.json that cannot be read or does not follow the schema."""


def read_export_json(path: str | Path) -> dict[str, Any]:
    """Read an export.json (a file, or the run folder holding one); errors name the file."""
    p = Path(path)
    if p.is_dir():
        p = p / EXPORT_FILE
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ExportRecordError(f"{p}: cannot read ({e.strerror or e})") from e
    except json.JSONDecodeError as e:
        raise ExportRecordError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict) or data.get("schema") != EXPORT_SCHEMA:
        got = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise ExportRecordError(f"{p}: field 'schema' must be {EXPORT_SCHEMA}, got {got!r}")
    if not isinstance(data.get("formats", {}), dict):
        raise ExportRecordError(f"{p}: field 'formats' must be an object")
    rows = (data.get("latency") or {}).get("rows", [])
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ExportRecordError(f"{p}: field 'latency.rows' must be a list of objects")
    return data


def write_export_record(run_dir: str | Path, record: Mapping[str, Any]) -> dict[str, Any]:
    """Write `record` as run_dir/export.json (strict JSON, atomically), keeping the formats of
    an earlier export that this one did not produce. Returns what was written."""
    target = Path(run_dir) / EXPORT_FILE
    data = dict(record)
    data["schema"] = EXPORT_SCHEMA
    if target.is_file():
        try:
            old = read_export_json(target)
        except ExportRecordError:
            old = {}  # unreadable: replaced (the caller asked to overwrite)
        data["formats"] = {**old.get("formats", {}), **data.get("formats", {})}
        if not data.get("latency") and old.get("latency"):
            data["latency"] = old["latency"]
    try:
        write_json_atomic(target, data, sort_keys=False, allow_nan=False)
    except ValueError as e:  # a NaN/inf measurement: never written as JSON that others misread
        raise ExportRecordError(f"{target}: {e}") from None
    return data


def headline_latency_ms(record: Mapping[str, Any]) -> float | None:
    """ONNX Runtime fp32 latency at batch 1 on one thread (median ms), if it was measured."""
    for row in (record.get("latency") or {}).get("rows", []):
        if (
            row.get("runtime"),
            row.get("precision"),
            row.get("batch_size"),
            row.get("threads"),
        ) == (
            "onnxruntime",
            "fp32",
            1,
            1,
        ):
            value = row.get("median_ms")
            if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                return float(value)
    return None


def run_latency_ms(run_dir: str | Path) -> float | None:
    """`headline_latency_ms` of the export.json in a run folder; None when it has none. An
    unreadable one is named in a warning, not fatal (the compare report leaves the run off
    its latency plot)."""
    path = Path(run_dir) / EXPORT_FILE
    if not path.is_file():
        return None
    try:
        return headline_latency_ms(read_export_json(path))
    except ExportRecordError as e:
        warnings.warn(f"left off the latency plot: {e}", stacklevel=2)
        return None
