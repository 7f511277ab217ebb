"""ImageNet, ImageFolder and identity folders through torchvision's real parsers."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.datasets import check_num_classes, identity_folder, image_folder, imagenet
from distill.data.errors import DataLayoutError
from distill.data.skipping import SkipBadSamples, SkipLog, SkipLogLoader, collate_skipping
from distill.data.transforms import PairedTransform, ViewSpec, build_transforms
from tests.datagen import make_identity_folders, make_image_folder, make_imagenet


@pytest.fixture(scope="module")
def inet(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("imagenet")
    return root, make_imagenet(root, n_classes=3, per_class=3, val_per_class=2, size=28)


def test_meta_bin_is_what_torchvision_reads(inet) -> None:
    from torchvision.datasets.imagenet import load_meta_file

    root, info = inet
    wnid_to_classes, val_wnids = load_meta_file(str(root))
    assert list(wnid_to_classes) == info["wnids"]
    assert all(isinstance(v, tuple) for v in wnid_to_classes.values())
    assert len(val_wnids) == info["n_val"]


@pytest.mark.parametrize("split", ["train", "val"])
def test_imagenet_through_torchvision(inet, split: str) -> None:
    from torchvision.datasets import ImageNet

    root, info = inet
    ds = imagenet(root, split, build_transforms(16, train=split == "train"), num_classes=3)
    tv = ImageNet(str(root), split=split)
    assert len(ds) == len(tv) == info[f"n_{split}"]
    assert ds.wnids == tv.wnids == info["wnids"]
    assert ds.classes == ["class0", "class1", "class2"]
    assert ds.targets == tv.targets
    item = ds[len(ds) - 1]
    assert (
        item["input"].shape == (3, 16, 16) and item["target"] == 2 and item["index"] == len(ds) - 1
    )


def test_imagenet_paired_batches(inet) -> None:
    root, _ = inet
    t = PairedTransform(
        ViewSpec(16), ViewSpec(24, mean=(0.5,) * 3, std=(0.5,) * 3), train=True, seed=0
    )
    loader = DataLoader(imagenet(root, "train", t), batch_size=4, collate_fn=collate_skipping)
    batch = next(iter(loader))
    assert batch["input"].shape == (4, 3, 16, 16)
    assert batch["teacher_input"].shape == (4, 3, 24, 24)
    assert batch["target"].dtype == torch.int64 and batch["skipped"] == []


def test_imagenet_layout_errors(tmp_path, inet) -> None:
    with pytest.raises(DataLayoutError, match="does not exist") as ei:
        imagenet(tmp_path / "missing")
    assert "meta.bin" in str(ei.value) and "train/n01440764" in str(ei.value)
    (tmp_path / "train").mkdir()
    with pytest.raises(DataLayoutError, match=r"meta\.bin"):
        imagenet(tmp_path)
    root, _ = inet
    with pytest.raises(ValueError, match=r"has 3 classes .* but 1000 were expected"):
        imagenet(root, "val", num_classes=1000)
    with pytest.raises(ValueError, match="'train' or 'val'"):
        imagenet(root, "test")


def test_image_folder_and_errors(tmp_path) -> None:
    info = make_image_folder(tmp_path / "f", classes=("x", "y"), per_class=2, size=(30, 20))
    ds = image_folder(tmp_path / "f", build_transforms(8))
    assert ds.classes == ["x", "y"] and ds.num_classes == 2 and len(ds) == info["n"]
    assert [ds[i]["target"] for i in range(len(ds))] == [0, 0, 1, 1]
    with pytest.raises(DataLayoutError, match="does not exist") as ei:
        image_folder(tmp_path / "nope")
    assert "<root>/<class_a>/xxx.jpg" in str(ei.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataLayoutError, match="class folder"):
        image_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="has 2 classes"):
        check_num_classes(ds.classes, 3, "folder f")


def test_identity_folders_with_and_without_labels(tmp_path) -> None:
    info = make_identity_folders(tmp_path / "faces", n_identities=3, per_identity=2, size=40)
    labelled = identity_folder(tmp_path / "faces", build_transforms(20))
    assert labelled.classes == info["identities"] and len(labelled) == 6
    assert labelled[5]["target"] == 2
    unlabelled = identity_folder(tmp_path / "faces", build_transforms(20), labels=False)
    assert len(unlabelled) == 6 and "target" not in unlabelled[0]
    batch = next(iter(DataLoader(unlabelled, batch_size=6, collate_fn=collate_skipping)))
    assert batch["input"].shape == (6, 3, 20, 20) and "target" not in batch
    (tmp_path / "none").mkdir()
    with pytest.raises(DataLayoutError, match="no image files"):
        identity_folder(tmp_path / "none", labels=False)


def test_a_corrupt_file_in_imagenet_is_skipped_and_named(tmp_path) -> None:
    root = tmp_path / "inet"
    info = make_imagenet(root, n_classes=2, per_class=2, val_per_class=1, size=24)
    bad = root / "train" / info["wnids"][1] / "broken.JPEG"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ds = SkipBadSamples(imagenet(root, "train", build_transforms(8, train=True)))
    log = SkipLog()
    n = sum(
        b["input"].shape[0]
        for b in SkipLogLoader(DataLoader(ds, batch_size=2, collate_fn=collate_skipping), log)
    )
    assert n == 4 and list(log.by_reason().values()) == [[str(bad)]]
