"""recipes/sweep.py: the alpha x resolution grid over a real recipe, skip/resume, W&B config.

The end-to-end test runs recipes/imagenet.py through `accelerate launch` on a generated
ImageNet (meta.bin + wnid folders) with a tiny `file:` teacher, on a 2 x 1 grid.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from recipes.sweep import (
    Cell,
    SweepError,
    check_passthrough,
    main,
    plan,
    recipe_script,
    wandb_sweep_config,
)
from tests.conftest import ROOT, launch_env
from tests.datagen import make_imagenet
from tests.test_recipes_common import TINY_TEACHER_OPTIONS, save_teacher

SWEEP = ROOT / "recipes" / "sweep.py"
LAUNCH_ARGS = "--cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"


def recipe_flags(data: Path, teacher: Path, steps: int) -> list[str]:
    return [
        "--data-dir", str(data), "--teacher", f"file:{teacher}",
        "--teacher-options", TINY_TEACHER_OPTIONS, "--batch-size", "4",
        "--max-steps", str(steps), "--save-every", "1", "--workers", "0",
        "--log-every", "1", "--progress", "false", "--mixed-precision", "no",
    ]  # fmt: skip


def sweep(out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(SWEEP), "--recipe", "imagenet", "--method", "kd",
           "--output-dir", str(out), "--alphas", "0.25", "0.5", "--resolutions", "32",
           "--launch-args", LAUNCH_ARGS, *args]  # fmt: skip
    return subprocess.run(
        cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_grid_runs_real_recipe_skips_finished_and_resumes_interrupted(tmp_path: Path) -> None:
    from distill.tracking import read_metrics_json
    from recipes.imagenet import main as imagenet_main

    data = tmp_path / "imagenet"
    make_imagenet(data, n_classes=3, per_class=4, val_per_class=2, size=32)
    teacher = save_teacher(tmp_path / "teacher.safetensors", 3)
    out = tmp_path / "sweep"

    # an interrupted cell: checkpoints up to step 2, no metrics.json
    cut = out / "kd-a0.5-r32"
    flags = recipe_flags(data, teacher, 2)
    args = [*flags, "--method", "kd", "--alpha", "0.5", "--resolution", "32"]
    assert imagenet_main([*args, "--output-dir", str(cut)]) == 0
    (cut / "metrics.json").unlink()
    assert [c.state for c in plan([0.25, 0.5], [32], "kd", out)] == ["todo", "resume"]

    r = sweep(out, "--", *recipe_flags(data, teacher, 3))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 finished before, 1 to resume" in r.stdout
    assert "--resume latest" in r.stdout and "resumed from" in r.stdout
    for alpha in (0.25, 0.5):
        m = read_metrics_json(out / f"kd-a{alpha:g}-r32" / "metrics.json")
        assert (m["alpha"], m["resolution"], m["method"], m["steps"]) == (alpha, 32, "kd", 3)
    html = (out / "report.html").read_text()
    assert "kd-a0.25-r32" in html or "a0.25" in html

    # everything finished: nothing is launched, the report is rewritten
    (out / "report.html").unlink()
    r = sweep(out, "--", *recipe_flags(data, teacher, 3))
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("[skip]") == 2 and "[run" not in r.stdout
    assert (out / "report.html").is_file()

    # a failing cell stops the sweep with a message saying how to continue (the plain
    # interpreter as launcher: one process start instead of accelerate's two)
    shutil.rmtree(out / "kd-a0.25-r32")
    r = sweep(out, "--launcher", "python", "--", *recipe_flags(tmp_path / "missing", teacher, 3))
    assert r.returncode == 1
    assert "[fail] kd-a0.25-r32" in r.stderr and "run the same command again" in r.stderr


def test_plan_cells_and_commands(tmp_path: Path, capsys: Any) -> None:
    from distill.tracking import RunInfo, write_metrics_json

    done = tmp_path / "ce-a1-r224"
    info = RunInfo(experiment="s", role="scratch", method="ce", student="mobilenet_v1",
                   dataset="imagenet", alpha=1.0, resolution=224)  # fmt: skip
    write_metrics_json(done / "metrics.json", info, metrics={"top1": 70.0}, mult_adds=1, params=1)
    cells = plan([1.0, 0.5], [224, 128], "ce", tmp_path)
    assert [(c.cell.name, c.state) for c in cells] == [
        ("ce-a1-r224", "done"),
        ("ce-a1-r128", "todo"),
        ("ce-a0.5-r224", "todo"),
        ("ce-a0.5-r128", "todo"),
    ]
    assert Cell(0.75, 160, None).name == "a0.75-r160"

    # a folder holding another cell's run is an error, not a silent skip
    wrong = RunInfo(**{**info.__dict__, "alpha": 0.25})
    write_metrics_json(tmp_path / "ce-a0.5-r128" / "metrics.json", wrong, metrics={"top1": 1.0},
                       mult_adds=1, params=1)  # fmt: skip
    with pytest.raises(SweepError, match=r"alpha 0\.25"):
        plan([0.5], [128], "ce", tmp_path)

    with pytest.raises(SweepError, match="--alpha, --output-dir"):
        check_passthrough(["--data-dir", "x", "--alpha=1", "--output-dir", "y"])
    with pytest.raises(SweepError, match="face_attributes, facenet, imagenet"):
        recipe_script("imagenett")
    assert recipe_script("facenet") == ROOT / "recipes" / "facenet.py"

    assert main(["--recipe", "imagenet", "--output-dir", str(tmp_path / "n"), "--dry-run",
                 "--alphas", "0.25", "--resolutions", "160", "--", "--data-dir", "d"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "accelerate.commands.launch" in printed and "recipes/imagenet.py --data-dir d" in printed
    assert "--alpha 0.25 --resolution 160 --output-dir" in printed
    assert not (tmp_path / "n").exists()  # a dry run writes nothing


def test_wandb_sweep_config_is_a_grid_over_the_paper_cells(tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "s"
    code = main(["--recipe", "face_attributes", "--method", "multilabel_kd", "--output-dir",
                 str(out), "--wandb-sweep", "--", "--data-dir", "/data/celeba"])  # fmt: skip
    assert code == 0
    cfg = yaml.safe_load((out / "sweep.yaml").read_text())
    assert cfg["method"] == "grid" and cfg["program"] == "recipes/sweep.py"
    assert cfg["parameters"]["alpha"]["values"] == [1.0, 0.75, 0.5, 0.25]
    assert cfg["parameters"]["resolution"]["values"] == [224, 192, 160, 128]
    assert cfg["metric"] == {"name": "eval/mAP", "goal": "maximize"}
    cmd = cfg["command"]
    assert cmd[:3] == ["${env}", "${interpreter}", "${program}"]
    assert cmd[cmd.index("${args}") + 1 :] == ["--", "--data-dir", "/data/celeba"]
    assert "wandb agent" in capsys.readouterr().out
    # the agent's call (`--alpha=A --resolution=R` from ${args}) plans exactly one cell
    assert (
        wandb_sweep_config("imagenet", out, [], alphas=[1], resolutions=[224], method=None)[
            "metric"
        ]["name"]
        == "eval/top1"
    )
    assert main(["--recipe", "imagenet", "--output-dir", str(out), "--alpha=0.5",
                 "--resolution=128", "--dry-run", "--", "--data-dir", "d"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "1 cells" in printed and "--alpha 0.5 --resolution 128" in printed
