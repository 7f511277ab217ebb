"""One schema for every run: names, tags and W&B grouping (metrics.json: distill.run_record).

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
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from distill.run_folder import flatten

# metrics.json lives in distill.run_record and the offline W&B reader in distill.wandb_offline;
# their names are importable from here as well.
from distill.run_record import (
    ROLES,
    SCHEMA_VERSION,
    MetricsFileError,
    RunRecord,
    metrics_record,
    read_metrics_json,
    validate_metrics,
    write_metrics_json,
    write_run_record,
)
from distill.wandb_offline import read_wandb_run

__all__ = [
    "ROLES",
    "SCHEMA_VERSION",
    "MetricsFileError",
    "RunInfo",
    "RunRecord",
    "end_trackers",
    "log_run_summary",
    "log_summary",
    "loggable_config",
    "metrics_record",
    "read_metrics_json",
    "read_wandb_run",
    "start_trackers",
    "summary_fields",
    "validate_metrics",
    "write_metrics_json",
    "write_run_record",
]

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


def start_trackers(accelerator: Any, config: Any, logged: Mapping[str, Any]) -> None:
    """Start accelerate's trackers for a `DistillerConfig` (once per accelerator): the W&B run
    gets `config.tracker_init_kwargs` (group, job type, tags), the run name and `WANDB_DIR`."""
    if not accelerator.log_with or getattr(accelerator, "trackers", None):
        return
    wandb_kwargs = dict(config.tracker_init_kwargs)
    if config.run_name:
        wandb_kwargs.setdefault("name", config.run_name)
    if os.environ.get("WANDB_DIR"):
        # wandb keeps process-wide settings from its first run; honour the current folder
        wandb_kwargs.setdefault("dir", os.environ["WANDB_DIR"])
    init_kwargs = {"wandb": wandb_kwargs} if wandb_kwargs else {}
    values = dict(logged)
    if config.report_to != "wandb":  # TensorBoard/MLflow hyper-parameters: flat scalars only
        values = {k: _scalar(v) for k, v in flatten(logged).items()}
    accelerator.init_trackers(config.project, config=values, init_kwargs=init_kwargs)


def _scalar(v: Any) -> int | float | str | bool:
    return v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)


def log_run_summary(accelerator: Any, record: Mapping[str, Any]) -> None:
    """The run record's numbers and strings, plus `summary_fields`, into the trackers' summary."""
    flat = {
        k: v
        for k, v in record.items()
        if isinstance(v, (int, float, str)) and not isinstance(v, bool)
    }
    flat.update(
        summary_fields(
            record.get("metrics") or {},
            mult_adds=int(record.get("mult_adds") or 0),
            params=int(record.get("params") or 0),
            images_per_s=record.get("images_per_s"),
            peak_mem_bytes=record.get("peak_mem_bytes"),
            teacher_metrics=record.get("teacher_metrics"),
        )
    )
    log_summary(accelerator, flat)


def loggable_config(
    config: Any,
    teacher_meta: Mapping[str, Any] | None,
    objective: str,
    objective_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The tracker config and config.json of a Distiller run: run_info's fields at the top, the
    DistillerConfig under "distiller", the teacher's metadata (without label names), the
    objective's class name and what it is (method, temperature, KD weight)."""
    cfg = asdict(config)
    info = cfg.pop("run_info")
    cfg.pop("tracker_init_kwargs")
    teacher = None
    if teacher_meta is not None:
        teacher = {k: v for k, v in teacher_meta.items() if k != "label_names"}
    return {
        **info,
        "seed": config.seed,
        "distiller": cfg,
        "teacher_meta": teacher,
        "objective": objective,
        "objective_config": dict(objective_config or {}),
    }


def end_trackers(accelerator: Any) -> None:
    """Finish the trackers a run started, leaving the process group up (accelerate's
    `end_training` also destroys it: call that at the end of a script, as the recipes do)."""
    for tracker in getattr(accelerator, "trackers", []):
        tracker.finish()
    accelerator.trackers = []
