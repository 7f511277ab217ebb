"""Recipe plumbing: config parsing (YAML + flags, every problem at once), teacher specs, the LR
schedule, bad-file skipping across processes, and the batched JPEG loader on the CPU.

Also holds the helpers the per-recipe tests share (`launch`, `save_teacher`, `tiny_args`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, accelerate_cmd, launch_env
from tests.datagen import make_bad_images, make_image_folder

CONFIGS = ROOT / "recipes" / "configs"


# ----------------------------------------------------------------------------- shared helpers


def launch(script: str, *args: str, processes: int = 1, timeout: int = 300) -> Any:
    """`accelerate launch recipes/<script> args` on the CPU (1 process, or 2 gloo ranks)."""
    cmd = accelerate_cmd(ROOT / "recipes" / script, *args, processes=processes)
    return subprocess.run(
        cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def ok(result: Any) -> Any:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def save_teacher(path: Path, num_classes: int, seed: int = 0) -> Path:
    """A tiny MobileNetV1 (alpha 0.25, 32 px) saved as safetensors, for `file:` teachers."""
    from safetensors.torch import save_file

    from distill.models import create_student

    torch.manual_seed(seed)
    model = create_student("mobilenet_v1", alpha=0.25, resolution=32, num_classes=num_classes)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


TINY_TEACHER_OPTIONS = "{arch: mobilenet_v1, model_kwargs: {alpha: 0.25, resolution: 32}}"


def tiny_args(out: Path, *, steps: int = 2) -> list[str]:
    """Settings every recipe test shares: tiny student, batch 4, no workers, no progress bar."""
    return [
        "--output-dir",
        str(out),
        "--student",
        "mobilenet_v1",
        "--alpha",
        "0.25",
        "--resolution",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        str(steps),
        "--workers",
        "0",
        "--log-every",
        "1",
        "--progress",
        "false",
        "--mixed-precision",
        "no",
    ]


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def check_run_dir(out: Path, steps: int, processes: int = 1) -> dict[str, Any]:
    """What every finished run leaves behind; returns metrics.json (schema-checked)."""
    from distill.tracking import read_metrics_json

    assert (out / "student.safetensors").is_file()
    assert (out / "config.json").is_file()
    assert "recipe" in read_json(out / "config.json")  # the resolved recipe config is logged
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts and ckpts[-1] == f"step_{steps:08d}"
    metrics = read_metrics_json(out / "metrics.json")
    assert metrics["steps"] == steps and metrics["num_processes"] == processes
    assert metrics["metrics"] and metrics["mult_adds"] and metrics["params"]
    return metrics


# ----------------------------------------------------------------------------- config


def test_flags_override_yaml_and_yaml_only_sets_values(tmp_path: Path) -> None:
    from recipes._config import parse_config
    from recipes.imagenet import ImageNetConfig

    cfg, _ = parse_config(
        ImageNetConfig,
        [
            "--config",
            str(CONFIGS / "imagenet_kd.yaml"),
            "--data-dir",
            str(tmp_path),
            "--lr",
            "0.05",
            "--lr-steps",
            "2,4",
            "--channels-last",
            "false",
            "--resume",
            "--max-steps",
            "none",
            "--teacher-options",
            "{input_size: 64}",
        ],
    )
    assert cfg.lr == 0.05 and cfg.lr_steps == [2, 4]  # flags win
    assert cfg.batch_size == 512 and cfg.kd_weight == 0.5 and cfg.temperature == 1.0  # YAML
    assert cfg.channels_last is False and cfg.resume == "latest" and cfg.max_steps is None
    assert cfg.teacher_options == {"input_size": 64}


@pytest.mark.parametrize(
    ("module", "config"),
    [
        ("imagenet", "imagenet_kd.yaml"),
        ("imagenet", "imagenet_dkd.yaml"),
        ("face_attributes", "face_attributes_teacher.yaml"),
        ("face_attributes", "face_attributes.yaml"),
        ("facenet", "facenet.yaml"),
    ],
)
def test_shipped_configs_are_valid(module: str, config: str) -> None:
    import importlib

    from recipes._config import RecipeConfig, parse_config

    mod = importlib.import_module(f"recipes.{module}")
    cls = next(
        v
        for v in vars(mod).values()
        if isinstance(v, type) and issubclass(v, RecipeConfig) and v.__module__ == mod.__name__
    )
    extra = ["--lfw-dir", "/l"] if module == "facenet" else []
    cfg, _ = parse_config(cls, ["--config", str(CONFIGS / config), "--data-dir", "/d", *extra])
    assert cfg.teacher and cfg.epochs >= 10


def test_published_imagenet_setting() -> None:
    from recipes._config import parse_config
    from recipes.imagenet import ImageNetConfig

    kd, _ = parse_config(
        ImageNetConfig, ["--config", str(CONFIGS / "imagenet_kd.yaml"), "--data-dir", "/d"]
    )
    dkd, _ = parse_config(
        ImageNetConfig, ["--config", str(CONFIGS / "imagenet_dkd.yaml"), "--data-dir", "/d"]
    )
    for c in (kd, dkd):
        assert (c.epochs, c.batch_size, c.lr, c.momentum, c.weight_decay) == (
            100,
            512,
            0.2,
            0.9,
            1e-4,
        )
        assert c.lr_steps == [30, 60, 90] and c.teacher and "IMAGENET1K_V1" in c.teacher
        assert (c.student, c.alpha, c.resolution, c.temperature) == ("mobilenet_v1", 1, 224, 1)
    assert kd.method == "kd" and kd.kd_weight == 0.5
    assert dkd.method == "dkd" and (dkd.method_args["alpha"], dkd.method_args["beta"]) == (1, 2)
    text = (CONFIGS / "imagenet_kd.yaml").read_text()
    assert "70.50%" in text and "68.87%" in text and "72.05%" in text


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    from distill.config import ConfigError
    from recipes._config import parse_config
    from recipes.imagenet import ImageNetConfig

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: many\nbatch_sise: 4\ntemperature: 0\n")
    with pytest.raises(ConfigError) as info:
        parse_config(
            ImageNetConfig,
            [
                "--config",
                str(bad_yaml),
                "--data-dir",
                str(tmp_path),
                "--kd-weight",
                "1.5",
                "--alpha",
                "-1",
                "--resolution",
                "16",
                "--batch-size",
                "0",
                "--method",
                "fitnets",
                "--tempreture",
                "2",
            ],
        )
    text = str(info.value)
    for needle in (
        "epochs: expected int, got 'many'",
        "unknown key 'batch_sise'",
        "temperature must be > 0",
        "kd_weight must be in [0, 1]",
        "alpha (width multiplier) must be in (0, 4]",
        "resolution must be >= 32",
        "batch_size must be >= 1",
        "method must be one of ce, kd, dkd, dist, ",
        "unknown option '--tempreture' (did you mean --temperature?)",
    ):
        assert needle in text, f"{needle!r} missing from:\n{text}"


def test_config_errors_exit_2_without_traceback(tmp_path: Path) -> None:
    """A real process: bad values are listed on stderr before torch is even imported."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "recipes" / "facenet.py"),
            "--data-dir",
            str(tmp_path),
            "--batch-size",
            "0",
            "--temperature",
            "-2",
        ],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "batch_size must be >= 1" in result.stderr
    assert "temperature must be > 0" in result.stderr
    assert "lfw_dir: set --lfw-dir" in result.stderr


def test_teacher_spec_options() -> None:
    from recipes._config import parse_teacher

    spec, kw = parse_teacher(
        "file:/w/t.safetensors arch=torchvision:resnet50 num_classes=40 weights=none",
        {"num_classes": 3, "input_size": 64},
    )
    assert spec == "file:/w/t.safetensors"
    assert kw == {
        "arch": "torchvision:resnet50",
        "num_classes": 40,
        "weights": None,
        "input_size": 64,
    }


def test_step_and_cosine_schedules() -> None:
    from distill.schedules import lr_factor

    kw: dict[str, Any] = {"steps_per_epoch": 10, "total_steps": 1000, "gamma": 0.1}
    step = [
        lr_factor(s, schedule="step", lr_steps=[30, 60, 90], warmup_epochs=0, **kw)
        for s in (0, 299, 300, 600, 900)
    ]
    assert step == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    cos = [lr_factor(s, schedule="cosine", lr_steps=[], warmup_epochs=1, **kw) for s in (0, 9)]
    assert cos[0] == pytest.approx(0.1) and cos[1] == pytest.approx(1.0)
    assert lr_factor(1000, schedule="cosine", lr_steps=[], warmup_epochs=0, **kw) == pytest.approx(
        0.0
    )


# ----------------------------------------------------------------------------- data plumbing


def test_bad_files_are_replaced_and_recorded_across_workers(tmp_path: Path) -> None:
    from distill.data import SkipLog, image_folder, take_skipped
    from distill.data.loaders import make_loader, robust
    from distill.data.transforms import paired_views

    root = tmp_path / "folder"
    make_image_folder(root, classes=("a", "b"), per_class=3, size=24)
    bad = make_bad_images(tmp_path / "bad", size=24)
    for key in ("truncated", "empty", "text", "grayscale", "cmyk", "rgba", "gray16"):
        target = root / "a" / f"zz_{key}{bad[key].suffix}"
        target.write_bytes(bad[key].read_bytes())
    ds = image_folder(root)
    ds.transform = paired_views(None, 32, train=True)
    loader = make_loader(robust(ds), 4, train=False, workers=2, seed=0)
    log = SkipLog()  # the records travel with the batches from the workers
    batches = [take_skipped(b, log)[0] for b in loader]
    assert sum(b["input"].shape[0] for b in batches) == len(ds)  # every batch stays full
    reasons = {Path(p).name: r for (p, r) in log.counts}
    assert reasons == {
        "zz_truncated.jpg": "truncated",
        "zz_empty.jpg": "empty",
        "zz_text.jpg": "not_an_image",
    }
    assert "skipped images: 4 skip(s) of 3 file(s)" in log.report()  # text.jpg -> truncated.jpg


def test_batched_jpeg_pipeline_through_accelerate(tmp_path: Path) -> None:
    """The --gpu-pipeline loader on its CPU path: bytes in the workers, decode on .to(device)."""
    from accelerate import Accelerator

    from distill.data import SkipLog, image_folder, take_skipped
    from distill.data.encoded import EncodedImageFolder, encoded_loader
    from distill.data.gpu_pipeline import GpuBatchTransform
    from distill.data.loaders import robust

    root = tmp_path / "folder"
    make_image_folder(root, classes=("a", "b", "c"), per_class=3, size=(40, 30))
    (root / "b" / "zz_empty.jpg").write_bytes(b"")
    tv = image_folder(root)
    transform = GpuBatchTransform(24, train=True, device="cpu", channels_last=False)
    folder = robust(EncodedImageFolder.from_samples(tv.samples, tv.classes))
    loader = encoded_loader(
        folder, transform, batch_size=5, shuffle=True, drop_last=True, num_workers=1, seed=0
    )
    prepared = Accelerator(cpu=True).prepare(loader)
    log = SkipLog()
    batches = [take_skipped(b, log)[0] for b in prepared]
    assert [b["input"].shape for b in batches] == [torch.Size([5, 3, 24, 24])] * 2
    assert batches[0]["target"].dtype == torch.int64
    assert [r for (_p, r) in log.counts] == ["empty"]


def test_unwritable_output_dir_is_a_clear_error(tmp_path: Path, capsys: Any) -> None:
    from recipes.imagenet import main
    from tests.datagen import make_imagenet

    if os.geteuid() == 0:
        target = "/proc/recipes-cannot-write-here"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "out")
    make_imagenet(tmp_path / "imnet", n_classes=2, per_class=2, val_per_class=1, size=32)
    code = main(
        [
            "--data-dir",
            str(tmp_path / "imnet"),
            "--method",
            "ce",
            "--teacher",
            "none",
            *tiny_args(Path(target)),
        ]
    )
    assert code == 2
    assert "cannot write to --output-dir" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["imagenet.py", "face_attributes.py", "facenet.py"])
def test_every_flag_has_a_help_line_and_its_choices(script: str) -> None:
    import dataclasses
    import importlib

    from recipes._config import RecipeConfig, field_comments

    module = importlib.import_module(f"recipes.{script.removesuffix('.py')}")
    cls = next(
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, RecipeConfig) and v.__module__ == module.__name__
    )
    described = field_comments(cls)
    assert [f.name for f in dataclasses.fields(cls) if f.name not in described] == []
    text = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=launch_env(),
    ).stdout
    flat = " ".join(text.split())
    assert "one of none, wandb" in flat or "one of none, wandb, tensorboard" in flat
    assert "one of raise, skip" in flat and "one of no, bf16, fp16" in flat
    assert "width multiplier (not the KD weight: see --kd-weight)" in flat
    assert "weight of the teacher term, 1 - it on the labels (KD papers' alpha)" in flat
