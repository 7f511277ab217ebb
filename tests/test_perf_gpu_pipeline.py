"""The batched decode + augment pipeline, on its CPU fallback (the same code path as CUDA)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.data import BadImageError, SkipBadSamples
from distill.data.encoded import (
    EncodedBatch,
    EncodedImageFolder,
    collate_encoded,
    encoded_loader,
    encoded_webdataset,
)
from distill.data.gpu_pipeline import GpuBatchTransform, pipeline_device
from distill.data.images import load_image
from distill.data.transforms import ViewSpec, build_transforms, render_view
from distill.seeding import SeededDataset
from tests.datagen import make_image_folder, make_webdataset_shards


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpegs")
    make_image_folder(root, classes=("a", "b"), per_class=3, size=(40, 30))
    make_image_folder(root, classes=("c",), per_class=2, size=(28, 36), ext=".png")
    return root


def test_flags() -> None:
    assert pipeline_device("off") is None
    assert pipeline_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--gpu-pipeline auto"):
            pipeline_device("on")
    with pytest.raises(ValueError, match="auto, on or off"):
        pipeline_device("yes")


def test_dataset_matches_imagefolder(folder: Path) -> None:
    from torchvision.datasets import ImageFolder

    ds = EncodedImageFolder(folder)
    ref = ImageFolder(str(folder))
    assert ds.classes == ref.classes and ds.samples == ref.samples
    item = ds[0]
    assert item["data"].dtype == torch.uint8 and item["data"].dim() == 1 and item["target"] == 0


def test_from_samples_and_unreadable_files(folder: Path, tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    ref = ImageFolder(str(folder))
    ds = EncodedImageFolder.from_samples(ref.samples, ref.classes)
    assert ds.num_classes == 3 and ds[1]["path"] == ref.samples[1][0]
    assert isinstance(ds[1]["crop_seed"], int)
    (tmp_path / "empty.jpg").write_bytes(b"")
    bad = EncodedImageFolder.from_samples(
        [(str(tmp_path / "empty.jpg"), 0), (str(tmp_path / "gone.jpg"), 0)], ["a"]
    )
    for i, reason in ((0, "empty"), (1, "missing")):
        with pytest.raises(BadImageError) as e:
            bad[i]
        assert e.value.reason == reason and e.value.path.endswith(("empty.jpg", "gone.jpg"))


def test_eval_batch_matches_the_pil_pipeline(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    batch = collate_encoded([ds[i] for i in range(len(ds))])
    t = GpuBatchTransform(
        16, train=False, device="auto" if not torch.cuda.is_available() else "cpu"
    )
    assert t.device.type == "cpu"
    x = t(batch["data"], batch["crop_seed"])["input"]
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    pil = build_transforms(16, train=False)
    ref = torch.stack([pil(load_image(p)) for p, _ in ds.samples])
    # Same pixels up to resampling differences (PIL's resize + crop vs one crop-and-resize).
    assert float((x - ref).abs().mean()) < 0.06
    lo = (0 - max(t.views.student.mean)) / min(t.views.student.std)
    hi = (1 - min(t.views.student.mean)) / min(t.views.student.std)
    assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4


def test_train_crops_render_exactly_like_the_pil_renderer(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    batch = collate_encoded([ds[i] for i in range(len(ds))])
    t = GpuBatchTransform(12, device="cpu", scale=(0.3, 1.0), channels_last=False)
    images = t.decode(batch["data"])
    params = t.params(images, batch["crop_seed"])
    x = t.apply(images, params)["input"]
    view = ViewSpec(12)
    for n, (path, _) in enumerate(ds.samples):
        assert torch.equal(x[n], render_view(load_image(path), params[n], view)), (n, params[n])
    flips = [p.flip for p in params]
    assert any(flips) and not all(flips)


def test_crops_follow_the_crop_seeds(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    b = collate_encoded([ds[i] for i in range(4)])
    t = GpuBatchTransform(12, device="cpu")
    a1 = t(b["data"], b["crop_seed"])["input"]
    assert torch.equal(a1, GpuBatchTransform(12, device="cpu")(b["data"], b["crop_seed"])["input"])
    assert not torch.equal(a1, t(b["data"], b["crop_seed"] + 1)["input"])
    # a sample's crop does not depend on its batch: render each alone
    for n in range(4):
        alone = t(b["data"][n : n + 1], b["crop_seed"][n : n + 1])["input"][0]
        assert torch.equal(alone, a1[n])


def test_teacher_view_is_the_same_crop_at_its_own_resolution(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    b = collate_encoded([ds[i] for i in range(len(ds))])
    teacher = ViewSpec(20, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    t = GpuBatchTransform(12, teacher=teacher, device="cpu")
    out = t(b["data"], b["crop_seed"])
    assert out["input"].shape == (8, 3, 12, 12) and out["teacher_input"].shape == (8, 3, 20, 20)
    student_only = GpuBatchTransform(12, device="cpu")(b["data"], b["crop_seed"])
    assert torch.equal(out["input"], student_only["input"])
    params = t.params(t.decode(b["data"]), b["crop_seed"])
    for n, (path, _) in enumerate(ds.samples):
        ref = render_view(load_image(path), params[n], teacher)
        assert torch.equal(out["teacher_input"][n], ref)
    same = GpuBatchTransform(12, teacher=ViewSpec((12, 12)), device="cpu")
    assert same.teacher is None and set(same(b["data"], b["crop_seed"])) == {"input"}


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_reads_bytes_and_batches_decode_on_to(folder: Path, workers: int) -> None:
    ds = SeededDataset(EncodedImageFolder(folder), seed=0)
    ds.epoch = 2
    t = GpuBatchTransform(12, device="cpu")
    loader = encoded_loader(ds, t, batch_size=3, shuffle=True, num_workers=workers, seed=0)
    raw = list(loader)
    assert all(isinstance(b, EncodedBatch) for b in raw) and [len(b) for b in raw] == [3, 3, 2]
    batches = [b.to("cpu") for b in raw]
    assert set(batches[0]) == {"input", "target", "index"}
    idx = torch.cat([b["index"] for b in batches])
    assert sorted(idx.tolist()) == list(range(8))
    # the same samples (same crop seeds) transformed in the main process give the same tensor
    first = batches[0]
    items = [ds[int(i)] for i in first["index"]]
    again = t([it["data"] for it in items], [it["crop_seed"] for it in items])["input"]
    assert torch.equal(first["input"], again)
    assert torch.equal(
        first["target"], torch.tensor([ds.samples[int(i)][1] for i in first["index"]])
    )
    # decoding in the workers instead gives the same batches
    eager = encoded_loader(
        ds, t, batch_size=3, shuffle=True, num_workers=workers, seed=0, decode_in_workers=True
    )
    for a, b in zip(batches, eager):
        assert isinstance(b, dict) and torch.equal(a["input"], b["input"])


def test_skip_markers_are_dropped_and_reported(folder: Path, tmp_path: Path) -> None:
    good = EncodedImageFolder(folder).samples[:2]
    gone = str(tmp_path / "gone.jpg")
    ds = EncodedImageFolder.from_samples([good[0], (gone, 0), good[1]], ["a"])
    loader = encoded_loader(SkipBadSamples(ds), GpuBatchTransform(8, device="cpu"), batch_size=3)
    (batch,) = [b.to("cpu") for b in loader]
    assert batch["input"].shape[0] == 2 and batch["index"].tolist() == [0, 2]
    assert batch["skipped"] == [(gone, "missing")]


def test_webdataset_source(tmp_path: Path) -> None:
    info = make_webdataset_shards(tmp_path, n_shards=2, per_shard=3, size=24)
    ds = encoded_webdataset([str(p) for p in info["shards"]])
    t = GpuBatchTransform(12, device="cpu")
    batches = [b.to("cpu") for b in encoded_loader(ds, t, batch_size=4)]
    assert [b["input"].shape for b in batches] == [(4, 3, 12, 12), (2, 3, 12, 12)]
    assert torch.cat([b["target"] for b in batches]).tolist() == info["labels"]


def test_undecodable_bytes_name_the_image() -> None:
    t = GpuBatchTransform(8, device="cpu")
    junk = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    with pytest.raises(BadImageError, match="image 0 of the batch"):
        t([junk], [0])
    with pytest.raises(BadImageError, match=r"x\.jpg.*gpu-pipeline off"):
        t([junk], [0], names=["x.jpg"])


def test_validation() -> None:
    with pytest.raises(ValueError, match="scale"):
        GpuBatchTransform(8, scale=(0.0, 1.0), device="cpu")
    with pytest.raises(ValueError, match="hflip"):
        GpuBatchTransform(8, hflip=2.0, device="cpu")
    with pytest.raises(ValueError, match="interpolation"):
        GpuBatchTransform(8, interpolation="lanczos", device="cpu")
    with pytest.raises(ValueError, match="crop seeds"):
        GpuBatchTransform(8, device="cpu").params([torch.zeros(3, 4, 4, dtype=torch.uint8)], [])


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)"
)
def test_cuda_path_matches_the_cpu_path(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    b = collate_encoded([ds[i] for i in range(len(ds))])
    cpu = GpuBatchTransform(16, device="cpu")
    gpu = GpuBatchTransform(16, device="cuda")
    images = gpu.decode(b["data"])
    assert all(t.device.type == "cuda" and t.dtype == torch.uint8 for t in images)
    params = gpu.params(images, b["crop_seed"])
    assert params == cpu.params(cpu.decode(b["data"]), b["crop_seed"])
    x_gpu = gpu.apply(images, params)["input"]
    x_cpu = cpu.apply(cpu.decode(b["data"]), params)["input"]
    # nvJPEG vs libjpeg and float vs uint8 resampling differ by a few grey levels at most
    assert float((x_gpu.cpu() - x_cpu).abs().mean()) < 0.05
    batches = [x.to("cuda") for x in encoded_loader(ds, gpu, batch_size=4, num_workers=1)]
    assert batches[0]["input"].device.type == "cuda" and batches[0]["target"].device.type == "cuda"
