"""The tail every recipe shares after parsing: the accelerator, the Distiller, `--eval-only`,
`--cache-teacher`, and errors printed for people instead of tracebacks.

A recipe supplies `build(cfg, ctx) -> Built` (data, student, teacher, objective and what the
run is); `run_recipe` does the rest, in accelerate's example shape:

    parse -> accelerator -> build -> Distiller(...).fit() (or .evaluate()) -> end

The loop, evaluation, checkpointing, the skip report and metrics.json live in `distill/`. This
module imports no torch at import time, so a bad config fails before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from distill.config import ConfigError
from recipes._config import (
    RecipeConfig,
    RecipeError,
    format_config,
    output_path,
    parse_config,
    parse_teacher,
)

if TYPE_CHECKING:
    from torch import nn

    from distill.constants import TaskKind
    from distill.data.teacher_cache import TeacherCache
    from distill.teacher import Teacher
    from distill.tracking import RunInfo

C = TypeVar("C", bound=RecipeConfig)

EXIT_USER_ERROR = 2
TRACEBACK_ENV = "MOBILEDISTILL_TRACEBACK"  # =1 shows the full traceback of a handled error

__all__ = [
    "Built",
    "Context",
    "RecipeError",
    "describe",
    "load_teacher",
    "run_recipe",
    "user_errors",
]


# ------------------------------------------------------------------------------ errors


@contextmanager
def user_errors(what: str) -> Iterator[None]:
    """Turn the plain ValueError/TypeError/KeyError/FileNotFoundError of a library call into a
    RecipeError prefixed with what was being done."""
    try:
        yield
    except RecipeError:
        raise
    except (ValueError, TypeError, KeyError, FileNotFoundError, NotADirectoryError) as e:
        if _is_user_error(e):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise RecipeError(f"{what}: {msg}") from e


def _user_error_types() -> tuple[type[BaseException], ...]:
    import pickle

    from distill.checkpoint import CheckpointError
    from distill.data import AnnotationError, BadImageError, DataLayoutError
    from distill.guards import NonFiniteLossError
    from distill.run_folder import RunFolderError
    from teachers import MissingWeightsError

    return (
        ConfigError,
        RecipeError,
        DataLayoutError,
        AnnotationError,
        BadImageError,
        MissingWeightsError,
        CheckpointError,
        NonFiniteLossError,
        RunFolderError,
        PermissionError,
        pickle.UnpicklingError,  # a refused file (it would have run code): UnsafeCheckpointError
    )


def _is_user_error(e: BaseException) -> bool:
    if isinstance(e, (ConfigError, RecipeError)):
        return True
    try:
        return isinstance(e, _user_error_types())
    except ImportError:  # pragma: no cover - broken install: show everything
        return False


def _message(e: BaseException) -> str:
    """The error's text; for one re-raised from a DataLoader worker, its last line only (torch
    prefixes "Caught X in DataLoader worker process N. Original Traceback ...")."""
    msg = str(e)
    if "Original Traceback" in msg:
        last = msg.strip().splitlines()[-1]
        msg = last.partition(f"{type(e).__name__}: ")[2] or last
    return msg


def _hint(e: BaseException) -> str:
    from distill.data import BadImageError

    if isinstance(e, BadImageError):
        return "\n(--strict-data stops at the first unreadable image; without it such files are skipped and counted)"
    return ""


# ------------------------------------------------------------------------------ what a recipe builds


@dataclass
class Context:
    """What `build` gets besides the config: the accelerator and per-process batch sizes."""

    cfg: RecipeConfig
    accelerator: Any
    per_process_batch: int
    per_process_eval_batch: int

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    def loaders(self, train_set: Any, eval_set: Any) -> tuple[Any, Any]:
        """The training and evaluation loaders every recipe ends with: unreadable images
        replaced and counted (`--strict-data` raises), `--limit-train/--limit-eval` applied."""
        from distill.data.loaders import limit, make_loader, robust

        cfg = self.cfg
        train = limit(robust(train_set, strict=cfg.strict_data), cfg.limit_train)
        evals = limit(robust(eval_set, strict=cfg.strict_data), cfg.limit_eval)
        return (
            make_loader(
                train, self.per_process_batch, train=True, workers=cfg.workers, seed=cfg.seed
            ),
            make_loader(
                evals, self.per_process_eval_batch, train=False, workers=cfg.workers, seed=cfg.seed
            ),
        )


@dataclass
class Built:
    """What a recipe builds; `run_recipe` trains or evaluates it.

    `info` says what the run is (metrics.json, W&B group/name/tags); `cache` is an opened
    teacher cache for `--teacher-cache` (then `teacher` is None and batches carry the teacher's
    answers); `build_cache` is what `--cache-teacher DIR` runs instead of training.
    """

    student: nn.Module
    teacher: Teacher | None
    objective: nn.Module
    train_loader: Any
    eval_loader: Any
    info: RunInfo
    task: TaskKind
    extra_params: list[Any] = field(default_factory=list)  # trained besides the student
    notes: dict[str, Any] = field(default_factory=dict)  # extra run_info
    cache: TeacherCache | None = None
    build_cache: Callable[[], None] | None = None


def describe(cfg: RecipeConfig, **fields: Any) -> RunInfo:
    """The run's `RunInfo`: the recipe's experiment and seed, its student, width (registered
    students only) and resolution unless `fields` say otherwise, plus `fields` (role, method,
    dataset, teacher, temperature, kd_weight)."""
    from distill.tracking import RunInfo

    alpha = cfg.alpha if ":" not in cfg.student else None  # timm:/torchvision: have no alpha
    defaults = {"student": cfg.student, "alpha": alpha, "resolution": cfg.resolution}
    return RunInfo(experiment=cfg.experiment, seed=cfg.seed, **{**defaults, **fields})


def load_teacher(cfg: RecipeConfig, **defaults: Any) -> Teacher:
    """`teachers.load(spec, **defaults, **cfg.teacher_options, **inline options)` for each
    --teacher; several make one `distill.ensemble.Teachers` (--ensemble, --teacher-weights; in
    "probs" mode at the recipe's temperature)."""
    specs = cfg.teacher_specs()
    if not specs:
        raise RecipeError("this method needs a teacher: set --teacher (a teachers spec)")
    members = [_load_one(raw, cfg.teacher_options, defaults) for raw in specs]
    if len(members) == 1:
        return members[0]
    from distill.ensemble import Teachers

    probs = cfg.ensemble == "probs"
    with user_errors(f"combining the teachers {[m.name for m in members]}"):
        ensemble = Teachers(
            members,
            weights=cfg.teacher_weights or None,
            combine=cfg.ensemble,
            temperature=cfg.temperature if probs else None,
        )
    return ensemble  # type: ignore[return-value]  # acts as a Teacher (distill.ensemble)


def _load_one(raw: str, options: Any, defaults: dict[str, Any]) -> Teacher:
    import teachers

    spec, kwargs = parse_teacher(raw, options)
    if spec is None:
        raise RecipeError(f"--teacher {raw!r} names no teacher: give a teachers spec")
    with user_errors(f"loading the teacher {spec!r}"):
        return teachers.load(spec, **{**defaults, **kwargs})


def build_student(cfg: RecipeConfig, num_outputs: int) -> nn.Module:
    """`--student` with `--alpha` (width) and `--resolution` where the builder takes them."""
    from distill.models import build_student as build

    with user_errors(f"building the student {cfg.student!r}"):
        return build(
            cfg.student, num_classes=num_outputs, alpha=cfg.alpha, resolution=cfg.resolution
        )


def check_outputs(teacher: Teacher, expected: int, what: str, unit: str = "classes") -> None:
    from distill.teacher import check_teacher_outputs

    with user_errors("checking the teacher"):
        check_teacher_outputs(teacher, expected, what, unit)


# ------------------------------------------------------------------------------ the run


def run_recipe(
    cls: type[C],
    build: Callable[[C, Context], Built],
    argv: Sequence[str] | None,
    description: str,
) -> int:
    """Parse, build, train or evaluate; returns the process exit code."""
    try:
        cfg, print_only = parse_config(cls, argv, description)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if print_only:
        print(format_config(cfg))
        return 0
    try:
        _run(cfg, build)
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)) or not _is_user_error(e):
            raise
        if os.environ.get(TRACEBACK_ENV, "") == "1":
            traceback.print_exc()
        rank = os.environ.get("RANK")
        where = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{where}error: {_message(e)}{_hint(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _launch_problems(cfg: RecipeConfig, n: int) -> list[str]:
    problems = []
    if cfg.batch_size % n:
        problems.append(f"batch_size {cfg.batch_size} must be divisible by the {n} processes")
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    if eval_bs % n:
        problems.append(f"eval_batch_size {eval_bs} must be divisible by the {n} processes")
    if getattr(cfg, "cache_teacher", None) and n > 1:
        problems.append(
            f"--cache-teacher builds the cache in one process, but {n} were launched: use "
            "`accelerate launch --num_processes 1` (training with --teacher-cache may use many)"
        )
    return problems


def _run(cfg: C, build: Callable[[C, Context], Built]) -> None:
    from distill.distiller import make_accelerator
    from distill.guards import check_writable
    from distill.seeding import seed_everything

    dcfg = cfg.distiller_config()
    acc = make_accelerator(dcfg)
    acc.print(format_config(cfg))
    n = acc.num_processes
    problems = _launch_problems(cfg, n)
    if problems:
        raise ConfigError(problems, "the config (for this launch)")
    eval_bs = cfg.eval_batch_size or cfg.batch_size
    ctx = Context(cfg, acc, cfg.batch_size // n, eval_bs // n)
    seed_everything(cfg.seed)  # the student's initialisation depends on --seed only
    built = build(cfg, ctx)  # reads nothing but metadata and weights, writes nothing
    if built.build_cache is not None:
        built.build_cache()
        return
    if acc.is_main_process:
        check_writable(output_path(cfg), "--output-dir")
    acc.wait_for_everyone()
    d = _distiller(cfg, ctx, built, dcfg)
    if cfg.eval_only:
        _evaluate_only(cfg, ctx, built, d)
        return
    with user_errors("training"):
        final = d.fit(built.train_loader, built.eval_loader)
    ctx.print(f"final metrics: {json.dumps(final)}")
    ctx.print(
        f"wrote {output_path(cfg)}: metrics.json, config.json, student.safetensors, checkpoints/"
    )
    acc.end_training()


def _distiller(cfg: RecipeConfig, ctx: Context, built: Built, dcfg: Any) -> Any:
    from distill.distiller import Distiller
    from distill.schedules import LRSchedule, make_optimizer, make_scheduler, steps_per_epoch

    params = [*built.student.parameters(), *built.objective.parameters(), *built.extra_params]
    optimizer = make_optimizer(
        params,
        cfg.optimizer,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov,
    )
    spe = steps_per_epoch(built.train_loader, ctx.accelerator.num_processes, cfg.grad_accum_steps)
    spe = spe or max(1, (cfg.max_steps or 1) // max(1, cfg.epochs))
    scheduler = make_scheduler(
        optimizer,
        LRSchedule(cfg.schedule, tuple(cfg.lr_steps), cfg.lr_gamma, cfg.warmup_epochs),
        steps_per_epoch=spe,
        total_steps=cfg.max_steps or cfg.epochs * spe,
    )
    info = built.info
    run_info = {k: v for k, v in dataclasses.asdict(info).items() if k != "seed"}
    dcfg = dataclasses.replace(
        dcfg,
        task=built.task,
        run_name=cfg.run_name or info.run_name(),
        run_info={**run_info, **built.notes, "recipe": cfg.resolved()},
        tracker_init_kwargs=info.wandb_init_kwargs() if cfg.report_to == "wandb" else {},
        cached_teacher=built.cache is not None,
    )
    with user_errors("setting up the run"):
        return Distiller(
            built.student,
            built.teacher,
            built.objective,
            optimizer,
            scheduler,
            config=dcfg,
            accelerator=ctx.accelerator,
        )


def _weights_for_eval(cfg: RecipeConfig) -> tuple[Path, str | None]:
    """(file, prefix) of the student weights `--eval-only` evaluates."""
    from distill.checkpoint import resolve_resume

    out = output_path(cfg)
    if cfg.resume:
        ckpt = resolve_resume(cfg.resume, out / "checkpoints")
        if ckpt is None:
            raise RecipeError(
                f"--eval-only --resume latest: no checkpoint under {out / 'checkpoints'}"
            )
        file = ckpt / "model.safetensors"
        if not file.is_file():
            raise RecipeError(f"checkpoint {ckpt} has no model.safetensors")
        return file, "student."
    exported = out / "student.safetensors"
    if exported.is_file():
        return exported, None
    raise RecipeError(
        f"--eval-only found nothing to evaluate: no {exported}. Train first, or pass "
        "--output-dir of a finished run, or --resume latest|PATH for a checkpoint"
    )


def _evaluate_only(cfg: RecipeConfig, ctx: Context, built: Built, d: Any) -> None:
    from distill.files import write_json_atomic
    from distill.serialization import load_state_dict

    file, prefix = _weights_for_eval(cfg)
    student = built.student
    with user_errors(f"loading the student weights {file}"):
        sd = load_state_dict(file, prefix=prefix, expected_keys=student.state_dict().keys())
        student.load_state_dict(sd, strict=True)
    ctx.print(f"evaluating {file}")
    with user_errors("evaluating"):
        metrics = d.evaluate(built.eval_loader)
        teacher_metrics = (
            d.evaluate(built.eval_loader, model="teacher") if built.teacher is not None else None
        )
    skipped = d.gathered_skips()
    result = {
        "weights": str(file),
        "dataset": built.info.dataset,
        "metrics": metrics,
        "teacher_metrics": teacher_metrics,
        "num_processes": ctx.accelerator.num_processes,
        "run_name": d.config.run_name,
        "skipped_images": skipped.to_dict(),
    }
    ctx.print(f"eval metrics: {json.dumps(metrics)}")
    if teacher_metrics is not None:
        ctx.print(f"teacher metrics: {json.dumps(teacher_metrics)}")
    if ctx.accelerator.is_main_process:
        if skipped.total:
            print(skipped.report(), file=sys.stderr)
        write_json_atomic(output_path(cfg, "eval.json"), result)
    ctx.accelerator.end_training()
