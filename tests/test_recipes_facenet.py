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
    assert set(m["metrics"]) == {"verification_acc", "tar_at_far_1e-4"}
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
    assert set(ev["metrics"]) == {"verification_acc", "tar_at_far_1e-4"}


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
