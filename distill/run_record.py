"""The run record: `metrics.json`, one schema, one writer.

A finished run is described by a typed `RunRecord`; `write_run_record` validates it and writes
it atomically. It is the only function that writes `metrics.json`: the Distiller calls it at the
end of `fit`, the tests and benchmarks call it (directly or through `write_metrics_json`), and
nothing reopens the file to patch it. `read_metrics_json` reads one back with errors that name
the file and the field; `compare` and `report` read runs through it.

Schema 1 (every key always present):

- what the run is: run_name, experiment, role, method, dataset, student, teacher, alpha (the
  width multiplier), resolution, temperature, kd_weight (the KD loss's weight of the teacher
  term), seed, and `info_<key>` for whatever else the caller described;
- what it scored: metrics, primary_metric, higher_is_better, teacher_metrics;
- what it cost: mult_adds, params, images_per_s (training steps only: evaluation, checkpoint
  writes and the first, warm-up step are not counted), peak_mem_bytes, peak_mem_kind;
- what it did: steps, epochs, images_seen, skipped_nonfinite (batches dropped by
  on_nonfinite="skip"), skipped_images ({"total": n, "files": [{"path", "reason", "count"}]},
  unreadable images the data pipeline replaced), wall_s, train_s, eval_s, checkpoint_s,
  num_processes, mixed_precision, date, device.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distill.files import write_json_atomic

__all__ = [
    "ROLES",
    "SCHEMA_VERSION",
    "MetricsFileError",
    "RunRecord",
    "build_record",
    "metrics_record",
    "read_metrics_json",
    "validate_metrics",
    "write_metrics_json",
    "write_run_record",
]

ROLES = ("teacher", "scratch", "distilled")
SCHEMA_VERSION = 1


class MetricsFileError(ValueError):
    """A metrics.json that is missing, unreadable or does not follow the schema."""


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def no_skips() -> dict[str, Any]:
    """`skipped_images` of a run that met no unreadable image."""
    return {"total": 0, "files": []}


@dataclass
class RunRecord:
    """Everything metrics.json holds; see the module docstring for each field."""

    run_name: str
    role: str
    method: str
    student: str
    seed: int
    metrics: dict[str, float]
    primary_metric: str = "top1"
    higher_is_better: bool = True
    experiment: str | None = None
    dataset: str | None = None
    teacher: str | None = None
    alpha: float | None = None
    resolution: int | None = None
    temperature: float | None = None
    kd_weight: float | None = None
    teacher_metrics: dict[str, float] | None = None
    mult_adds: int | None = None
    params: int | None = None
    images_per_s: float | None = None
    peak_mem_bytes: int | None = None
    peak_mem_kind: str | None = None
    steps: int | None = None
    epochs: float | None = None
    images_seen: int | None = None
    skipped_nonfinite: int = 0
    skipped_images: dict[str, Any] = field(default_factory=no_skips)
    wall_s: float | None = None
    train_s: float | None = None
    eval_s: float | None = None
    checkpoint_s: float | None = None
    num_processes: int | None = None
    mixed_precision: str | None = None
    date: str = field(default_factory=_now)
    device: str | None = None
    info: dict[str, Any] = field(default_factory=dict)  # written as info_<key>

    @classmethod
    def from_info(cls, info: Any, **values: Any) -> RunRecord:
        """From a `distill.tracking.RunInfo` (name and schema fields) plus `values`."""
        described = {k: v for k, v in asdict(info).items() if k in _FIELD_NAMES}
        return cls(run_name=info.run_name(), **{**described, **values})

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema": SCHEMA_VERSION}
        for f in fields(self):
            if f.name != "info":
                out[f.name] = getattr(self, f.name)
        out.update({f"info_{k}": v for k, v in self.info.items()})
        return out


_FIELD_NAMES = {f.name for f in fields(RunRecord)}
_STR_FIELDS = ("run_name", "role", "method", "student")
_OPT_FLOAT_FIELDS = (
    "alpha", "temperature", "kd_weight", "images_per_s", "epochs",
    "wall_s", "train_s", "eval_s", "checkpoint_s",
)  # fmt: skip
_OPT_INT_FIELDS = ("resolution", "peak_mem_bytes", "steps", "images_seen", "num_processes")
_OPT_STR_FIELDS = ("experiment", "dataset", "teacher", "date", "device", "mixed_precision")


def _check_numbers(out: dict[str, Any], fail: Any) -> None:
    for name in _OPT_FLOAT_FIELDS:
        out.setdefault(name, None)
        if out[name] is not None and not _is_num(out[name]):
            raise fail(name, f"must be a finite number or null, got {out[name]!r}")
    for name in _OPT_INT_FIELDS:
        out.setdefault(name, None)
        if out[name] is not None and not _is_int(out[name]):
            raise fail(name, f"must be an int or null, got {out[name]!r}")
    for name in ("mult_adds", "params"):  # null when profiling failed: left off cost plots
        out.setdefault(name, None)
        if out[name] is not None and (not _is_int(out[name]) or out[name] < 0):
            raise fail(name, f"must be a non-negative int or null, got {out[name]!r}")


def _check_metrics(out: dict[str, Any], fail: Any, require: bool) -> None:
    metrics = out.get("metrics")
    if not isinstance(metrics, dict) or (require and not metrics):
        raise fail("metrics", f"must be a non-empty object of numbers, got {metrics!r}")
    for key, value in metrics.items():
        if not _is_num(value):
            raise fail(f"metrics.{key}", f"must be a finite number, got {value!r}")
    default = "top1" if "top1" in metrics or not metrics else next(iter(metrics))
    out.setdefault("primary_metric", default)
    if metrics and out["primary_metric"] not in metrics:
        raise fail(
            "primary_metric",
            f"{out['primary_metric']!r} is not a key of metrics ({sorted(metrics)})",
        )
    out.setdefault("higher_is_better", True)
    if not isinstance(out["higher_is_better"], bool):
        raise fail("higher_is_better", f"must be true or false, got {out['higher_is_better']!r}")
    out.setdefault("teacher_metrics", None)
    teacher_metrics = out["teacher_metrics"]
    if teacher_metrics is not None:
        if not isinstance(teacher_metrics, dict):
            raise fail("teacher_metrics", f"must be an object or null, got {teacher_metrics!r}")
        for key, value in teacher_metrics.items():
            if not _is_num(value):
                raise fail(f"teacher_metrics.{key}", f"must be a finite number, got {value!r}")


def validate_metrics(
    data: Any, source: str = "metrics.json", *, require_metrics: bool = True
) -> dict[str, Any]:
    """Check a metrics.json dict against schema 1; return it with optional fields filled.

    Reading is lenient where a finished run may lack a value (experiment, dataset, mult_adds,
    params may be null; extra keys are kept). `require_metrics=False` accepts a run that was
    trained without an evaluation set (empty `metrics`).

    Raises MetricsFileError naming `source` and the offending field.
    """

    def fail(name: str, why: str) -> MetricsFileError:
        return MetricsFileError(f"{source}: field {name!r} {why}")

    if not isinstance(data, dict):
        raise MetricsFileError(f"{source}: expected a JSON object, got {type(data).__name__}")
    out = dict(data)
    if out.get("schema") != SCHEMA_VERSION:
        raise fail("schema", f"must be {SCHEMA_VERSION}, got {out.get('schema')!r}")
    for name in _STR_FIELDS:
        if not isinstance(out.get(name), str) or not out[name]:
            raise fail(name, f"must be a non-empty string, got {out.get(name)!r}")
    if out["role"] not in ROLES:
        raise fail("role", f"must be one of {ROLES}, got {out['role']!r}")
    if not _is_int(out.get("seed")):
        raise fail("seed", f"must be an int, got {out.get('seed')!r}")
    for name in _OPT_STR_FIELDS:
        out.setdefault(name, None)
        if out[name] is not None and not isinstance(out[name], str):
            raise fail(name, f"must be a string or null, got {out[name]!r}")
    _check_numbers(out, fail)
    _check_metrics(out, fail, require_metrics)
    skipped = out.setdefault("skipped_images", no_skips())
    if not isinstance(skipped, dict) or not _is_int(skipped.get("total")):
        raise fail("skipped_images", f"must be {{'total': n, 'files': [...]}}, got {skipped!r}")
    return out


def write_run_record(
    path: str | os.PathLike[str], record: RunRecord, *, require_metrics: bool = False
) -> dict[str, Any]:
    """Validate `record` and write it to `path` (strict JSON, atomically); return the dict. A
    run trained without an evaluation set has empty metrics unless `require_metrics`."""
    data = validate_metrics(
        record.to_dict(),
        source=f"metrics of run {record.run_name}",
        require_metrics=require_metrics,
    )
    try:
        write_json_atomic(path, data, sort_keys=False, allow_nan=False)
    except ValueError as e:  # a NaN/inf the schema does not check (an info_ value)
        raise MetricsFileError(f"metrics of run {record.run_name}: {e}") from None
    return data


def metrics_record(info: Any, **values: Any) -> dict[str, Any]:
    """The validated metrics.json dict of `info` (a RunInfo) and `values` (RunRecord fields)."""
    record = RunRecord.from_info(info, **values)
    return validate_metrics(record.to_dict(), source=f"metrics of run {record.run_name}")


def write_metrics_json(path: str | os.PathLike[str], info: Any, **values: Any) -> dict[str, Any]:
    """`write_run_record(path, RunRecord.from_info(info, **values))`: metrics, mult_adds,
    params, ... as keyword arguments."""
    # a record written by hand must carry metrics
    return write_run_record(path, RunRecord.from_info(info, **values), require_metrics=True)


def read_metrics_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate a metrics.json; errors name the file and the field."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise MetricsFileError(f"{p}: cannot read ({e.strerror or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetricsFileError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from e
    return validate_metrics(data, source=str(p))


# run_info keys that are RunRecord fields (the rest is written as info_<key>)
DESCRIBED = (
    "experiment", "role", "method", "dataset", "student", "teacher",
    "alpha", "resolution", "temperature", "kd_weight",
)  # fmt: skip


def build_record(
    config: Any,
    *,
    final: dict[str, float],
    teacher_metrics: dict[str, float] | None,
    task: str,
    defaults: dict[str, Any],
    cost: dict[str, int | None],
    timer: Any,
    progress: dict[str, Any],
    accelerator: Any,
) -> RunRecord:
    """The record of a Distiller run: what it is (`config.run_info`, else `defaults`), what it
    scored (`final`, the task's primary metric), cost (`cost`, `timer`: distill.timing) and did
    (`progress`)."""
    from distill.evaluation import EVALUATORS
    from distill.timing import device_name, peak_memory

    info = dict(config.run_info)
    info.pop("evaluate_teacher", None)
    described = {**defaults, **{k: info.pop(k) for k in DESCRIBED if k in info}}
    evaluator = EVALUATORS[task]
    peak, peak_kind = peak_memory(accelerator.device)
    return RunRecord(
        run_name=config.run_name or Path(config.output_dir).name,
        seed=config.seed,
        metrics=final,
        primary_metric=evaluator.primary,
        higher_is_better=evaluator.higher_is_better,
        teacher_metrics=teacher_metrics,
        **described,
        mult_adds=cost["mult_adds"],
        params=cost["params"],
        **timer.record_fields(),
        peak_mem_bytes=peak,
        peak_mem_kind=peak_kind,
        **progress,
        num_processes=accelerator.num_processes,
        mixed_precision=str(accelerator.mixed_precision),
        device=device_name(accelerator.device),
        info=info,
    )
