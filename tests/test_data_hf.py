"""Hugging Face `datasets` sources: imagefolder+metadata, WebDataset shards, streaming by rank."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from torch.utils.data import DataLoader

from distill.data.errors import AnnotationError, DataLayoutError
from distill.data.hf import HFIterableImageDataset, hf_image_dataset, load_hf
from distill.data.images import BadImageError
from distill.data.skipping import SkipLog, SkipLogLoader, collate_skipping
from distill.data.transforms import PairedTransform, ViewSpec, build_transforms
from tests.datagen import (
    make_hf_imagefolder,
    make_image_folder,
    make_webdataset_shards,
    synth_image,
)

T16 = build_transforms(16)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hf")
    info = {
        "imagefolder": make_hf_imagefolder(root / "imgf", n=6, n_classes=3),
        "wds": make_webdataset_shards(root / "wds", n_shards=4, per_shard=3, n_classes=3),
    }
    return root, info


def test_imagefolder_with_metadata(hf_dirs) -> None:
    root, info = hf_dirs
    for split in ("train", "test"):
        ds = hf_image_dataset(
            "imagefolder",
            T16,
            data_dir=root / "imgf",
            split=split,
            cache_dir=root / "cache",
            num_classes=3,
        )
        assert ds.label_column == "label" and len(ds) == 6
        assert [ds[i]["target"] for i in range(6)] == info["imagefolder"][split]
        assert ds[0]["input"].shape == (3, 16, 16) and ds[5]["index"] == 5


def test_local_dir_is_detected_and_paired(hf_dirs) -> None:
    root, info = hf_dirs
    t = PairedTransform(ViewSpec(16), ViewSpec(24), train=True, seed=0)
    ds = hf_image_dataset(root / "imgf", t, split="test", cache_dir=root / "cache")
    batch = next(iter(DataLoader(ds, batch_size=6, collate_fn=collate_skipping)))
    assert batch["teacher_input"].shape == (6, 3, 24, 24)
    assert batch["target"].tolist() == info["imagefolder"]["test"]


def test_imagefolder_class_folders_give_class_names(tmp_path) -> None:
    make_image_folder(tmp_path / "cls", classes=("ant", "bee"), per_class=2, size=20)
    ds = hf_image_dataset(tmp_path / "cls", T16, cache_dir=tmp_path / "cache")
    assert ds.classes == ["ant", "bee"] and ds.num_classes == 2
    assert sorted(ds[i]["target"] for i in range(4)) == [0, 0, 1, 1]


def test_metadata_errors_name_csv_and_line(tmp_path) -> None:
    make_hf_imagefolder(tmp_path / "d", n=4, n_classes=3, split_dirs=("train",))
    meta = tmp_path / "d" / "train" / "metadata.csv"
    lines = meta.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "7", 1)
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"label 7 is outside the class range 0\.\.2") as ei:
        hf_image_dataset(
            "imagefolder", data_dir=tmp_path / "d", num_classes=3, cache_dir=tmp_path / "c"
        )
    assert ei.value.file == str(meta) and ei.value.line == 4
    lines[2] = "images/gone.jpg,1,x"
    meta.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=r"gone\.jpg' does not exist") as ei:
        load_hf("imagefolder", data_dir=tmp_path / "d")
    assert ei.value.line == 3


def test_missing_dirs_and_unknown_splits(tmp_path, hf_dirs) -> None:
    with pytest.raises(DataLayoutError, match="does not exist") as ei:
        load_hf("imagefolder", data_dir=tmp_path / "nothing")
    assert "metadata.csv" in str(ei.value)
    root, _ = hf_dirs
    with pytest.raises(ValueError, match="validation"):
        load_hf(root / "imgf", split="validation", cache_dir=root / "cache")


def test_webdataset_shards_map_style(hf_dirs) -> None:
    root, info = hf_dirs
    ds = hf_image_dataset(root / "wds", T16, cache_dir=root / "cache", num_classes=3)
    assert ds.label_column == "cls" and len(ds) == 12
    assert [ds[i]["target"] for i in range(12)] == info["wds"]["labels"]
    by_json = hf_image_dataset(
        root / "wds", T16, cache_dir=root / "cache", label_column="json.label"
    )
    assert [by_json[i]["target"] for i in range(12)] == info["wds"]["labels"]
    with pytest.raises(AnnotationError, match=r"train-0000\d\.tar:0000\d\d: label 2 is outside"):
        hf_image_dataset(root / "wds", T16, cache_dir=root / "cache", num_classes=2)


def test_map_style_in_worker_processes_and_stream_label_check(hf_dirs) -> None:
    root, info = hf_dirs
    ds = hf_image_dataset(root / "wds", T16, cache_dir=root / "cache")
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skipping, num_workers=2)
    assert [t for b in loader for t in b["target"].tolist()] == info["wds"]["labels"]
    files = [str(p) for p in info["wds"]["shards"]]
    stream = hf_image_dataset("webdataset", T16, data_files=files, streaming=True, num_classes=2)
    assert isinstance(stream, HFIterableImageDataset) and not stream.sharded_by_node
    with pytest.raises(AnnotationError, match=r"\.tar:\d+: label 2 is outside"):
        list(stream)


@pytest.mark.parametrize("world_size", [2, 3])  # 4 shards: by shards for 2, by examples for 3
def test_streaming_split_by_node_gives_disjoint_covering_shards(hf_dirs, world_size: int) -> None:
    _root, info = hf_dirs
    files = [str(p) for p in info["wds"]["shards"]]
    per_rank = []
    for rank in range(world_size):
        ds = hf_image_dataset(
            "webdataset", T16, data_files=files, streaming=True, rank=rank, world_size=world_size
        )
        per_rank.append([(x["target"], float(x["input"].sum())) for x in ds])
    flat = [s for r in per_rank for s in r]
    assert len(flat) == 12 and len({s[1] for s in flat}) == 12  # disjoint and complete
    assert sorted(t for t, _ in flat) == sorted(info["wds"]["labels"])
    assert all(abs(len(r) - 12 / world_size) < 1 for r in per_rank)


def test_streaming_workers_and_seeded_shuffle(hf_dirs) -> None:
    _root, info = hf_dirs
    files = [str(p) for p in info["wds"]["shards"]]
    ds = hf_image_dataset(
        "webdataset", T16, data_files=files, streaming=True, shuffle_seed=1, shuffle_buffer=4
    )
    loader = DataLoader(ds, batch_size=2, collate_fn=collate_skipping, num_workers=2)
    targets = [t for b in loader for t in b["target"].tolist()]
    assert sorted(targets) == sorted(info["wds"]["labels"])
    again = [t for b in loader for t in b["target"].tolist()]
    assert again == targets  # same seed, same epoch: same order


def test_streaming_skips_bad_images_and_strict_raises(tmp_path) -> None:
    info = make_webdataset_shards(tmp_path, n_shards=1, per_shard=3, n_classes=2)
    shard = info["shards"][0]
    # rewrite the shard with sample 000001's jpg truncated
    members = []
    with tarfile.open(shard) as tar:
        for m in tar.getmembers():
            data = tar.extractfile(m).read()  # type: ignore[union-attr]
            if m.name == "000001.jpg":
                data = data[: len(data) // 2]
            members.append((m.name, data))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    ds = hf_image_dataset("webdataset", T16, data_files=[str(shard)], streaming=True)
    log = SkipLog()
    batches = list(SkipLogLoader(DataLoader(ds, batch_size=3, collate_fn=collate_skipping), log))
    assert batches[0]["input"].shape[0] == 2
    assert list(log.counts) == [(f"{shard}:000001", "truncated")]
    strict = hf_image_dataset(
        "webdataset", T16, data_files=[str(shard)], streaming=True, strict=True
    )
    with pytest.raises(BadImageError, match="000001"):
        list(strict)


def test_local_parquet_dataset_as_a_hub_name(tmp_path) -> None:
    """A dataset name resolves through `load_dataset` like a hub repo; a local repo directory
    with parquet shards exercises that path offline."""
    import datasets

    imgs = [synth_image(i, 20) for i in range(4)]
    feats = datasets.Features(
        {"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["a", "b"])}
    )
    dset = datasets.Dataset.from_dict({"img": imgs, "fine_label": [0, 1, 1, 0]}, features=feats)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    dset.to_parquet(str(tmp_path / "repo" / "data" / "train-00000-of-00001.parquet"))
    ds = hf_image_dataset(tmp_path / "repo", T16, cache_dir=tmp_path / "cache")
    assert ds.image_column == "img" and ds.label_column == "fine_label" and ds.classes == ["a", "b"]
    assert [ds[i]["target"] for i in range(4)] == [0, 1, 1, 0]
    assert torch.isfinite(ds[0]["input"]).all()
