"""`--cache-teacher DIR` / `--teacher-cache DIR` in the face-attribute and FaceNet recipes, and a
temperature the cache cannot serve refused by the ImageNet recipe before training.

Generated CelebA (8 training faces), identity folders (12 faces) + LFW pairs, ImageNet (3
classes x 4 images); tiny MobileNetV1 `file:` teachers (40 attribute logits, a 32-d embedding,
3 classes). Builds and cached runs go through `main` in this process; each cached run has the
teacher file moved away, so it proves the teacher is never loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from distill.data.cache import TeacherCache
from tests.datagen import make_celeba, make_identity_folders, make_imagenet, make_lfw_pairs
from tests.test_cache_exact import as_version_1
from tests.test_recipes_common import TINY_TEACHER_OPTIONS, read_json, save_teacher, tiny_args


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache_recipes")


def _run_cached(main: Any, args: list[str], teacher: Path) -> dict[str, Any]:
    """Train from the cache with the teacher file moved away (a run that tried to load it
    would fail); metrics.json."""
    moved = teacher.with_suffix(".moved")
    teacher.rename(moved)
    try:
        assert main(args) == 0
    finally:
        moved.rename(teacher)
    out = Path(args[args.index("--output-dir") + 1])
    return read_json(out / "metrics.json")


# ------------------------------------------------------------------------- face attributes


def _args(root: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir", str(root), "--teacher", f"file:{teacher}",
        "--teacher-options", TINY_TEACHER_OPTIONS, *tiny_args(out, steps=2), *extra,
    ]  # fmt: skip


def test_face_attributes_cache_stores_40_logits_exactly(
    base: Path, tmp_path: Path, capsys: Any
) -> None:
    from recipes.face_attributes import main

    make_celeba(base / "celeba", n=12, size=(24, 30), splits=(8, 2, 2))
    teacher = save_teacher(base / "attributes.safetensors", 40)
    cache_dir = tmp_path / "cache"
    build = _args(base / "celeba", teacher, tmp_path / "unused", "--crops", "2")
    assert main([*build, "--cache-teacher", str(cache_dir)]) == 0
    assert "cached 8 images x 2 crops, 40 multilabel outputs" in capsys.readouterr().out
    cache = TeacherCache.open(cache_dir)
    assert (cache.kind, cache.num_classes, cache.crops) == ("multilabel", 40, 2)

    # the stored logits are the teacher's on the replayed crops (float32, not top-k)
    import teachers

    model = teachers.load(
        f"file:{teacher}", output="multilabel", arch="mobilenet_v1",
        model_kwargs={"alpha": 0.25, "resolution": 32},
    )  # fmt: skip
    faces = _replayable_faces(base / "celeba", model)
    for i in range(len(cache)):
        item = faces.replay(i, cache.params(i, 1))
        x, prepared = item.get("teacher_input", item["input"]), "teacher_input" in item
        with torch.no_grad():
            online = model(x[None], prepared=prepared).output[0]
        torch.testing.assert_close(cache.logits(i, 1), online, rtol=1e-5, atol=1e-5)

    cached = _args(base / "celeba", teacher, tmp_path / "run", "--teacher-cache", str(cache_dir))
    m = _run_cached(main, cached, teacher)
    assert m["teacher_metrics"] is None and m["method"] == "multilabel_kd"
    assert m["info_teacher_cache"]["kind"] == "multilabel"
    assert set(m["metrics"]) == {"mAP", "mean_acc"}

    assert main([*build, "--teacher-cache", str(cache_dir), "--stage", "teacher"]) == 2
    assert "are for --stage distill with multilabel_kd" in capsys.readouterr().err


def _replayable_faces(root: Path, teacher: Any) -> Any:
    """The recipe's replayable CelebA training set, rendering the teacher's view too."""
    from distill.data import CelebAFaces
    from distill.data.transforms import paired_views
    from recipes._cache import replayable
    from recipes.face_attributes import _FACE_CROP, FaceAttributesConfig

    cfg = FaceAttributesConfig(data_dir=str(root))
    train = CelebAFaces(root, "train")
    train.transform = paired_views(
        teacher, 32, train=True, **_FACE_CROP, scale=tuple(cfg.crop_scale)
    )
    return replayable(cfg, train)


# ------------------------------------------------------------------------------ FaceNet


def _facenet_args(base: Path, teacher: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data-dir", str(base / "faces"), "--lfw-dir", str(base / "lfw"),
        "--teacher", f"file:{teacher} output=embedding", "--teacher-options",
        TINY_TEACHER_OPTIONS, "--embedding-dim", "16", *tiny_args(out, steps=2), *extra,
    ]  # fmt: skip


def test_facenet_cache_stores_the_embeddings(base: Path, tmp_path: Path, capsys: Any) -> None:
    from recipes.facenet import main

    make_identity_folders(base / "faces", n_identities=3, per_identity=4, size=40)
    make_lfw_pairs(base / "lfw", n_people=4, images_per_person=3, n_folds=2, pairs_per_fold=3)
    teacher = save_teacher(base / "embedder.safetensors", 32)
    cache_dir = tmp_path / "cache"
    build = _facenet_args(base, teacher, tmp_path / "unused", "--crops", "2")
    assert main([*build, "--cache-teacher", str(cache_dir)]) == 0
    assert "cached 12 images x 2 crops, 32 embedding outputs" in capsys.readouterr().out
    cache = TeacherCache.open(cache_dir)
    assert (cache.kind, cache.num_classes, cache.tail) == ("embedding", 32, None)

    cached = _facenet_args(base, teacher, tmp_path / "run", "--teacher-cache", str(cache_dir))
    m = _run_cached(main, cached, teacher)  # the 32-d teacher size comes from the cache
    assert m["teacher_metrics"] is None and m["info_teacher_cache"]["kind"] == "embedding"
    assert "verification_acc" in m["metrics"]

    # a cache of another teacher is refused, naming it
    other = save_teacher(tmp_path / "other.safetensors", 32, seed=1)
    assert main(_facenet_args(base, other, tmp_path / "x", "--teacher-cache", str(cache_dir))) == 2
    assert "other.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------ ImageNet, temperatures


def test_imagenet_recipe_refuses_a_temperature_the_cache_cannot_serve(
    base: Path, tmp_path: Path, capsys: Any
) -> None:
    from recipes.imagenet import main

    make_imagenet(base / "imagenet", n_classes=3, per_class=4, val_per_class=2, size=32)
    teacher = save_teacher(base / "classes.safetensors", 3)

    def args(out: Path, *extra: str) -> list[str]:
        return _args(base / "imagenet", teacher, out, "--topk", "2", *extra)

    cache_dir = tmp_path / "cache"
    assert main(args(tmp_path / "unused", "--cache-teacher", str(cache_dir))) == 0
    capsys.readouterr()
    # the default cache (8-bit tail) serves every temperature
    assert main(args(tmp_path / "t4", "--teacher-cache", str(cache_dir), "--temperature", "4")) == 0
    # a format-version-1 cache (the tail's mass at T = 1 only) serves T = 1 alone
    old = tmp_path / "v1"
    as_version_1(cache_dir, old)
    assert main(args(tmp_path / "old", "--teacher-cache", str(old), "--temperature", "4")) == 2
    err = capsys.readouterr().err
    assert "serves temperature 1 only, but training uses temperature 4" in err
    assert "rebuild the cache: the same command with --cache-teacher DIR" in err
    assert not (tmp_path / "old" / "metrics.json").exists()
    assert main(args(tmp_path / "old1", "--teacher-cache", str(old), "--temperature", "1")) == 0
