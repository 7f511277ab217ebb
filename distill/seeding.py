"""Seeding for exact resume: the random state of every sample and every batch is a pure function
of (seed, epoch, index), so a run resumed at any checkpoint replays what an uninterrupted run
would have drawn.

- `SeededDataset` runs `__getitem__` under a state derived from (seed, epoch, index): random
  augmentations no longer depend on when or in which DataLoader worker a sample is loaded.
- `seed_batch` re-seeds Python, numpy and torch before each training batch from (seed, epoch,
  batch index, rank): dropout & co. replay exactly.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, IterableDataset

__all__ = ["SeededDataset", "sample_seed", "seed_batch", "seed_everything", "seeded_loader"]

_MOD = 2**31 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample `index` in `epoch` (a fixed mixing of three integers)."""
    return (seed * 1_000_003 + epoch * 999_983 + int(index) * 7_919 + 17) % _MOD


def seed_batch(seed: int, epoch: int, batch: int, rank: int) -> None:
    """Seed Python, numpy and torch for one training batch of one process."""
    s = (seed * 1_000_003 + epoch * 10_007 + batch * 101 + rank) % _MOD
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def seed_everything(seed: int) -> None:
    """Seed every generator the run uses (accelerate's `set_seed`: Python, numpy, torch, CUDA).

    torch seeds its default generator at random on start-up; without this a student's
    initialisation (and any replaced teacher head) would differ between runs with one seed.
    """
    from accelerate.utils import set_seed

    set_seed(seed)


class SeededDataset(torch.utils.data.Dataset[Any]):
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
        s = sample_seed(self.seed, self.epoch, index)
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
    """The same DataLoader over a `SeededDataset` (map-style datasets only); other loaders are
    returned as they are, with None."""
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
