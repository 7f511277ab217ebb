"""The teacher registry and `python -m teachers`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import teachers
from teachers import registry
from teachers.__main__ import main

PREFIXES = {"facenet", "file", "hf", "timm", "torchvision"}


def test_all_prefixes_registered() -> None:
    assert {s.prefix for s in teachers.list_teachers()} == PREFIXES
    for source in teachers.list_teachers():
        assert source.summary and source.examples and source.weights_location()


def test_duplicate_prefix_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_TEACHERS", dict(registry._TEACHERS))

    with pytest.raises(ValueError, match=r"'timm' is already registered by teachers\.timm_zoo"):

        @teachers.register_teacher("timm", summary="again")
        def another(name: str, **kwargs: object) -> teachers.registry.Teacher:
            raise AssertionError

    @teachers.register_teacher("toy", summary="a linear layer", examples=("toy:3",))
    def toy(name: str, **kwargs: object) -> teachers.registry.Teacher:
        return teachers.registry.Teacher(torch.nn.Linear(2, int(name)), output="logits")

    assert teachers.load("toy:3")(torch.randn(1, 2), prepared=True).output.shape == (1, 3)
    with pytest.raises(ValueError, match="lower-case identifier"):
        teachers.register_teacher("Bad-Name", summary="x")


def test_spec_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown teacher prefix 'tf'.*torchvision:"):
        teachers.load("tf:resnet")
    with pytest.raises(ValueError, match="'<prefix>:<name>'"):
        teachers.load("resnet50")
    with pytest.raises(ValueError, match=r"file:/w/teacher\.safetensors"):
        teachers.load("/w/teacher.safetensors")


def test_list_in_process(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    by_prefix = {r["prefix"]: r for r in rows}
    assert set(by_prefix) == PREFIXES
    resnet = by_prefix["torchvision"]["examples"]["torchvision:resnet50"]
    assert resnet["input_size"] == 224 and resnet["num_outputs"] == 1000
    assert resnet["file"] == str(
        tmp_path / "torch" / "hub" / "checkpoints" / "resnet50-11ad3fa6.pth"
    )
    assert resnet["cached"] is False
    face = by_prefix["facenet"]["examples"]["facenet:vggface2"]
    assert face["output"] == "embedding" and face["input_size"] == [160, 160]
    assert face["file"].endswith("torch/checkpoints/20180402-114759-vggface2.pt")
    assert main(["where", "facenet:vggface2"]) == 1  # not cached: non-zero exit


def test_python_m_teachers_list_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "teachers", "list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    ).stdout
    for prefix in PREFIXES:
        assert f"\n{prefix}:" in out
    assert "torchvision:resnet50" in out and "input_size=224" in out
    assert "mean=(0.485, 0.456, 0.406)" in out and "output=embedding" in out
    assert "hub/checkpoints" in out and "models--timm--" in out
