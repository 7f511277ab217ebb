"""INT8: static post-training quantisation with ONNX Runtime's quantiser.

`quantize_static` in QDQ format (QuantizeLinear/DequantizeLinear pairs around each quantised
op, which every ONNX runtime reads), int8 weights per output channel and int8 activations
whose ranges come from MinMax calibration on a few hundred training images fed through a
`CalibrationDataReader`. The graph is first put through `quant_pre_process` (shape inference,
BatchNorm folding), as ONNX Runtime recommends.

The INT8 model is then scored on the evaluation set next to fp32: accuracy when the set has
the run's labels, else top-1 agreement with fp32. Non-finite outputs are an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from distill.export.check import require, top1_accuracy
from distill.export.graph import INPUT_NAME, onnx_metadata, onnx_session, run_onnx
from distill.export.run import ExportError
from distill.files import atomic_path

__all__ = ["DEFAULT_MAX_DROP", "Int8Report", "quantize_int8", "score_int8"]

DEFAULT_MAX_DROP = 1.0  # points of the metric INT8 may cost before it is reported as too much


def size_mb(path: str | Path) -> float:
    return Path(path).stat().st_size / 1e6


@dataclass(frozen=True)
class Int8Report:
    """fp32 vs INT8 on the same evaluation images."""

    metric: str  # "top1" (against labels) or "top1_agreement_with_fp32"
    before: float
    after: float
    max_drop: float
    images: int
    calibration_images: int
    fp32_size_mb: float
    int8_size_mb: float

    @property
    def drop(self) -> float:
        return self.before - self.after

    @property
    def over_threshold(self) -> bool:
        return self.drop > self.max_drop

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drop": self.drop, "over_threshold": self.over_threshold}

    def describe(self) -> str:
        text = (
            f"INT8: {self.metric} {self.before:.2f} -> {self.after:.2f} ({-self.drop:+.2f} points) "
            f"on {self.images} images; {self.fp32_size_mb:.2f} MB -> {self.int8_size_mb:.2f} MB "
            f"({self.fp32_size_mb / max(self.int8_size_mb, 1e-9):.1f}x smaller), calibrated on "
            f"{self.calibration_images} training images"
        )
        if self.over_threshold:
            text += (
                f"\nINT8 COSTS TOO MUCH: {self.drop:.2f} points of {self.metric}, more than "
                f"--max-int8-drop {self.max_drop:g}. Ship the fp32 model, calibrate on more or "
                "more representative images (--calibration-images, --data-dir), or keep "
                "sensitive layers in fp32."
            )
        return text


class _Batches:
    """onnxruntime.quantization.CalibrationDataReader over (M, C, H, W) calibration images."""

    def __init__(self, images: Tensor, batch_size: int) -> None:
        self.images = images.float().numpy()
        self.batch_size = batch_size
        self.rewind()

    def rewind(self) -> None:
        self._start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._start >= len(self.images):
            return None
        batch = self.images[self._start : self._start + self.batch_size]
        self._start += self.batch_size
        return {INPUT_NAME: batch}


def _reader(images: Tensor, batch_size: int) -> Any:
    q = require("onnxruntime.quantization")

    class Reader(_Batches, q.CalibrationDataReader):  # type: ignore[misc, name-defined]
        pass

    return Reader(images, batch_size)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantiser logs a line per op at INFO/WARNING
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def quantize_int8(
    fp32: str | Path, out: str | Path, calibration: Tensor, *, batch_size: int = 32
) -> Path:
    """Quantise the fp32 ONNX model `fp32` into `out` (QDQ, per-channel int8 weights, int8
    activations calibrated with MinMax on `calibration`); metadata_props are carried over."""
    if calibration.dim() != 4 or len(calibration) == 0:
        raise ExportError(
            "the INT8 calibration set is empty: calibration needs a few hundred training images "
            f"(got shape {tuple(calibration.shape)}); pass --calibration-images N > 0, or a "
            "--data-dir whose train/ folder holds images"
        )
    onnx = require("onnx")
    q = require("onnxruntime.quantization")
    target = Path(out)
    with tempfile.TemporaryDirectory(prefix="distill-int8-") as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        with _quiet():
            q.quant_pre_process(str(fp32), str(prepped), skip_symbolic_shape=False)
            with atomic_path(target) as written:
                q.quantize_static(
                    str(prepped),
                    str(written),
                    _reader(calibration, batch_size),
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=q.QuantType.QInt8,
                    weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                )
                proto = onnx.load(str(written))
                del proto.metadata_props[:]
                for key, value in {**onnx_metadata(fp32), "precision": "int8"}.items():
                    entry = proto.metadata_props.add()
                    entry.key, entry.value = key, value
                onnx.save(proto, str(written))
    return target


def score_int8(
    fp32: str | Path,
    int8: str | Path,
    inputs: Tensor,
    targets: Tensor | None,
    *,
    calibration_images: int,
    max_drop: float = DEFAULT_MAX_DROP,
) -> Int8Report:
    """Evaluate both ONNX models on `inputs`; raise on non-finite INT8 outputs."""
    ref = run_onnx(onnx_session(fp32), inputs)
    got = run_onnx(onnx_session(int8), inputs)
    bad = int((~np.isfinite(got)).sum())
    if bad:
        raise ExportError(
            f"the INT8 model {int8} returns {bad} non-finite values on {len(inputs)} evaluation "
            "images (the fp32 model returns none): the calibration ranges are unusable. "
            "Calibrate on finite, normalised training images, or ship the fp32 model."
        )
    if targets is not None:
        metric, before, after = "top1", top1_accuracy(ref, targets), top1_accuracy(got, targets)
    else:
        metric, before = "top1_agreement_with_fp32", 100.0
        after = float((ref.argmax(1) == got.argmax(1)).mean() * 100.0)
    return Int8Report(
        metric=metric,
        before=before,
        after=after,
        max_drop=max_drop,
        images=len(inputs),
        calibration_images=calibration_images,
        fp32_size_mb=size_mb(fp32),
        int8_size_mb=size_mb(int8),
    )
