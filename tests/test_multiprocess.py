"""Two gloo ranks: the student a run evaluates is the one it saves (BatchNorm statistics
synchronised), `evaluate()` and a second `fit()` work after `fit()`, and a non-finite loss on
one rank stops every rank, naming the step and the rank."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, accelerate_cmd, launch_env
from tests.datagen import make_celeba, make_identity_folders, make_imagenet, make_lfw_pairs
from tests.test_recipes_common import (
    TINY_TEACHER_OPTIONS,
    launch,
    ok,
    read_json,
    save_teacher,
    tiny_args,
)

SCRIPT = ROOT / "tests" / "scripts" / "ddp_fit.py"


def ddp(out: Path, *extra: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    cmd = accelerate_cmd(SCRIPT, str(out), *extra, processes=2)
    return subprocess.run(
        cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_evaluate_and_a_second_fit_after_fit(tmp_path: Path) -> None:
    r = ddp(tmp_path / "run", "--after-fit")
    assert r.returncode == 0, r.stderr[-4000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    # every rank evaluates the saved student: the same numbers as the run's own final evaluation
    assert result["evaluate"] == result["fit"] == result["metrics_json"]
    assert result["second_fit_steps"] == 2 * result["first_fit_steps"]


def test_a_nonfinite_loss_on_one_rank_stops_both(tmp_path: Path) -> None:
    r = ddp(tmp_path / "run", "--poison-rank", "1", "--poison-step", "3", timeout=180)
    assert r.returncode != 0
    assert "loss became non-finite at step 3 (parts: loss, kd) on rank 1 of 2" in r.stderr
    assert r.stderr.count("loss became non-finite at step 3") == 2  # both ranks stopped


def _same_after_eval_only(script: str, args: list[str], out: Path) -> None:
    """Train on 2 ranks, then `--eval-only` on 2 ranks from the saved student: same numbers."""
    ok(launch(script, *args, processes=2))
    trained = read_json(out / "metrics.json")["metrics"]
    ok(launch(script, *args, "--eval-only", processes=2))
    assert read_json(out / "eval.json")["metrics"] == trained


def test_imagenet_final_metric_equals_eval_only_of_the_saved_student(tmp_path: Path) -> None:
    root = tmp_path / "imagenet"
    make_imagenet(root, n_classes=3, per_class=8, val_per_class=4, size=32)
    teacher = save_teacher(tmp_path / "t.safetensors", 3)
    out = tmp_path / "run"
    args = [
        "--data-dir", str(root), "--teacher", f"file:{teacher}",
        "--teacher-options", TINY_TEACHER_OPTIONS, *tiny_args(out, steps=3),
    ]  # fmt: skip
    _same_after_eval_only("imagenet.py", args, out)


@pytest.mark.slow
def test_face_attributes_final_metric_equals_eval_only(tmp_path: Path) -> None:
    from recipes.face_attributes import main

    make_celeba(tmp_path / "data", n=16, size=(24, 30), splits=(8, 4, 4))
    teacher_run = tmp_path / "teacher"
    teacher = "torchvision:mobilenet_v3_small weights=none input_size=32"
    stage = ["--stage", "teacher", "--data-dir", str(tmp_path / "data"), "--teacher", teacher]
    assert main([*stage, *tiny_args(teacher_run, steps=1)]) == 0
    out = tmp_path / "run"
    weights = teacher_run / "student.safetensors"
    args = [
        "--data-dir", str(tmp_path / "data"),
        "--teacher", f"file:{weights} arch=torchvision:mobilenet_v3_small input_size=32",
        *tiny_args(out, steps=3),
    ]  # fmt: skip
    _same_after_eval_only("face_attributes.py", args, out)


@pytest.mark.slow
def test_facenet_final_metric_equals_eval_only(tmp_path: Path) -> None:
    make_identity_folders(tmp_path / "faces", n_identities=3, per_identity=4, size=40)
    make_lfw_pairs(tmp_path / "lfw", n_people=4, images_per_person=3, n_folds=2, pairs_per_fold=4)
    teacher = save_teacher(tmp_path / "embedder.safetensors", 32)
    out = tmp_path / "run"
    args = [
        "--data-dir", str(tmp_path / "faces"), "--lfw-dir", str(tmp_path / "lfw"),
        "--teacher", f"file:{teacher} output=embedding", "--teacher-options", TINY_TEACHER_OPTIONS,
        "--embedding-dim", "16", *tiny_args(out, steps=3),
    ]  # fmt: skip
    _same_after_eval_only("facenet.py", args, out)
    shutil.rmtree(out / "checkpoints")
