"""The batched decode + augment pipeline, on its CPU fallback (the same code path as CUDA)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from distill.data.gpu_pipeline import (
    EncodedImageFolder,
    GpuBatchTransform,
    collate_encoded,
    encoded_loader,
    encoded_webdataset,
    pipeline_device,
    sample_crops,
)
from distill.data.images import load_image
from distill.data.transforms import CropParams, ViewSpec, apply_crop, build_transforms
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


def test_eval_batch_matches_the_pil_pipeline(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    batch = collate_encoded([ds[i] for i in range(len(ds))])
    t = GpuBatchTransform(
        16, train=False, device="auto" if not torch.cuda.is_available() else "cpu"
    )
    assert t.device.type == "cpu"
    x = t(batch["data"], batch["index"])
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    pil = build_transforms(16, train=False)
    ref = torch.stack([pil(load_image(p)) for p, _ in ds.samples])
    # Same pixels up to resampling differences (PIL vs torch antialiased bilinear).
    assert float((x - ref).abs().mean()) < 0.06
    lo = (0 - max(t.mean)) / min(t.std)
    hi = (1 - min(t.mean)) / min(t.std)
    assert lo - 1e-4 <= float(x.min()) and float(x.max()) <= hi + 1e-4


def test_train_crops_render_like_the_pil_transform(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    batch = collate_encoded([ds[i] for i in range(len(ds))])
    t = GpuBatchTransform(12, device="cpu", scale=(0.3, 1.0), seed=1)
    images = t.decode(batch["data"])
    params = t.params(images, torch.Generator().manual_seed(0))
    x = t.apply(images, params)
    view = ViewSpec(12)
    for n, (path, _) in enumerate(ds.samples):
        p = CropParams.from_tensor(params[n])
        ref = apply_crop(load_image(path), p, view)
        assert float((x[n] - ref).abs().mean()) < 0.08, (n, p)
    assert params[:, 4].sum() not in (0, len(ds))  # some flipped, some not


def test_seeded_and_epoch_dependent(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    b = collate_encoded([ds[i] for i in range(4)])
    t = GpuBatchTransform(12, device="cpu", seed=3)
    a1 = t(b["data"], b["index"], epoch=0)
    a2 = GpuBatchTransform(12, device="cpu", seed=3)(b["data"], b["index"], epoch=0)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, t(b["data"], b["index"], epoch=1))
    assert not torch.equal(a1, GpuBatchTransform(12, device="cpu", seed=4)(b["data"], b["index"]))


def test_crop_distribution_matches_torchvision() -> None:
    from torchvision.transforms import v2

    h, w, n = 120, 200, 3000
    ours = sample_crops([(h, w)] * n, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(32)
    theirs = torch.tensor(
        [
            [p[k] for k in ("top", "left", "height", "width")]
            for p in (rrc.make_params([torch.zeros(3, h, w)]) for _ in range(n))
        ]
    )
    for name, a, b in (
        ("area", ours[:, 2] * ours[:, 3] / (h * w), theirs[:, 2] * theirs[:, 3] / (h * w)),
        ("log aspect", (ours[:, 3] / ours[:, 2]).log(), (theirs[:, 3] / theirs[:, 2]).log()),
        ("centre y", ours[:, 0] + ours[:, 2] / 2, theirs[:, 0] + theirs[:, 2] / 2),
        ("centre x", ours[:, 1] + ours[:, 3] / 2, theirs[:, 1] + theirs[:, 3] / 2),
    ):
        a, b = a.double(), b.double()
        se = math.sqrt(float(a.var() + b.var()) / n)
        assert abs(float(a.mean() - b.mean())) < 4 * se, name
    assert (ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all()
    assert (ours[:, :4] >= 0).all() and abs(float(ours[:, 4].float().mean()) - 0.5) < 0.05


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_cpu_fallback_decodes_in_workers(folder: Path, workers: int) -> None:
    ds = EncodedImageFolder(folder)
    t = GpuBatchTransform(12, device="cpu", seed=0)
    loader = encoded_loader(ds, t, batch_size=3, shuffle=True, num_workers=workers, seed=0)
    loader.set_epoch(2)
    batches = list(loader)
    assert [b["input"].shape[0] for b in batches] == [3, 3, 2]
    idx = torch.cat([b["index"] for b in batches])
    assert sorted(idx.tolist()) == list(range(8))
    # the same batch transformed in the main process gives the same tensor
    first = batches[0]
    data = [ds[int(i)]["data"] for i in first["index"]]
    torch.testing.assert_close(first["input"], t(data, first["index"], epoch=2), rtol=0, atol=0)
    assert torch.equal(
        first["target"], torch.tensor([ds.samples[int(i)][1] for i in first["index"]])
    )


def test_webdataset_source(tmp_path: Path) -> None:
    info = make_webdataset_shards(tmp_path, n_shards=2, per_shard=3, size=24)
    ds = encoded_webdataset([str(p) for p in info["shards"]])
    t = GpuBatchTransform(12, device="cpu")
    batches = list(encoded_loader(ds, t, batch_size=4))
    assert [b["input"].shape for b in batches] == [(4, 3, 12, 12), (2, 3, 12, 12)]
    assert torch.cat([b["target"] for b in batches]).tolist() == info["labels"]


def test_undecodable_bytes_name_the_image() -> None:
    t = GpuBatchTransform(8, device="cpu")
    with pytest.raises(ValueError, match="image 0 of the batch"):
        t([torch.tensor([1, 2, 3, 4], dtype=torch.uint8)])


def test_validation() -> None:
    with pytest.raises(ValueError, match="scale"):
        GpuBatchTransform(8, scale=(0.0, 1.0), device="cpu")
    with pytest.raises(ValueError, match="hflip"):
        GpuBatchTransform(8, hflip=2.0, device="cpu")


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)"
)
def test_cuda_path_matches_the_cpu_path(folder: Path) -> None:
    ds = EncodedImageFolder(folder)
    b = collate_encoded([ds[i] for i in range(len(ds))])
    cpu = GpuBatchTransform(16, device="cpu", seed=0)
    gpu = GpuBatchTransform(16, device="cuda", seed=0)
    images = gpu.decode(b["data"])
    assert all(t.device.type == "cuda" and t.dtype == torch.uint8 for t in images)
    params = gpu.params(images, torch.Generator().manual_seed(0))
    assert torch.equal(params, cpu.params(cpu.decode(b["data"]), torch.Generator().manual_seed(0)))
    x_gpu = gpu.apply(images, params)
    x_cpu = cpu.apply(cpu.decode(b["data"]), params)
    # nvJPEG vs libjpeg and float vs uint8 resampling differ by a few grey levels at most
    assert float((x_gpu.cpu() - x_cpu).abs().mean()) < 0.05
    batches = list(encoded_loader(ds, gpu, batch_size=4, num_workers=1))
    assert batches[0]["input"].device.type == "cuda" and batches[0]["target"].device.type == "cuda"
