"""Typed dataclass configs from YAML/dicts, with one error that lists every problem, and the
Distiller's own config.

YAML only sets values here; nothing is imported or built from a string. This module imports no
torch, so a bad config fails in well under a second.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, cast, get_args, get_origin

from distill.constants import TASK_KINDS, TaskKind

T = TypeVar("T")

MixedPrecision = Literal["no", "bf16", "fp16"]
OnNonFinite = Literal["raise", "skip"]
ReportTo = Literal["none", "wandb", "tensorboard", "mlflow"]  # accelerate's trackers
TeacherDtype = Literal["auto", "fp32", "bf16", "fp16"]  # distill.teacher.auto_teacher_dtype
Task = Literal["auto"] | TaskKind  # auto: the teacher's kind, else logits


class ConfigError(ValueError):
    """Invalid configuration; `problems` lists each one, the message shows them all."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if all(get_origin(a) is typing.Literal for a in args):
            return "one of " + ", ".join(str(v) for a in args for v in get_args(a))
        return " or ".join(_type_name(a) for a in args)
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value) with light coercion: int -> float, str from CLI -> the field type."""
    value = cast(Any, value)
    origin = get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            return (type(None) in args), None
        for arg in args:
            if arg is type(None):
                continue
            ok, v = _coerce(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is typing.Literal:
        return (value in get_args(tp)), value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            return False, value
        item_types = [a for a in get_args(tp) if a is not Ellipsis]
        inner = item_types[0] if item_types else Any
        out: list[Any] = []
        for v in value:
            ok, cv = _coerce(v, inner)
            if not ok:
                return False, value
            out.append(cv)
        return True, (tuple(out) if origin is tuple else out)
    if origin is dict:
        return isinstance(value, Mapping), dict(value) if isinstance(value, Mapping) else value
    if tp is bool:
        if isinstance(value, bool):
            return True, value
        if isinstance(value, str) and value.lower() in {"true", "1", "yes", "false", "0", "no"}:
            return True, value.lower() in {"true", "1", "yes"}
        return False, value
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if tp is int:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)
        if isinstance(value, str):
            try:
                return True, int(value)
            except ValueError:
                return False, value
        return False, value
    if tp is str:
        return isinstance(value, (str, Path)), str(value) if isinstance(value, Path) else value
    if isinstance(tp, type):
        return isinstance(value, tp), value
    return True, value


def from_dict(
    cls: type[T], data: Mapping[str, Any], *, source: str = "config", check: bool = True
) -> T:
    """Build dataclass `cls` from `data`: unknown keys, wrong types and (if the class has a
    `problems()` method) out-of-range values are all reported together in one ConfigError."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems: list[str] = []
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in fields:
            close = [f for f in fields if f.startswith(name[:3])][:5]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"unknown key {key!r}{hint}")
            continue
        ok, coerced = _coerce(value, hints[name])
        if not ok:
            problems.append(
                f"{key}: expected {_type_name(hints[name])}, got {value!r} ({type(value).__name__})"
            )
            continue
        kwargs[name] = coerced
    if problems:
        raise ConfigError(problems, source)
    obj = cls(**kwargs)
    if check:
        validate(obj, source)
    return obj


def validate(obj: Any, source: str = "config") -> None:
    """Raise one ConfigError if `obj.problems()` returns anything."""
    check: Callable[[], list[str]] | None = getattr(obj, "problems", None)
    if check is not None:
        problems = check()
        if problems:
            raise ConfigError(problems, source)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping of plain values (safe_load: no Python objects are constructed)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {p} does not exist"], str(p))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], str(p)) from e
    if not isinstance(data, dict):
        raise ConfigError(["the top level must be a mapping of key: value"], str(p))
    return data


@dataclass
class DistillerConfig:
    """How the loop runs. Recipes map their flags onto this; it is logged as is."""

    output_dir: str = "runs/distill"
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    grad_accum_steps: int = 1
    mixed_precision: MixedPrecision = "no"
    log_every: int = 10
    save_every: int | None = None  # optimizer steps between checkpoints
    save_at_epoch_end: bool = True
    keep_checkpoints: int = 2
    eval_every: int | None = None  # optimizer steps; None: at epoch ends only
    eval_at_epoch_end: bool = True
    resume: str | None = None  # "latest", a checkpoint folder, or None
    channels_last: bool = False
    compile: bool = False
    seed: int = 0
    max_grad_norm: float | None = None
    on_nonfinite: OnNonFinite = "raise"
    task: Task = "auto"  # what the student outputs; auto: the teacher's kind, else logits
    report_to: ReportTo = "none"
    project: str = "mobiledistill"
    run_name: str | None = None
    progress: bool = True
    export_student: bool = True
    check_compatible: bool = True
    cached_teacher: bool = False  # batches carry "teacher_logits": no teacher model needed
    # the frozen teacher's weights, apart from the student's precision; auto: bf16 on CUDA
    # GPUs with bf16 tensor cores, else fp32 (distill.teacher.auto_teacher_dtype)
    teacher_dtype: TeacherDtype = "auto"
    # the run folder (distill.run_folder): a folder holding another run is refused unless
    # overwrite (the old run is moved aside); a stale lock is cleared with break_lock; a resume
    # that would change what the run is is refused unless allow_resume_changes (then recorded)
    overwrite: bool = False
    break_lock: bool = False
    allow_resume_changes: bool = False
    collective_timeout_s: float = 600.0  # a process that waits longer on the others gives up
    run_info: dict[str, Any] = field(default_factory=dict)  # role, method, alpha, ... for reports
    tracker_init_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. wandb group/tags

    def problems(self) -> list[str]:
        p = []
        if self.epochs < 1 and self.max_steps is None:
            p.append(f"epochs must be >= 1 (got {self.epochs}) unless max_steps is set")
        for name in ("max_steps", "save_every", "eval_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                p.append(f"{name} must be >= 1 or unset, got {v}")
        for name in ("grad_accum_steps", "log_every"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name, allowed in (
            ("mixed_precision", get_args(MixedPrecision)),
            ("on_nonfinite", get_args(OnNonFinite)),
            ("task", ("auto", *TASK_KINDS)),
            ("report_to", get_args(ReportTo)),
            ("teacher_dtype", get_args(TeacherDtype)),
        ):
            if getattr(self, name) not in allowed:
                p.append(f"{name} must be {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.collective_timeout_s > 0:
            p.append(f"collective_timeout_s must be > 0, got {self.collective_timeout_s}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            p.append(f"max_grad_norm must be > 0 or unset, got {self.max_grad_norm}")
        return p


def make_accelerator(config: DistillerConfig) -> Any:
    """The Accelerator the Distiller makes for itself: seedable sampler (exact resume),
    scheduler stepped by the loop, W&B when report_to="wandb". Recipes call it too."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs

    cfg = config
    # a rank that died leaves the others waiting in a collective: they give up after this
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.collective_timeout_s))
    return Accelerator(
        kwargs_handlers=[timeout],
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        # tensorboard and mlflow write under the run folder (<output_dir>/<project>/...)
        project_dir=cfg.output_dir if cfg.report_to in ("tensorboard", "mlflow") else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,
    )
