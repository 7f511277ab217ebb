"""One training/evaluation loop for every distillation method, on accelerate.

A method is an objective (see `distill.losses`), not a new loop: the Distiller feeds each batch
to the frozen Teacher and to the student, hands both outputs to the objective and optimises
the `"loss"` it returns. Accelerate owns device placement, DDP, mixed precision, gradient
accumulation and trackers; the teacher is moved to the device but never wrapped in DDP nor
written into checkpoints.

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
import platform
import random
import resource
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from distill import checkpoint as ckpt
from distill import metrics as M
from distill.data.skipping import SkipLog, take_skipped
from distill.teacher import FeatureHooks, Teacher, as_teacher, extract_output
from distill.types import Batch, Outputs, split_batch, to_device

logger = logging.getLogger(__name__)

Task = Literal["auto", "logits", "multilabel", "embedding"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the message names the step, the part and the last checkpoint."""


@dataclass
class DistillerConfig:
    """How the loop runs. Recipes map their flags onto this; it is logged as is."""

    output_dir: str = "runs/distill"
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    grad_accum_steps: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
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
    on_nonfinite: Literal["raise", "skip"] = "raise"
    task: Task = "auto"  # what the student outputs; auto: the teacher's kind, else logits
    report_to: Literal["none", "wandb"] = "none"
    project: str = "mobiledistill"
    run_name: str | None = None
    progress: bool = True
    export_student: bool = True
    check_compatible: bool = True
    cached_teacher: bool = False  # batches carry "teacher_logits": no teacher model needed
    run_info: dict[str, Any] = field(default_factory=dict)  # role, method, alpha, ... for reports
    tracker_init_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. wandb group/tags

    def problems(self) -> list[str]:
        p = []
        if self.epochs < 1 and self.max_steps is None:
            p.append(f"epochs must be >= 1 (got {self.epochs}) unless max_steps is set")
        if self.max_steps is not None and self.max_steps < 1:
            p.append(f"max_steps must be >= 1, got {self.max_steps}")
        if self.grad_accum_steps < 1:
            p.append(f"grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.log_every < 1:
            p.append(f"log_every must be >= 1, got {self.log_every}")
        for name in ("save_every", "eval_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                p.append(f"{name} must be >= 1 or unset, got {v}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            p.append(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.on_nonfinite not in ("raise", "skip"):
            p.append(f"on_nonfinite must be raise or skip, got {self.on_nonfinite!r}")
        if self.task not in ("auto", "logits", "multilabel", "embedding"):
            p.append(f"task must be auto, logits, multilabel or embedding, got {self.task!r}")
        if self.report_to not in ("none", "wandb"):
            p.append(f"report_to must be none or wandb, got {self.report_to!r}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            p.append(f"max_grad_norm must be > 0 or unset, got {self.max_grad_norm}")
        return p


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


class SeededDataset(torch.utils.data.Dataset):
    """Runs the wrapped dataset's `__getitem__` under a random state derived from
    (seed, epoch, index), so random augmentations do not depend on when or in which worker
    a sample is loaded: skipping batches on resume then replays exactly the same crops.

    The global random state is restored afterwards. `epoch` is set by the loop before each
    epoch's iterator is made (persistent workers would keep a stale copy: avoid them when
    exact resume matters).
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        s = (self.seed * 1_000_003 + self.epoch * 999_983 + int(index) * 7_919 + 17) % (2**31 - 1)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # CPU generator only: torch.manual_seed would also queue CUDA seeding per image
            torch.default_generator.manual_seed(s)
            random.seed(s)
            np.random.seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def __getattr__(self, name: str) -> Any:
        if name in {"dataset", "seed", "epoch"}:
            raise AttributeError(name)
        return getattr(self.dataset, name)


def seeded_loader(loader: Any, seed: int) -> tuple[Any, SeededDataset | None]:
    """The same DataLoader over a `SeededDataset` (map-style datasets only)."""
    from torch.utils.data import BatchSampler, DataLoader, IterableDataset

    if type(loader) is not DataLoader or isinstance(loader.dataset, IterableDataset):
        return loader, None
    ds = SeededDataset(loader.dataset, seed)
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "generator": loader.generator,
        "persistent_workers": loader.persistent_workers,
    }
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    if type(loader.batch_sampler) is BatchSampler:
        kwargs.update(
            sampler=loader.sampler,
            batch_size=loader.batch_size,
            drop_last=loader.drop_last,
        )
    else:
        kwargs["batch_sampler"] = loader.batch_sampler
    return DataLoader(ds, **kwargs), ds


def _seed_batch(seed: int, epoch: int, batch: int, rank: int) -> None:
    s = (seed * 1_000_003 + epoch * 10_007 + batch * 101 + rank) % (2**31 - 1)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


FAULT_NONFINITE_ENV = "MOBILEDISTILL_FAULT_NONFINITE"


def _fault_from_env() -> tuple[int, str] | None:
    """Fault injection for the test suite (tests/FAULTS.md): MOBILEDISTILL_FAULT_NONFINITE=
    STEP:PART makes loss part PART (and so the loss) NaN while optimizer step STEP is computed."""
    raw = os.environ.get(FAULT_NONFINITE_ENV)
    if not raw:
        return None
    step, _, part = raw.partition(":")
    return int(step), part or "loss"


def _poison(parts: dict[str, Tensor], part: str) -> dict[str, Tensor]:
    if part not in parts:
        raise KeyError(f"{FAULT_NONFINITE_ENV}: no loss part {part!r}; parts: {sorted(parts)}")
    nan = torch.tensor(float("nan"), device=parts[part].device)
    bad = parts[part] * nan
    return {**parts, part: bad, "loss": parts["loss"] + bad if part != "loss" else bad}


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
        self._check_optimizer(student, objective, optimizer)
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
        self.accelerator = accelerator or self._make_accelerator()
        self.progress = Progress()
        self.skip_log = SkipLog()  # unreadable images dropped by the data pipeline
        self._prepared = False
        self._compat_checked = False
        self._history: list[dict[str, float]] = []
        self._input_shape: tuple[int, ...] | None = None
        self._train_len = 0
        self.output_dir = Path(self.config.output_dir)
        self._fault = _fault_from_env()
        if example_input is not None:
            self._check_compat(example_input)

    # ---------------------------------------------------------------- set-up
    def _make_accelerator(self) -> Any:
        return make_accelerator(self.config)

    @staticmethod
    def _check_optimizer(student: nn.Module, objective: nn.Module, optimizer: Any) -> None:
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [
            n for n, p in objective.named_parameters() if p.requires_grad and id(p) not in in_opt
        ]
        if missing:
            raise ValueError(
                f"the objective has trainable parameters {missing[:5]} that are not in the "
                "optimizer: build it over list(student.parameters()) + "
                "list(objective.parameters())"
            )
        if not any(id(p) in in_opt for p in student.parameters()):
            raise ValueError("the optimizer holds none of the student's parameters")

    @property
    def task(self) -> str:
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
            from accelerate.utils import set_seed

            set_seed(self.config.seed)
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
        with self.accelerator.autocast():
            if b.teacher_input is not None:
                x = (
                    _channels_last(b.teacher_input)
                    if self.config.channels_last
                    else b.teacher_input
                )
                return self.teacher(x, prepared=True)
            x = _channels_last(b.input) if self.config.channels_last else b.input
            return self.teacher(x)

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
        cfg, acc = self.config, self.accelerator
        self._preflight()
        train_loader, seeded = seeded_loader(train_loader, cfg.seed)
        train_loader, eval_loader = self._prepare(train_loader, eval_loader)
        total = self._total_steps(train_loader)
        self._train_len = self._epoch_len(train_loader)
        ckpt_root = self.output_dir / "checkpoints"
        resume_from = ckpt.resolve_resume(cfg.resume, ckpt_root)
        if resume_from is not None:
            state = ckpt.load_checkpoint(acc, resume_from, self.scheduler)
            self.progress = Progress(
                **{k: state[k] for k in dataclasses.asdict(Progress()) if k in state}
            )
            self._history = state.get("history", [])
            acc.print(f"resumed from {resume_from} at step {self.progress.step}")
        elif cfg.resume == "latest":
            acc.print(f"no checkpoint under {ckpt_root}: starting from scratch")
        self._init_trackers()
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.write_json_atomic(self.output_dir / "config.json", self._loggable_config())

        p = self.progress
        bar = self._bar(total, p.step)
        sums: dict[str, Tensor] = {}
        n_in_sums = 0
        bad_step = torch.tensor(-1, device=acc.device)
        bad_parts: dict[str, Tensor] = {}
        t_start, steps_timed, images_timed = time.perf_counter(), 0, 0
        last_saved = p.step if resume_from is not None else -1
        last_eval: dict[str, float] = {}
        world = acc.num_processes

        def zero() -> Tensor:
            return torch.zeros((), device=acc.device)

        def step_tensor(v: int) -> Tensor:
            return torch.tensor(v, device=acc.device)

        self.step_module.train()
        while p.step < total:
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(p.epoch)
            if seeded is not None:
                seeded.epoch = p.epoch
            loader = (
                acc.skip_first_batches(train_loader, p.batch_in_epoch)
                if p.batch_in_epoch
                else train_loader
            )
            it = iter(loader)
            batch_idx = p.batch_in_epoch
            epoch_done = False
            while p.step < total:
                try:
                    raw = next(it)
                except StopIteration:
                    epoch_done = True
                    break
                raw, empty = take_skipped(raw, self.skip_log)
                if empty:  # every image of this batch was unreadable (counted in skip_log)
                    batch_idx += 1
                    continue
                # dropout & co. depend on (seed, epoch, batch, rank) only: exact on resume
                _seed_batch(cfg.seed, p.epoch, batch_idx, acc.process_index)
                batch_idx += 1
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
                        f"step {p.step + 1}: non-finite loss, batch skipped "
                        f"({p.skipped_nonfinite} so far)"
                    )
                else:
                    # first non-finite step, recorded on the device: no host sync per step
                    finite = torch.isfinite(parts["loss"])
                    newly_bad = (bad_step < 0) & ~finite
                    bad_step = torch.where(newly_bad, step_tensor(p.step + 1), bad_step)
                    for k, v in parts.items():
                        v = v.detach().float()
                        sums[k] = sums.get(k, zero()) + v
                        prev = bad_parts.get(
                            k, torch.zeros((), dtype=torch.bool, device=acc.device)
                        )
                        bad_parts[k] = prev | (newly_bad & ~torch.isfinite(v))
                    n_in_sums += 1  # skipped batches (agreed by all ranks) are not averaged
                images_timed += b.size() * world
                p.images_seen += b.size() * world
                if not acc.sync_gradients:
                    continue
                p.step += 1
                p.batch_in_epoch = batch_idx
                steps_timed += 1
                if self.scheduler is not None and not acc.optimizer_step_was_skipped:
                    self.scheduler.step()
                if bar is not None:
                    bar.update(1)
                want_save = cfg.save_every is not None and p.step % cfg.save_every == 0
                if p.step % cfg.log_every == 0 or want_save or p.step == total:
                    self._raise_if_nonfinite(bad_step, bad_parts, ckpt_root)
                    elapsed = time.perf_counter() - t_start
                    self._log_train(sums, n_in_sums, images_timed / max(elapsed, 1e-9), bar)
                    sums, n_in_sums = {}, 0
                if want_save:
                    self._save(ckpt_root)
                    last_saved = p.step
                if cfg.eval_every and eval_loader is not None and p.step % cfg.eval_every == 0:
                    last_eval = self._eval_and_log(eval_loader)
                    self.step_module.train()
            if epoch_done:
                p.epoch += 1
                p.batch_in_epoch = 0
                at_end = p.step >= total
                if cfg.eval_at_epoch_end and eval_loader is not None and not at_end:
                    last_eval = self._eval_and_log(eval_loader)
                    self.step_module.train()
                if cfg.save_at_epoch_end and not at_end:
                    self._raise_if_nonfinite(bad_step, bad_parts, ckpt_root)
                    self._save(ckpt_root)
                    last_saved = p.step
        if bar is not None:
            bar.close()
        if sums:
            self._raise_if_nonfinite(bad_step, bad_parts, ckpt_root)
        if self._device_is_cuda():
            torch.cuda.synchronize()
        wall = time.perf_counter() - t_start
        images_per_s = images_timed / max(wall, 1e-9)
        if last_saved != p.step:
            self._raise_if_nonfinite(bad_step, bad_parts, ckpt_root)
            self._save(ckpt_root)
        if eval_loader is not None:
            last_eval = self._eval_and_log(eval_loader)
        teacher_metrics = None
        if (
            eval_loader is not None
            and self.teacher is not None
            and self.config.run_info.get("evaluate_teacher", True)
        ):
            teacher_metrics = self.evaluate(eval_loader, model="teacher", _prepared=True)
        self._finish(last_eval, teacher_metrics, images_per_s, wall)
        return last_eval

    def _epoch_len(self, loader: Any) -> int:
        try:
            return len(loader)
        except TypeError:
            return 0

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
            if self._fault is not None and self._fault[0] == self.progress.step + 1:
                parts = _poison(parts, self._fault[1])
            if cfg.on_nonfinite == "skip":
                finite = torch.isfinite(parts["loss"].detach()).float().reshape(1)
                # every process must agree, or DDP's gradient all-reduce would hang
                skipped = bool(acc.gather(finite).min() < 1)
            if skipped:
                self.optimizer.zero_grad(set_to_none=True)
            else:
                acc.backward(parts["loss"])
                if cfg.max_grad_norm is not None and acc.sync_gradients:
                    acc.clip_grad_norm_(self.step_module.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return parts, skipped

    def _raise_if_nonfinite(
        self, bad_step: Tensor, bad_parts: dict[str, Tensor], root: Path
    ) -> None:
        step = int(bad_step.item())
        if step < 0:
            return
        names = [k for k, v in bad_parts.items() if bool(v)] or ["loss"]
        last = ckpt.find_latest(root)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"loss became non-finite at step {step} (parts: {', '.join(names)}); {where}. "
            "Lower the learning rate or temperature, check the inputs, or set "
            "on_nonfinite='skip' to drop such batches."
        )

    def _save(self, root: Path) -> None:
        p = self.progress
        # a finite loss can still end in an overflowing update: never save such weights
        params = [t.detach() for t in self.step_module.parameters()]
        if params and not bool(torch.stack([torch.isfinite(t).all() for t in params]).all()):
            last = ckpt.find_latest(root)
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise NonFiniteLossError(
                f"the weights became non-finite at step {p.step} (parts: weights; the loss was "
                f"finite, the update overflowed); {where}. Lower the learning rate or set "
                "max_grad_norm."
            )
        state = {
            **dataclasses.asdict(p),
            "accelerate_iteration": int(self.accelerator.project_configuration.iteration) + 1,
            "history": self._history[-1000:],
            "config": self._loggable_config(),
        }
        ckpt.save_checkpoint(
            self.accelerator, root, p.step, state, self.scheduler, keep=self.config.keep_checkpoints
        )

    # ---------------------------------------------------------------- logging
    def _preflight(self) -> None:
        """Fail before any work when the output folder cannot be written, or its disk cannot
        hold the checkpoints the run will keep (an estimate: weights + two optimizer moments)."""
        out = self.output_dir
        if self.accelerator.is_main_process:
            try:
                out.mkdir(parents=True, exist_ok=True)
                probe = out / ".write-test"
                probe.write_text("ok")
                probe.unlink()
            except OSError as e:
                raise PermissionError(
                    f"cannot write to output_dir {out} ({e.strerror}); choose a writable folder"
                ) from e
            student_bytes = sum(
                t.numel() * t.element_size()
                for t in [*self.student.parameters(), *self.student.buffers()]
            )
            ckpt.check_free_space(
                out / "checkpoints",
                ckpt.estimate_bytes(self.step_module),
                self.config.keep_checkpoints,
                extra=student_bytes,
            )

    def _bar(self, total: int, initial: int) -> Any:
        if not (self.config.progress and self.accelerator.is_main_process):
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )

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
        if bar is not None:
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
        init_kwargs = {}
        if self.config.tracker_init_kwargs:
            init_kwargs["wandb"] = dict(self.config.tracker_init_kwargs)
        if self.config.run_name:
            init_kwargs.setdefault("wandb", {}).setdefault("name", self.config.run_name)
        if os.environ.get("WANDB_DIR"):
            # wandb keeps process-wide settings from its first run; honour the current folder
            init_kwargs.setdefault("wandb", {}).setdefault("dir", os.environ["WANDB_DIR"])
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

    def _device_is_cuda(self) -> bool:
        return self.accelerator.device.type == "cuda"

    def _finish(
        self,
        final: dict[str, float],
        teacher_metrics: dict[str, float] | None,
        images_per_s: float,
        wall: float,
    ) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()
        skipped = self.skip_log.all_gather() if acc.num_processes > 1 else self.skip_log
        if skipped.total and acc.is_main_process:
            acc.print(skipped.report())
            ckpt.write_json_atomic(self.output_dir / "skipped.json", skipped.to_dict())
        student = self.unwrapped_student
        profile = self._profile(student)
        peak = (
            int(torch.cuda.max_memory_allocated(acc.device))
            if self._device_is_cuda()
            else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
        )
        info = dict(self.config.run_info)
        info.pop("evaluate_teacher", None)
        primary = {"logits": "top1", "multilabel": "mAP", "embedding": "verification_acc"}[
            self.task
        ]
        summary = {
            "schema": 1,
            "run_name": self.config.run_name or self.output_dir.name,
            "experiment": info.pop("experiment", None),
            "role": info.pop("role", "distilled" if self.teacher is not None else "scratch"),
            "method": info.pop("method", type(self.objective).__name__),
            "dataset": info.pop("dataset", None),
            "student": info.pop("student", type(student).__name__),
            "teacher": info.pop("teacher", self.teacher.name if self.teacher is not None else None),
            "alpha": info.pop("alpha", None),
            "resolution": info.pop(
                "resolution", self._input_shape[-1] if self._input_shape else None
            ),
            "temperature": info.pop("temperature", None),
            "kd_weight": info.pop("kd_weight", None),
            "seed": self.config.seed,
            "metrics": final,
            "primary_metric": primary,
            "higher_is_better": True,
            "teacher_metrics": teacher_metrics,
            "mult_adds": profile.get("mult_adds"),
            "params": profile.get("params"),
            "images_per_s": images_per_s,
            "peak_mem_bytes": peak,
            "peak_mem_kind": "cuda_max_allocated" if self._device_is_cuda() else "cpu_max_rss",
            "steps": self.progress.step,
            "epochs": self.progress.epoch + self.progress.batch_in_epoch / max(1, self._train_len),
            "images_seen": self.progress.images_seen,
            "skipped_nonfinite": self.progress.skipped_nonfinite,
            "skipped_images": skipped.total,
            "wall_s": wall,
            "num_processes": acc.num_processes,
            "mixed_precision": str(acc.mixed_precision),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": self._device_name(),
            **{f"info_{k}": v for k, v in info.items()},
        }
        self.summary = summary
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.config.export_student:
                export_student(student, self.output_dir / "student.safetensors")
            ckpt.write_json_atomic(self.output_dir / "metrics.json", summary)
        if acc.log_with and acc.is_main_process:
            from distill.tracking import log_summary, summary_fields

            flat = {
                k: v
                for k, v in summary.items()
                if isinstance(v, (int, float, str)) and not isinstance(v, bool)
            }
            flat.update(
                summary_fields(
                    final,
                    mult_adds=int(profile.get("mult_adds") or 0),
                    params=int(profile.get("params") or 0),
                    images_per_s=images_per_s,
                    peak_mem_bytes=peak,
                    teacher_metrics=teacher_metrics,
                )
            )
            log_summary(acc, flat)
        acc.wait_for_everyone()
        acc.end_training()

    def _profile(self, student: nn.Module) -> dict[str, int]:
        if self._input_shape is None or len(self._input_shape) != 3:
            return {}
        try:
            from distill.profiling import profile

            prof = profile(student, self._input_shape)
            return {"mult_adds": int(prof.mult_adds), "params": int(prof.params)}
        except Exception as e:  # profiling is informative; never fail a finished run over it
            logger.warning("could not profile the student: %s", e)
            return {"params": sum(p.numel() for p in student.parameters())}

    def _device_name(self) -> str:
        dev = self.accelerator.device
        if dev.type == "cuda":
            return torch.cuda.get_device_name(dev)
        return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(
        self,
        loader: Iterable[Any],
        *,
        model: Literal["student", "teacher"] = "student",
        _prepared: bool = False,
    ) -> dict[str, float]:
        """Metrics of the student (or the teacher) on `loader`, over all processes.

        logits -> top1/top5 (%); multilabel -> mAP and mean accuracy (%); embedding -> 10-fold
        verification accuracy and TAR at FAR=1e-4 (%), from batches with "input", "input2" and
        a 0/1 "target" (same identity).
        """
        acc = self.accelerator
        if not _prepared:
            _, loader = self._prepare(None, loader)
        if model == "teacher" and self.teacher is None:
            raise ValueError("there is no teacher to evaluate")
        # net(x, x_for_teacher): the teacher takes its own view of the batch when there is one
        net: Callable[[Any, Any], Tensor]
        if model == "student":
            student = self.accelerator.unwrap_model(self.step_module).student
            was = student.training
            student.eval()

            def net(x: Any, _prepared: Any = None) -> Tensor:
                return extract_output(
                    student(_channels_last(x) if self.config.channels_last else x)
                )
        else:
            assert self.teacher is not None
            teacher = self.teacher

            def net(x: Any, prepared: Any = None) -> Tensor:
                if prepared is not None:
                    return teacher(prepared, prepared=True).output
                return teacher(x).output

        task = self.task
        correct = torch.zeros(2, device=acc.device)
        count = torch.zeros((), device=acc.device)
        outs: list[Tensor] = []
        targets: list[Tensor] = []
        masks: list[Tensor] = []
        pairs: list[Tensor] = []
        try:
            for raw in loader:
                raw, empty = take_skipped(raw, self.skip_log)
                if empty:
                    continue
                b = split_batch(to_device(raw, acc.device))
                with acc.autocast():
                    out = net(b.input, b.teacher_input).float()
                if task == "logits":
                    if b.target is None:
                        raise ValueError("evaluation batches need targets for top-1/top-5")
                    hits = M.topk_hits(out, b.target, (1, 5))  # (B, 2)
                    hits = acc.gather_for_metrics(hits)
                    correct += hits.sum(0)
                    count += hits.shape[0]
                elif task == "multilabel":
                    o, t = acc.gather_for_metrics((out, b.target))
                    outs.append(o.cpu())
                    targets.append(t.cpu())
                    if "mask" in b.extra:
                        masks.append(acc.gather_for_metrics(b.extra["mask"]).cpu())
                else:
                    x2 = b.extra.get("input2")
                    if x2 is None:
                        raise ValueError(
                            "embedding evaluation needs pair batches: {'input', 'input2', 'target' "
                            "(1 = same identity)}, e.g. LFW pairs"
                        )
                    with acc.autocast():
                        out2 = net(x2, b.extra.get("teacher_input2")).float()
                    o1, o2, t = acc.gather_for_metrics((out, out2, b.target))
                    outs.append(o1.cpu())
                    pairs.append(o2.cpu())
                    targets.append(t.cpu())
        finally:
            if model == "student":
                student.train(was)
        if task == "logits":
            n = max(float(count), 1.0)
            return {"top1": float(correct[0]) / n * 100.0, "top5": float(correct[1]) / n * 100.0}
        if task == "multilabel":
            scores, y = torch.cat(outs), torch.cat(targets)
            mask = torch.cat(masks) if masks else None
            return {
                "mAP": M.mean_average_precision(scores, y, mask),
                "mean_acc": M.multilabel_accuracy(scores, y, mask),
            }
        d = M.pair_distances(torch.cat(outs), torch.cat(pairs))
        same = torch.cat(targets).numpy()
        folds = 10 if len(d) >= 10 else max(2, len(d))
        return {
            "verification_acc": M.verification_accuracy(d, same, folds),
            "tar_at_far_1e-4": M.tar_at_far(d, same, 1e-4),
        }


def export_student(student: nn.Module, path: Path) -> None:
    """Write the student's weights as safetensors (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu().clone() for k, v in student.state_dict().items()}
    tmp = path.with_name(f".tmp-{path.name}")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Load a run's metrics.json."""
    return json.loads(Path(path).read_text())


__all__: Sequence[str] = [
    "Distiller",
    "DistillerConfig",
    "NonFiniteLossError",
    "Progress",
    "export_student",
]
