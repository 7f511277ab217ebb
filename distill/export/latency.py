"""CPU latency of a student as it ships: ONNX Runtime (fp32 and INT8) and eager PyTorch, at
batch 1 and batch N, on one thread and on all of them.

Each setting is warmed up, then timed `repeats` times on the same random batch; the median and
the 90th percentile of the wall-clock times are reported (ms per batch). One thread is the
phone-like number and the one the compare report plots; all threads shows what a server core
pool adds. On a machine shared with other jobs the p90 is the first to suffer: compare rows
measured in one call, not across days.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "LatencyRow",
    "LatencySettings",
    "all_threads",
    "format_latency_table",
    "measure_latency",
    "model_latency",
    "onnx_latency",
    "torch_latency",
]


def all_threads() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class LatencySettings:
    batch_sizes: tuple[int, ...] = (1, 32)
    threads: tuple[int | None, ...] = (1, None)  # None: all cores
    warmup: int = 5
    repeats: int = 30

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch sizes must be >= 1, got {self.batch_sizes}")
        if self.warmup < 0 or self.repeats < 2:
            raise ValueError(
                f"need warmup >= 0 and repeats >= 2, got {self.warmup}, {self.repeats}"
            )

    def thread_counts(self) -> list[int]:
        return list(dict.fromkeys(all_threads() if t is None else int(t) for t in self.threads))


@dataclass(frozen=True)
class LatencyRow:
    runtime: str  # "onnxruntime" or "pytorch"
    precision: str  # "fp32" or "int8"
    batch_size: int
    threads: int
    median_ms: float
    p90_ms: float
    repeats: int

    @property
    def images_per_s(self) -> float:
        return self.batch_size / (self.median_ms / 1e3)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_s": round(self.images_per_s, 1)}


def _time(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times)), float(np.percentile(times, 90))


def _batch(input_size: Sequence[int], n: int) -> torch.Tensor:
    return torch.randn(n, *input_size, generator=torch.Generator().manual_seed(0))


def onnx_latency(
    path: str | Path,
    input_size: Sequence[int],
    *,
    precision: str = "fp32",
    settings: LatencySettings | None = None,
) -> list[LatencyRow]:
    """ONNX Runtime rows for one model file (a session per thread count)."""
    from distill.export.graph import onnx_session

    s = settings or LatencySettings()
    rows = []
    for threads in s.thread_counts():
        session = onnx_session(path, threads)
        name = session.get_inputs()[0].name
        for n in s.batch_sizes:
            x = _batch(input_size, n).numpy()
            med, p90 = _time(lambda: session.run(None, {name: x}), s.warmup, s.repeats)  # noqa: B023
            rows.append(LatencyRow("onnxruntime", precision, n, threads, med, p90, s.repeats))
    return rows


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def torch_latency(
    model: nn.Module, input_size: Sequence[int], *, settings: LatencySettings | None = None
) -> list[LatencyRow]:
    """Eager PyTorch rows (eval mode, inference_mode); the model's mode is restored."""
    s = settings or LatencySettings()
    was = model.training
    model.eval()
    rows = []
    try:
        for threads in s.thread_counts():
            with _torch_threads(threads):
                for n in s.batch_sizes:
                    x = _batch(input_size, n)
                    med, p90 = _time(lambda: model(x), s.warmup, s.repeats)  # noqa: B023
                    rows.append(LatencyRow("pytorch", "fp32", n, threads, med, p90, s.repeats))
    finally:
        model.train(was)
    return rows


def measure_latency(
    model: nn.Module | None,
    input_size: Sequence[int],
    *,
    onnx: str | Path | None = None,
    int8: str | Path | None = None,
    settings: LatencySettings | None = None,
) -> dict[str, Any]:
    """The latency section of export.json: every runtime given, every batch and thread count.

    model: eager PyTorch rows (None: none); onnx / int8: ONNX files for ONNX Runtime rows.
    """
    from distill.timing import device_name

    s = settings or LatencySettings()
    rows: list[LatencyRow] = []
    if onnx is not None:
        rows += onnx_latency(onnx, input_size, precision="fp32", settings=s)
    if int8 is not None:
        rows += onnx_latency(int8, input_size, precision="int8", settings=s)
    if model is not None:
        rows += torch_latency(model, input_size, settings=s)
    return {
        "device": device_name(),
        "threads_all": all_threads(),
        "input_size": list(input_size),
        "warmup": s.warmup,
        "repeats": s.repeats,
        "rows": [r.to_dict() for r in rows],
    }


def format_latency_table(rows: Sequence[dict[str, Any]], *, label: str | None = None) -> str:
    """A Markdown table of latency rows (as stored in export.json)."""
    head = ["runtime", "precision", "batch", "threads", "median ms", "p90 ms", "images/s"]
    if label is not None:
        head.insert(0, "model")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["runtime"],
            r["precision"],
            str(r["batch_size"]),
            str(r["threads"]),
            f"{r['median_ms']:.3f}",
            f"{r['p90_ms']:.3f}",
            f"{r['batch_size'] / (r['median_ms'] / 1e3):.0f}",
        ]
        if label is not None:
            cells.insert(0, label)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def model_latency(
    model: nn.Module, input_size: Sequence[int], *, settings: LatencySettings | None = None
) -> dict[str, Any]:
    """Export `model` to a temporary ONNX file and measure it with ONNX Runtime next to eager
    PyTorch (`measure_latency`); without the export extra, or for a model the exporter cannot
    trace, eager PyTorch only (and a note saying why)."""
    import tempfile

    from distill.export.run import ExportError

    try:
        from distill.export.check import require

        require("onnxruntime")
        require("onnxscript")
    except ExportError as e:
        out = measure_latency(model, input_size, settings=settings)
        return {**out, "note": f"eager PyTorch only: {e}"}
    from distill.export.graph import export_onnx

    with tempfile.TemporaryDirectory(prefix="distill-latency-") as tmp:
        path = Path(tmp) / "model.onnx"
        c, h, w = (int(v) for v in input_size)
        try:
            export_onnx(model, path, input_size=(c, h, w), metadata={"producer": "mobiledistill"})
        except ExportError as e:  # an untraceable model still gets its eager rows
            out = measure_latency(model, input_size, settings=settings)
            return {**out, "note": f"eager PyTorch only: {e}"}
        return measure_latency(model, input_size, onnx=path, settings=settings)
