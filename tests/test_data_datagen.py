"""The shared generators write what third-party readers accept (other test areas rely on them)."""

from __future__ import annotations

import pytest

from tests.datagen import (
    make_bad_images,
    make_identity_folders,
    make_image_folder,
    make_webdataset_shards,
    synth_image,
)


def test_webdataset_library_reads_the_shards(tmp_path) -> None:
    wds = pytest.importorskip("webdataset")
    info = make_webdataset_shards(tmp_path, n_shards=2, per_shard=3)
    urls = [str(p) for p in info["shards"]]
    samples = list(
        wds.WebDataset(urls, shardshuffle=False)
        .decode("pil")
        .to_tuple("__key__", "jpg", "cls", "json")
    )
    assert [s[0] for s in samples] == info["keys"]
    assert [int(s[2]) for s in samples] == info["labels"] == [s[3]["label"] for s in samples]
    assert samples[0][1].size == (32, 32)


def test_torchvision_image_folder_reads_identity_and_class_folders(tmp_path) -> None:
    from torchvision.datasets import ImageFolder

    ids = make_identity_folders(tmp_path / "ids", n_identities=2, per_identity=2)
    assert ImageFolder(str(tmp_path / "ids")).classes == ids["identities"]
    info = make_image_folder(tmp_path / "f", classes=("a", "b"), per_class=2, ext=".png")
    assert len(ImageFolder(str(tmp_path / "f"))) == info["n"]


def test_generators_are_deterministic_and_small(tmp_path) -> None:
    assert synth_image(3, (20, 10)).tobytes() == synth_image(3, (20, 10)).tobytes()
    assert synth_image(3, 16).tobytes() != synth_image(4, 16).tobytes()
    bad = make_bad_images(tmp_path)
    assert bad["huge"].stat().st_size < 200  # claims 40000x40000
    assert sum(p.stat().st_size for p in bad.values()) < 20_000
