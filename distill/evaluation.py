"""Evaluation: one evaluator per task kind, and the one loop that feeds it.

An evaluator collects what its metrics need from each batch (`update`) and turns it into
numbers at the end (`compute`); it names its primary metric for reports. Adding a task kind or
a metric is one class here, registered with `@register_evaluator`, plus its name in
`distill.types.TaskKind`: the training loop does not change.

    evaluator = make_evaluator("multilabel", objective)  # the objective's missing_label
    metrics = evaluate_loader(net, loader, evaluator, accelerator=acc, skip_log=log)

Evaluators see gathered tensors (every process's share, without the padding accelerate adds to
the last batch), so `compute` gives the same numbers on every process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from distill import metrics as M
from distill.data.skipping import SkipLog, take_skipped
from distill.losses.multilabel import _mask_from
from distill.step import channels_last as to_channels_last
from distill.teacher import extract_output
from distill.types import TASK_KINDS, Batch, split_batch, to_device

__all__ = [
    "EVALUATORS",
    "EmbeddingEvaluator",
    "Evaluator",
    "LogitsEvaluator",
    "MultiLabelEvaluator",
    "evaluate_loader",
    "make_evaluator",
    "register_evaluator",
    "score_line",
    "student_net",
    "teacher_net",
]

# net(student_input, teacher_input_or_None) -> output tensor
Net = Callable[[Any, Any], Tensor]
Gather = Callable[[Any], Any]


class Evaluator:
    """Base class: collects batches, computes metrics (in percent, as papers report them)."""

    kind: ClassVar[str]
    primary: ClassVar[str]
    higher_is_better: ClassVar[bool] = True

    def views(self, b: Batch) -> list[tuple[Any, Any]]:
        """The (student input, teacher input) pairs to run the model on for one batch."""
        return [(b.input, b.teacher_input)]

    def update(self, outputs: list[Tensor], b: Batch, gather: Gather) -> None:
        raise NotImplementedError

    def compute(self) -> dict[str, float]:
        raise NotImplementedError

    @classmethod
    def for_objective(cls, objective: Any) -> Evaluator:
        """The evaluator that scores what `objective` trains (None: the defaults)."""
        return cls()


EVALUATORS: dict[str, type[Evaluator]] = {}


def register_evaluator(cls: type[Evaluator]) -> type[Evaluator]:
    """Class decorator: make `cls` the evaluator of task kind `cls.kind` (names are unique)."""
    if cls.kind in EVALUATORS:
        raise ValueError(
            f"task kind {cls.kind!r} already has the evaluator {EVALUATORS[cls.kind].__name__}"
        )
    if cls.kind not in TASK_KINDS:
        raise ValueError(f"add {cls.kind!r} to distill.types.TaskKind to register its evaluator")
    EVALUATORS[cls.kind] = cls
    return cls


def make_evaluator(kind: str, objective: Any = None) -> Evaluator:
    """A fresh evaluator for task kind `kind`, configured from the training `objective` where
    the two must agree (a multi-label objective's `missing_label`)."""
    if kind not in EVALUATORS:
        raise ValueError(f"no evaluator for task kind {kind!r}; known: {sorted(EVALUATORS)}")
    return EVALUATORS[kind].for_objective(objective)


@register_evaluator
class LogitsEvaluator(Evaluator):
    """Class logits: top-1 and top-5 accuracy."""

    kind = "logits"
    primary = "top1"

    def __init__(self) -> None:
        self.correct: Tensor | None = None  # (2,) hits at k = 1, 5
        self.count = 0

    def update(self, outputs: list[Tensor], b: Batch, gather: Gather) -> None:
        if b.target is None:
            raise ValueError("evaluation batches need targets for top-1/top-5")
        hits = gather(M.topk_hits(outputs[0], b.target, (1, 5)))  # (B, 2)
        total = hits.sum(0)
        self.correct = total if self.correct is None else self.correct + total
        self.count += int(hits.shape[0])

    def compute(self) -> dict[str, float]:
        n = max(float(self.count), 1.0)
        c = self.correct.tolist() if self.correct is not None else [0.0, 0.0]
        return {"top1": c[0] / n * 100.0, "top5": c[1] / n * 100.0}


@register_evaluator
class MultiLabelEvaluator(Evaluator):
    """Per-attribute logits against 0/1 targets: mean AP (sklearn's AP per attribute) and mean
    accuracy over the known labels only.

    A label is unknown where the target equals `missing_label` (NaN matches NaN), the value the
    multi-label objectives read, or where a batch "mask" is 0. Attributes whose known labels
    are all positive score AP 100; those with no known positive are left out of the mean AP
    with a warning (`distill.metrics.mean_average_precision`).
    """

    kind = "multilabel"
    primary = "mAP"

    def __init__(self, missing_label: float | None = None) -> None:
        if missing_label is not None and 0.0 <= missing_label <= 1.0:
            raise ValueError(
                f"missing_label={missing_label} collides with real labels in [0, 1]; use a value "
                "outside it, e.g. -1 (the objective's missing_label)"
            )
        self.missing_label = missing_label
        self.scores: list[Tensor] = []
        self.targets: list[Tensor] = []
        self.masks: list[Tensor] = []

    @classmethod
    def for_objective(cls, objective: Any) -> Evaluator:
        return cls(missing_label=getattr(objective, "missing_label", None))

    def update(self, outputs: list[Tensor], b: Batch, gather: Gather) -> None:
        o, t = gather((outputs[0], b.target))
        self.scores.append(o.cpu())
        self.targets.append(t.cpu())
        if "mask" in b.extra:
            self.masks.append(gather(b.extra["mask"]).cpu())

    def known(self, target: Tensor) -> Tensor | None:
        """(N, A) float, 1 where a label is known; None when every label is."""
        mask = _mask_from(target, self.missing_label)  # the objectives' own rule
        if self.masks:
            batch_mask = (torch.cat(self.masks) != 0).float()
            mask = batch_mask if mask is None else mask * batch_mask
        return mask

    def compute(self) -> dict[str, float]:
        scores, y = torch.cat(self.scores), torch.cat(self.targets)
        mask = self.known(y)
        return {
            "mAP": M.mean_average_precision(scores, y, mask),
            "mean_acc": M.multilabel_accuracy(scores, y, mask),
        }


@register_evaluator
class EmbeddingEvaluator(Evaluator):
    """Face verification on pair batches {"input", "input2", "target" (1 = same identity)}.

    - "verification_acc": 10-fold accuracy (LFW protocol), %;
    - "val_at_far_1e-3": FaceNet's validation rate, 10-fold, the threshold per fold set on the
      other folds to FAR = 1e-3 (`distill.metrics.val_at_far`), %; the FAR it reached on the
      held-out folds is "val_at_far_1e-3_far_reached" (a fraction);
    - "tar_at_far_1e-4": the strict, pooled TAR at FAR <= 1e-4, no folds (`tar_at_far`), %.
      LFW's 3,000 non-matching pairs cannot resolve 1e-4, so there it is the TAR at zero
      false accepts.

    Folds are contiguous in evaluation order (fewer than 10 pairs: one fold per pair, at least 2).
    """

    kind = "embedding"
    primary = "verification_acc"

    def __init__(self) -> None:
        self.first: list[Tensor] = []
        self.second: list[Tensor] = []
        self.same: list[Tensor] = []

    def views(self, b: Batch) -> list[tuple[Any, Any]]:
        x2 = b.extra.get("input2")
        if x2 is None:
            raise ValueError(
                "embedding evaluation needs pair batches: {'input', 'input2', 'target' "
                "(1 = same identity)}, e.g. LFW pairs"
            )
        return [(b.input, b.teacher_input), (x2, b.extra.get("teacher_input2"))]

    def update(self, outputs: list[Tensor], b: Batch, gather: Gather) -> None:
        o1, o2, t = gather((outputs[0], outputs[1], b.target))
        self.first.append(o1.cpu())
        self.second.append(o2.cpu())
        self.same.append(t.cpu())

    def compute(self) -> dict[str, float]:
        d = M.pair_distances(torch.cat(self.first), torch.cat(self.second))
        same = torch.cat(self.same).numpy()
        folds = 10 if len(d) >= 10 else max(2, len(d))
        val, far_reached = M.val_at_far(d, same, 1e-3, folds)
        return {
            "verification_acc": M.verification_accuracy(d, same, folds),
            "val_at_far_1e-3": val,
            "val_at_far_1e-3_far_reached": far_reached,
            "tar_at_far_1e-4": M.tar_at_far(d, same, 1e-4),
        }


def teacher_net(teacher: Any) -> Net:
    """A `distill.Teacher` as a Net: it takes its own view of the batch when there is one."""

    def net(x: Any, prepared: Any) -> Tensor:
        if prepared is not None:
            return teacher(prepared, prepared=True).output
        return teacher(x).output

    return net


def student_net(student: Any, *, channels_last: bool = False) -> Net:
    """A student (any module returning one tensor, or an object with .logits) as a Net."""

    def net(x: Any, _teacher_view: Any) -> Tensor:
        return extract_output(student(to_channels_last(x) if channels_last else x))

    return net


def evaluate_loader(
    net: Net,
    loader: Iterable[Any],
    evaluator: Evaluator,
    *,
    accelerator: Any,
    skip_log: SkipLog | None = None,
) -> dict[str, float]:
    """Run `net` over `loader` under no_grad and the accelerator's autocast; returns
    `evaluator.compute()`. Unreadable images the data pipeline reported are moved into
    `skip_log`."""
    acc = accelerator
    log = skip_log if skip_log is not None else SkipLog()
    with torch.no_grad():
        for raw in loader:
            raw, empty = take_skipped(raw, log)
            if empty:
                continue
            b = split_batch(to_device(raw, acc.device))
            outputs = []
            for x, x_teacher in evaluator.views(b):
                with acc.autocast():
                    outputs.append(net(x, x_teacher).float())
            evaluator.update(outputs, b, acc.gather_for_metrics)
    return evaluator.compute()


def score_line(metrics: dict[str, float], teacher: dict[str, float] | None = None) -> str:
    """ "top1 61.2 (teacher 76.1, gap -14.9), top5 83 (teacher 93, gap -10)" for the console."""
    parts = []
    for k, v in metrics.items():
        text = f"{k} {v:.4g}"
        if teacher and k in teacher:
            text += f" (teacher {teacher[k]:.4g}, gap {v - teacher[k]:+.3g})"
        parts.append(text)
    return ", ".join(parts)
