"""distill.data.cache: the identity explainer, build_or_reuse and open_checked, on real caches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import distill.data.cache as cache_pkg
import distill.data.teacher_cache as shim
from distill.data.cache import (
    CacheCorruptError,
    CacheMismatchError,
    Fingerprint,
    ReplayableShifts,
    TeacherCache,
    build_cache,
    build_or_reuse,
    iter_entries,
    open_checked,
)

NUM_CLASSES = 5
HOW = "the same command with --cache-teacher DIR"


class Counting(nn.Module):
    """A tiny teacher on (1, 8, 8) images that counts the images it has seen."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(64, NUM_CLASSES)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, C)
        self.seen += len(x)
        return self.fc(x.flatten(1)) * 4


class Failing(ReplayableShifts):
    fail_at: int | None = None

    def draw(self, index: int, generator: torch.Generator) -> Any:
        if index == self.fail_at:
            raise RuntimeError("interrupted")
        return super().draw(index, generator)


def _data(max_shift: int = 2) -> Failing:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 1, 8, 8, generator=g)
    return Failing(images, torch.arange(6) % NUM_CLASSES, max_shift=max_shift)


def _identity(ds: Any, spec: str = "tiny:0") -> dict[str, Any]:
    return {
        "teacher": {"spec": spec, "options": {"scale": 4}},
        "dataset": ds.data_signature(),
        "images": len(ds),
        "transform": ds.transform_config(),
        "num_classes": NUM_CLASSES,
    }


def _build(out: Path, ds: ReplayableShifts, teacher: nn.Module, **kw: Any) -> TeacherCache:
    kw = {"identity": _identity(ds), "crops": 2, "topk": 3, "seed": 0, **kw}
    return build_or_reuse(teacher, ds, out, batch_size=4, shard_size=4, progress=False, **kw)


def _same(a: TeacherCache, b: TeacherCache) -> bool:
    return all(
        x[2].params == y[2].params and torch.equal(x[2].values, y[2].values)
        for x, y in zip(iter_entries(a), iter_entries(b), strict=True)
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> TeacherCache:
    return _build(tmp_path_factory.mktemp("cache"), _data(), Counting())


def test_explainer_names_each_changed_component_with_old_and_new_values(
    built: TeacherCache,
) -> None:
    assert built.identity is not None and built.identity["teacher"]["spec"] == "tiny:0"
    same = open_checked(built.path, _identity(_data()))
    assert _same(same, built)
    other = _identity(_data(max_shift=3), spec="tiny:1")
    with pytest.raises(CacheMismatchError) as e:
        open_checked(built.path, other, labels={"teacher": "teacher (--teacher)"}, how_to_build=HOW)
    msg = str(e.value)
    assert "was built for a different teacher, transform:" in msg
    assert "teacher (--teacher): spec: cache 'tiny:0', now 'tiny:1'" in msg
    assert "the transform parameters: max_shift: cache 2, now 3" in msg
    assert "options" not in msg and "dataset" not in msg  # what did not change is not named
    assert msg.rstrip().endswith(HOW)
    # a Fingerprint works as the expectation too: every field is compared, k included
    fp = Fingerprint.from_identity(_identity(_data()), topk=4, crops=2)
    with pytest.raises(CacheMismatchError, match=r"topk \(k\): cache 3 != now 4"):
        open_checked(built.path, fp)


def test_fewer_images_are_counted(built: TeacherCache) -> None:
    ds = _data()
    small = ReplayableShifts(ds.images[:4], ds.targets[:4], max_shift=2)
    with pytest.raises(CacheMismatchError, match="cache 6 images, now 4"):
        open_checked(built.path, _identity(small))


def test_reuse_runs_no_teacher(built: TeacherCache) -> None:
    teacher = Counting()
    again = _build(built.path, _data(), teacher)
    assert teacher.seen == 0 and _same(again, built)


def test_refuses_another_cache_before_the_teacher_runs(built: TeacherCache) -> None:
    before = (built.path / "manifest.json").read_bytes()
    teacher = Counting()
    other = _identity(_data(max_shift=3))
    with pytest.raises(CacheMismatchError, match="max_shift: cache 2, now 3") as e:
        _build(built.path, _data(max_shift=3), teacher, identity=other)
    assert "Choose another folder, or delete this one" in str(e.value)
    with pytest.raises(CacheMismatchError, match=r"the seed of the crop draws: cache 0 != now 1"):
        _build(built.path, _data(), teacher, seed=1)
    assert teacher.seen == 0
    assert (built.path / "manifest.json").read_bytes() == before


def test_interrupted_build_resumes(built: TeacherCache, tmp_path: Path) -> None:
    ds, teacher = _data(), Counting()
    ds.fail_at = 5  # in the second shard (items 4-5)
    with pytest.raises(RuntimeError, match="interrupted"):
        _build(tmp_path, ds, teacher)
    assert (tmp_path / "progress.json").is_file() and not (tmp_path / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="rerun it to resume"):
        open_checked(tmp_path, _identity(ds))
    ds.fail_at, teacher.seen = None, 0
    resumed = _build(tmp_path, ds, teacher)
    assert teacher.seen == 1 + 2 * 2  # the probe, then shard 1 only (2 items x 2 crops)
    assert _same(resumed, built) and not (tmp_path / "progress.json").exists()


def test_open_checked_missing_and_corrupt(built: TeacherCache, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"no teacher cache there.*Build it first: {HOW}"):
        open_checked(tmp_path / "none", _identity(_data()), how_to_build=HOW)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in built.path.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    shard = copy / "shard_00001.offset.npy"
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")  # one float, changed in place
    with pytest.raises(CacheCorruptError, match=r"shard_00001\.offset\.npy does not match.*DIR"):
        open_checked(copy, _identity(_data()), how_to_build=HOW)


def test_manifest_without_identity_still_opens(built: TeacherCache, tmp_path: Path) -> None:
    for f in built.path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    m = json.loads((tmp_path / "manifest.json").read_text())
    del m["identity"]  # as written before the identity was recorded
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    old = open_checked(tmp_path, _identity(_data()))
    assert old.identity is None and _same(old, built)
    with pytest.raises(CacheMismatchError, match=r"the transform parameters: cache \w{12} != now"):
        open_checked(tmp_path, _identity(_data(max_shift=3)))


def test_identities_are_checked(tmp_path: Path) -> None:
    ds = _data()
    partial = {k: v for k, v in _identity(ds).items() if k != "transform"}
    with pytest.raises(ValueError, match="does not describe transform"):
        build_or_reuse(Counting(), ds, tmp_path, identity=partial, crops=1, topk=2)
    wrong = {**_identity(ds), "num_classes": 9}
    with pytest.raises(ValueError, match="a teacher with 5 classes"):
        build_or_reuse(Counting(), ds, tmp_path, identity=wrong, crops=1, topk=2, progress=False)
    fp = Fingerprint.from_identity(_identity(_data(max_shift=3)), topk=2, crops=1)
    with pytest.raises(ValueError, match="disagree on transform"):
        build_cache(
            Counting(), ds, tmp_path, crops=1, topk=2, fingerprint=fp, identity=_identity(ds)
        )
    assert not (tmp_path / "manifest.json").exists()


def test_default_identity_matches_the_fingerprint(tmp_path: Path) -> None:
    ds, teacher = _data(), Counting()
    cache = build_cache(teacher, ds, tmp_path, crops=1, topk=2, progress=False)
    assert cache.fingerprint == Fingerprint.create(teacher, ds, topk=2, crops=1, num_classes=5)
    assert cache.identity is not None and cache.identity["transform"]["max_shift"] == 2
    with pytest.raises(
        CacheMismatchError, match=r"weights or input conversion: cache \w{12}, now \w{12}"
    ):
        build_cache(Counting(seed=1), ds, tmp_path, crops=1, topk=2, progress=False)


def test_unreadable_images_are_recorded_once_per_item(tmp_path: Path) -> None:
    from distill.data.cache import CachedDataset, ReplayableImages
    from distill.data.skipping import SkipBadReplays
    from tests.datagen import make_image_folder
    from tests.test_cache_teacher_cache import _dataset, _teacher

    make_image_folder(tmp_path / "img", classes=("a", "b"), per_class=2, size=(28, 24))
    (tmp_path / "img" / "a" / "0000_empty.jpg").write_bytes(b"")  # sorted first in a/
    images = _dataset(tmp_path / "img")
    ds = SkipBadReplays(images)
    bad = [p for p, _ in images.samples].index(str(tmp_path / "img" / "a" / "0000_empty.jpg"))
    ident = {**_identity(ds), "num_classes": 7}
    kw: dict[str, Any] = {"identity": ident, "crops": 3, "topk": 2, "progress": False}
    cache = build_or_reuse(_teacher(), ds, tmp_path / "c", **kw)
    assert cache.skipped.to_dict()["files"] == [
        {"path": images.samples[bad][0], "reason": "empty", "count": 1}  # not once per crop
    ]
    reopened = open_checked(tmp_path / "c", ident)
    assert reopened.skipped.to_dict() == cache.skipped.to_dict()
    # the stand-in (the next readable image) is what was cached, and what training replays
    replay = CachedDataset(ds, reopened)
    params = reopened.params(bad, 0)
    stand_in = ReplayableImages(images.samples[bad + 1 :], images.transform, root=images.root)
    assert torch.equal(replay[bad]["input"], stand_in.replay(0, params)["input"])


def test_teacher_cache_module_still_exports_everything() -> None:
    for name in cache_pkg.__all__:
        assert getattr(shim, name) is getattr(cache_pkg, name), name
    for name in ("_ARRAYS", "_Draws", "_LOGIT_FLOOR", "_teacher_logits", "draw_generator"):
        assert hasattr(shim, name), name
