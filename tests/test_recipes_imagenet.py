"""recipes/imagenet.py end to end on a generated ImageNet (meta.bin + train/val wnid folders).

The training split holds 12 good images plus a truncated, an empty, a grayscale and a CMYK file
(16 = 4 full batches of 4); validation has an RGBA PNG among its JPEGs. Teachers are tiny
MobileNetV1 `file:` checkpoints; the student is MobileNetV1 0.25 at 32 px.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from recipes.imagenet import main
from tests.datagen import (
    make_bad_images,
    make_hf_imagefolder,
    make_imagenet,
    make_webdataset_shards,
)
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


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("imagenet_recipe")
    root = base / "imagenet"
    make_imagenet(root, n_classes=3, per_class=4, val_per_class=2, size=32)
    bad = make_bad_images(base / "bad", size=24)
    for key in ("truncated", "empty", "grayscale", "cmyk"):
        shutil.copy(bad[key], root / "train" / WNID / f"{WNID}_{key}.JPEG")
    shutil.copy(bad["rgba"], root / "val" / WNID / "ILSVRC2012_val_00000099.JPEG")
    return {
        "root": root,
        "teacher": save_teacher(base / "teacher3.safetensors", 3),
        "teacher5": save_teacher(base / "teacher5.safetensors", 5),
        "base": base,
    }


def recipe_args(
    data: dict[str, Path], out: Path, steps: int, teacher: str = "teacher"
) -> list[str]:
    return [
        "--data-dir",
        str(data["root"]),
        "--teacher",
        f"file:{data[teacher]}",
        "--teacher-options",
        TINY_TEACHER_OPTIONS,
        *tiny_args(out, steps=steps),
    ]


def assert_skip_report(stderr: str, metrics: dict[str, Any]) -> None:
    assert "skipped images:" in stderr
    for name in (f"{WNID}_truncated.JPEG", f"{WNID}_empty.JPEG"):
        assert name in stderr
    for converted in ("grayscale", "cmyk", "ILSVRC2012_val_00000099"):
        assert converted not in stderr  # converted to RGB, not skipped
    reasons = {Path(f["path"]).name: f["reason"] for f in metrics["skipped_images"]["files"]}
    assert reasons == {f"{WNID}_truncated.JPEG": "truncated", f"{WNID}_empty.JPEG": "empty"}


def test_single_process_train_resume_eval(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "run"
    # one epoch (4 steps) through `accelerate launch`: every bad file is met once
    r = ok(launch("imagenet.py", *recipe_args(data, out, 4), "--save-every", "2"))
    assert "resolved config (ImageNetConfig):" in r.stdout and "kd_weight: 0.5" in r.stdout
    m = check_run_dir(out, steps=4)
    assert set(m["metrics"]) == {"top1", "top5"} and set(m["teacher_metrics"]) == {"top1", "top5"}
    assert (m["role"], m["method"], m["dataset"], m["alpha"], m["resolution"]) == (
        "distilled",
        "kd",
        "imagenet",
        0.25,
        32,
    )
    assert_skip_report(r.stderr, m)

    # resume (in this process: the same code path, without a second interpreter start-up)
    assert main([*recipe_args(data, out, 6), "--resume", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "step_00000004" in printed
    m = check_run_dir(out, steps=6)
    assert m["epochs"] == pytest.approx(1.5)

    assert main([*recipe_args(data, out, 6), "--eval-only"]) == 0
    ev = read_json(out / "eval.json")
    assert ev["weights"].endswith("student.safetensors")
    assert set(ev["metrics"]) == {"top1", "top5"} and ev["teacher_metrics"]
    assert ev["metrics"] == m["metrics"]  # same weights, same data: same numbers


def test_two_processes_train_and_resume(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    r = ok(launch("imagenet.py", *recipe_args(data, out, 4), "--save-every", "2", processes=2))
    assert r.stdout.count("resolved config (ImageNetConfig):") == 1  # main process only
    m = check_run_dir(out, steps=4, processes=2)
    assert_skip_report(r.stderr, m)  # records from both ranks, gathered
    assert (out / "checkpoints" / "step_00000004" / "random_states_1.pkl").is_file()
    r = ok(launch("imagenet.py", *recipe_args(data, out, 5), "--resume", "latest", processes=2))
    assert "resumed from" in r.stdout and "step_00000004" in r.stdout
    check_run_dir(out, steps=5, processes=2)


def test_bad_input_gives_clear_errors(data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    def run(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().err

    # a missing data dir says which layout is expected
    args = recipe_args(data, tmp_path / "x", 1)
    args[1] = str(tmp_path / "nowhere")
    code, err = run(*args)
    assert code == 2 and "--data-dir does not exist" in err and "meta.bin" in err
    assert "Traceback" not in err

    # a teacher trained on another label set
    code, err = run(*recipe_args(data, tmp_path / "x", 1, teacher="teacher5"))
    assert code == 2
    assert "has 5 outputs but the dataset imagenet has 3 classes" in err

    if not torch.cuda.is_available():
        code, err = run(*recipe_args(data, tmp_path / "x", 1), "--gpu-pipeline", "on")
        assert code == 2 and "--gpu-pipeline on needs a CUDA device" in err

    # --strict-data turns the first unreadable image into an error naming it
    code, err = run(*recipe_args(data, tmp_path / "strict", 4), "--strict-data")
    assert code == 2 and "--strict-data" in err
    assert f"{WNID}_truncated.JPEG: truncated" in err or f"{WNID}_empty.JPEG: empty" in err


def test_hf_sources_and_wandb(
    data: dict[str, Path], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--dataset imagefolder (<dir>/<split>/metadata.csv, labels checked against the class
    count before training) logged to W&B (offline); --dataset webdataset --streaming."""
    from distill.tracking import read_wandb_run

    hf = data["base"] / "hf"
    if not hf.exists():
        make_hf_imagefolder(hf, n=8, n_classes=3, size=32)
    out = tmp_path / "hf_run"
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    hf_args = ["--dataset", "imagefolder", "--data-dir", str(hf), "--eval-split", "test"]
    teacher = ["--teacher", f"file:{data['teacher']}", "--teacher-options", TINY_TEACHER_OPTIONS]
    wandb = ["--report-to", "wandb", "--experiment", "hf_demo", "--channels-last"]
    assert main([*hf_args, *teacher, *tiny_args(out, steps=1), *wandb]) == 0
    assert read_json(out / "metrics.json")["dataset"] == "imagefolder"
    run = read_wandb_run(next((tmp_path / "wandb").glob("offline-run-*")), wait_s=20)
    assert (run["group"], run["job_type"]) == ("hf_demo", "distilled")
    assert {"kd", "alpha:0.25", "res:32"} <= set(run["tags"])
    assert run["name"] == "distilled-kd-mobilenet_v1-a0.25-r32-T1-w0.5-s0"
    assert run["config"]["recipe"]["channels_last"] is True

    shards = data["base"] / "shards"
    if not shards.exists():
        make_webdataset_shards(shards, n_shards=2, per_shard=4, prefix="train")
        make_webdataset_shards(shards, n_shards=1, per_shard=4, prefix="validation", seed=1)
    stream = ["--dataset", "webdataset", "--data-dir", str(shards), "--streaming"]
    out = tmp_path / "stream_run"
    assert main([*stream, *teacher, *tiny_args(out, steps=2), "--num-classes", "3"]) == 0
    assert read_json(out / "metrics.json")["steps"] == 2

    bad = tmp_path / "hf_bad"
    shutil.copytree(hf, bad)
    meta = bad / "train" / "metadata.csv"
    lines = meta.read_text().splitlines()
    file_name, _label, caption = lines[2].split(",")
    lines[2] = f"{file_name},7,{caption}"  # csv line 3: a label outside 0..2
    meta.write_text("\n".join(lines) + "\n")
    hf_args[3] = str(bad)
    capsys.readouterr()
    assert main([*hf_args, *teacher, *tiny_args(tmp_path / "hf_bad_run", steps=1)]) == 2
    err = capsys.readouterr().err
    assert "metadata.csv, line 3" in err and "label 7 is outside the class range" in err
