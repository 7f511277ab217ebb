"""The cached loss is the online loss: class logits at T > 1, attribute logits, embeddings.

Every cache here is built on disk by `build_cache` from a real (tiny, CPU) teacher and read back
through `CachedDataset`. The class-logit teacher is a linear map fitted so that its 1000 logits
on 64 random images are the benchmark's ImageNet-like synthetic rows (`synthetic_logits`:
mean top-1 probability 0.81 with Gaussian noise, 0.71 with heavy-tailed noise), since no
pretrained ImageNet teacher can be downloaded here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from benchmarks.cache_fidelity import students, synthetic_logits
from distill.data.cache import (
    CachedDataset,
    CacheMismatchError,
    ReplayableShifts,
    TeacherCache,
    build_cache,
    compress_topk,
    densify_batch,
    open_checked,
    quantize_tail,
    reconstruct_logits,
)
from distill.data.cache.fingerprint import default_identity
from distill.files import sha256_file
from distill.losses import EmbeddingDistillLoss, MultiLabelKDLoss
from distill.losses.kd import soft_kd_loss
from distill.teacher import Teacher
from distill.types import Outputs

N, C = 64, 1000


def _images(n: int = N, seed: int = 0) -> ReplayableShifts:
    g = torch.Generator().manual_seed(seed)
    return ReplayableShifts(torch.randn(n, 1, 16, 16, generator=g), torch.arange(n), max_shift=0)


def _fitted(data: ReplayableShifts, target: Tensor) -> nn.Module:
    """A linear teacher whose outputs on `data`'s images are `target` (N, C) (to ~1e-4)."""
    x = data.images.flatten(1).double()
    layer = nn.Linear(x.shape[1], target.shape[1], bias=False)
    with torch.no_grad():
        layer.weight.copy_((torch.linalg.pinv(x) @ target.double()).T.float())
    return nn.Sequential(nn.Flatten(), layer)


def _loaded(data: ReplayableShifts, cache: TeacherCache, **kw: Any) -> dict[str, Tensor]:
    loader = torch.utils.data.DataLoader(CachedDataset(data, cache, **kw), batch_size=len(data))
    return next(iter(loader))


def _kd_difference(s: Tensor, online: Tensor, cached: Tensor, t: float) -> tuple[float, float]:
    out = []
    for teacher in (online, cached):
        x = s.clone().requires_grad_(True)
        loss = soft_kd_loss(x, teacher, temperature=t)
        out.append((float(loss.detach()), torch.autograd.grad(loss, x)[0]))
    (lo, go), (lc, gc) = out
    return abs(lc - lo) / lo, float((gc - go).norm() / go.norm())


@dataclass
class Built:
    data: ReplayableShifts
    teacher: nn.Module
    online: Tensor  # (N, C): what an online run's teacher returns
    cache: TeacherCache  # the default build: top-10 and the 8-bit tail

    def mass_cache(self, out: Path, temperatures: tuple[float, ...] = (4.0,)) -> TeacherCache:
        return build_cache(
            self.teacher, self.data, out, crops=1, topk=10, tail="mass",
            temperatures=temperatures, progress=False,
        )  # fmt: skip


@pytest.fixture(scope="module", params=["gaussian", "student-t"])
def built(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Built:
    data = _images()
    teacher = _fitted(data, synthetic_logits(n=N, noise=request.param))
    with torch.no_grad():
        online = teacher(data.images)
    out = tmp_path_factory.mktemp(f"exact_{request.param}")
    cache = build_cache(teacher, data, out, crops=1, topk=10, batch_size=16, progress=False)
    return Built(data, teacher, online, cache)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_cached_kd_matches_online_within_1_percent(built: Built, temperature: float) -> None:
    data, online, cache = built.data, built.online, built.cache
    assert (cache.tail, cache.topk) == ("quantized", 10)  # the default: the 8-bit tail
    p = online.softmax(1).max(1).values.mean()
    assert 0.5 < float(p) < 0.9  # a confident, ImageNet-like teacher
    cached = _loaded(data, cache, temperature=temperature)["teacher_logits"]
    for name, s in students(online).items():
        loss, grad = _kd_difference(s, online, cached, temperature)
        assert loss < 0.01 and grad < 0.01, (name, temperature, loss, grad)


def test_tail_mass_only_is_exact_in_mass_but_not_in_gradient(built: Built, tmp_path: Path) -> None:
    data, online = built.data, built.online
    cache = built.mass_cache(tmp_path)
    assert cache.temperatures == (1.0, 4.0) and cache.nbytes() < built.cache.nbytes() / 10
    cached = _loaded(data, cache, temperature=4.0)["teacher_logits"]
    p, q = (online / 4).softmax(1), (cached / 4).softmax(1)
    top = online.topk(10, dim=1).indices
    torch.testing.assert_close(q.gather(1, top), p.gather(1, top), rtol=2e-3, atol=1e-6)
    tail_p, tail_q = 1 - p.gather(1, top).sum(1), 1 - q.gather(1, top).sum(1)
    torch.testing.assert_close(tail_q, tail_p, rtol=1e-4, atol=1e-6)  # exact tail mass at T
    # ... but how it splits among the 990 tail classes is unknown: the gradient is far off
    _, grad = _kd_difference(students(online)["untrained"], online, cached, 4.0)
    assert grad > 0.05
    assert cache.serves(4.0) and not cache.serves(2.0) and built.cache.serves(2.0)


def test_unserved_temperature_is_refused_naming_what_is_served(
    built: Built, tmp_path: Path
) -> None:
    data = built.data
    cache = built.mass_cache(tmp_path)
    with pytest.raises(CacheMismatchError) as e:
        CachedDataset(data, cache, temperature=2.0)
    msg = str(e.value)
    assert "serves temperatures 1 and 4 only, but training uses temperature 2" in msg
    assert "Train at temperature 1 or 4, or rebuild the cache" in msg and "8-bit tail" in msg
    ident = default_identity(built.teacher, data, C)
    how = "the same command with --cache-teacher DIR"
    with pytest.raises(CacheMismatchError, match=f"rebuild the cache: {how}"):
        open_checked(tmp_path, ident, temperature=2.0, how_to_build=how)
    assert open_checked(tmp_path, ident, temperature=4.0).serves(4.0)


def as_version_1(src: Path, dst: Path) -> None:
    """Rewrite a cache of class logits storing the tail's mass at T = 1 into the layout of
    format version 1: tail_lse (rows, crops), no 8-bit tail, no kind/tail/temperatures in the
    manifest, checksums updated."""
    dst.mkdir()
    for f in src.iterdir():
        if not any(n in f.name for n in (".tail_codes.", ".tail_range.")):
            (dst / f.name).write_bytes(f.read_bytes())
    m = json.loads((dst / "manifest.json").read_text())
    assert m["temperatures"] == [1.0], "version 1 stored the tail's mass at T = 1 only"
    for key in ("kind", "tail", "temperatures"):
        del m[key]
    m["version"] = 1
    for shard in m["shards"]:
        shard["files"].pop("tail_codes", None)
        shard["files"].pop("tail_range", None)
        entry = shard["files"]["tail_lse"]
        arr = np.load(dst / entry["file"])[..., 0]
        np.save(dst / entry["file"], arr)
        entry.update(sha256=sha256_file(dst / entry["file"]), shape=list(arr.shape))
    (dst / "manifest.json").write_text(json.dumps(m))


def test_version_1_caches_serve_t1_only(built: Built, tmp_path: Path) -> None:
    data, online = built.data, built.online
    new = built.mass_cache(tmp_path / "v2", temperatures=())
    as_version_1(new.path, tmp_path / "v1")
    old = TeacherCache.open(tmp_path / "v1")
    assert (old.version, old.kind, old.tail, old.temperatures) == (1, "logits", "mass", (1.0,))
    # at T = 1 it reads as it always did: top-k exact, the rest sharing the T = 1 mass
    got = _loaded(data, old)["teacher_logits"]
    c = compress_topk(online, 10)
    want = reconstruct_logits(c.values.half(), c.indices, c.tail_lse, C)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, _loaded(data, new)["teacher_logits"])
    with pytest.raises(CacheMismatchError, match="format-version-1 cache") as e:
        CachedDataset(data, old, temperature=4.0)
    assert "serves temperature 1 only" in str(e.value) and "rebuild" in str(e.value)


@pytest.mark.parametrize("tail", ["quantized", "mass"])
def test_topk_batches_densify_to_the_dense_logits(built: Built, tmp_path: Path, tail: str) -> None:
    data = built.data
    cache = built.cache if tail == "quantized" else built.mass_cache(tmp_path)
    for t in (1.0, 4.0):
        dense = _loaded(data, cache, temperature=t)["teacher_logits"]
        compact = _loaded(data, cache, temperature=t, output="topk")
        assert ("teacher_tail_codes" in compact) == (tail == "quantized")
        torch.testing.assert_close(densify_batch(compact, C)["teacher_logits"], dense)


def test_fp16_and_8_bit_error_bounds() -> None:
    z = synthetic_logits(n=32, noise="student-t")
    c = compress_topk(z, C)  # k = C: only fp16 rounding of the values remains
    got = reconstruct_logits(c.values.half(), c.indices, c.tail_lse, C, c.offset)
    depth = (z.amax(1, keepdim=True) - z).abs()
    assert bool(((got - z).abs() <= depth * 2**-11 + 1e-4).all())
    assert torch.equal(got.amax(1), z.amax(1))  # the max comes back exactly
    rest = z - z.amax(1, keepdim=True)
    codes, span = quantize_tail(rest)
    step = (span[:, 1] - span[:, 0]) / 255
    back = span[:, :1] + codes.float() * step[:, None]
    kept = rest >= span[:, :1]  # heavy tails reach 76 below the max: clipped to 60 below
    assert bool(((back - rest).abs() <= step[:, None] / 2 + 1e-5)[kept].all())
    assert not kept.all() and bool((back[~kept] == span[:, :1].expand_as(back)[~kept]).all())


# ----------------------------------------------------------------- multi-label and embeddings


class Linear(nn.Module):
    def __init__(self, outputs: int, scale: float) -> None:
        super().__init__()
        torch.manual_seed(outputs)
        self.fc, self.scale = nn.Linear(256, outputs), scale

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1)) * self.scale


def test_multilabel_cache_is_exact(tmp_path: Path) -> None:
    data = _images(16)
    teacher = Teacher(Linear(40, 8.0), output="multilabel")
    cache = build_cache(teacher, data, tmp_path, crops=1, kind="multilabel", progress=False)
    assert (cache.kind, cache.topk, cache.num_classes) == ("multilabel", 40, 40)
    with torch.no_grad():
        online = teacher(data.images).output  # (16, 40) attribute logits
    cached = _loaded(data, cache, temperature=2.0)["teacher_logits"]
    assert torch.equal(cached, online)  # float32, bit-identical: no rounding at all
    s = torch.randn(16, 40)
    target = (torch.rand(16, 40) > 0.5).float()
    for t in (1.0, 2.0, 4.0):
        kd = MultiLabelKDLoss(temperature=t, alpha=0.5)
        assert torch.equal(
            kd(Outputs(s), Outputs(cached), target)["loss"],
            kd(Outputs(s), Outputs(online), target)["loss"],
        )
    with pytest.raises(ValueError, match="kind='multilabel'"):
        build_cache(teacher, data, tmp_path / "x", crops=1, topk=10, progress=False)
    with pytest.raises(ValueError, match="stores all 40 outputs: drop topk=10"):
        build_cache(teacher, data, tmp_path / "y", crops=1, topk=10, kind="multilabel")
    with pytest.raises(ValueError, match="output='topk' is for caches of class logits"):
        CachedDataset(data, cache, output="topk")


def test_embedding_cache_is_exact(tmp_path: Path) -> None:
    data = _images(16)
    teacher = Teacher(Linear(512, 1.0), output="embedding")
    cache = build_cache(teacher, data, tmp_path, crops=1, kind="embedding", progress=False)
    assert (cache.kind, cache.num_classes, cache.tail) == ("embedding", 512, None)
    with torch.no_grad():
        online = teacher(data.images).output  # (16, 512)
    cached = _loaded(data, cache)["teacher_logits"]
    assert torch.equal(cached, online)
    s = torch.randn(16, 64)
    for kind in ("mse", "cosine", "rkd"):
        loss = EmbeddingDistillLoss(64, 512, kind)  # type: ignore[arg-type]
        assert torch.equal(
            loss(Outputs(s), Outputs(cached), None)["loss"],
            loss(Outputs(s), Outputs(online), None)["loss"],
        )
    # a cache of another kind is refused by a run that expects embeddings
    ident = default_identity(teacher, data, 512)
    with pytest.raises(CacheMismatchError, match="what the teacher outputs"):
        open_checked(tmp_path, ident, kind="logits")
