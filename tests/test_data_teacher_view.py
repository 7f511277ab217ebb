"""What the teacher sees has one owner: the PIL path and the batched pipeline's CPU fallback hand
the student and the teacher bit-identical tensors, the teacher's at its own resolution."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from distill.data.datasets import image_folder
from distill.data.encoded import EncodedCollate, EncodedImageFolder, encoded_loader
from distill.data.gpu_pipeline import GpuBatchTransform
from distill.data.transforms import PairedTransform, paired_views
from distill.seeding import SeededDataset
from distill.teacher import Teacher
from tests.datagen import synth_image

SEED = 7
STUDENT = 128
# (file, PIL size (w, h), mode): photos larger and smaller than the views, one grayscale, one CMYK
IMAGES = [
    ("a/0_wide.jpg", (300, 200), "RGB"),
    ("a/1_small.jpg", (64, 48), "RGB"),
    ("a/2_gray.jpg", (180, 240), "L"),
    ("b/3_cmyk.jpg", (260, 250), "CMYK"),
    ("b/4_tall.jpg", (150, 330), "RGB"),
    ("b/5_square.jpg", (256, 256), "RGB"),
]


def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A gradient with a 2 px checkerboard and noise: detail that a 128 px view of a large
    crop cannot hold, so a native 224 px view of it differs from an upsampled 128 px one."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(60, 190, size=3)
    slope = rng.uniform(-0.3, 0.3, size=(3, 2))
    img = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], -1)
    img += (50 * (((xx // 2 + yy // 2) % 2) - 0.5))[..., None] + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("teacher_view")
    for n, (name, size, mode) in enumerate(IMAGES):
        (root / name).parent.mkdir(exist_ok=True)
        _photo(n, size).convert(mode).save(root / name, "JPEG", quality=90)
    return root


def _teacher(interpolation: str = "bicubic") -> Teacher:
    # a 224 px teacher with its own normalisation; the model itself does not matter here
    return Teacher(
        nn.Identity(),
        input_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        interpolation=interpolation,
    )


def _pil_items(root: Path, paired: PairedTransform, epoch: int) -> list[dict[str, Any]]:
    """The per-image PIL path, under the training loop's per-sample seeding."""
    ds = SeededDataset(image_folder(root, paired), SEED)
    ds.epoch = epoch
    return [ds[i] for i in range(len(ds))]


def _batched(
    root: Path,
    paired: PairedTransform,
    epoch: int,
    *,
    batch_size: int = 4,
    shuffle: bool = False,
    workers: int = 0,
    order_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The batched pipeline on its CPU fallback, with its batches put back in index order."""
    ds = SeededDataset(EncodedImageFolder(root), SEED)
    ds.epoch = epoch
    transform = GpuBatchTransform.from_paired(paired, device="cpu")
    loader = encoded_loader(
        ds,
        transform,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        seed=order_seed,
    )
    parts = [batch.to("cpu") for batch in loader]
    index = torch.cat([p["index"] for p in parts])
    order = torch.argsort(index)
    assert index[order].tolist() == list(range(len(ds)))
    return {k: torch.cat([p[k] for p in parts])[order] for k in ("input", "teacher_input")}


@pytest.mark.parametrize("train", [True, False])
def test_both_paths_hand_both_models_identical_tensors(folder: Path, train: bool) -> None:
    paired = paired_views(_teacher(), STUDENT, train=train)
    pil = _pil_items(folder, paired, epoch=3)
    batched = _batched(folder, paired, epoch=3)
    assert len(pil) == len(IMAGES) == len(batched["input"])
    for i, item in enumerate(pil):
        assert item["input"].shape == (3, STUDENT, STUDENT)
        assert item["teacher_input"].shape == (3, 224, 224)
        assert torch.equal(item["input"], batched["input"][i]), IMAGES[i]
        assert torch.equal(item["teacher_input"], batched["teacher_input"][i]), IMAGES[i]


def test_the_teacher_gets_a_native_crop_not_the_student_view_upsampled(folder: Path) -> None:
    teacher = _teacher()
    paired = paired_views(teacher, STUDENT, train=True)
    pil = _pil_items(folder, paired, epoch=0)
    batched = _batched(folder, paired, epoch=0)
    student = torch.stack([item["input"] for item in pil])  # (B, 3, 128, 128)
    native = torch.stack([item["teacher_input"] for item in pil])  # (B, 3, 224, 224)
    assert native.shape == batched["teacher_input"].shape == (len(IMAGES), 3, 224, 224)
    # what a device-side conversion makes of the student view: the Teacher's own resize and
    # re-normalisation, and a plain F.interpolate of the student view re-normalised
    converted = teacher.convert(student)
    s_mean, s_std = torch.tensor(paired.student.mean), torch.tensor(paired.student.std)
    pixels = student * s_std.view(1, 3, 1, 1) + s_mean.view(1, 3, 1, 1)  # 0..1
    up = F.interpolate(pixels, size=(224, 224), mode="bicubic", align_corners=False)
    upsampled = (up - 0.5) / 0.25
    for other in (converted, upsampled):
        assert other.shape == native.shape
        diff = (native - other).abs().flatten(1).mean(1)  # (B,), in teacher-normalised units
        # 0.03 is about 2 grey levels on average over every pixel of every image
        assert (diff > 0.03).all() and float(diff.mean()) > 0.05, diff
    # ...yet it is the same region: shrunk to the student's size it matches the student view
    t_pixels = native * 0.25 + 0.5
    down = F.interpolate(t_pixels, size=(STUDENT, STUDENT), mode="bilinear", antialias=True)
    assert float((down - pixels).abs().mean()) < 0.02


def test_the_crop_follows_epoch_and_index_not_batching_or_workers(folder: Path) -> None:
    paired = paired_views(_teacher(), STUDENT, train=True)
    ref = _batched(folder, paired, epoch=1)
    same = [
        _batched(folder, paired, epoch=1, batch_size=2, shuffle=True, order_seed=5),
        _batched(folder, paired, epoch=1, batch_size=5, shuffle=True, order_seed=9, workers=2),
        _batched(folder, paired, epoch=1, batch_size=3, workers=1),
    ]
    for other in same:
        for key in ("input", "teacher_input"):
            assert torch.equal(ref[key], other[key])
    later = _batched(folder, paired, epoch=2)
    changed = [
        not torch.equal(ref["teacher_input"][i], later["teacher_input"][i])
        for i in range(len(IMAGES))
    ]
    assert all(changed), changed
    pil_later = _pil_items(folder, paired, epoch=2)
    for i, item in enumerate(pil_later):
        assert torch.equal(later["teacher_input"][i], item["teacher_input"])


def test_the_same_image_at_two_indices_gets_two_crops(tmp_path: Path, folder: Path) -> None:
    root = tmp_path / "dup"
    (root / "a").mkdir(parents=True)
    for name in ("x.jpg", "y.jpg"):  # the same bytes, dataset indices 0 and 1
        shutil.copy(folder / IMAGES[0][0], root / "a" / name)
    paired = paired_views(_teacher(), STUDENT, train=True)
    batched = _batched(root, paired, epoch=0)["teacher_input"]
    pil = [item["teacher_input"] for item in _pil_items(root, paired, epoch=0)]
    assert not torch.equal(batched[0], batched[1]) and not torch.equal(pil[0], pil[1])
    assert torch.equal(batched[0], pil[0]) and torch.equal(batched[1], pil[1])


def test_eval_views_are_the_centre_crop_whatever_the_seed(folder: Path) -> None:
    paired = paired_views(_teacher(), STUDENT, train=False)
    a = _batched(folder, paired, epoch=0)
    b = _batched(folder, paired, epoch=4, batch_size=1)
    assert torch.equal(a["teacher_input"], b["teacher_input"])
    assert torch.equal(a["input"], b["input"])


def test_a_teacher_like_the_student_adds_no_view(folder: Path) -> None:
    same = Teacher(nn.Identity(), input_size=STUDENT)  # ImageNet statistics, bilinear
    paired = paired_views(same, STUDENT, train=True)
    assert paired.teacher is None
    transform = GpuBatchTransform.from_paired(paired_views(_teacher(), STUDENT, train=True))
    assert transform.teacher is not None and transform.teacher.size == (224, 224)
    ds = SeededDataset(EncodedImageFolder(folder), SEED)
    out = EncodedCollate(GpuBatchTransform.from_paired(paired, device="cpu"))([ds[0], ds[1]])
    assert set(out.to("cpu")) == {"input", "target", "index"}


def test_cmyk_and_grayscale_are_decoded_like_pil(folder: Path) -> None:
    from distill.data.images import load_image
    from distill.data.transforms import to_uint8_image

    transform = GpuBatchTransform(16, device="cpu")
    for name, size, _mode in IMAGES:
        data = torch.frombuffer(bytearray((folder / name).read_bytes()), dtype=torch.uint8)
        (img,) = transform.decode([data])
        assert img.shape == (3, size[1], size[0]) and img.dtype == torch.uint8
        assert torch.equal(img, to_uint8_image(load_image(folder / name)))
    buf = io.BytesIO()
    synth_image(0, 8).save(buf, "PNG")
    png = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    assert transform.decode([png])[0].shape == (3, 8, 8)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)"
)
def test_cuda_renders_the_same_crops_up_to_rounding(folder: Path) -> None:
    paired = paired_views(_teacher(), STUDENT, train=True)
    ds = SeededDataset(EncodedImageFolder(folder), SEED)
    items = [ds[i] for i in range(len(ds))]
    cpu = GpuBatchTransform.from_paired(paired, device="cpu")
    gpu = GpuBatchTransform.from_paired(paired, device="cuda")
    seeds = [it["crop_seed"] for it in items]
    data = [it["data"] for it in items]
    images = gpu.decode(data)
    assert all(t.device.type == "cuda" and t.dtype == torch.uint8 for t in images)
    assert gpu.params(images, seeds) == cpu.params(cpu.decode(data), seeds)  # same boxes
    x_gpu = EncodedCollate(gpu)(items).to("cuda")
    x_cpu = EncodedCollate(cpu)(items).to("cpu")
    for key, view in (("input", paired.student), ("teacher_input", paired.teacher)):
        assert view is not None
        assert x_gpu[key].device.type == "cuda" and x_gpu[key].shape == x_cpu[key].shape
        # nvJPEG vs libjpeg and float vs uint8 resampling: rounding, a grey level here and there
        std = torch.tensor(view.std).view(1, 3, 1, 1)
        levels = ((x_gpu[key].cpu() - x_cpu[key]) * std * 255).abs()  # in grey levels
        assert float(levels.mean()) < 1.0 and float(levels.max()) < 32, key
