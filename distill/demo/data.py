"""The digits for the demo: a fixed labelled subset, and fast in-memory batches."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from distill.data.digits import DigitsDataset, load_digits_splits


def stratified_subset(ds: DigitsDataset, fraction: float, seed: int = 0) -> DigitsDataset:
    """A class-balanced `fraction` of `ds`, fixed by `seed` (the same for every run)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return ds
    from sklearn.model_selection import train_test_split

    idx = list(range(len(ds)))
    keep, _ = train_test_split(
        idx, train_size=fraction, random_state=seed, stratify=ds.targets.numpy()
    )
    k = torch.as_tensor(sorted(keep))
    return DigitsDataset(
        ds.images[k].contiguous(),
        ds.targets[k],
        augment=ds.augment,
        max_shift=ds.max_shift,
        background=ds.background,
    )


def digits_data(
    resolution: int, *, train_fraction: float = 1.0, split_seed: int = 0
) -> tuple[DigitsDataset, DigitsDataset]:
    """(train subset, test) at `resolution`; the split and subset depend on `split_seed` only,
    so every resolution sees the same images."""
    train, test = load_digits_splits(resolution, seed=split_seed)
    return stratified_subset(train, train_fraction, split_seed), test


class InMemoryLoader:
    """Batches of an in-memory `DigitsDataset`: shuffled, and shifted like its per-image
    augmentation, on whole batches of tensors, from a generator seeded by (seed, epoch).

    A DataLoader over single items costs ~1 ms of Python per image here (collation and the
    Distiller's per-item reseeding), more than the tiny models' own compute: on a CPU demo
    that is the difference between minutes and tens of minutes. One process only (no
    sharding), and no mid-epoch resume; the demo needs neither.
    """

    def __init__(self, ds: DigitsDataset, batch_size: int, *, train: bool, seed: int = 0) -> None:
        self.images, self.targets = ds.tensors()
        self.batch_size = batch_size
        self.train = train
        # drop_last: a last training batch of 3 images would throw the BatchNorm running
        # statistics of the 1x1 deepest MobileNet layers far off (seen: 60% test error)
        self.drop_last = train and len(ds) > batch_size
        self.shift = ds.max_shift if train and ds.augment else 0
        self.background = ds.background
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.targets)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        """{"input", "target", "index" (positions in the dataset, for CRD's memory bank)}."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.targets)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx]
            if self.shift:
                x = random_shift(x, self.shift, self.background, g)
            yield {"input": x, "target": self.targets[idx], "index": idx}


def random_shift(x: Tensor, max_shift: int, background: Tensor, g: torch.Generator) -> Tensor:
    """Shift each image of x (B, C, H, W) by its own offset in [-max_shift, max_shift]^2,
    filling with `background` (C, 1, 1)."""
    b, c, h, w = x.shape
    s = max_shift
    padded = background.to(x.dtype).expand(b, c, h + 2 * s, w + 2 * s).clone()
    padded[:, :, s : s + h, s : s + w] = x
    dy, dx = torch.randint(0, 2 * s + 1, (2, b), generator=g)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b)[:, None, None, None]
    ci = torch.arange(c)[None, :, None, None]
    return padded[bi, ci, rows, cols]  # (B, C, H, W)
