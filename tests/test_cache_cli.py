"""`python -m distill cache-teacher` on an ImageFolder with a local safetensors teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distill.__main__ import main
from distill.data.teacher_cache import CacheMismatchError, TeacherCache
from distill.models import create_student
from tests.datagen import make_image_folder


def _args(tmp_path: Path, weights: Path, *extra: str) -> list[str]:
    return [
        "cache-teacher",
        "--teacher-arch", "mobilenet_v1",
        "--teacher-arg", "alpha=0.25",
        "--teacher-weights", str(weights),
        "--num-classes", "5",
        "--teacher-resolution", "32",
        "--data-dir", str(tmp_path / "imgs"),
        "--out", str(tmp_path / "cache"),
        "--crops", "2", "--topk", "3", "--resolution", "16",
        "--batch-size", "4", "--workers", "0", "--device", "cpu", "--no-progress",
        *extra,
    ]  # fmt: skip


def test_cache_teacher_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2, size=36)
    torch.manual_seed(0)
    model = create_student("mobilenet_v1", alpha=0.25, num_classes=5)
    weights = tmp_path / "teacher.safetensors"
    save_file(model.state_dict(), str(weights))

    assert main(_args(tmp_path, weights)) == 0
    assert "cached 4 images x 2 crops, top-3 of 5 classes" in capsys.readouterr().out
    cache = TeacherCache.open(tmp_path / "cache")
    assert cache.manifest["teacher_meta"]["input_size"] == [32, 32]

    # the same command again reuses the cache; a different teacher is refused
    assert main(_args(tmp_path, weights)) == 0
    torch.manual_seed(1)
    save_file(create_student("mobilenet_v1", alpha=0.25, num_classes=5).state_dict(), str(weights))
    with pytest.raises(CacheMismatchError, match="teacher"):
        main(_args(tmp_path, weights))
    assert main(_args(tmp_path, weights, "--overwrite")) == 0


def test_cache_teacher_cli_wrong_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path / "imgs", classes=("a",), per_class=1, size=36)
    weights = tmp_path / "teacher.safetensors"
    save_file(create_student("mobilenet_v1", alpha=0.25, num_classes=5).state_dict(), str(weights))
    args = _args(tmp_path, weights)
    args[args.index("alpha=0.25")] = "alpha=0.5"
    assert main(args) == 2
    assert "error:" in capsys.readouterr().err
