"""Recipe configuration: one typed dataclass per recipe, filled from YAML and then the command line.

YAML only sets values (it is read with `yaml.safe_load`, nothing is imported or built from a
string); every command-line flag `--some-field VALUE` overrides the field `some_field`. All
problems (unknown keys or flags, wrong types, out-of-range values) are collected and raised
together in one `ConfigError`, before any model or data is touched. This module imports no
torch; checking `method` reads the one method registry (distill.losses), which does (about a
second), so a bad config still fails in seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from distill.config import (
    ConfigError,
    DistillerConfig,
    MixedPrecision,
    OnNonFinite,
    ReportTo,
    TeacherDtype,
    from_dict,
    load_yaml,
)

C = TypeVar("C", bound="RecipeConfig")

Ensemble = Literal["probs", "losses"]  # distill.ensemble.Teachers' combine
GpuPipeline = Literal["auto", "on", "off"]
Optimizer = Literal["sgd", "adamw"]  # distill.schedules.OptimizerName
Schedule = Literal["step", "cosine", "constant"]  # distill.schedules.ScheduleName
_NONE_WORDS = {"none", "null", "~"}


class RecipeError(ValueError):
    """A problem with the user's data, weights or settings; its message says what to change."""


@dataclass
class RecipeConfig:
    """Fields every recipe shares. Sizes are global: `batch_size` is split over processes."""

    # where things are
    data_dir: str | None = None  # the dataset in its torchvision on-disk layout
    dataset: str | None = None  # or: a Hugging Face dataset name / local imagefolder/webdataset
    train_split: str = "train"  # the training split of a --dataset source
    eval_split: str = "validation"  # for --dataset sources
    streaming: bool = False  # --dataset only: iterate without downloading it all (needs max_steps)
    output_dir: str = "runs/recipe"  # the run folder: checkpoints, metrics.json, the student
    # how long
    epochs: int = 1  # passes over the training set (unless max_steps)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    batch_size: int = 256  # global, over all processes
    eval_batch_size: int | None = None  # global; default: batch_size
    grad_accum_steps: int = 1  # batches whose gradients make one optimizer step
    # optimisation
    optimizer: Optimizer = "sgd"  # SGD with momentum, or AdamW
    lr: float = 0.1  # peak learning rate (for the global batch size)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 weight decay
    nesterov: bool = False  # Nesterov momentum (SGD)
    schedule: Schedule = "step"  # step: x lr_gamma at lr_steps; cosine: to 0; constant
    lr_steps: list[int] = field(default_factory=list)  # epochs at which lr *= lr_gamma
    lr_gamma: float = 0.1  # the step schedule's factor
    warmup_epochs: float = 0.0  # linear learning-rate warm-up, in epochs
    max_grad_norm: float | None = None  # clip the gradient norm to this (unset: no clipping)
    label_smoothing: float = 0.0  # of the cross-entropy of the ce method
    # the run
    mixed_precision: MixedPrecision = "no"  # autocast of the forward passes
    save_every: int | None = None  # steps between checkpoints (also at each epoch end)
    eval_every: int | None = None  # steps between evaluations (also at each epoch end)
    log_every: int = 50  # steps between logged (and checked) loss rows
    keep_checkpoints: int = 2  # newest checkpoints kept (0: all)
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # start over in a folder holding a run: the old one is moved aside
    break_lock: bool = False  # clear the lock a killed run left in --output-dir
    allow_resume_changes: bool = False  # resume with settings that change the run (recorded)
    eval_only: bool = False  # evaluate the run folder's student (or --resume checkpoint)
    seed: int = 0  # initialisation, data order, augmentation: one seed for all
    workers: int = 8  # DataLoader worker processes per training process
    strict_data: bool = False  # stop at the first unreadable image instead of skipping it
    gpu_pipeline: GpuPipeline = "auto"  # decode + augment JPEGs on the GPU (image folders only)
    channels_last: bool = False  # channels-last memory (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the student and the teacher
    on_nonfinite: OnNonFinite = "raise"  # a NaN/inf loss stops the run, or its batch is skipped
    report_to: ReportTo = "none"  # experiment tracker (through accelerate)
    project: str = "mobiledistill"  # the tracker's project
    experiment: str = "recipe"  # W&B group, metrics.json "experiment"
    run_name: str | None = None  # default: derived from role/method/student/alpha/...
    progress: bool = True  # a progress bar (plain lines when not on a terminal)
    limit_train: int | None = None  # use only the first N training samples (smoke tests)
    limit_eval: int | None = None  # use only the first N evaluation samples
    # models
    student: str = "mobilenet_v1"  # a registered student, or timm:NAME / torchvision:NAME
    alpha: float = 1.0  # MobileNet's width multiplier (not the KD weight: see --kd-weight)
    resolution: int = 224  # the student's input size (the paper's resolution multiplier)
    teacher: str | list[str] | None = None  # a teachers spec [key=value ...]; again: an ensemble
    ensemble: Ensemble = "probs"  # several teachers: mean tempered probabilities, or a loss each
    teacher_weights: list[float] = field(default_factory=list)  # one per teacher; unset: equal
    teacher_options: dict[str, Any] = field(default_factory=dict)  # keyword args of teachers.load
    teacher_precision: TeacherDtype = "auto"  # the teacher's weights; auto: bf16 on CUDA, else fp32
    method: str = "kd"  # the distillation method (see the choices)
    temperature: float = 4.0  # softmax temperature T of the soft targets
    kd_weight: float = 0.9  # weight of the teacher term, 1 - it on the labels (KD papers' alpha)

    # Recipe classes override these two: the task kind of their students (the methods offered
    # are the distill.losses registry's for it) and the recipe's name.
    TASK: typing.ClassVar[str] = "logits"
    NAME: typing.ClassVar[str] = "recipe"

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        """The registered methods for this recipe's task (distill.losses.methods_for)."""
        from distill.losses import methods_for

        return methods_for(cls.TASK)

    def problems(self) -> list[str]:
        p: list[str] = []
        if not self.data_dir and not self.dataset:
            p.append("data_dir: set --data-dir (or --dataset for a Hugging Face source)")

        def at_least(name: str, lo: float, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if v is None or v < lo:
                p.append(f"{name} must be >= {lo:g}{' or unset' if optional else ''}, got {v}")

        p += self.distiller_config().problems()  # epochs, steps, saving, logging, precision
        at_least("batch_size", 1)
        at_least("eval_batch_size", 1, optional=True)
        at_least("workers", 0)
        at_least("limit_train", 1, optional=True)
        at_least("limit_eval", 1, optional=True)
        at_least("warmup_epochs", 0)
        at_least("weight_decay", 0)
        at_least("momentum", 0)
        if not self.lr > 0:
            p.append(f"lr must be > 0, got {self.lr}")
        if not 0 < self.lr_gamma <= 1:
            p.append(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if any(s < 1 for s in self.lr_steps) or self.lr_steps != sorted(self.lr_steps):
            p.append(f"lr_steps must be increasing epochs >= 1, got {self.lr_steps}")
        if not 0 <= self.label_smoothing < 1:
            p.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.method not in self.methods():
            p.append(f"method must be one of {', '.join(self.methods())}; got {self.method!r}")
        if not self.alpha > 0 or self.alpha > 4:
            p.append(f"alpha (width multiplier) must be in (0, 4], got {self.alpha}")
        if self.resolution < 32:
            p.append(
                f"resolution must be >= 32 (MobileNet downsamples by 32), got {self.resolution}"
            )
        if not self.temperature > 0:
            p.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.kd_weight <= 1:
            p.append(f"kd_weight must be in [0, 1], got {self.kd_weight}")
        if self.streaming and not self.dataset:
            p.append("streaming applies to --dataset sources only")
        if self.streaming and self.max_steps is None and not self.eval_only:
            p.append("streaming data has no length: set max_steps")
        if self.resume is not None and not self.resume:
            p.append("resume must be 'latest' or a checkpoint folder")
        p += self._teacher_problems()
        return p

    def teacher_specs(self) -> list[str]:
        """The --teacher specs, one per teacher (an ensemble when more than one)."""
        if self.teacher is None:
            return []
        return [self.teacher] if isinstance(self.teacher, str) else list(self.teacher)

    def _teacher_problems(self) -> list[str]:
        specs = self.teacher_specs()
        p = []
        if any(not s.strip() for s in specs) or (self.teacher is not None and not specs):
            p.append("teacher must be a spec like 'torchvision:resnet50' or unset")
        if self.teacher_weights and len(self.teacher_weights) != len(specs):
            p.append(
                f"teacher_weights has {len(self.teacher_weights)} weights for {len(specs)} "
                "teachers: give one per --teacher, or none for equal weights"
            )
        if any(not w > 0 for w in self.teacher_weights):
            p.append(f"teacher_weights must all be > 0, got {self.teacher_weights}")
        return p

    def resolved(self) -> dict[str, Any]:
        """The config as plain values, for printing, logging and config.json."""
        return dataclasses.asdict(self)

    def distiller_config(self, **run: Any) -> DistillerConfig:
        """The one mapping of the recipe's settings onto the Distiller's (the same Literal types
        on both sides); `run` sets what only the built run knows (task, run_name, run_info,
        tracker_init_kwargs, cached_teacher)."""
        return DistillerConfig(
            output_dir=self.output_dir,
            epochs=self.epochs,
            max_steps=self.max_steps,
            grad_accum_steps=self.grad_accum_steps,
            mixed_precision=self.mixed_precision,
            log_every=self.log_every,
            save_every=self.save_every,
            keep_checkpoints=self.keep_checkpoints,
            eval_every=self.eval_every,
            resume=self.resume,
            overwrite=self.overwrite,
            break_lock=self.break_lock,
            allow_resume_changes=self.allow_resume_changes,
            channels_last=self.channels_last,
            compile=self.compile,
            seed=self.seed,
            max_grad_norm=self.max_grad_norm,
            on_nonfinite=self.on_nonfinite,
            report_to=self.report_to,
            project=self.project,
            run_name=self.run_name,
            progress=self.progress,
            teacher_dtype=self.teacher_precision,
            **run,
        )


@dataclass
class CacheableRecipeConfig(RecipeConfig):
    """A recipe whose teacher outputs class logits can distil offline (FKD-style cache):
    `--cache-teacher DIR` runs the teacher once over `crops` crops of every training image and
    exits; `--teacher-cache DIR` then trains from DIR without loading the teacher."""

    cache_teacher: str | None = None  # build the teacher cache in this folder, then exit
    teacher_cache: str | None = None  # train from this cache (built by --cache-teacher)
    crops: int = 10  # augmentation draws cached per training image (K)
    topk: int = 10  # teacher logits kept exactly (fp16) per draw (k); the rest in 8 bits

    def problems(self) -> list[str]:
        p = super().problems()
        if self.cache_teacher is None and self.teacher_cache is None:
            return p
        if self.cache_teacher is not None and self.teacher_cache is not None:
            p.append(
                "cache_teacher and teacher_cache exclude each other: build the cache first "
                "(--cache-teacher DIR), then train with --teacher-cache DIR"
            )
        flag = "--cache-teacher" if self.cache_teacher is not None else "--teacher-cache"
        if self.crops < 1 or self.topk < 1:
            p.append(f"crops and topk must be >= 1, got {self.crops} and {self.topk}")
        if self.method == "ce":
            p.append(f"method ce uses no teacher: drop {flag}")
        if not self.teacher:
            p.append(f"{flag} needs --teacher: the cache is tied to the teacher spec")
        if self.dataset:
            p.append(f"{flag} reads image folders (--data-dir), not --dataset sources")
        if len(self.teacher_specs()) > 1 and self.ensemble == "losses":
            p.append(
                f"{flag} stores one answer per crop, but --ensemble losses needs each teacher's: "
                "use --ensemble probs (the cache then holds the averaged soft targets)"
            )
        if self.gpu_pipeline == "on":
            p.append(
                f"{flag} replays stored crops with the PIL pipeline: use --gpu-pipeline auto or off"
            )
        if self.cache_teacher is not None and (self.eval_only or self.resume is not None):
            p.append(
                "--cache-teacher only builds the cache and exits: drop --eval-only/--resume "
                "(an interrupted build resumes by itself when rerun)"
            )
        return p


# ------------------------------------------------------------------------------- parsing


def _optional(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType) and type(None) in get_args(tp)


def _is_bool(tp: Any) -> bool:
    return tp is bool or (_optional(tp) and bool in get_args(tp))


def _cli_value(raw: str, tp: Any) -> Any:
    """A flag's text as the value from_dict should coerce: 'none' unsets Optional fields,
    mappings are read as YAML flow style ('{arch: mobilenet_v1}')."""
    if _optional(tp) and raw.strip().lower() in _NONE_WORDS:
        return None
    if get_origin(tp) is dict:
        import yaml

        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else "invalid"
            raise ValueError(f"cannot read {raw!r} as a YAML mapping ({first})") from None
        return value if value is not None else {}
    return raw


def _choices(tp: Any) -> list[Any]:
    """The values of a Literal (or Optional[Literal]) type, else []."""
    if get_origin(tp) is typing.Literal:
        return list(get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return [v for a in get_args(tp) if get_origin(a) is typing.Literal for v in get_args(a)]
    return []


_FIELD_COMMENT = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.+?)\s*$")


def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment after it in the class body}, through the base classes: the one
    place a setting is described, read for --help."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for line in source.splitlines():
            m = _FIELD_COMMENT.match(line)
            if m:
                out[m.group(1)] = m.group(2)
    return out


def build_parser(cls: type[RecipeConfig], description: str) -> argparse.ArgumentParser:
    """`--config FILE` plus one `--field-name VALUE` flag per dataclass field."""
    ap = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=argparse.SUPPRESS,
        allow_abbrev=False,
    )
    ap.add_argument("--config", help="YAML file of field: value (flags override it)")
    ap.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        factory: Any = f.default_factory
        default = f.default if f.default is not dataclasses.MISSING else factory()
        choices = _choices(tp) or (list(cls.methods()) if f.name == "method" else [])
        text = comments.get(f.name, f.name.replace("_", " "))
        text += f"; one of {', '.join(map(str, choices))}" if choices else ""
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "metavar": "V",
            "help": f"{text} (default: {default!r})".replace("%", "%%"),
        }
        if _is_bool(tp):
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif f.name == "resume":
            kwargs.update(nargs="?", const="latest", metavar="latest|PATH")
        elif f.name == "teacher":  # given more than once: an ensemble
            kwargs.update(action="append", metavar="SPEC")
        ap.add_argument(flag, **kwargs)
    return ap


def parse_config(cls: type[C], argv: Sequence[str] | None, description: str = "") -> tuple[C, bool]:
    """(config, print_only) from `--config` YAML and flags; raises ConfigError listing every
    problem (unknown flags or keys, wrong types, values out of range)."""
    ap = build_parser(cls, description)
    args, unknown = ap.parse_known_args(argv)
    ns = vars(args)
    problems = _unknown(unknown, [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(cls)])
    source = "the command line"
    data: dict[str, Any] = {}
    config_file = ns.pop("config", None)
    print_only = bool(ns.pop("print_config", False))
    if config_file:
        source = f"{config_file} + command line"
        try:
            data = load_yaml(config_file)
        except ConfigError as e:
            raise ConfigError(e.problems + problems, str(config_file)) from None
    hints = typing.get_type_hints(cls)
    if isinstance(ns.get("teacher"), list) and len(ns["teacher"]) == 1:
        ns["teacher"] = ns["teacher"][0]  # one --teacher: a spec, as in YAML
    for name, raw in ns.items():
        if name == "teacher" and isinstance(raw, list):
            if "list" not in str(hints[name]):
                problems.append(f"the {cls.NAME} recipe takes one --teacher, got {len(raw)}")
            data[name] = list(raw)
            continue
        try:
            data[name] = _cli_value(raw, hints[name])
        except ValueError as e:
            problems.append(f"{name}: {e}")
    cfg, more = _build(cls, data, source)
    problems += more
    if problems:
        raise ConfigError(problems, source)
    assert cfg is not None
    return cfg, print_only


def _unknown(args: Sequence[str], flags: Sequence[str]) -> list[str]:
    """Problems for arguments argparse did not recognise (a flag's value stays with it)."""
    import difflib

    problems: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            name = arg.split("=", 1)[0]
            close = difflib.get_close_matches(name, flags, n=1)
            hint = f" (did you mean {close[0]}?)" if close else " (see --help)"
            problems.append(f"unknown option {name!r}{hint}")
            i += 1
            while i < len(args) and not args[i].startswith("-"):
                i += 1  # its value
            continue
        problems.append(f"unexpected argument {arg!r}")
        i += 1
    return problems


def _build(cls: type[C], data: Mapping[str, Any], source: str) -> tuple[C | None, list[str]]:
    """Every key checked on its own, so one error lists all of them; then ranges."""
    problems: list[str] = []
    good: dict[str, Any] = {}
    for key, value in data.items():
        try:
            from_dict(cls, {key: value}, source=source, check=False)
        except ConfigError as e:
            problems += e.problems
        else:
            good[key] = value
    try:
        cfg = from_dict(cls, good, source=source, check=False)
    except ConfigError as e:  # pragma: no cover - every key passed on its own
        return None, problems + e.problems
    except (TypeError, ValueError) as e:
        return None, [*problems, str(e)]
    return cfg, problems + cfg.problems()


def format_config(cfg: RecipeConfig) -> str:
    """The resolved config as `key: value` lines (what the run will use)."""
    lines = [f"resolved config ({type(cfg).__name__}):"]
    for k, v in cfg.resolved().items():
        lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    return "\n".join(lines)


def parse_teacher(
    spec: str | None, options: Mapping[str, Any]
) -> tuple[str | None, dict[str, Any]]:
    """'file:/t.safetensors arch=torchvision:resnet50 num_classes=40' -> (spec, kwargs).

    Inline `key=value` options are read as YAML scalars ("none"/"null" -> None); the
    `teacher_options` mapping is applied first, inline options override it.
    """
    if spec is None:
        return None, dict(options)
    import shlex

    import yaml

    parts = shlex.split(spec)
    if not parts:
        return None, dict(options)
    kwargs = dict(options)
    for item in parts[1:]:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                [f"teacher option {item!r} must look like key=value (in {spec!r})"], "teacher"
            )
        if raw.strip().lower() in _NONE_WORDS:
            kwargs[key] = None
            continue
        try:
            kwargs[key] = yaml.safe_load(raw)
        except yaml.YAMLError:
            kwargs[key] = raw
        if not isinstance(kwargs[key], (str, int, float, bool, list, dict)):
            kwargs[key] = raw
    return parts[0], kwargs


def output_path(cfg: RecipeConfig, *parts: str) -> Path:
    return Path(cfg.output_dir).expanduser().joinpath(*parts)
