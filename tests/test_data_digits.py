"""scikit-learn digits as an in-memory image dataset: shapes, split, determinism."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.digits import DigitsDataset, digits_arrays, load_digits_splits
from distill.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def splits() -> tuple[DigitsDataset, DigitsDataset]:
    return load_digits_splits(32, seed=0)


def test_shapes_split_and_stratification(splits) -> None:
    train, test = splits
    assert (len(train), len(test)) == (1347, 450)
    item = train[0]
    assert item["input"].shape == (3, 32, 32) and item["input"].dtype == torch.float32
    assert item["target"].dtype == torch.int64
    counts = torch.bincount(test.targets, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 46  # stratified: ~45 per digit
    assert train.num_classes == 10 and train.classes[3] == "3"


def test_split_is_fixed_by_seed_and_disjoint() -> None:
    a_tr, a_te = load_digits_splits(16, seed=3)
    b_tr, b_te = load_digits_splits(16, seed=3)
    assert torch.equal(a_te.images, b_te.images) and torch.equal(a_tr.targets, b_tr.targets)
    _, c_te = load_digits_splits(16, seed=4)
    assert not torch.equal(a_te.images, c_te.images)
    everything = {tuple(x.flatten().tolist()) for x in torch.cat([a_tr.images, a_te.images])}
    # a few digits images are exact duplicates of each other, so allow a handful
    assert len(everything) >= 1797 - 10


def test_normalisation_and_background(splits) -> None:
    train, _ = splits
    raw, _ = digits_arrays(32)
    m = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    s = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert float(raw.min()) >= 0 and float(raw.max()) <= 1
    assert torch.allclose(train.background, -m / s)
    corner = train.images[:, :, 0, 0]  # digits have black borders
    assert torch.allclose(corner.mean(0), (-m / s).flatten(), atol=0.05)


def test_augmentation_shifts_deterministically_and_test_never_augments(splits) -> None:
    train, test = splits
    torch.manual_seed(0)
    a = torch.stack([train[i]["input"] for i in range(8)])
    torch.manual_seed(0)
    b = torch.stack([train[i]["input"] for i in range(8)])
    assert torch.equal(a, b)
    assert not torch.equal(a, train.images[:8])
    assert torch.equal(test[5]["input"], test.images[5])


def test_loader_batches_and_resolutions() -> None:
    tr, _ = load_digits_splits(48, augment=False)
    batch = next(iter(DataLoader(tr, batch_size=16)))
    assert batch["input"].shape == (16, 3, 48, 48) and batch["target"].shape == (16,)
    assert batch["index"].tolist() == list(range(16))
    with pytest.raises(ValueError, match=">= 8"):
        digits_arrays(4)
    with pytest.raises(ValueError, match="test_size"):
        load_digits_splits(16, test_size=1.5)
