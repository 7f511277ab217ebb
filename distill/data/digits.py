"""scikit-learn's handwritten digits as a small, real image dataset held in memory.

1,797 8x8 grey images of the digits 0-9 (the UCI "Optical Recognition of Handwritten Digits"
test set, shipped inside scikit-learn, so nothing is downloaded). They are scaled to 0..1,
upsampled once to `resolution` (bilinear), repeated to 3 channels and normalised, then split
with a fixed seed (stratified). Used by the demo and the accuracy benchmarks, where a real
dataset that trains in seconds on a CPU is worth more than a synthetic one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NUM_CLASSES = 10
CLASSES = [str(i) for i in range(NUM_CLASSES)]


class DigitsDataset(Dataset[dict[str, Any]]):
    """Tensors in memory: {"input": (3, R, R) float32, "target": int64 scalar, "index": int}.

    `augment=True` shifts each image by up to `max_shift` pixels (zero-padded in normalised
    units, i.e. the background colour) using the global torch RNG, which DataLoader workers
    and `accelerate.utils.set_seed` seed.
    """

    classes = CLASSES
    num_classes = NUM_CLASSES

    def __init__(
        self,
        images: Tensor,
        targets: Tensor,
        *,
        augment: bool = False,
        max_shift: int = 0,
        background: Tensor | None = None,
    ) -> None:
        if images.ndim != 4 or images.shape[0] != targets.shape[0]:
            raise ValueError(
                f"images must be (N, C, H, W) with N == len(targets); got {tuple(images.shape)} "
                f"and {tuple(targets.shape)}"
            )
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.images = images
        self.targets = targets
        self.augment = augment and max_shift > 0
        self.max_shift = max_shift
        # per-channel value of a black (0) pixel after normalisation: (C, 1, 1)
        self.background = (
            background if background is not None else torch.zeros(images.shape[1], 1, 1)
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Any]:
        x = self.images[index]
        if self.augment:
            x = _random_shift(x, self.max_shift, self.background)
        return {"input": x, "target": self.targets[index], "index": index}

    def tensors(self) -> tuple[Tensor, Tensor]:
        """All (inputs, targets), unaugmented: for whole-set evaluation in one pass."""
        return self.images, self.targets


def _random_shift(x: Tensor, max_shift: int, background: Tensor) -> Tensor:
    # (C, H, W): pad with the background and crop back at a random offset
    c, h, w = x.shape
    s = max_shift
    padded = background.expand(c, h + 2 * s, w + 2 * s).clone()
    padded[:, s : s + h, s : s + w] = x
    dy, dx = (int(v) for v in torch.randint(0, 2 * s + 1, (2,)))
    return padded[:, dy : dy + h, dx : dx + w]


def digits_arrays(resolution: int = 32) -> tuple[Tensor, Tensor]:
    """All 1,797 images as (N, 3, R, R) float32 in 0..1 and labels (N,) int64."""
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ValueError(f"resolution must be >= 8 (the images are 8x8), got {resolution}")
    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()
    return x, torch.from_numpy(d.target).to(torch.int64)


def load_digits_splits(
    resolution: int = 32,
    *,
    test_size: float = 0.25,
    seed: int = 0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool = True,
    max_shift: int | None = None,
) -> tuple[DigitsDataset, DigitsDataset]:
    """(train, test) with a stratified split fixed by `seed` (default 1,347 / 450 images).

    Normalised with `mean`/`std` (ImageNet's by default, so a `Teacher` with default
    student statistics re-normalises nothing). Training shifts by up to `max_shift` pixels
    (default: resolution // 8, one source pixel); the test set is never augmented.
    """
    from sklearn.model_selection import train_test_split

    if not (0 < test_size < 1):
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    x, y = digits_arrays(resolution)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=test_size, random_state=seed, stratify=y.numpy())
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
    x = (x - m) / s
    background = (-m / s).view(3, 1, 1)
    shift = resolution // 8 if max_shift is None else max_shift
    tr_t, te_t = torch.as_tensor(tr), torch.as_tensor(te)
    train = DigitsDataset(
        x[tr_t].contiguous(), y[tr_t], augment=augment, max_shift=shift, background=background
    )
    test = DigitsDataset(x[te_t].contiguous(), y[te_t], augment=False, background=background)
    return train, test


def digits_info() -> dict[str, Any]:
    return {"name": "sklearn-digits", "num_classes": NUM_CLASSES, "n": 1797, "source_size": 8}
