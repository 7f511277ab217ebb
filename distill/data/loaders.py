"""DataLoaders for distillation runs: bad files skipped and counted, exact-resume friendly.

    train = make_loader(robust(train_set), batch_size, train=True, workers=8, seed=0)

`robust` wraps a dataset in the project's one skipping system (`distill.data.skipping`):
an unreadable image is replaced by the next readable one so every batch keeps its size (DDP
and the exact-resume bookkeeping rely on equal batches), and the replaced files travel with the
batch to the Distiller, which counts and reports them. `make_loader` uses `collate_skipping`
and never persistent workers (they would keep a stale epoch: exact resume needs the current
one). Accelerate shards the loader per process when the Distiller prepares it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, Subset

from distill.data.skipping import SkipBadSamples, collate_skipping

__all__ = ["limit", "make_loader", "robust"]

# attributes recipes read from a dataset, kept when it is cut with `limit`
_KEPT = ("classes", "num_classes", "attr_names", "num_outputs")


def robust(dataset: Any, *, strict: bool = False) -> Any:
    """Unreadable images of a map-style dataset are replaced by the next readable one (and
    recorded); `strict` raises at the first one instead. Streams yield `Skipped` markers
    themselves, which `collate_skipping` drops and records."""
    if isinstance(dataset, IterableDataset):
        return dataset
    return SkipBadSamples(dataset, strict=strict, replace=True)


def limit(dataset: Any, n: int | None) -> Any:
    """The first `n` samples (map-style datasets; streams are cut by max_steps instead)."""
    if n is None or isinstance(dataset, IterableDataset) or n >= len(dataset):
        return dataset
    sub = Subset(dataset, range(n))
    for attr in _KEPT:
        if hasattr(dataset, attr):
            setattr(sub, attr, getattr(dataset, attr))
    return sub


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    train: bool,
    workers: int,
    seed: int,
    collate_fn: Any = collate_skipping,
) -> DataLoader[Any]:
    """A DataLoader: shuffled with a seeded generator and full batches for training, in order
    for evaluation; pinned memory when a GPU is there."""
    iterable = isinstance(dataset, IterableDataset)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and not iterable,
        drop_last=train and not iterable,
        num_workers=workers,
        collate_fn=collate_fn,
        # batches that decode themselves on the device (distill.data.encoded) are not pinned
        pin_memory=torch.cuda.is_available() and collate_fn is collate_skipping,
        persistent_workers=False,  # exact resume: workers must see the current epoch
        generator=g if train and not iterable else None,
    )
