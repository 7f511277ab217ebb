"""`python -m distill cache-teacher` on an ImageFolder with a local safetensors teacher."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from distill.__main__ import main
from distill.data.teacher_cache import TeacherCache
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
    capsys.readouterr()
    assert main(_args(tmp_path, weights)) == 2  # an error for people, not a traceback
    assert "error:" in capsys.readouterr().err
    assert main(_args(tmp_path, weights, "--overwrite")) == 0


def test_cache_teacher_cli_relative_dir_and_class_count(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run from the data's parent with a relative --data-dir, without --num-classes: the class
    count comes from the checkpoint; a wrong one is explained shape by shape."""
    make_image_folder(tmp_path / "imgs", classes=("a", "b"), per_class=2, size=36)
    save_file(create_student("mobilenet_v1", alpha=0.25, num_classes=7).state_dict(),
              str(tmp_path / "t7.safetensors"))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    args = _args(Path("."), Path("t7.safetensors"))
    del args[args.index("--num-classes") : args.index("--num-classes") + 2]
    assert main(args) == 0
    assert "top-3 of 7 classes" in capsys.readouterr().out
    args = _args(Path("."), Path("t7.safetensors"), "--overwrite", "--num-classes", "5")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 tensors differ in shape" in err
    assert "classifier.weight: file (7, 256) vs model (5, 256)" in err
    assert "[" not in err.split("e.g.")[1]  # shapes in words, not a Python list


def test_cache_teacher_cli_wrong_arch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image_folder(tmp_path / "imgs", classes=("a",), per_class=1, size=36)
    weights = tmp_path / "teacher.safetensors"
    save_file(create_student("mobilenet_v1", alpha=0.25, num_classes=5).state_dict(), str(weights))
    args = _args(tmp_path, weights)
    args[args.index("alpha=0.25")] = "alpha=0.5"
    assert main(args) == 2
    assert "error:" in capsys.readouterr().err


def test_cache_teacher_cli_tail_and_kind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_image_folder(tmp_path / "imgs", classes=("a",), per_class=2, size=36)
    weights = tmp_path / "teacher.safetensors"
    save_file(create_student("mobilenet_v1", alpha=0.25, num_classes=5).state_dict(), str(weights))
    assert main(_args(tmp_path, weights, "--tail", "mass", "--temperatures", "4", "2")) == 0
    cache = TeacherCache.open(tmp_path / "cache")
    assert (cache.tail, cache.temperatures) == ("mass", (1.0, 2.0, 4.0))
    assert cache.serves(2.0) and not cache.serves(3.0)
    args = _args(tmp_path, weights, "--kind", "multilabel")
    args[args.index("--out") + 1] = str(tmp_path / "attrs")
    assert main(args) == 0
    assert "5 multilabel outputs" in capsys.readouterr().out
    assert TeacherCache.open(tmp_path / "attrs").kind == "multilabel"
