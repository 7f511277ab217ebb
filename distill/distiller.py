"""One training/evaluation loop for every distillation method, on accelerate.

A method is an objective (see `distill.losses`), not a new loop: the Distiller feeds each batch
to the frozen Teacher and to the student, hands both outputs to the objective and optimises
the `"loss"` it returns. Accelerate owns device placement, DDP, mixed precision, gradient
accumulation and trackers; the teacher is moved to the device but never wrapped in DDP nor
written into checkpoints.

The loop calls parts that live in their own modules: `distill.seeding` (exact resume),
`distill.guards` (preflight, non-finite losses), `distill.evaluation` (one evaluator per task
kind), `distill.timing` (training throughput), `distill.run_record` (metrics.json) and
`distill.checkpoint` (atomic checksummed checkpoints).

Exact resume: the random state is re-seeded from (seed, epoch, batch index, rank) before
every batch is fetched, and batches already seen are skipped, so a run interrupted at any
checkpoint and resumed ends with the same weights as an uninterrupted one (bit-identical on
the CPU with `num_workers=0`; with workers, augmentations must be seeded per sample).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill import checkpoint as ckpt
from distill.config import DistillerConfig
from distill.data.skipping import SkipLog, take_skipped
from distill.evaluation import evaluate_loader, make_evaluator
from distill.files import write_json_atomic
from distill.guards import NonFiniteLossError, NonFiniteWatch, all_finite, check_weights_finite
from distill.guards import preflight as _preflight
from distill.run_record import RunRecord, write_run_record
from distill.seeding import seed_batch, seed_everything, seeded_loader
from distill.teacher import FeatureHooks, Teacher, as_teacher, extract_output
from distill.timing import Throughput, device_name, peak_memory
from distill.types import Batch, Outputs, TaskKind, split_batch, to_device

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Counters persisted in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    images_seen: int = 0
    skipped_nonfinite: int = 0


class _FunctionObjective(nn.Module):
    """Lets a plain function `(student, teacher, target) -> dict` serve as an objective."""

    def __init__(self, fn: Callable[..., dict[str, Tensor]]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, student: Outputs, teacher: Outputs | None, target: Any) -> dict[str, Tensor]:
        return self.fn(student, teacher, target)


class _StudentStep(nn.Module):
    """Student + objective in one module, so DDP syncs the gradients of both (an objective
    may own parameters: FitNets adapters, embedding projections)."""

    def __init__(self, student: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.hooks = FeatureHooks(student, getattr(objective, "student_features", None))

    def forward(self, x: Any, teacher: Outputs | None, target: Any) -> dict[str, Tensor]:
        self.hooks.pop()
        out = Outputs(extract_output(self.student(x)), {})
        out.features = self.hooks.pop()
        parts = self.objective(out, teacher, target)
        if not isinstance(parts, dict) or "loss" not in parts:
            raise TypeError(
                f"objective {type(self.objective).__name__} must return a dict with a 'loss' "
                f"entry, got {type(parts).__name__}"
            )
        return parts


def _channels_last(x: Any) -> Any:
    if isinstance(x, Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def make_accelerator(config: DistillerConfig) -> Any:
    """The Accelerator the Distiller makes for itself: seedable sampler (exact resume),
    scheduler stepped by the loop, W&B when report_to="wandb". Recipes call it too."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    cfg = config
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        log_with="wandb" if cfg.report_to == "wandb" else None,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        step_scheduler_with_optimizer=False,
    )


@dataclass
class _Window:
    """Loss parts summed since the last log row, and the run's first non-finite step."""

    watch: NonFiniteWatch
    sums: dict[str, Tensor] = field(default_factory=dict)
    n: int = 0

    def add(self, step: int, parts: dict[str, Tensor]) -> None:
        self.watch.record(step, parts)
        for k, v in parts.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1  # skipped batches (agreed by all ranks) are not averaged

    def take(self) -> tuple[dict[str, Tensor], int]:
        out, self.sums, n, self.n = self.sums, {}, self.n, 0
        return out, n


class Distiller:
    """Train `student` to imitate `teacher` with `objective`; evaluate either.

    Args:
        student: any `nn.Module` whose forward returns one tensor (or an object with .logits).
        teacher: a `Teacher`, a bare module (wrapped with default settings), or None for
            training from labels alone (the scratch baseline; the objective must not need one).
        objective: maps (student Outputs, teacher Outputs, target) to {"loss": ..., parts}.
        optimizer: over the student's (and the objective's, if it has any) parameters.
        scheduler: stepped once per optimizer step (not prepared by accelerate, so its length
            is in optimizer steps whatever the number of processes).
        config: a `DistillerConfig`.
        accelerator: an existing `Accelerator` (recipes create theirs); by default one is made
            from the config.
        example_input: one batch of student input to check teacher/student compatibility at
            construction; otherwise it is checked on the first batch.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: Teacher | nn.Module | None,
        objective: nn.Module | Callable[..., dict[str, Tensor]],
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        *,
        config: DistillerConfig | None = None,
        accelerator: Any = None,
        example_input: Any = None,
    ) -> None:
        from distill.config import validate

        self.config = config or DistillerConfig()
        validate(self.config, "DistillerConfig")
        if not isinstance(objective, nn.Module):
            objective = _FunctionObjective(objective)
        self.teacher = as_teacher(teacher)
        needs = getattr(objective, "needs_teacher", True) and not self.config.cached_teacher
        if needs and self.teacher is None:
            raise ValueError(
                f"{type(objective).__name__} distils from a teacher, but teacher is None. Pass a "
                "Teacher, or use distill.losses.CrossEntropy to train from labels alone."
            )
        _check_optimizer(student, objective, optimizer)
        teacher_features: dict[str, str] = getattr(objective, "teacher_features", None) or {}
        if self.teacher is not None and teacher_features:
            self.teacher.add_features(teacher_features)
        if self.config.channels_last:
            student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            if self.teacher is not None:
                self.teacher.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.student = student
        self.objective = objective
        self.step_module: nn.Module = _StudentStep(student, objective)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accelerator = accelerator or make_accelerator(self.config)
        self.progress = Progress()
        self.skip_log = SkipLog()  # unreadable images the data pipeline replaced
        self.summary: dict[str, Any] = {}
        self._prepared = False
        self._compat_checked = False
        self._history: list[dict[str, float]] = []
        self._input_shape: tuple[int, ...] | None = None
        self._train_len = 0
        self.output_dir = Path(self.config.output_dir)
        if example_input is not None:
            self._check_compat(example_input)

    # ---------------------------------------------------------------- set-up
    @property
    def task(self) -> TaskKind:
        if self.config.task != "auto":
            return self.config.task
        return self.teacher.output_kind if self.teacher is not None else "logits"

    def _check_compat(self, example_input: Any) -> None:
        if self.teacher is None or not self.config.check_compatible or self._compat_checked:
            return
        x = example_input
        if isinstance(x, Tensor):
            x = x[:2]
            dev = next((p.device for p in self.student.parameters()), torch.device("cpu"))
            x = x.to(dev)
            self.teacher.to(dev)
        self.teacher.check_compatible(self.student, x)
        self._compat_checked = True

    def _prepare(self, train_loader: Any, eval_loader: Any) -> tuple[Any, Any]:
        acc = self.accelerator
        if not self._prepared:
            seed_everything(self.config.seed)
            if self.config.compile:
                step: Any = self.step_module
                step.student = torch.compile(step.student)
                if self.teacher is not None:
                    self.teacher.model = torch.compile(self.teacher.model)  # type: ignore[assignment]
            self.step_module, self.optimizer = acc.prepare(self.step_module, self.optimizer)
            if self.teacher is not None:
                self.teacher.to(acc.device)
            self._prepared = True
        return self._prepare_loader(train_loader), self._prepare_loader(eval_loader)

    def _prepare_loader(self, loader: Any) -> Any:
        if loader is None:
            return None
        # a stream already split per process (split_dataset_by_node) must not be sharded again
        if getattr(getattr(loader, "dataset", None), "sharded_by_node", False):
            return loader
        return self.accelerator.prepare(loader)

    @property
    def unwrapped_student(self) -> nn.Module:
        step = self.accelerator.unwrap_model(self.step_module)
        student = step.student
        return getattr(student, "_orig_mod", student)

    def _resume(self, root: Path) -> bool:
        """Load the checkpoint `config.resume` names, if any; whether one was loaded."""
        cfg, acc = self.config, self.accelerator
        resume_from = ckpt.resolve_resume(cfg.resume, root)
        if resume_from is None:
            if cfg.resume == "latest":
                acc.print(f"no checkpoint under {root}: starting from scratch")
            return False
        state = ckpt.load_checkpoint(acc, resume_from, self.scheduler)
        names = dataclasses.asdict(Progress())
        self.progress = Progress(**{k: state[k] for k in names if k in state})
        self._history = state.get("history", [])
        if acc.is_main_process and state.get("skipped_images"):
            self.skip_log = SkipLog.from_dict(state["skipped_images"])
        acc.print(f"resumed from {resume_from} at step {self.progress.step}")
        return True

    # ---------------------------------------------------------------- training
    def _teacher_outputs(self, b: Batch) -> Outputs | None:
        if b.teacher_cached is not None:
            return b.teacher_cached
        if not getattr(self.objective, "needs_teacher", True):
            return None
        if self.teacher is None:
            raise ValueError(
                "cached_teacher=True but this batch has no 'teacher_logits': build the loader "
                "from a teacher cache (distill.data.teacher_cache.CachedDataset), or pass a Teacher"
            )
        cl = self.config.channels_last
        with self.accelerator.autocast():
            if b.teacher_input is not None:
                x = _channels_last(b.teacher_input) if cl else b.teacher_input
                return self.teacher(x, prepared=True)
            return self.teacher(_channels_last(b.input) if cl else b.input)

    def _total_steps(self, train_loader: Any) -> int:
        cfg = self.config
        if cfg.max_steps is not None:
            return cfg.max_steps
        try:
            n = len(train_loader)
        except TypeError:
            raise ValueError(
                "this data loader has no length (streaming data): set max_steps"
            ) from None
        return cfg.epochs * math.ceil(n / cfg.grad_accum_steps)

    def fit(
        self, train_loader: Iterable[Any], eval_loader: Iterable[Any] | None = None
    ) -> dict[str, Any]:
        """Train to `max_steps` (or `epochs`), evaluating/saving as configured.

        Returns the final eval metrics (empty without an eval loader). Writes checkpoints,
        `config.json`, `metrics.json` and `student.safetensors` into `output_dir`.
        """
        acc = self.accelerator
        if acc.is_main_process:
            _preflight(
                self.output_dir, self.step_module, self.student, self.config.keep_checkpoints
            )
        train_loader, seeded = seeded_loader(train_loader, self.config.seed)
        train_loader, eval_loader = self._prepare(train_loader, eval_loader)
        total = self._total_steps(train_loader)
        self._train_len = _length(train_loader)
        root = self.output_dir / "checkpoints"
        resumed = self._resume(root)
        self._init_trackers()
        if acc.is_main_process:
            write_json_atomic(self.output_dir / "config.json", self._loggable_config())
        timer = Throughput(acc.device)
        window = _Window(NonFiniteWatch(acc.device))
        last_saved = self.progress.step if resumed else -1
        bar = _bar(self.config.progress and acc.is_main_process, total, self.progress.step)
        self.step_module.train()
        while self.progress.step < total:
            saved = self._run_epoch(train_loader, seeded, eval_loader, total, timer, window, bar)
            last_saved = saved if saved is not None else last_saved
        bar.close()
        window.watch.raise_if_bad(root)
        if last_saved != self.progress.step:
            with timer.pause("checkpoint"):
                self._save(root)
        last_eval: dict[str, float] = {}
        teacher_metrics = None
        if eval_loader is not None:
            with timer.pause("eval"):
                last_eval = self._eval_and_log(eval_loader)
                if self.teacher is not None and self.config.run_info.get("evaluate_teacher", True):
                    teacher_metrics = self.evaluate(eval_loader, model="teacher", _prepared=True)
        self._finish(last_eval, teacher_metrics, timer)
        return last_eval

    def _run_epoch(
        self,
        train_loader: Any,
        seeded: Any,
        eval_loader: Any,
        total: int,
        timer: Throughput,
        window: _Window,
        bar: Any,
    ) -> int | None:
        """Train until the epoch ends or `total` steps are done; returns the step of the last
        checkpoint written (None if none was)."""
        cfg, acc, p = self.config, self.accelerator, self.progress
        root = self.output_dir / "checkpoints"
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(p.epoch)
        if seeded is not None:
            seeded.epoch = p.epoch
        skip = p.batch_in_epoch
        it = iter(acc.skip_first_batches(train_loader, skip) if skip else train_loader)
        batch_idx, saved, step_images = skip, None, 0
        while p.step < total:
            raw = next(it, None)
            if raw is None:
                break
            raw, empty = take_skipped(raw, self.skip_log)
            batch_idx += 1
            if empty:  # every image of this batch was unreadable (counted in skip_log)
                continue
            # dropout & co. depend on (seed, epoch, batch, rank) only: exact on resume
            seed_batch(cfg.seed, p.epoch, batch_idx - 1, acc.process_index)
            step_images += self._train_batch(raw, batch_idx, window)
            if not acc.sync_gradients:
                continue
            p.step += 1
            p.batch_in_epoch = batch_idx
            timer.step_done(step_images)
            step_images = 0
            if self.scheduler is not None and not acc.optimizer_step_was_skipped:
                self.scheduler.step()
            bar.update(1)
            saved = self._after_step(total, timer, window, bar, eval_loader) or saved
        else:
            return saved
        p.epoch += 1
        p.batch_in_epoch = 0
        if p.step < total:  # the epoch ended before the run did
            if cfg.eval_at_epoch_end and eval_loader is not None:
                with timer.pause("eval"):
                    self._eval_and_log(eval_loader)
                self.step_module.train()
            if cfg.save_at_epoch_end:
                window.watch.raise_if_bad(root)
                with timer.pause("checkpoint"):
                    self._save(root)
                saved = p.step
        return saved

    def _train_batch(self, raw: Any, batch_idx: int, window: _Window) -> int:
        """One micro-batch: forward, backward, (maybe) optimizer step; returns its images."""
        acc, p = self.accelerator, self.progress
        b = split_batch(to_device(raw, acc.device))
        if self._input_shape is None and isinstance(b.input, Tensor):
            self._input_shape = tuple(b.input.shape[1:])
        if not self._compat_checked:
            self._check_compat(b.input)
        on_progress = getattr(self.objective, "on_progress", None)
        if callable(on_progress):
            on_progress(p.step, p.epoch + (batch_idx - 1) / max(1, self._train_len))
        parts, skipped = self._train_micro_step(b)
        if skipped:
            p.skipped_nonfinite += 1
            acc.print(
                f"step {p.step + 1}: non-finite loss, batch skipped ({p.skipped_nonfinite} so far)"
            )
        else:
            window.add(p.step + 1, parts)
        images = b.size() * acc.num_processes
        p.images_seen += images
        return images

    def _after_step(
        self, total: int, timer: Throughput, window: _Window, bar: Any, eval_loader: Any
    ) -> int | None:
        """Log, save and evaluate as configured after optimizer step `progress.step`."""
        cfg, p = self.config, self.progress
        root = self.output_dir / "checkpoints"
        want_save = cfg.save_every is not None and p.step % cfg.save_every == 0
        if p.step % cfg.log_every == 0 or want_save or p.step == total:
            window.watch.raise_if_bad(root)
            self._log_train(*window.take(), timer.images_per_s(), bar)
        saved = None
        if want_save:
            with timer.pause("checkpoint"):
                self._save(root)
            saved = p.step
        if cfg.eval_every and eval_loader is not None and p.step % cfg.eval_every == 0:
            with timer.pause("eval"):
                self._eval_and_log(eval_loader)
            self.step_module.train()
        return saved

    def _train_micro_step(self, b: Batch) -> tuple[dict[str, Tensor], bool]:
        """Forward, backward and (at accumulation boundaries) optimizer step for one batch.

        Returns the loss parts and whether the batch was skipped for a non-finite loss
        (only with on_nonfinite="skip", which costs one host sync per batch)."""
        acc, cfg = self.accelerator, self.config
        t_out = self._teacher_outputs(b)
        x = _channels_last(b.input) if cfg.channels_last else b.input
        skipped = False
        with acc.accumulate(self.step_module):
            with acc.autocast():
                parts = self.step_module(x, t_out, b.target)
            if cfg.on_nonfinite == "skip":
                skipped = not all_finite(parts["loss"], acc)
            if skipped:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                acc.backward(parts["loss"])
                if cfg.max_grad_norm is not None and acc.sync_gradients:
                    acc.clip_grad_norm_(self.step_module.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return parts, skipped

    def _save(self, root: Path) -> None:
        p = self.progress
        check_weights_finite(self.step_module, p.step, root)
        gathered = self._gathered_skips()
        state = {
            **dataclasses.asdict(p),
            "accelerate_iteration": int(self.accelerator.project_configuration.iteration) + 1,
            "history": self._history[-1000:],
            "config": self._loggable_config(),
            "skipped_images": gathered.to_dict(),
        }
        ckpt.save_checkpoint(
            self.accelerator, root, p.step, state, self.scheduler, keep=self.config.keep_checkpoints
        )

    def _gathered_skips(self) -> SkipLog:
        """Every process's skip log merged (a collective: every process calls it)."""
        return self.skip_log.all_gather() if self.accelerator.num_processes > 1 else self.skip_log

    # ---------------------------------------------------------------- logging
    def _log_train(self, sums: dict[str, Tensor], n: int, images_per_s: float, bar: Any) -> None:
        if n == 0 or not sums:  # nothing since the last row (every batch skipped)
            return
        acc = self.accelerator
        keys = sorted(sums)
        vec = torch.stack([sums[k] / n for k in keys])
        vec = acc.reduce(vec, reduction="mean") if acc.num_processes > 1 else vec
        values = dict(zip(keys, vec.tolist()))
        row = {f"train/{k}": v for k, v in values.items()}
        row["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        row["train/images_per_s"] = images_per_s
        row["train/epoch"] = float(self.progress.epoch)
        self._history.append({"step": self.progress.step, **row})
        acc.log(row, step=self.progress.step)
        bar.set_postfix(
            {k: f"{v:.4g}" for k, v in values.items()} | {"img/s": f"{images_per_s:.0f}"}
        )

    def _eval_and_log(self, loader: Any) -> dict[str, float]:
        result = self.evaluate(loader, _prepared=True)
        row = {f"eval/{k}": v for k, v in result.items()}
        self._history.append({"step": self.progress.step, **row})
        self.accelerator.log(row, step=self.progress.step)
        self.accelerator.print(
            f"step {self.progress.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items())
        )
        return result

    def _init_trackers(self) -> None:
        acc = self.accelerator
        if not acc.log_with or getattr(acc, "trackers", None):
            return
        wandb_kwargs = dict(self.config.tracker_init_kwargs)
        if self.config.run_name:
            wandb_kwargs.setdefault("name", self.config.run_name)
        if os.environ.get("WANDB_DIR"):
            # wandb keeps process-wide settings from its first run; honour the current folder
            wandb_kwargs.setdefault("dir", os.environ["WANDB_DIR"])
        init_kwargs = {"wandb": wandb_kwargs} if wandb_kwargs else {}
        acc.init_trackers(
            self.config.project, config=self._loggable_config(), init_kwargs=init_kwargs
        )

    def _loggable_config(self) -> dict[str, Any]:
        cfg = dataclasses.asdict(self.config)
        info = cfg.pop("run_info")
        cfg.pop("tracker_init_kwargs")
        teacher = self.teacher.meta if self.teacher is not None else None
        if teacher is not None:
            teacher = {k: v for k, v in teacher.items() if k != "label_names"}
        return {
            **info,
            "seed": self.config.seed,
            "distiller": cfg,
            "teacher_meta": teacher,
            "objective": type(self.objective).__name__,
        }

    def _finish(
        self,
        final: dict[str, float],
        teacher_metrics: dict[str, float] | None,
        timer: Throughput,
    ) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        skipped = self._gathered_skips()
        if skipped.total and acc.is_main_process:
            acc.print(skipped.report())
            write_json_atomic(self.output_dir / "skipped.json", skipped.to_dict())
        record = self._record(final, teacher_metrics, timer, skipped)
        self.summary = record.to_dict()
        if acc.is_main_process:
            if self.config.export_student:
                export_student(self.unwrapped_student, self.output_dir / "student.safetensors")
            self.summary = write_run_record(self.output_dir / "metrics.json", record)
        if acc.log_with and acc.is_main_process:
            from distill.tracking import log_summary, summary_fields

            flat = {
                k: v
                for k, v in self.summary.items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            }
            flat.update(
                summary_fields(
                    final,
                    mult_adds=int(record.mult_adds or 0),
                    params=int(record.params or 0),
                    images_per_s=record.images_per_s,
                    peak_mem_bytes=record.peak_mem_bytes,
                    teacher_metrics=teacher_metrics,
                )
            )
            log_summary(acc, flat)
        acc.wait_for_everyone()
        acc.end_training()

    def _record(
        self,
        final: dict[str, float],
        teacher_metrics: dict[str, float] | None,
        timer: Throughput,
        skipped: SkipLog,
    ) -> RunRecord:
        """The run record: what the run is (config.run_info), scored, cost and did."""
        acc, p = self.accelerator, self.progress
        info = dict(self.config.run_info)
        info.pop("evaluate_teacher", None)
        teacher_name = self.teacher.name if self.teacher is not None else None
        described = {k: info.pop(k) for k in _DESCRIBED if k in info}
        described.setdefault("role", "distilled" if self.teacher is not None else "scratch")
        described.setdefault("method", type(self.objective).__name__)
        described.setdefault("student", type(self.unwrapped_student).__name__)
        described.setdefault("teacher", teacher_name)
        described.setdefault("resolution", self._input_shape[-1] if self._input_shape else None)
        peak, peak_kind = peak_memory(acc.device)
        evaluator = make_evaluator(self.task)
        cost = self._profile(self.unwrapped_student)
        return RunRecord(
            run_name=self.config.run_name or self.output_dir.name,
            seed=self.config.seed,
            metrics=final,
            primary_metric=evaluator.primary,
            higher_is_better=evaluator.higher_is_better,
            teacher_metrics=teacher_metrics,
            **described,
            mult_adds=cost["mult_adds"],
            params=cost["params"],
            images_per_s=timer.images_per_s(),
            peak_mem_bytes=peak,
            peak_mem_kind=peak_kind,
            steps=p.step,
            epochs=p.epoch + p.batch_in_epoch / max(1, self._train_len),
            images_seen=p.images_seen,
            skipped_nonfinite=p.skipped_nonfinite,
            skipped_images=skipped.to_dict(),
            wall_s=_since(timer.begin),
            train_s=timer.train_seconds(),
            eval_s=timer.totals["eval"],
            checkpoint_s=timer.totals["checkpoint"],
            num_processes=acc.num_processes,
            mixed_precision=str(acc.mixed_precision),
            device=device_name(acc.device),
            info=info,
        )

    def _profile(self, student: nn.Module) -> dict[str, int | None]:
        if self._input_shape is None or len(self._input_shape) != 3:
            return {"mult_adds": None, "params": None}
        try:
            from distill.profiling import profile

            prof = profile(student, self._input_shape)
            return {"mult_adds": int(prof.mult_adds), "params": int(prof.params)}
        except Exception as e:  # profiling is informative; never fail a finished run over it
            logger.warning("could not profile the student: %s", e)
            return {"mult_adds": None, "params": sum(p.numel() for p in student.parameters())}

    # ---------------------------------------------------------------- evaluation
    def evaluate(
        self,
        loader: Iterable[Any],
        *,
        model: Literal["student", "teacher"] = "student",
        _prepared: bool = False,
    ) -> dict[str, float]:
        """Metrics of the student (or the teacher) on `loader`, over all processes, from the
        evaluator of the task kind (`distill.evaluation`): logits -> top1/top5 (%);
        multilabel -> mAP and mean accuracy (%); embedding -> 10-fold verification accuracy
        and TAR at FAR=1e-4 (%), from pair batches {"input", "input2", "target"}.
        """
        if not _prepared:
            _, loader = self._prepare(None, loader)
        if model == "teacher" and self.teacher is None:
            raise ValueError("there is no teacher to evaluate")
        evaluator = make_evaluator(self.task)
        acc = self.accelerator
        if model == "teacher":
            assert self.teacher is not None
            teacher = self.teacher

            def net(x: Any, prepared: Any) -> Tensor:
                if prepared is not None:
                    return teacher(prepared, prepared=True).output
                return teacher(x).output

            return evaluate_loader(net, loader, evaluator, accelerator=acc, skip_log=self.skip_log)
        student = self.accelerator.unwrap_model(self.step_module).student
        was = student.training
        student.eval()
        cl = self.config.channels_last

        def student_net(x: Any, _prepared: Any) -> Tensor:
            return extract_output(student(_channels_last(x) if cl else x))

        try:
            return evaluate_loader(
                student_net, loader, evaluator, accelerator=acc, skip_log=self.skip_log
            )
        finally:
            student.train(was)


_DESCRIBED = (
    "experiment", "role", "method", "dataset", "student", "teacher",
    "alpha", "resolution", "temperature", "kd_weight",
)  # fmt: skip


def _check_optimizer(student: nn.Module, objective: nn.Module, optimizer: Any) -> None:
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [
        n for n, p in objective.named_parameters() if p.requires_grad and id(p) not in in_opt
    ]
    if missing:
        raise ValueError(
            f"the objective has trainable parameters {missing[:5]} that are not in the "
            "optimizer: build it over list(student.parameters()) + list(objective.parameters())"
        )
    if not any(id(p) in in_opt for p in student.parameters()):
        raise ValueError("the optimizer holds none of the student's parameters")


def _length(loader: Any) -> int:
    try:
        return len(loader)
    except TypeError:
        return 0


def _since(t: float) -> float:
    return time.perf_counter() - t


def _bar(enabled: bool, total: int, initial: int) -> Any:
    from distill.files import progress_bar

    return progress_bar(total, desc="train", unit="step", initial=initial, enabled=enabled)


def export_student(student: nn.Module, path: Path) -> None:
    """Write the student's weights as safetensors (atomically)."""
    from distill.serialization import save_safetensors

    save_safetensors(student.state_dict(), path)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Load a run's metrics.json as it is (`distill.run_record.read_metrics_json` validates)."""
    return dict(json.loads(Path(path).read_text()))


__all__: Sequence[str] = [
    "Distiller",
    "DistillerConfig",
    "NonFiniteLossError",
    "Progress",
    "export_student",
    "make_accelerator",
]
