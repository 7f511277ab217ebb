"""Offline distillation through recipes/imagenet.py: `--cache-teacher DIR` then `--teacher-cache DIR`.

Generated ImageNet (meta.bin + wnid folders, 3 classes x 4 images + one truncated JPEG that is
skipped), a tiny MobileNetV1 `file:` teacher. The cache is built once through `accelerate
launch`; the teacher file is then moved away, so every cached run proves it never reads it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from recipes.imagenet import main
from tests.datagen import make_bad_images, make_imagenet
from tests.test_recipes_common import (
    TINY_TEACHER_OPTIONS,
    check_run_dir,
    launch,
    ok,
    read_json,
    save_teacher,
    tiny_args,
)

WNID = "n01440764"


def args(data: dict[str, Path], out: Path, *extra: str, teacher: str = "") -> list[str]:
    return [
        "--data-dir",
        str(data["root"]),
        "--teacher",
        teacher or f"file:{data['teacher']}",
        "--teacher-options",
        TINY_TEACHER_OPTIONS,
        *tiny_args(out, steps=2),
        *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("recipe_cache")
    root = base / "imagenet"
    make_imagenet(root, n_classes=3, per_class=4, val_per_class=2, size=32)
    bad = make_bad_images(base / "bad", size=24)
    shutil.copy(bad["truncated"], root / "train" / WNID / f"{WNID}_truncated.JPEG")
    teacher = save_teacher(base / "teacher.safetensors", 3)
    d = {"root": root, "teacher": teacher, "cache": base / "cache", "base": base}
    build = args(d, base / "unused", "--cache-teacher", str(d["cache"]), "--crops", "2")
    d["build_out"] = base / "build.log"
    r = ok(launch("imagenet.py", *build, "--topk", "2"))
    d["build_out"].write_text(r.stdout + "\n" + r.stderr)
    teacher.rename(base / "teacher.moved")  # a cached run that tried to load it would fail
    return d


def test_build_then_train_without_the_teacher(
    data: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.data.teacher_cache import CachedDataset, TeacherCache

    log = data["build_out"].read_text()
    assert "cached 13 images x 2 crops, top-2 of 3 classes" in log
    assert f"{WNID}_truncated.JPEG" in log  # skipped (and replaced) while caching, reported
    assert not (data["base"] / "unused" / "metrics.json").exists()  # caching trains nothing
    cache = TeacherCache.open(data["cache"])
    assert (len(cache), cache.crops, cache.topk, cache.num_classes) == (13, 2, 2, 3)
    built = read_json(data["cache"] / "recipe.json")
    assert built["identity"]["transform"]["student"]["resolution"] == 32
    assert not data["teacher"].exists()

    draws: set[tuple[int, int]] = set()
    draw_for = CachedDataset.draw_for

    def recording(self: CachedDataset, index: int) -> int:
        draws.add((self.epoch, draw_for(self, index)))
        return draw_for(self, index)

    monkeypatch.setattr(CachedDataset, "draw_for", recording)
    out = tmp_path / "run"
    # 13 images, batches of 4: 3 steps per epoch, so 6 steps are 2 epochs
    assert main(args(data, out, "--teacher-cache", str(data["cache"]), "--max-steps", "6")) == 0
    assert draws == {(0, 0), (1, 1)}  # epoch e replays the crop cached as draw e mod K
    m = check_run_dir(out, steps=6)
    assert m["teacher_metrics"] is None  # the teacher is never loaded, not even to evaluate it
    assert set(m["metrics"]) == {"top1", "top5"}
    assert (m["role"], m["method"]) == ("distilled", "kd")
    assert m["teacher"] == cache.manifest["teacher_meta"]["name"]  # as an online run names it
    assert m["info_teacher_cache"]["digest"] == cache.fingerprint.digest


def test_stale_cache_is_refused_naming_what_changed(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    cached = ["--teacher-cache", str(data["cache"])]

    def refused(*extra: str, teacher: str = "") -> str:
        out = tmp_path / "stale"
        assert main(args(data, out, *cached, *extra, teacher=teacher)) == 2
        assert not (out / "metrics.json").exists()
        err = capsys.readouterr().err
        assert "was built for a different" in err and "Traceback" not in err
        return err

    err = refused("--resolution", "64")
    assert "training transform" in err and "student.resolution: cache 32, now 64" in err
    err = refused("--limit-train", "8")
    assert "training images" in err and "cache 13 images, now 8" in err
    err = refused(teacher=f"file:{data['base'] / 'other.safetensors'}")
    assert "teacher (--teacher spec" in err and "other.safetensors" in err


def test_tampered_shard_is_refused(data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    bad = tmp_path / "tampered"
    shutil.copytree(data["cache"], bad)
    shard = bad / "shard_00000.values.npy"
    arr = np.load(shard)
    arr[0, 0, 0] += 1  # one soft target, changed in place: same size, different bytes
    np.save(shard, arr)
    assert main(args(data, tmp_path / "run", "--teacher-cache", str(bad))) == 2
    err = capsys.readouterr().err
    assert "shard_00000.values.npy does not match the checksum" in err and "--cache-teacher" in err


def test_flag_conflicts_and_missing_cache(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    both = ["--cache-teacher", str(tmp_path / "c"), "--teacher-cache", str(data["cache"])]
    assert main(args(data, tmp_path / "x", *both)) == 2
    assert "exclude each other" in capsys.readouterr().err
    ce = ["--teacher-cache", str(data["cache"]), "--method", "ce"]
    assert main(args(data, tmp_path / "x", *ce)) == 2
    assert "method ce uses no teacher" in capsys.readouterr().err
    assert main(args(data, tmp_path / "x", "--teacher-cache", str(tmp_path / "none"))) == 2
    err = capsys.readouterr().err
    assert "no teacher cache there" in err and "--cache-teacher" in err


def test_cache_teacher_cli_help_points_to_the_recipes(capsys: Any) -> None:
    from distill.cli.cache_teacher import main as cli

    with pytest.raises(SystemExit):
        cli(["--help"])
    assert "--cache-teacher DIR --crops K --topk k" in capsys.readouterr().out


def test_two_processes_build_refused_train_allowed(data: dict[str, Path], tmp_path: Path) -> None:
    build = args(data, tmp_path / "x", "--cache-teacher", str(tmp_path / "c2"))
    r = launch("imagenet.py", *build, processes=2)
    assert r.returncode != 0
    assert "--cache-teacher builds the cache in one process, but 2 were launched" in r.stderr
    assert not (tmp_path / "c2").exists()
    out = tmp_path / "ddp"
    ok(launch("imagenet.py", *args(data, out, "--teacher-cache", str(data["cache"])), processes=2))
    m = check_run_dir(out, steps=2, processes=2)
    assert m["teacher_metrics"] is None
