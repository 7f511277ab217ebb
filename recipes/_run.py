"""The part every recipe shares after parsing: accelerator, optimiser and schedule, the Distiller,
`--eval-only`, the bad-image report, and errors printed for people instead of tracebacks.

A recipe supplies `build(cfg, ctx) -> Parts` (data, student, teacher, objective); `run_recipe`
does the rest:

    parse -> accelerator -> build -> Distiller -> fit (or evaluate) -> skip report -> end

or, for `--cache-teacher DIR` (recipes with a CacheableRecipeConfig): build -> run the teacher
over K crops of every training image into DIR -> exit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from distill.config import ConfigError
from recipes._config import RecipeConfig, format_config, output_path, parse_config, parse_teacher

C = TypeVar("C", bound=RecipeConfig)

EXIT_USER_ERROR = 2
TRACEBACK_ENV = "MOBILEDISTILL_TRACEBACK"  # =1 shows the full traceback of a handled error


class RecipeError(ValueError):
    """A problem with the user's data, weights or settings; its message says what to change."""


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
    from distill.distiller import NonFiniteLossError
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


# ------------------------------------------------------------------------------ the parts


@dataclass
class Context:
    """What `build` gets besides the config."""

    accelerator: Any
    recorder: Any  # recipes._data.SkipRecorder
    per_process_batch: int
    per_process_eval_batch: int

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)


@dataclass
class Parts:
    """What a recipe builds; `run_recipe` trains/evaluates it."""

    student: Any
    teacher: Any  # distill.Teacher | None
    objective: Any
    train_loader: Any
    eval_loader: Any
    task: str  # "logits" | "multilabel" | "embedding"
    role: str  # "teacher" | "scratch" | "distilled"
    dataset_name: str
    student_name: str
    alpha: float | None = None
    resolution: int | None = None
    method: str | None = None  # metrics.json "method" when it is not cfg.method
    uses_temperature: bool = True  # the objective reads cfg.temperature
    uses_kd_weight: bool = True  # the objective reads cfg.kd_weight
    extra_params: list[Any] = field(default_factory=list)  # trained besides the student
    notes: dict[str, Any] = field(default_factory=dict)  # extra run_info
    # offline distillation (CacheableRecipeConfig): the training set as a replayable dataset
    # (recipes._data.replayable_images) and its class count, for --cache-teacher; the opened
    # cache for --teacher-cache (then `teacher` is None and batches carry "teacher_logits")
    replayable: Any = None
    num_classes: int | None = None
    teacher_cache: Any = None  # distill.data.teacher_cache.TeacherCache | None


# ------------------------------------------------------------------------------ building blocks


def make_accelerator(cfg: RecipeConfig) -> Any:
    """The accelerator the Distiller would make for itself (seedable sampler for exact resume,
    scheduler stepped by the loop), made early so the recipe can prepare its data first."""
    from distill.distiller import DistillerConfig
    from distill.distiller import make_accelerator as distill_accelerator

    return distill_accelerator(
        DistillerConfig(
            mixed_precision=cfg.mixed_precision,  # type: ignore[arg-type]
            grad_accum_steps=cfg.grad_accum_steps,
            report_to=cfg.report_to,  # type: ignore[arg-type]
            seed=cfg.seed,
        )
    )


def load_teacher(cfg: RecipeConfig, **defaults: Any) -> Any:
    """`teachers.load(cfg.teacher, **defaults, **cfg.teacher_options, **inline options)`."""
    import teachers

    spec, options = parse_teacher(cfg.teacher, cfg.teacher_options)
    if spec is None:
        raise RecipeError("this method needs a teacher: set --teacher (a teachers spec)")
    kwargs = {**defaults, **options}
    with user_errors(f"loading the teacher {spec!r}"):
        return teachers.load(spec, **kwargs)


def build_student(name: str, *, alpha: float, resolution: int, num_outputs: int) -> Any:
    """A registered student with width `alpha` for `resolution` px, or a timm:/torchvision: model
    (which take no alpha/resolution)."""
    import inspect

    from distill.models import create_student, get_student_builder

    kwargs: dict[str, Any] = {"num_classes": num_outputs}
    if ":" not in name:
        with user_errors("building the student"):
            params = inspect.signature(get_student_builder(name)).parameters
        if "alpha" in params:
            kwargs["alpha"] = alpha
        if "resolution" in params:
            kwargs["resolution"] = resolution
    with user_errors(f"building the student {name!r}"):
        return create_student(name, **kwargs)


def check_outputs(teacher: Any, expected: int, what: str, unit: str = "classes") -> None:
    """The teacher must produce one output per class/attribute of the dataset."""
    n = getattr(teacher, "num_outputs", None)
    if n is not None and n != expected:
        raise RecipeError(
            f"the teacher {teacher.name} has {n} outputs but {what} has {expected} {unit}: the "
            "teacher must have been trained on this label set. Point --teacher at such a "
            f"checkpoint, or add num_classes={expected} to the teacher options to replace its "
            "head (which re-initialises it: fine-tune it first)"
        )


def steps_per_epoch(loader: Any, num_processes: int, grad_accum: int) -> int | None:
    try:
        n = len(loader)
    except TypeError:
        return None
    return max(1, math.ceil(math.ceil(n / num_processes) / grad_accum))


def make_optimizer(cfg: RecipeConfig, params: Sequence[Any]) -> Any:
    import torch

    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


def lr_factor(
    step: int,
    *,
    steps_per_epoch: int,
    total_steps: int,
    schedule: str,
    lr_steps: Sequence[int],
    gamma: float,
    warmup_epochs: float,
) -> float:
    """The learning-rate multiplier after `step` optimizer steps."""
    warmup = warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "step":
        epoch = step / steps_per_epoch
        return float(gamma ** sum(1 for m in lr_steps if epoch >= m))
    if schedule == "cosine":
        t = min(1.0, (step - warmup) / max(1.0, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def make_scheduler(cfg: RecipeConfig, optimizer: Any, spe: int | None) -> Any:
    import torch

    spe = spe or max(1, (cfg.max_steps or 1) // max(1, cfg.epochs))
    total = cfg.max_steps or cfg.epochs * spe

    def factor(step: int) -> float:
        return lr_factor(
            step,
            steps_per_epoch=spe,
            total_steps=total,
            schedule=cfg.schedule,
            lr_steps=cfg.lr_steps,
            gamma=cfg.lr_gamma,
            warmup_epochs=cfg.warmup_epochs,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_info(cfg: RecipeConfig, parts: Parts) -> Any:
    from distill.tracking import RunInfo
    from recipes._data import cached_teacher_name

    teacher = (
        parts.teacher.name
        if parts.teacher is not None
        else cached_teacher_name(cfg, parts.teacher_cache)
    )
    distilled = parts.role == "distilled"
    return RunInfo(
        experiment=cfg.experiment,
        role=parts.role,
        method=parts.method or cfg.method,
        student=parts.student_name,
        dataset=parts.dataset_name,
        teacher=teacher,
        alpha=parts.alpha,
        resolution=parts.resolution,
        temperature=cfg.temperature if distilled and parts.uses_temperature else None,
        kd_weight=cfg.kd_weight if distilled and parts.uses_kd_weight else None,
        seed=cfg.seed,
    )


# ------------------------------------------------------------------------------ the run


def run_recipe(
    cls: type[C],
    build: Callable[[C, Context], Parts],
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


def _run(cfg: C, build: Callable[[C, Context], Parts]) -> None:
    from recipes._data import SkipRecorder

    acc = make_accelerator(cfg)
    acc.print(format_config(cfg))
    n = acc.num_processes
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
    if problems:
        raise ConfigError(problems, "the config (for this launch)")
    out = output_path(cfg)
    recorder = SkipRecorder(out / "skipped", acc.process_index)
    ctx = Context(acc, recorder, cfg.batch_size // n, eval_bs // n)
    # torch seeds its default generator at random on start-up: without this the student's
    # initialisation (and any replaced teacher head) would differ between runs with one --seed
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    parts = build(cfg, ctx)  # reads nothing but metadata and weights, writes nothing
    if getattr(cfg, "cache_teacher", None):
        _cache_teacher(cfg, ctx, parts)
        return
    if acc.is_main_process:
        _check_writable(out)
        recorder.reset()  # the report covers this invocation
    acc.wait_for_everyone()
    if cfg.eval_only:
        _evaluate_only(cfg, ctx, parts)
    else:
        _fit(cfg, ctx, parts)
    _report_skips(cfg, ctx)


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(
            f"cannot write to --output-dir {out} ({e.strerror}); choose a writable folder"
        ) from None


def _distiller(cfg: RecipeConfig, ctx: Context, parts: Parts, info: Any) -> Any:
    from distill.distiller import Distiller, DistillerConfig
    from recipes._data import cache_notes

    params = list(parts.student.parameters()) + list(parts.objective.parameters())
    optimizer = make_optimizer(cfg, params + list(parts.extra_params))
    spe = steps_per_epoch(parts.train_loader, ctx.accelerator.num_processes, cfg.grad_accum_steps)
    scheduler = make_scheduler(cfg, optimizer, spe)
    tracker_kwargs = info.wandb_init_kwargs() if cfg.report_to == "wandb" else {}
    dcfg = DistillerConfig(
        output_dir=cfg.output_dir,
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        grad_accum_steps=cfg.grad_accum_steps,
        mixed_precision=cfg.mixed_precision,  # type: ignore[arg-type]
        log_every=cfg.log_every,
        save_every=cfg.save_every,
        keep_checkpoints=cfg.keep_checkpoints,
        eval_every=cfg.eval_every,
        resume=cfg.resume,
        channels_last=cfg.channels_last,
        compile=cfg.compile,
        seed=cfg.seed,
        max_grad_norm=cfg.max_grad_norm,
        on_nonfinite=cfg.on_nonfinite,  # type: ignore[arg-type]
        task=parts.task,  # type: ignore[arg-type]
        report_to=cfg.report_to,  # type: ignore[arg-type]
        project=cfg.project,
        run_name=cfg.run_name or info.run_name(),
        progress=cfg.progress,
        run_info={
            **{k: v for k, v in vars(info).items() if k != "seed"},
            **parts.notes,
            **cache_notes(parts.teacher_cache),
            "recipe": cfg.resolved(),
        },
        tracker_init_kwargs=tracker_kwargs,
        cached_teacher=parts.teacher_cache is not None,
    )
    with user_errors("setting up the run"):
        return Distiller(
            parts.student,
            parts.teacher,
            parts.objective,
            optimizer,
            scheduler,
            config=dcfg,
            accelerator=ctx.accelerator,
        )


def _cache_teacher(cfg: Any, ctx: Context, parts: Parts) -> None:
    """--cache-teacher DIR: the teacher's answers on K crops of every training image, then exit."""
    from distill.checkpoint import write_json_atomic
    from recipes._data import build_recipe_cache

    if parts.teacher is None or parts.replayable is None or parts.num_classes is None:
        raise RecipeError(f"--cache-teacher: the {cfg.NAME} recipe built no teacher to cache")
    ctx.recorder.reset()
    with user_errors("building the teacher cache"):
        cache = build_recipe_cache(
            cfg,
            parts.teacher,
            parts.replayable,
            parts.num_classes,
            device=ctx.accelerator.device,
            batch_size=ctx.per_process_eval_batch,
        )
    log = ctx.recorder.read()
    if log:  # the substitutes are cached; training replays the same substitution
        print(log.report(), file=sys.stderr)
        write_json_atomic(cache.path / "skipped.json", log.to_dict())
        ctx.recorder.reset()
    ctx.print(
        f"cached {len(cache)} images x {cache.crops} crops, top-{cache.topk} of "
        f"{cache.num_classes} classes in {cache.path} ({cache.nbytes() / 2**20:.1f} MiB, "
        f"fingerprint {cache.fingerprint.digest[:12]}); train from it with the same settings "
        f"and --teacher-cache {cache.path}"
    )


def _fit(cfg: RecipeConfig, ctx: Context, parts: Parts) -> None:
    info = run_info(cfg, parts)
    d = _distiller(cfg, ctx, parts, info)
    with user_errors("training"):
        final = d.fit(parts.train_loader, parts.eval_loader)
    ctx.print(f"final metrics: {json.dumps(final)}")
    ctx.print(
        f"wrote {output_path(cfg)}: metrics.json, config.json, student.safetensors, checkpoints/"
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


def _evaluate_only(cfg: RecipeConfig, ctx: Context, parts: Parts) -> None:
    from distill.checkpoint import write_json_atomic
    from distill.serialization import load_state_dict

    file, prefix = _weights_for_eval(cfg)
    student = parts.student
    with user_errors(f"loading the student weights {file}"):
        sd = load_state_dict(file, prefix=prefix, expected_keys=student.state_dict().keys())
        student.load_state_dict(sd, strict=True)
    ctx.print(f"evaluating {file}")
    info = run_info(cfg, parts)
    d = _distiller(cfg, ctx, parts, info)
    with user_errors("evaluating"):
        metrics = d.evaluate(parts.eval_loader)
        teacher_metrics = (
            d.evaluate(parts.eval_loader, model="teacher") if parts.teacher is not None else None
        )
    result = {
        "weights": str(file),
        "dataset": parts.dataset_name,
        "metrics": metrics,
        "teacher_metrics": teacher_metrics,
        "num_processes": ctx.accelerator.num_processes,
        "run_name": cfg.run_name or info.run_name(),
    }
    ctx.print(f"eval metrics: {json.dumps(metrics)}")
    if teacher_metrics is not None:
        ctx.print(f"teacher metrics: {json.dumps(teacher_metrics)}")
    if ctx.accelerator.is_main_process:
        write_json_atomic(output_path(cfg, "eval.json"), result)
    ctx.accelerator.end_training()


def _report_skips(cfg: RecipeConfig, ctx: Context) -> None:
    from distill.checkpoint import write_json_atomic

    # accelerate's end_training has ended the process group: no collectives here. Every
    # process has finished loading data, so the main process reads all their records.
    if not ctx.accelerator.is_main_process:
        return
    log = ctx.recorder.read()
    out = output_path(cfg)
    if not log:
        return
    print(log.report(), file=sys.stderr)
    write_json_atomic(out / "skipped.json", log.to_dict())
    ctx.recorder.reset()  # merged into skipped.json
    metrics_file = out / "metrics.json"
    if not cfg.eval_only and metrics_file.is_file():
        data = json.loads(metrics_file.read_text())
        data["skipped_images"] = log.to_dict()
        write_json_atomic(metrics_file, data)
