"""file: teachers: local checkpoints in the shapes training code really writes them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from torchvision import models

import teachers
from distill.serialization import UnsafeCheckpointError, file_sha256, save_safetensors


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.shufflenet_v2_x0_5(num_classes=10).eval()


def _check_same(t: teachers.registry.Teacher, source: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
    torch.testing.assert_close(t(x, prepared=True).output, expected, atol=1e-5, rtol=1e-5)


def _wrappers(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    return {
        "plain.safetensors": sd,
        "ddp.pt": {f"module.{k}": v for k, v in sd.items()},
        "compiled.pth": {f"_orig_mod.{k}": v for k, v in sd.items()},
        "lightning.ckpt": {
            "epoch": 4,
            "global_step": 100,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
            "lr_schedulers": [],
            "hyper_parameters": {"lr": 0.1, "arch": "resnet18"},
        },
        "timm_train.pth.tar": {
            "epoch": 9,
            "arch": "resnet18",
            "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": []},
            "args": argparse.Namespace(model="resnet18", lr=0.1),
            "version": 2,
            "metric": 71.2,
        },
    }


@pytest.mark.parametrize(
    "fname",
    ["plain.safetensors", "ddp.pt", "compiled.pth", "lightning.ckpt", "timm_train.pth.tar"],
)
def test_wrapped_checkpoints_load(tmp_path: Path, resnet: torch.nn.Module, fname: str) -> None:
    obj = _wrappers(resnet.state_dict())[fname]
    path = tmp_path / fname
    if fname.endswith(".safetensors"):
        save_safetensors(obj, path)  # type: ignore[arg-type]
    else:
        torch.save(obj, path)
    t = teachers.load(f"file:{path}", arch="torchvision:shufflenet_v2_x0_5")
    assert t.meta["num_outputs"] == 10  # read from the file's classifier
    assert t.meta["label_names"] is None  # 10 classes: not ImageNet's names
    assert t.meta["input_size"] == (224, 224)
    assert file_sha256(path) in t.meta["source"]
    _check_same(t, resnet)


def test_num_classes_replaces_the_file_head(tmp_path: Path, resnet: torch.nn.Module) -> None:
    save_safetensors(resnet.state_dict(), tmp_path / "r.safetensors")
    t = teachers.load(
        f"file:{tmp_path / 'r.safetensors'}",
        arch="torchvision:shufflenet_v2_x0_5",
        num_classes=40,
        output="multilabel",
    )
    assert t.meta["num_outputs"] == 40 and t.meta["output"] == "multilabel"
    assert torch.equal(t.model.conv1[0].weight, resnet.conv1[0].weight)


def test_timm_arch_with_ema_and_prefix(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", num_classes=3).eval()
    sd = {f"student.{k}": v for k, v in source.state_dict().items()}
    sd["teacher.fc.weight"] = torch.zeros(1)
    torch.save({"state_dict_ema": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "d.pt")
    t = teachers.load(
        f"file:{tmp_path / 'd.pt'}",
        arch="timm:test_resnet.r160_in1k",
        prefix="student.",
        prefer_ema=True,
    )
    assert t.meta["num_outputs"] == 3 and t.meta["input_size"] == (160, 160)
    _check_same(t, source)


def test_student_arch(tmp_path: Path) -> None:
    from distill.models import create_student

    torch.manual_seed(0)
    source = create_student("mobilenet_v1", alpha=0.25, num_classes=5).eval()
    save_safetensors(source.state_dict(), tmp_path / "s.safetensors")
    t = teachers.load(
        f"file:{tmp_path / 's.safetensors'}", arch="mobilenet_v1", model_kwargs={"alpha": 0.25}
    )
    assert t.meta["num_outputs"] == 5
    _check_same(t, source)


def test_facenet_arch(tmp_path: Path) -> None:
    from teachers.inception_resnet_v1 import InceptionResnetV1

    torch.manual_seed(0)
    source = InceptionResnetV1(num_identities=6).eval()
    save_safetensors(source.state_dict(), tmp_path / "f.safetensors")
    t = teachers.load(f"file:{tmp_path / 'f.safetensors'}", arch="facenet")
    assert t.meta["output"] == "embedding" and t.meta["num_outputs"] == 512
    assert t.meta["input_size"] == (160, 160)
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(t(x, prepared=True).output, source(x), atol=1e-5, rtol=1e-5)


def test_malicious_checkpoint_refused(tmp_path: Path, resnet: torch.nn.Module) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    torch.save({"state_dict": resnet.state_dict(), "callbacks": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load.*evil\.ckpt"):
        teachers.load(f"file:{tmp_path / 'evil.ckpt'}", arch="torchvision:shufflenet_v2_x0_5")
    assert not marker.exists()


def test_clear_errors(tmp_path: Path, resnet: torch.nn.Module) -> None:
    path = tmp_path / "r.pt"
    torch.save(resnet.state_dict(), path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        teachers.load(f"file:{tmp_path / 'missing.pt'}", arch="torchvision:shufflenet_v2_x0_5")
    with pytest.raises(ValueError, match="pass arch="):
        teachers.load(f"file:{path}")
    with pytest.raises(ValueError, match=r"does not fit the model.*shape mismatch"):
        teachers.load(f"file:{path}", arch="torchvision:shufflenet_v2_x1_0")
    with pytest.raises(ValueError, match="checksum mismatch"):
        teachers.load(f"file:{path}", arch="torchvision:shufflenet_v2_x0_5", sha256="deadbeef")
    t = teachers.load(
        f"file:{path}", arch="torchvision:shufflenet_v2_x0_5", sha256=file_sha256(path)[:12]
    )
    assert t.meta["num_outputs"] == 10
