"""Shared value types: what models return to objectives and how a batch is read (the shared
constants, defined in distill.constants, are importable from here too)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from distill.constants import IMAGENET_MEAN, IMAGENET_STD, TASK_KINDS, TaskKind

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TASK_KINDS",
    "Batch",
    "Outputs",
    "TaskKind",
    "split_batch",
    "to_device",
]


@dataclass
class Outputs:
    """One side's result for a batch.

    `output` is the tensor the model's `forward` returns: logits (B, K), multi-label logits
    (B, A) or embeddings (B, D). `features` holds intermediate activations captured by hooks,
    keyed by the names the user gave (e.g. {"l3": (B, C, H, W)}).
    """

    output: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Batch:
    """A batch after `split_batch`: the student's input, optional labels and extras.

    `teacher_input` is the same image prepared at the teacher's own resolution/normalisation
    (paired transforms); when absent the Teacher converts `input` itself. `teacher_cached`
    holds replayed teacher outputs (offline distillation) and skips the teacher forward.
    """

    input: Any
    target: Tensor | None = None
    teacher_input: Any = None
    teacher_cached: Outputs | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def size(self) -> int:
        x = self.input
        if isinstance(x, Tensor):
            return int(x.shape[0])
        if isinstance(x, Mapping):
            return int(next(iter(x.values())).shape[0])
        if isinstance(x, Sequence):
            return int(x[0].shape[0])
        raise TypeError(f"cannot tell the batch size of an input of type {type(x).__name__}")


def split_batch(batch: Any) -> Batch:
    """Read the batch formats loaders produce.

    - `Tensor`: input only (unlabelled data, pure teacher emulation);
    - `(input,)`, `(input, target)` or longer tuples/lists (extras ignored);
    - a mapping with "input" (or "image"/"pixel_values"), and optionally "target"/"label"/
      "labels", "teacher_input", "teacher_logits" (cached outputs);
    - a `Batch` as is.
    """
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, Tensor):
        return Batch(input=batch)
    if isinstance(batch, Mapping):
        x = _first(batch, ("input", "image", "pixel_values"))
        if x is None:
            raise KeyError(
                f"batch dict has keys {sorted(batch)}; expected one of 'input', 'image' or "
                "'pixel_values' for the student's input"
            )
        y = _first(batch, ("target", "label", "labels"))
        cached = batch.get("teacher_logits")
        extra = {
            k: v
            for k, v in batch.items()
            if k
            not in {"input", "image", "pixel_values", "target", "label", "labels"}
            | {"teacher_input", "teacher_logits"}
        }
        return Batch(
            input=x,
            target=y,
            teacher_input=batch.get("teacher_input"),
            teacher_cached=Outputs(cached) if isinstance(cached, Tensor) else cached,
            extra=extra,
        )
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        if len(batch) == 0:
            raise ValueError("empty batch")
        target = batch[1] if len(batch) > 1 else None
        return Batch(input=batch[0], target=target)
    raise TypeError(
        f"unsupported batch type {type(batch).__name__}: yield a tensor, an (input, target) "
        "tuple or a dict with 'input'/'target'"
    )


def _first(d: Mapping[str, Any], keys: Sequence[str]) -> Any:
    for k in keys:
        if k in d and d[k] is not None:
            return d[k]
    return None


def to_device(x: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Move a tensor or a nested structure of tensors to `device`."""
    if isinstance(x, Tensor):
        return x.to(device, non_blocking=non_blocking)
    if isinstance(x, Mapping):
        return {k: to_device(v, device, non_blocking) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to_device(v, device, non_blocking) for v in x)
    return x
