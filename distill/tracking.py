"""One schema for every run: names, W&B grouping, `metrics.json`, and reading offline W&B runs.

A run is described once by a `RunInfo`; its name, tags, tracker config and the `metrics.json`
written at the end all derive from it, so `compare` and `report` can line runs up by the same
fields (experiment, role, method, student, alpha, resolution, ...).

W&B is driven through accelerate's trackers:

    info = RunInfo(experiment="digits", role="distilled", method="kd", student="mobilenet_v1",
                   dataset="digits", teacher="resnet18", alpha=0.5, resolution=16,
                   temperature=4.0, kd_weight=0.9, seed=0)
    accelerator.init_trackers(project, config=info.config(extra),
                              init_kwargs={"wandb": info.wandb_init_kwargs()})
    accelerator.log({"train/loss": ..., "train/lr": ...}, step=step)
    log_summary(accelerator, summary_fields(...))

History keys: `train/<part>` (loss parts), `train/lr`, `eval/<metric>`. Summary keys are the
`SUMMARY_*` constants below plus `eval/<metric>`, `teacher/<metric>`, `gap_to_teacher/<metric>`.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROLES = ("teacher", "scratch", "distilled")
SCHEMA_VERSION = 1

# Summary fields every run reports (W&B summary and the report's axes).
SUMMARY_MULT_ADDS = "mult_adds"
SUMMARY_PARAMS = "params"
SUMMARY_IMAGES_PER_S = "images_per_s"
SUMMARY_PEAK_MEM = "peak_mem"
EVAL_PREFIX = "eval/"
TRAIN_PREFIX = "train/"
TEACHER_PREFIX = "teacher/"
GAP_PREFIX = "gap_to_teacher/"

_SAFE = re.compile(r"[^A-Za-z0-9_.]+")


class MetricsFileError(ValueError):
    """A metrics.json that is missing, unreadable or does not follow the schema."""


def _num(x: float) -> str:
    """Compact number for names: 1.0 -> "1", 0.75 -> "0.75", 4.0 -> "4"."""
    return f"{x:g}"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _slug(text: str) -> str:
    return _SAFE.sub("_", text).strip("_") or "x"


@dataclass(frozen=True)
class RunInfo:
    """What a run is: the fields every comparison groups and filters by.

    `experiment` becomes the W&B group, `role` the job type. `alpha` is the width multiplier and
    `resolution` the input size (the paper's rho); `temperature`/`kd_weight` are the KD loss's.
    For a teacher run, `student` names the model being evaluated (the teacher's architecture).
    """

    experiment: str
    role: str
    method: str
    student: str
    dataset: str
    teacher: str | None = None
    alpha: float | None = None
    resolution: int | None = None
    temperature: float | None = None
    kd_weight: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("experiment", "method", "student", "dataset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"RunInfo.{name} must be a non-empty string.")
        if self.role not in ROLES:
            raise ValueError(f"RunInfo.role must be one of {ROLES}, got {self.role!r}.")
        if self.role == "distilled" and not self.teacher:
            raise ValueError("RunInfo(role='distilled') needs teacher=<the teacher's name>.")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"RunInfo.alpha (width multiplier) must be > 0, got {self.alpha}.")
        if self.resolution is not None and (not _is_int(self.resolution) or self.resolution <= 0):
            raise ValueError(f"RunInfo.resolution must be a positive int, got {self.resolution}.")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"RunInfo.temperature must be > 0, got {self.temperature}.")
        if self.kd_weight is not None and not self.kd_weight >= 0:
            raise ValueError(f"RunInfo.kd_weight must be >= 0, got {self.kd_weight}.")
        if not _is_int(self.seed):
            raise ValueError(f"RunInfo.seed must be an int, got {self.seed!r}.")

    def run_name(self) -> str:
        """Deterministic, readable: "distilled-kd-mobilenet_v1-a0.5-r160-T4-w0.9-s0"."""
        model = self.teacher if self.role == "teacher" and self.teacher else self.student
        parts = [self.role]
        if self.role != "teacher":
            parts.append(_slug(self.method))
        parts.append(_slug(model))
        if self.alpha is not None:
            parts.append(f"a{_num(self.alpha)}")
        if self.resolution is not None:
            parts.append(f"r{self.resolution}")
        if self.role == "distilled":
            if self.temperature is not None:
                parts.append(f"T{_num(self.temperature)}")
            if self.kd_weight is not None:
                parts.append(f"w{_num(self.kd_weight)}")
        parts.append(f"s{self.seed}")
        return "-".join(parts)

    def tags(self) -> list[str]:
        """W&B tags (each under W&B's 64-character limit)."""
        tags = [self.role, self.method, f"student:{self.student}", f"dataset:{self.dataset}"]
        if self.teacher:
            tags.append(f"teacher:{self.teacher}")
        if self.alpha is not None:
            tags.append(f"alpha:{_num(self.alpha)}")
        if self.resolution is not None:
            tags.append(f"res:{self.resolution}")
        return [t[:64] for t in tags]

    def config(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The tracker config: the schema fields, then `extra` (hyper-parameters) on top.

        `extra` may not redefine a schema field with a different value, so the report's axes
        always mean the same thing.
        """
        cfg: dict[str, Any] = asdict(self)
        for key, value in (extra or {}).items():
            if key in cfg and cfg[key] != value:
                raise ValueError(
                    f"config key {key!r}={value!r} conflicts with RunInfo.{key}={cfg[key]!r}; "
                    "set it on RunInfo only."
                )
            cfg[key] = value
        return cfg

    def wandb_init_kwargs(self) -> dict[str, Any]:
        """`init_kwargs={"wandb": info.wandb_init_kwargs()}` for `Accelerator.init_trackers`."""
        return {
            "group": self.experiment,
            "job_type": self.role,
            "tags": self.tags(),
            "name": self.run_name(),
        }


def summary_fields(
    metrics: Mapping[str, float],
    *,
    mult_adds: int,
    params: int,
    images_per_s: float | None = None,
    peak_mem_bytes: int | None = None,
    teacher_metrics: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The summary every run reports: eval/<m>, teacher/<m>, gap_to_teacher/<m> and costs."""
    out: dict[str, Any] = {SUMMARY_MULT_ADDS: int(mult_adds), SUMMARY_PARAMS: int(params)}
    if images_per_s is not None:
        out[SUMMARY_IMAGES_PER_S] = float(images_per_s)
    if peak_mem_bytes is not None:
        out[SUMMARY_PEAK_MEM] = int(peak_mem_bytes)
    for key, value in metrics.items():
        out[EVAL_PREFIX + key] = float(value)
    for key, value in (teacher_metrics or {}).items():
        out[TEACHER_PREFIX + key] = float(value)
        if key in metrics:
            out[GAP_PREFIX + key] = float(metrics[key]) - float(value)
    return out


def log_summary(accelerator: Any, values: Mapping[str, Any]) -> None:
    """Write `values` into the run summary of every W&B tracker `accelerator` holds.

    accelerate's `log` only appends history rows; the summary is where the report's scatter
    plots read mult_adds/params from. Other trackers get the values as a final log row.
    """
    for tracker in getattr(accelerator, "trackers", []):
        if getattr(tracker, "name", None) == "wandb":
            tracker.tracker.summary.update(dict(values))
        else:
            tracker.log(dict(values))


# ----------------------------------------------------------------------------- metrics.json

_STR_FIELDS = ("run_name", "role", "method", "student")
_OPT_FLOAT_FIELDS = ("alpha", "temperature", "kd_weight", "images_per_s", "epochs", "wall_s")
_OPT_INT_FIELDS = ("resolution", "peak_mem_bytes", "steps")
_OPT_STR_FIELDS = ("experiment", "dataset", "teacher", "date", "device")


def validate_metrics(data: Any, source: str = "metrics.json") -> dict[str, Any]:
    """Check a metrics.json dict against schema 1; return it with optional fields filled.

    Reading is lenient where a finished run may lack a value (experiment, dataset, mult_adds,
    params may be null; extra keys are kept); writing through `metrics_record` is strict.

    Raises MetricsFileError naming `source` and the offending field.
    """

    def fail(field: str, why: str) -> MetricsFileError:
        return MetricsFileError(f"{source}: field {field!r} {why}")

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
    metrics = out.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise fail("metrics", f"must be a non-empty object of numbers, got {metrics!r}")
    for key, value in metrics.items():
        if not _is_num(value):
            raise fail(f"metrics.{key}", f"must be a finite number, got {value!r}")
    out.setdefault("primary_metric", "top1" if "top1" in metrics else next(iter(metrics)))
    if out["primary_metric"] not in metrics:
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
    return out


def metrics_record(
    info: RunInfo,
    *,
    metrics: Mapping[str, float],
    mult_adds: int,
    params: int,
    primary_metric: str = "top1",
    higher_is_better: bool = True,
    teacher_metrics: Mapping[str, float] | None = None,
    images_per_s: float | None = None,
    peak_mem_bytes: int | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    wall_s: float | None = None,
    device: str | None = None,
    date: str | None = None,
) -> dict[str, Any]:
    """Build and validate the metrics.json dict of schema 1 for `info`."""
    record: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "run_name": info.run_name(),
        **asdict(info),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "primary_metric": primary_metric,
        "higher_is_better": higher_is_better,
        "teacher_metrics": (
            None if teacher_metrics is None else {k: float(v) for k, v in teacher_metrics.items()}
        ),
        "mult_adds": int(mult_adds),
        "params": int(params),
        "images_per_s": None if images_per_s is None else float(images_per_s),
        "peak_mem_bytes": None if peak_mem_bytes is None else int(peak_mem_bytes),
        "steps": steps,
        "epochs": None if epochs is None else float(epochs),
        "wall_s": None if wall_s is None else float(wall_s),
        "date": date or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device,
    }
    return validate_metrics(record, source=f"metrics of run {record['run_name']}")


def write_metrics_json(path: str | os.PathLike[str], info: RunInfo, **fields: Any) -> dict:
    """Validate and atomically write metrics.json (tmp file + os.replace); return the record.

    `fields` are `metrics_record`'s keyword arguments (metrics, mult_adds, params, ...).
    """
    record = metrics_record(info, **fields)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record


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


# ----------------------------------------------------------------------------- offline W&B runs

# wandb-core writes a `.wandb` transaction log in LevelDB's log format: a 7-byte file header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
# (crc32 of type+data, length, type: FULL/FIRST/MIDDLE/LAST); a record is one protobuf
# `wandb_internal.Record`. wandb 0.31 no longer ships a Python reader (its datastore moved to Go),
# so this is a small reader of that documented format.
_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B run file")
    ident, magic, version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block trailer padding
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        start = pos + _CHUNK.size
        if kind == 0 and length == 0:  # zero padding: nothing more written yet
            break
        if start + length > len(data):  # the run is still writing: stop at the last whole record
            break
        chunk = data[start : start + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos} (checksum mismatch)")
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _find_run_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such W&B run file or run folder")
    found = sorted(path.glob("*.wandb")) or sorted(path.glob("*/*.wandb"))
    found = found or sorted(path.glob("wandb/*/*.wandb"))
    # wandb's latest-run is a link to one of the run folders: count each run file once
    found = sorted({f.resolve(): f for f in found if not f.parent.is_symlink()}.values()) or found
    if not found:
        raise FileNotFoundError(f"{path}: no .wandb run file inside (looked in */ and wandb/*/)")
    if len(found) > 1:
        names = ", ".join(str(f) for f in found[:5])
        raise ValueError(f"{path}: holds {len(found)} W&B runs ({names}); pass one run folder")
    return found[0]


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set_path(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            nxt = target[key] = {}
        target = nxt
    target[keys[-1]] = value


def _del_path(target: dict[str, Any], keys: list[str]) -> None:
    for key in keys[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            return
        target = nxt
    target.pop(keys[-1], None)


def _history_value(item: Any) -> Any:
    """A HistoryItem's value: `value_json`, or the typed `value` oneof newer encoders use."""
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _apply(target: dict[str, Any], update: Any) -> None:
    """Apply a ConfigRecord/SummaryRecord (update + remove items) to a dict."""
    for item in update.update:
        _set_path(target, _item_path(item), json.loads(item.value_json))
    for item in update.remove:
        _del_path(target, _item_path(item))


def read_wandb_run(path: str | os.PathLike[str], *, wait_s: float = 0.0) -> dict[str, Any]:
    """Parse an offline W&B run (`.wandb` file, or the run folder holding one).

    Returns {"id", "project", "entity", "name", "group", "job_type", "tags", "config",
    "history": [row, ...], "summary", "exit_code"} with W&B's internal `_wandb` keys dropped.
    Values are decoded from their JSON; history rows keep `_step`/`_runtime`/`_timestamp`.

    wandb-core writes the file from its own process and may still be flushing it when
    `run.finish()` / `accelerator.end_training()` returns; `wait_s` > 0 re-reads until the
    run's exit record (its last) is there, for up to that many seconds. A run that is still
    going (or crashed) reads as far as it was written, with `exit_code` None.
    """
    run_file = _find_run_file(Path(path))
    deadline = time.monotonic() + wait_s
    while True:
        out = _parse_run_file(run_file)
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _parse_run_file(run_file: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {
        "file": str(run_file),
        "id": None,
        "project": None,
        "entity": None,
        "name": None,
        "group": None,
        "job_type": None,
        "tags": [],
        "config": {},
        "history": [],
        "summary": {},
        "exit_code": None,
    }
    for raw in _wandb_records(run_file):
        record = pb.Record()  # type: ignore[attr-defined]  # version-switching shim module
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                id=run.run_id,
                project=run.project or None,
                entity=run.entity or None,
                name=run.display_name or None,
                group=run.run_group or None,
                job_type=run.job_type or None,
                tags=list(run.tags),
            )
            _apply(out["config"], run.config)
            _apply(out["summary"], run.summary)
        elif kind == "config":
            _apply(out["config"], record.config)
        elif kind == "summary":
            _apply(out["summary"], record.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _history_value(item))
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    for section in ("config", "summary"):
        out[section].pop("_wandb", None)
    return out
