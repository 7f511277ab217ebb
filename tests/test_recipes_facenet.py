"""recipes/facenet.py: embedding distillation on identity folders, evaluated on LFW pairs.

Training data: 3 identity folders of 4 aligned crops, one of them truncated (12 files = 3 full
batches of 4). Evaluation: LFW (`lfw-py/lfw_funneled/` + tab-separated `pairs.txt`, 2 folds of 3
matched + 3 mismatched pairs). The teacher is a tiny MobileNetV1 `file:` checkpoint whose 32-d
head serves as the embedding; the student's is 16-d, so the loss learns a projection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from recipes.facenet import main
from tests.datagen import make_bad_images, make_identity_folders, make_lfw_pairs
from tests.test_recipes_common import (
    TINY_TEACHER_OPTIONS,
    check_run_dir,
    launch,
    ok,
    read_json,
    save_teacher,
    tiny_args,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("facenet_recipe")
    ids = make_identity_folders(base / "faces", n_identities=3, per_identity=4, size=40)
    bad = make_bad_images(base / "bad", size=24)
    broken = Path(ids["paths"][5])
    broken.write_bytes(bad["truncated"].read_bytes())
    make_lfw_pairs(base / "lfw", n_people=4, images_per_person=3, n_folds=2, pairs_per_fold=3)
    return {
        "faces": base / "faces",
        "lfw": base / "lfw",
        "broken": broken,
        "teacher": save_teacher(base / "embedder.safetensors", 32),
        "base": base,
    }


EMBEDDING_METRICS = {
    "verification_acc",
    "val_at_far_1e-3",
    "val_at_far_1e-3_far_reached",
    "tar_at_far_1e-4",
}


def recipe_args(data: dict[str, Path], out: Path, steps: int) -> list[str]:
    return [
        "--data-dir",
        str(data["faces"]),
        "--lfw-dir",
        str(data["lfw"]),
        "--teacher",
        f"file:{data['teacher']} output=embedding",
        "--teacher-options",
        TINY_TEACHER_OPTIONS,
        "--embedding-dim",
        "16",
        *tiny_args(out, steps=steps),
    ]


def test_single_process_train_resume_eval(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "run"
    r = ok(launch("facenet.py", *recipe_args(data, out, 3), "--save-every", "3"))
    assert "resolved config (FaceNetConfig):" in r.stdout
    m = check_run_dir(out, steps=3)
    assert set(m["metrics"]) == EMBEDDING_METRICS
    assert m["primary_metric"] == "verification_acc" and m["teacher_metrics"]
    assert (m["role"], m["method"], m["temperature"], m["kd_weight"]) == (
        "distilled",
        "embedding",
        None,
        None,
    )
    assert [f["reason"] for f in m["skipped_images"]["files"]] == ["truncated"]
    assert data["broken"].name in r.stderr

    assert main([*recipe_args(data, out, 4), "--resume", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out
    check_run_dir(out, steps=4)
    assert main([*recipe_args(data, out, 4), "--eval-only"]) == 0
    ev = read_json(out / "eval.json")
    assert set(ev["metrics"]) == EMBEDDING_METRICS


def test_two_processes_train_and_resume(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    ok(launch("facenet.py", *recipe_args(data, out, 2), "--save-every", "1", processes=2))
    check_run_dir(out, steps=2, processes=2)
    r = ok(launch("facenet.py", *recipe_args(data, out, 3), "--resume", "latest", processes=2))
    assert "resumed from" in r.stdout
    check_run_dir(out, steps=3, processes=2)


def test_bad_input(data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    # a classifier is not an embedding teacher
    args = recipe_args(data, tmp_path / "x", 1)
    args[5] = f"file:{data['teacher']}"
    assert main(args) == 2
    assert "outputs logits, but this recipe distils embeddings" in capsys.readouterr().err

    # pairs.txt naming an image that is not there: file and line
    lfw = tmp_path / "lfw"
    make_lfw_pairs(lfw, n_people=4, images_per_person=3, n_folds=2, pairs_per_fold=3)
    pairs = lfw / "lfw-py" / "pairs.txt"
    lines = pairs.read_text().splitlines()
    name, i, _j = lines[1].split("\t")
    lines[1] = f"{name}\t{i}\t9"
    pairs.write_text("\n".join(lines) + "\n")
    args = recipe_args(data, tmp_path / "y", 1)
    args[3] = str(lfw)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "pairs.txt, line 2: references" in err and "_0009.jpg, which does not exist" in err

    # a missing data dir shows the identity-folder layout
    args = recipe_args(data, tmp_path / "z", 1)
    args[1] = str(tmp_path / "nowhere")
    assert main(args) == 2
    assert "<root>/<identity>/0001_01.jpg" in capsys.readouterr().err


# ------------------------------------------------------------------------- LFW face crop


def _framed_faces(lfw_root: Path, inner: float = 0.7) -> None:
    """Rewrite every LFW image as 250x250 (the funneled size): a red frame around a green centre
    covering `inner` of each side, standing in for background around the face."""
    from PIL import Image, ImageDraw

    lo = round(250 * (1 - inner) / 2)
    for path in (lfw_root / "lfw-py" / "lfw_funneled").rglob("*.jpg"):
        img = Image.new("RGB", (250, 250), (255, 0, 0))
        ImageDraw.Draw(img).rectangle([lo, lo, 249 - lo, 249 - lo], fill=(0, 255, 0))
        img.save(path, quality=95)


def _red_fraction(data: dict[str, Path], lfw: Path, out: Path, *extra: str) -> float:
    """Fraction of red (frame) pixels in the first evaluation batch the recipe builds."""
    from distill.data import IMAGENET_MEAN, IMAGENET_STD
    from recipes._config import parse_config
    from recipes._run import Context
    from recipes.facenet import FaceNetConfig, build

    args = recipe_args(data, out, 1)
    args[3] = str(lfw)
    cfg, _ = parse_config(FaceNetConfig, [*args, *extra])
    built = build(cfg, Context(cfg, None, 4, 4))
    x = next(iter(built.eval_loader))["input"]  # (B, 3, 32, 32), ImageNet-normalised
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    rgb = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + mean
    return float(((rgb[:, 0] > 0.5) & (rgb[:, 1] < 0.5)).float().mean())


def test_lfw_is_evaluated_on_the_central_face_crop(data: dict[str, Path], tmp_path: Path) -> None:
    from recipes.facenet import LFW_FACE_CROP, FaceNetConfig

    lfw = tmp_path / "lfw250"
    make_lfw_pairs(lfw, n_people=4, images_per_person=3, n_folds=2, pairs_per_fold=3, size=250)
    _framed_faces(lfw)
    assert FaceNetConfig().lfw_crop == LFW_FACE_CROP == 0.58
    # default: the central 58% (145 px) lies inside the 70% green centre: no frame left
    assert _red_fraction(data, lfw, tmp_path / "a") == 0.0
    # --lfw-crop 1: the whole 250x250 image, frame included (about half the area)
    assert _red_fraction(data, lfw, tmp_path / "b", "--lfw-crop", "1") > 0.3


def test_lfw_crop_is_validated(data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    assert main([*recipe_args(data, tmp_path / "x", 1), "--lfw-crop", "0"]) == 2
    assert "lfw_crop must be in (0, 1], got 0" in capsys.readouterr().err
