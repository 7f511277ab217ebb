"""Teacher-output cache: reconstruction math, fingerprints, checksums, exact replay."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill.data.teacher_cache import (
    CacheCorruptError,
    CachedDataset,
    CacheMismatchError,
    Fingerprint,
    ReplayableImages,
    TeacherCache,
    build_cache,
    compress_topk,
    densify_batch,
    reconstruct_logits,
    topk_kl,
)
from distill.data.transforms import PairedTransform, ViewSpec
from distill.teacher import Teacher
from distill.types import split_batch
from tests.datagen import make_image_folder

NUM_CLASSES = 7


# ----------------------------------------------------------------------------- math


def test_full_k_reconstructs_exactly() -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 50) * 4
    c = compress_topk(logits, 50)
    dense = reconstruct_logits(c.values, c.indices, c.tail_lse, 50, c.offset)
    torch.testing.assert_close(dense, logits)  # raw logits come back when offset is given
    for t in (1.0, 4.0):
        assert float(topk_kl(logits, 50, t).max()) < 1e-6  # only fp16 rounding remains


def test_topk_probabilities_and_tail_mass_exact_at_t1() -> None:
    torch.manual_seed(1)
    logits = torch.randn(8, 100) * 3
    k = 5
    c = compress_topk(logits, k)
    dense = reconstruct_logits(c.values, c.indices, c.tail_lse, 100)
    p, q = logits.softmax(1), dense.softmax(1)
    torch.testing.assert_close(q.gather(1, c.indices), p.gather(1, c.indices))
    tail_p = 1 - p.gather(1, c.indices).sum(1)
    tail_q = 1 - q.gather(1, c.indices).sum(1)
    torch.testing.assert_close(tail_q, tail_p, atol=1e-6, rtol=1e-5)
    # the tail classes share the tail mass uniformly
    mask = torch.ones_like(q, dtype=torch.bool).scatter(1, c.indices, False)
    tails = q[mask].view(8, 95)
    torch.testing.assert_close(tails, tails[:, :1].expand_as(tails))


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_decreases_as_k_grows(temperature: float) -> None:
    torch.manual_seed(2)
    logits = torch.randn(64, 100) * 3
    kls = [float(topk_kl(logits, k, temperature).mean()) for k in (1, 5, 10, 20, 50, 100)]
    assert all(a >= b for a, b in itertools.pairwise(kls)), kls
    assert kls[0] > 2 * kls[3] and kls[-1] < 1e-5


def test_reconstruction_is_finite_when_the_tail_underflows() -> None:
    logits = torch.tensor([[0.0, -200.0, -1e5, -1e5]])
    c = compress_topk(logits, 1)
    dense = reconstruct_logits(c.values.half(), c.indices, c.tail_lse, 4)
    assert torch.isfinite(dense).all()
    kl = F.kl_div(
        F.log_softmax(dense, 1), F.log_softmax(logits, 1), log_target=True, reduction="sum"
    )
    assert torch.isfinite(kl)


def test_compress_rejects_bad_k() -> None:
    with pytest.raises(ValueError, match="topk=0"):
        compress_topk(torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="topk=4"):
        compress_topk(torch.zeros(2, 3), 4)


# ----------------------------------------------------------------------------- cache on disk


class TinyNet(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = nn.Linear(8, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3))) * 5


def _teacher(seed: int = 0) -> Teacher:
    return Teacher(TinyNet(seed), input_size=20, mean=(0.5,) * 3, std=(0.25,) * 3)


def _dataset(root: Path, scale: tuple[float, float] = (0.3, 1.0)) -> ReplayableImages:
    transform = PairedTransform(
        ViewSpec(12), ViewSpec(20, mean=(0.5,) * 3, std=(0.25,) * 3), train=True, scale=scale
    )
    return ReplayableImages.from_folder(root, transform)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    make_image_folder(root, classes=("a", "b"), per_class=3, size=(28, 24))
    return root


@pytest.fixture(scope="module")
def built(images: Path, tmp_path_factory: pytest.TempPathFactory) -> TeacherCache:
    out = tmp_path_factory.mktemp("cache")
    return build_cache(
        _teacher(),
        _dataset(images),
        out,
        crops=3,
        topk=4,
        batch_size=4,
        shard_size=4,
        progress=False,
    )


def test_manifest_and_layout(built: TeacherCache) -> None:
    m = json.loads((built.path / "manifest.json").read_text())
    assert (m["num_items"], m["crops"], m["topk"], m["num_classes"]) == (6, 3, 4, NUM_CLASSES)
    assert m["param_names"] == {"int": ["top", "left", "height", "width", "flip"], "float": []}
    assert [(s["start"], s["stop"]) for s in m["shards"]] == [(0, 4), (4, 6)]
    values = np.load(built.path / m["shards"][0]["files"]["values"]["file"])
    assert values.dtype == np.float16 and values.shape == (4, 3, 4)
    assert np.load(built.path / m["shards"][0]["files"]["indices"]["file"]).dtype == np.int16
    assert not (built.path / "progress.json").exists()


def test_replay_gives_the_exact_crop_and_the_teachers_answer(
    built: TeacherCache, images: Path
) -> None:
    ds = _dataset(images)
    teacher = _teacher()
    cached = CachedDataset(ds, TeacherCache.open(built.path), choice="cycle")
    seen_params = set()
    for epoch in range(4):
        cached.set_epoch(epoch)
        for i in range(len(cached)):
            item = cached[i]
            params = built.params(i, epoch % 3)
            seen_params.add((i, tuple(params.values())))
            fresh = ds.replay(i, params)
            assert torch.equal(item["input"], fresh["input"])  # bit-identical student pixels
            assert item["target"] == fresh["target"]
            # the cached answer equals a fresh teacher run on that crop (fp16 tolerance)
            t = teacher(fresh["teacher_input"][None], prepared=True).output[0]
            top = t.topk(4).indices
            stored = built.entry(i, epoch % 3)
            assert set(stored.indices.tolist()) == set(top.tolist())
            raw = built.logits(i, epoch % 3, raw=True)
            torch.testing.assert_close(raw[top], t[top], atol=2e-2, rtol=1e-3)
            torch.testing.assert_close(
                F.log_softmax(item["teacher_logits"], 0)[top],
                F.log_softmax(t, 0)[top],
                atol=2e-2,
                rtol=1e-3,
            )
    assert len(seen_params) == 6 * 3  # epochs 0-2 used the three different draws, epoch 3 repeats
    raw = CachedDataset(ds, built, raw=True)
    raw.set_epoch(1)
    torch.testing.assert_close(raw[2]["teacher_logits"], built.logits(2, 1, raw=True))


def test_build_does_not_depend_on_batch_size(
    built: TeacherCache, images: Path, tmp_path: Path
) -> None:
    other = build_cache(
        _teacher(),
        _dataset(images),
        tmp_path,
        crops=3,
        topk=4,
        batch_size=5,
        shard_size=4,
        progress=False,
    )
    for i in range(6):
        for d in range(3):
            a, b = built.entry(i, d), other.entry(i, d)
            assert a.params == b.params
            assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)


def test_fingerprint_mismatch_names_the_component(built: TeacherCache, images: Path) -> None:
    ds = _dataset(images)
    good = Fingerprint.create(_teacher(), ds, topk=4, crops=3, num_classes=NUM_CLASSES)
    TeacherCache.open(built.path, good)  # matches
    TeacherCache.open(built.path, good.digest)  # the digest alone works too
    with pytest.raises(CacheMismatchError, match=r"teacher's weights"):
        TeacherCache.open(
            built.path,
            Fingerprint.create(_teacher(seed=1), ds, topk=4, crops=3, num_classes=NUM_CLASSES),
        )
    with pytest.raises(CacheMismatchError, match=r"transform parameters") as e:
        TeacherCache.open(
            built.path,
            Fingerprint.create(
                _teacher(), _dataset(images, (0.5, 1.0)), topk=4, crops=3, num_classes=NUM_CLASSES
            ),
        )
    assert "teacher's weights" not in str(e.value)
    with pytest.raises(CacheMismatchError, match=r"topk \(k\): cache 4 != now 5"):
        TeacherCache.open(
            built.path, Fingerprint.create(_teacher(), ds, topk=5, crops=3, num_classes=NUM_CLASSES)
        )
    with pytest.raises(CacheMismatchError, match="fingerprint"):
        TeacherCache.open(built.path, "0" * 64)
    # same weights, another input conversion: a different teacher
    other = Teacher(TinyNet(0), input_size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    fp = Fingerprint.create(other, ds, topk=4, crops=3, num_classes=NUM_CLASSES)
    assert fp.differences(good) == ["teacher"]


def test_changed_file_list_is_a_dataset_mismatch(images: Path, tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    make_image_folder(root, classes=("a", "b"), per_class=2, size=24)
    fp = Fingerprint.create(_teacher(), _dataset(root), topk=2, crops=1, num_classes=NUM_CLASSES)
    cache = build_cache(_teacher(), _dataset(root), tmp_path / "c", crops=1, topk=2, progress=False)
    make_image_folder(root, classes=("a",), per_class=3, size=24, seed=5)  # adds a/0002.jpg
    now = Fingerprint.create(_teacher(), _dataset(root), topk=2, crops=1, num_classes=NUM_CLASSES)
    assert now.differences(fp) == ["dataset"]
    with pytest.raises(CacheMismatchError, match=r"dataset's file list"):
        TeacherCache.open(cache.path, now)
    # rebuilding into the same folder refuses to overwrite a different cache by default
    with pytest.raises(CacheMismatchError, match="overwrite"):
        build_cache(_teacher(), _dataset(root), tmp_path / "c", crops=1, topk=2, progress=False)


def test_tampered_shard_is_refused(built: TeacherCache, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(built.path, copy)
    TeacherCache.open(copy)
    target = copy / "shard_00001.values.npy"
    arr = np.load(target)
    arr[0, 0, 0] += 1
    np.save(target, arr)
    with pytest.raises(CacheCorruptError, match=r"shard_00001\.values\.npy"):
        TeacherCache.open(copy)
    target.unlink()
    with pytest.raises(CacheCorruptError, match="missing"):
        TeacherCache.open(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="cache-teacher"):
        TeacherCache.open(copy)


class _FailingOnce(ReplayableImages):
    fail_at: int | None = None
    calls = 0

    def draw(self, index, generator):  # type: ignore[no-untyped-def]
        type(self).calls += 1
        if index == self.fail_at:
            raise RuntimeError("interrupted")
        return super().draw(index, generator)


def test_interrupted_build_resumes_from_complete_shards(
    images: Path, tmp_path: Path, built: TeacherCache
) -> None:
    ds = _FailingOnce(_dataset(images).samples, _dataset(images).transform, root=images)
    ds.fail_at = 5
    with pytest.raises(RuntimeError, match="interrupted"):
        build_cache(
            _teacher(), ds, tmp_path, crops=3, topk=4, batch_size=4, shard_size=4, progress=False
        )
    assert (tmp_path / "progress.json").exists() and not (tmp_path / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="resume"):
        TeacherCache.open(tmp_path)
    ds.fail_at, _FailingOnce.calls = None, 0
    cache = build_cache(
        _teacher(), ds, tmp_path, crops=3, topk=4, batch_size=4, shard_size=4, progress=False
    )
    assert _FailingOnce.calls == 1 + 2 * 3  # the probe + shard 1 only; shard 0 was kept
    for i in range(6):
        assert torch.equal(cache.entry(i, 2).values, built.entry(i, 2).values)


def test_cached_batches_skip_the_teacher(built: TeacherCache, images: Path) -> None:
    ds = CachedDataset(_dataset(images), built, output="topk", choice="random", seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=6)
    batch = densify_batch(next(iter(loader)), built.num_classes)
    b = split_batch(batch)
    assert b.teacher_cached is not None and b.teacher_cached.output.shape == (6, NUM_CLASSES)
    assert b.input.shape == (6, 3, 12, 12) and b.teacher_input is None
    dense = CachedDataset(_dataset(images), built, choice="random", seed=3)
    torch.testing.assert_close(
        torch.stack([dense[i]["teacher_logits"] for i in range(6)]), b.teacher_cached.output
    )
    # a length mismatch between data and cache is an error, not a silent misalignment
    with pytest.raises(ValueError, match="6"):
        CachedDataset(
            ReplayableImages(_dataset(images).samples[:5], _dataset(images).transform, root=images),
            built,
        )


def test_t4_reconstruction_error_is_small_for_peaked_teachers() -> None:
    # A confident 1000-class teacher (ImageNet-like): k = 10 keeps T = 4 KL small.
    torch.manual_seed(4)
    logits = torch.randn(32, 1000) * 1.5
    logits[torch.arange(32), torch.randint(1000, (32,))] += 12
    kl1 = float(topk_kl(logits, 10, 1.0).mean())
    kl4 = float(topk_kl(logits, 10, 4.0).mean())
    assert kl1 < 0.05 and math.isfinite(kl4)


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run by benchmarks/gpu_check.sh)"
)
def test_cuda_build_matches_cpu(built: TeacherCache, images: Path, tmp_path: Path) -> None:
    cache = build_cache(
        _teacher(), _dataset(images), tmp_path, crops=3, topk=4, batch_size=4, shard_size=4,
        device="cuda", autocast=False, progress=False,
    )  # fmt: skip
    assert cache.fingerprint == built.fingerprint
    for i in range(6):
        for d in range(3):
            a, b = built.entry(i, d), cache.entry(i, d)
            assert a.params == b.params
            torch.testing.assert_close(built.logits(i, d), cache.logits(i, d), atol=2e-2, rtol=1e-3)


def test_set_epoch_reaches_persistent_workers(built: TeacherCache, images: Path) -> None:
    ds = CachedDataset(_dataset(images), built)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=1, persistent_workers=True)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        seen.append(next(iter(loader))["teacher_logits"])
    expected = [torch.stack([built.logits(i, e) for i in range(6)]) for e in range(3)]
    for got, want in zip(seen, expected):
        torch.testing.assert_close(got, want)
