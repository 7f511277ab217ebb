"""CelebA and LFW pairs through torchvision's parsers, with line-exact annotation errors."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.errors import AnnotationError, DataLayoutError
from distill.data.faces import CelebAFaces, LFWPairsDataset
from distill.data.skipping import collate_skipping
from distill.data.transforms import PairedTransform, ViewSpec, build_transforms
from tests.datagen import CELEBA_ATTRS, make_celeba, make_lfw_pairs


@pytest.fixture(scope="module")
def celeba(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("celeba")
    return root, make_celeba(root, n=10, splits=(6, 2, 2))


def _copy(celeba, tmp_path):
    root, _info = celeba
    shutil.copytree(root, tmp_path / "c")
    return tmp_path / "c", tmp_path / "c" / "celeba"


@pytest.mark.parametrize(("split", "n"), [("train", 6), ("valid", 2), ("test", 2), ("all", 10)])
def test_celeba_splits_and_attributes(celeba, split: str, n: int) -> None:
    root, info = celeba
    ds = CelebAFaces(root, split, build_transforms(16))
    assert len(ds) == n
    assert ds.attr_names == CELEBA_ATTRS and ds.num_outputs == 40
    offset = {"train": 0, "valid": 6, "test": 8, "all": 0}[split]
    assert torch.equal(
        ds.attr, torch.as_tensor(info["attrs"][offset : offset + n], dtype=torch.float32)
    )
    item = ds[0]
    assert item["input"].shape == (3, 16, 16)
    assert item["target"].shape == (40,) and item["target"].dtype == torch.float32


def test_celeba_matches_torchvision_with_only_integrity_bypassed(celeba) -> None:
    from torchvision.datasets import CelebA

    class Unchecked(CelebA):
        def _check_integrity(self) -> bool:
            return True

    root, _ = celeba
    tv = Unchecked(str(root), split="all", target_type=["attr", "identity"])
    ours = CelebAFaces(root, "all", target="identity")
    assert ours.filenames == tv.filename
    assert torch.equal(ours.identity, tv.identity[:, 0])
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CelebA(str(root))  # the md5 check we replace: our files are not the official bytes


def test_celeba_targets_and_root_variants(celeba) -> None:
    root, info = celeba
    inner = CelebAFaces(root / "celeba", "all", target=None)  # the celeba folder itself
    assert len(inner) == 10 and "target" not in inner[0]
    ident = CelebAFaces(root, "all", target="identity")
    assert int(ident[3]["target"]) == int(info["identity"][3])
    t = PairedTransform(ViewSpec(16), ViewSpec(24), train=True)
    batch = next(
        iter(DataLoader(CelebAFaces(root, "train", t), batch_size=3, collate_fn=collate_skipping))
    )
    assert batch["teacher_input"].shape == (3, 3, 24, 24) and batch["target"].shape == (3, 40)


def _edit_line(path, lineno: int, fn) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = fn(lines[lineno - 1])
    path.write_text("\n".join(lines) + "\n")


def test_celeba_wrong_column_count_names_file_and_line(celeba, tmp_path) -> None:
    root, base = _copy(celeba, tmp_path)
    _edit_line(base / "list_attr_celeba.txt", 5, lambda s: s.rsplit(" ", 1)[0])  # drop a value
    with pytest.raises(AnnotationError, match="expected an image name and 40 values, got 39") as ei:
        CelebAFaces(root)
    assert ei.value.file.endswith("list_attr_celeba.txt") and ei.value.line == 5
    assert "list_attr_celeba.txt, line 5" in str(ei.value)


@pytest.mark.parametrize(
    ("file", "line", "edit", "message"),
    [
        (
            "list_attr_celeba.txt",
            3,
            lambda s: s.replace("-1", " 0", 1).replace(" 1", " 0", 1),
            "-1 or 1",
        ),
        ("list_eval_partition.txt", 2, lambda s: s[:-1] + "7", "partition must be"),
        ("list_bbox_celeba.txt", 1, lambda s: "9999", "says 9999 images but 10 rows"),
        ("identity_CelebA.txt", 4, lambda s: "000099.jpg 3", "same images in the same order"),
        ("list_landmarks_align_celeba.txt", 6, lambda s: s + " ", "trailing space"),
        (
            "list_bbox_celeba.txt",
            7,
            lambda s: s.replace(" ", "\t"),
            "expected an image name and 4 values",
        ),
    ],
)
def test_celeba_annotation_errors(celeba, tmp_path, file, line, edit, message) -> None:
    root, base = _copy(celeba, tmp_path)
    _edit_line(base / file, line, edit)
    with pytest.raises(AnnotationError, match=message) as ei:
        CelebAFaces(root)
    assert ei.value.file.endswith(file) and ei.value.line == line


def test_celeba_unannotated_attributes_with_a_missing_label(celeba, tmp_path) -> None:
    root, base = _copy(celeba, tmp_path)
    _, info = celeba
    # line 4 is the second image: blank its first and its last attribute (0 = not annotated)
    _edit_line(base / "list_attr_celeba.txt", 4, lambda s: s[:10] + "  0" + s[13:-2] + " 0")
    with pytest.raises(AnnotationError, match="0 marks a missing annotation") as ei:
        CelebAFaces(root, "all")
    assert ei.value.line == 4
    ds = CelebAFaces(root, "all", missing_label=-1)
    want = torch.as_tensor(info["attrs"], dtype=torch.float32)
    want[1, 0] = want[1, -1] = -1
    assert torch.equal(ds.attr, want) and torch.equal(ds[1]["target"], want[1])
    valid = CelebAFaces(root, "valid", missing_label=-1)  # rows follow the split's file names
    assert torch.equal(valid.attr, want[6:8])


def test_celeba_layout_errors(celeba, tmp_path) -> None:
    with pytest.raises(DataLayoutError, match="no CelebA folder") as ei:
        CelebAFaces(tmp_path)
    assert "list_eval_partition.txt" in str(ei.value)
    root, base = _copy(celeba, tmp_path)
    (base / "identity_CelebA.txt").unlink()
    with pytest.raises(DataLayoutError, match=r"identity_CelebA\.txt is missing"):
        CelebAFaces(root)
    with pytest.raises(ValueError, match="split"):
        CelebAFaces(root, "validation")


# ------------------------------------------------------------------------------------ LFW


@pytest.fixture(scope="module")
def lfw(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lfw")
    return root, make_lfw_pairs(root, n_people=4, images_per_person=3, n_folds=2, pairs_per_fold=2)


def test_lfw_pairs_through_torchvision(lfw) -> None:
    from torchvision.datasets import LFWPairs

    class Unchecked(LFWPairs):
        def _check_integrity(self) -> bool:
            return True

    root, info = lfw
    ds = LFWPairsDataset(root, build_transforms(16))
    tv = Unchecked(str(root))
    assert ds.pairs == list(tv.data) and ds.targets == tv.targets == info["targets"]
    assert (ds.n_folds, ds.pairs_per_fold) == (2, 2)
    assert [ds[i]["fold"] for i in range(len(ds))] == [0, 0, 0, 0, 1, 1, 1, 1]
    item = ds[2]
    assert item["input"].shape == item["input2"].shape == (3, 16, 16)
    assert item["target"] == 0 and not torch.equal(item["input"], item["input2"])


def test_lfw_paired_teacher_views_and_root_variant(lfw) -> None:
    root, _ = lfw
    t = PairedTransform(ViewSpec(16), ViewSpec(20), train=False)
    batch = next(
        iter(
            DataLoader(
                LFWPairsDataset(root / "lfw-py", t), batch_size=8, collate_fn=collate_skipping
            )
        )
    )
    assert batch["teacher_input"].shape == batch["teacher_input2"].shape == (8, 3, 20, 20)
    assert batch["target"].tolist() == [1, 1, 0, 0, 1, 1, 0, 0]


def _copy_lfw(lfw, tmp_path):
    root, _ = lfw
    shutil.copytree(root, tmp_path / "l")
    return tmp_path / "l", tmp_path / "l" / "lfw-py" / "pairs.txt"


def test_lfw_missing_image_names_pairs_file_and_line(lfw, tmp_path) -> None:
    root, pairs = _copy_lfw(lfw, tmp_path)
    _edit_line(pairs, 3, lambda s: s.split("\t")[0] + "\t1\t9")
    with pytest.raises(AnnotationError, match=r"_0009\.jpg, which does not exist") as ei:
        LFWPairsDataset(root)
    assert ei.value.line == 3 and "pairs.txt, line 3" in str(ei.value)


@pytest.mark.parametrize(
    ("line", "edit", "message"),
    [
        (1, lambda s: "10 300", "expected a header"),
        (4, lambda s: s.replace("\t", " "), "expected 4 tab-separated fields"),
        (2, lambda s: s.split("\t")[0] + "\tone\t2", "not an integer"),
    ],
)
def test_lfw_malformed_lines(lfw, tmp_path, line, edit, message) -> None:
    root, pairs = _copy_lfw(lfw, tmp_path)
    _edit_line(pairs, line, edit)
    with pytest.raises(AnnotationError, match=message) as ei:
        LFWPairsDataset(root)
    assert ei.value.line == line


def test_lfw_layout_errors(lfw, tmp_path) -> None:
    with pytest.raises(DataLayoutError, match="no LFW folder") as ei:
        LFWPairsDataset(tmp_path)
    assert "pairs.txt" in str(ei.value)
    root, pairs = _copy_lfw(lfw, tmp_path)
    pairs.unlink()
    with pytest.raises(DataLayoutError, match=r"pairs\.txt is missing"):
        LFWPairsDataset(root)
