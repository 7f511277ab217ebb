"""One training/evaluation loop for every distillation method, on accelerate.

A method is an objective (see `distill.losses`), not a new loop: the Distiller feeds each batch
to the frozen Teacher and to the student, hands both outputs to the objective and optimises
the `"loss"` it returns. Accelerate owns device placement, DDP, mixed precision, gradient
accumulation and trackers; the teacher is moved to the device but never wrapped in DDP nor
written into checkpoints.

It calls parts that live in their own modules: `run_folder` (lock, reruns), `seeding`, `guards`,
`step`, `evaluation` (one evaluator per task kind), `timing`, `checkpoint`, `run_record`, `outputs`.

Exact resume: the random state is re-seeded from (seed, epoch, batch index, rank) before
every batch is fetched, and batches already seen are skipped, so a run interrupted at any
checkpoint and resumed ends with the same weights as an uninterrupted one (bit-identical on
the CPU with `num_workers=0`; with workers, augmentations must be seeded per sample).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill import checkpoint as ckpt
from distill import evaluation as ev
from distill import step as st
from distill.config import DistillerConfig, make_accelerator, validate
from distill.data.skipping import SkipLog, take_skipped
from distill.files import progress_bar, write_json_atomic
from distill.guards import NonFiniteLossError, NonFiniteWatch, all_finite, check_weights_finite
from distill.outputs import export_student, read_metrics, write_outputs
from distill.profiling import student_cost
from distill.run_folder import check_resume, claim_folder, kept_record, on_main
from distill.run_record import build_record
from distill.seeding import seed_batch, seed_everything, seeded_loader
from distill.step import LossWindow
from distill.teacher import Teacher, as_teacher
from distill.timing import Throughput
from distill.tracking import end_trackers, loggable_config, start_trackers
from distill.types import Batch, TaskKind, split_batch, to_device


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
        self.config = config or DistillerConfig()
        validate(self.config, "DistillerConfig")
        self.teacher = as_teacher(teacher)
        objective = st.wire(student, self.teacher, objective, optimizer, self.config)
        self.student = student
        self.objective = objective
        self.step_module: nn.Module = st.StudentStep(student, objective)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.accelerator = st.ddp_ready(accelerator or make_accelerator(self.config), objective)
        self.progress = ckpt.Progress()
        self.skip_log = SkipLog()  # unreadable images the data pipeline replaced
        self.summary: dict[str, Any] = {}
        self._prepared = False
        self._compat_checked = False
        self._history: list[dict[str, float]] = []
        self._input_shape: tuple[int, ...] | None = None
        self._train_len = 0
        self._resumes: list[dict[str, Any]] = []  # accepted changes of settings on resume
        self._dataset: str | None = None
        self._fitted = False
        self._teacher_metrics: dict[str, float] | None = None
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
            # The forwards, in place: state dicts keep their keys (no "_orig_mod."). Not
            # Module.compile(): torch 2.11 leaves built-in containers (nn.Sequential) eager.
            if self.config.compile:
                members = getattr(self.teacher, "members", [self.teacher])  # an ensemble's
                models = [self.student] + [t.model for t in members if t is not None]
                for m in models:
                    m.forward = torch.compile(m.forward)  # type: ignore[method-assign]
            self.step_module, self.optimizer = acc.prepare(self.step_module, self.optimizer)
            if self.teacher is not None:  # cast first: half the bytes to move to the device
                self.teacher.to_precision(self.config.teacher_dtype, acc.device)
                self.teacher.to(acc.device)
            self._prepared = True
        return st.prepare_loader(acc, train_loader), st.prepare_loader(acc, eval_loader)

    @property
    def unwrapped_student(self) -> nn.Module:
        step = self.accelerator.unwrap_model(self.step_module)
        student = step.student
        return getattr(student, "_orig_mod", student)

    def _resume(self, root: Path) -> bool:
        """Load the checkpoint `config.resume` names, if any; whether one was loaded."""
        state = ckpt.resume(self.accelerator, self.config.resume, root, self.scheduler)
        if state is None:
            return False
        self.progress = ckpt.Progress.from_state(state)
        self._resumes = list(state.get("resume_changes", []))
        change = check_resume(
            state.get("config") or {}, self._loggable_config(), self.config, self.accelerator.print
        )
        if change:
            self._resumes.append({"step": self.progress.step, "changes": change})
        self._history = state.get("history", [])
        if self.accelerator.is_main_process and state.get("skipped_images"):
            self.skip_log = SkipLog.from_dict(state["skipped_images"])  # merged over ranks
        return True

    # ---------------------------------------------------------------- training
    def fit(
        self, train_loader: Iterable[Any], eval_loader: Iterable[Any] | None = None
    ) -> dict[str, Any]:
        """Train to `max_steps` (or `epochs`), evaluating/saving as configured.

        Returns the final eval metrics (empty without an eval loader). Writes checkpoints,
        `config.json`, `metrics.json` and `student.safetensors` into `output_dir`, holding its
        lock meanwhile (distill.run_folder). Resuming a finished run keeps its record as it is.
        """
        cfg = self.config
        lock = on_main(
            self.accelerator,
            lambda: claim_folder(
                self.output_dir,
                cfg,
                fresh=cfg.resume is None and not self._fitted,  # a 2nd fit() continues its run
                trained=self.step_module,
                exported=self.student,
                say=self.accelerator.print,
            ),
        )
        try:
            result = self._fit(train_loader, eval_loader)
            self._fitted = True
            return result
        finally:
            if lock is not None:
                lock.release()

    def _fit(
        self, train_loader: Iterable[Any], eval_loader: Iterable[Any] | None
    ) -> dict[str, Any]:
        acc = self.accelerator
        train_loader, seeded = seeded_loader(train_loader, self.config.seed)
        train_loader, eval_loader = self._prepare(train_loader, eval_loader)
        total = st.total_steps(train_loader, self.config)
        self._train_len = st.epoch_length(train_loader)
        root = self.output_dir / "checkpoints"
        resumed = self._resume(root)
        if resumed and self.progress.step >= total:
            kept = kept_record(self.output_dir, self.progress.step, acc.print)
            if kept is not None:  # a finished run requeued: its record stays as it was
                self.summary = kept
                return dict(kept["metrics"])
        self._dataset = st.dataset_name(train_loader)
        start_trackers(self.accelerator, self.config, self._loggable_config())
        if acc.is_main_process:
            write_json_atomic(self.output_dir / "config.json", self._loggable_config())
        timer = Throughput(acc.device)
        window = LossWindow(NonFiniteWatch(acc.device))
        last_saved = self.progress.step if resumed else -1
        show = self.config.progress and acc.is_main_process
        bar = progress_bar(
            total, desc="train", unit="step", initial=self.progress.step, enabled=show
        )
        self.step_module.train()
        while self.progress.step < total:
            saved = self._run_epoch(train_loader, seeded, eval_loader, total, timer, window, bar)
            last_saved = saved if saved is not None else last_saved
        bar.close()
        window.watch.raise_if_bad(root, acc)
        if last_saved != self.progress.step:
            with timer.pause("checkpoint"):
                self._save(root)
        last_eval: dict[str, float] = {}
        teacher_metrics = None
        if eval_loader is not None:
            with timer.pause("eval"):
                last_eval = self._eval_and_log(eval_loader)
                teacher_metrics = self._teacher_scores(eval_loader)
        self._finish(last_eval, teacher_metrics, timer)
        return last_eval

    def _finish(
        self, final: dict[str, float], teacher_metrics: dict[str, float] | None, timer: Throughput
    ) -> None:
        """Write the run's outputs (distill.outputs) and end the trackers."""
        acc, p = self.accelerator, self.progress
        acc.wait_for_everyone()
        skipped = self.gathered_skips()
        record = build_record(
            self.config,
            final=final,
            teacher_metrics=teacher_metrics,
            task=self.task,
            defaults=st.describe_run(
                self.unwrapped_student,
                self.teacher,
                self.objective,
                dataset=self._dataset,
                input_shape=self._input_shape,
            ),
            cost=student_cost(self.unwrapped_student, self._input_shape),
            timer=timer,
            progress={
                **ckpt.progress_fields(p, self._train_len),
                "skipped_images": skipped.to_dict(),
            },
            accelerator=acc,
        )
        if self._resumes:
            record.info["resume_changes"] = self._resumes
        st.sync_buffers(self.step_module, acc)
        student = self.unwrapped_student if self.config.export_student else None
        self.summary = write_outputs(acc, self.output_dir, record, student=student, skipped=skipped)
        acc.wait_for_everyone()
        end_trackers(acc)  # the process group stays: evaluate() and another fit() still work

    def _run_epoch(
        self,
        train_loader: Any,
        seeded: Any,
        eval_loader: Any,
        total: int,
        timer: Throughput,
        window: LossWindow,
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
                window.watch.raise_if_bad(root, acc)
                with timer.pause("checkpoint"):
                    self._save(root)
                saved = p.step
        return saved

    def _train_batch(self, raw: Any, batch_idx: int, window: LossWindow) -> int:
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
        self, total: int, timer: Throughput, window: LossWindow, bar: Any, eval_loader: Any
    ) -> int | None:
        """Log, save and evaluate as configured after optimizer step `progress.step`."""
        cfg, p = self.config, self.progress
        root = self.output_dir / "checkpoints"
        want_save = cfg.save_every is not None and p.step % cfg.save_every == 0
        if p.step % cfg.log_every == 0 or want_save or p.step == total:
            window.watch.raise_if_bad(root, self.accelerator)
            self._log_train(window, timer.images_per_s(), bar)
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
        t_out = st.teacher_outputs(
            self.teacher, self.objective, b, acc, to_channels_last=cfg.channels_last
        )
        x = st.channels_last(b.input) if cfg.channels_last else b.input
        skipped = False
        with acc.accumulate(self.step_module):
            with acc.autocast():
                parts = self.step_module(x, t_out, b.target, st.batch_extras(self.objective, b))
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
        st.sync_buffers(self.step_module, self.accelerator)  # what is saved is what each rank has
        check_weights_finite(self.step_module, p.step, root)
        gathered = self.gathered_skips()
        state = {
            **dataclasses.asdict(p),
            "resume_changes": self._resumes,
            "accelerate_iteration": int(self.accelerator.project_configuration.iteration) + 1,
            "history": self._history[-1000:],
            "config": self._loggable_config(),
            "skipped_images": gathered.to_dict(),
        }
        ckpt.save_checkpoint(
            self.accelerator, root, p.step, state, self.scheduler, keep=self.config.keep_checkpoints
        )

    def gathered_skips(self) -> SkipLog:
        """The unreadable images every process met so far, merged (a collective: every process
        must call it)."""
        return self.skip_log.all_gather() if self.accelerator.num_processes > 1 else self.skip_log

    # ---------------------------------------------------------------- logging
    def _log_train(self, window: LossWindow, images_per_s: float, bar: Any) -> None:
        p, lr = self.progress, float(self.optimizer.param_groups[0]["lr"])
        row = window.take_row(self.accelerator, lr=lr, images_per_s=images_per_s, epoch=p.epoch)
        if not row:  # nothing since the last row (every batch skipped)
            return
        self._history.append({"step": p.step, **row})
        self.accelerator.log(row, step=p.step)
        bar.set_postfix({k.removeprefix("train/"): f"{v:.4g}" for k, v in row.items()})

    def _eval_and_log(self, loader: Any) -> dict[str, float]:
        result = self.evaluate(loader, _prepared=True)
        row = {f"eval/{k}": v for k, v in result.items()}
        self._history.append({"step": self.progress.step, **row})
        self.accelerator.log(row, step=self.progress.step)
        teacher = self._teacher_scores(loader)  # evaluated once: the teacher does not change
        self.accelerator.print(f"step {self.progress.step}: {ev.score_line(result, teacher)}")
        return result

    def _teacher_scores(self, loader: Any) -> dict[str, float] | None:
        if self.teacher is None or not self.config.run_info.get("evaluate_teacher", True):
            return None
        if self._teacher_metrics is None:
            self._teacher_metrics = self.evaluate(loader, model="teacher", _prepared=True)
        return self._teacher_metrics

    def _loggable_config(self) -> dict[str, Any]:
        teacher = self.teacher.meta if self.teacher is not None else None
        objective = type(self.objective).__name__
        return loggable_config(
            self.config, teacher, objective, st.describe_objective(self.objective)
        )

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
        evaluator = ev.make_evaluator(self.task, self.objective)  # e.g. its missing_label
        acc = self.accelerator
        if model == "teacher":
            assert self.teacher is not None
            net = ev.teacher_net(self.teacher)
            return ev.evaluate_loader(
                net, loader, evaluator, accelerator=acc, skip_log=self.skip_log
            )
        st.sync_buffers(self.step_module, acc)  # every rank evaluates the student that is saved
        student = self.accelerator.unwrap_model(self.step_module).student
        was = student.training
        student.eval()
        try:
            net = ev.student_net(student, channels_last=self.config.channels_last)
            return ev.evaluate_loader(
                net, loader, evaluator, accelerator=acc, skip_log=self.skip_log
            )
        finally:
            student.train(was)


__all__: Sequence[str] = [
    "Distiller",
    "DistillerConfig",
    "NonFiniteLossError",
    "export_student",
    "make_accelerator",
    "read_metrics",
]
