"""Ship a trained student: ONNX (+ INT8), a torch.export archive, a Hugging Face folder, and
CPU latency, each checked against eager PyTorch on real images.

    from distill.export import export_run
    record = export_run("runs/kd-a0.5-r160", formats=("onnx", "pt2", "hf"), int8=True)
    record["formats"]["int8"]["after"], record["latency"]["rows"]

    python -m distill export RUN_DIR --format onnx pt2 hf --int8

Modules: `run` (the run folder back as a model), `data` (evaluation and calibration images),
`graph` (ONNX and .pt2), `int8` (static quantisation), `hf` + `card` (the Hub folder),
`latency`, `check` (outputs against PyTorch), `record` (export.json), `api` (`export_run`).
onnx, onnxruntime and onnxscript (`pip install 'mobiledistill[export]'`) are imported inside
the functions that use them, and names are imported on first use: `import distill.export.record`
(what the compare report reads) loads neither torch nor ONNX.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FORMATS": "api",
    "ExportOptions": "api",
    "export_run": "api",
    "planned_files": "api",
    "DEFAULT_ATOL": "check",
    "Agreement": "check",
    "compare_outputs": "check",
    "ExportData": "data",
    "resolve_data": "data",
    "LatencyRow": "latency",
    "LatencySettings": "latency",
    "format_latency_table": "latency",
    "measure_latency": "latency",
    "EXPORT_FILE": "record",
    "ExportRecordError": "record",
    "headline_latency_ms": "record",
    "read_export_json": "record",
    "write_export_record": "record",
    "ExportError": "run",
    "LoadedRun": "run",
    "Preprocess": "run",
    "load_run": "run",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distill.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"distill.export.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
