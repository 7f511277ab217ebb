"""torchvision teachers from a seeded torch.hub cache ($TORCH_HOME/hub/checkpoints), offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision import models

import teachers
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD, Teacher

FILE = "resnet18-f37072fd.pth"  # basename of ResNet18_Weights.IMAGENET1K_V1.url


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture
def seeded(torch_home: Path) -> tuple[Path, torch.nn.Module]:
    """A randomly initialised resnet18 saved under the real file name and place."""
    torch.manual_seed(0)
    source = models.resnet18(num_classes=1000).eval()
    for m in source.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = torch_home / "hub" / "checkpoints" / FILE
    path.parent.mkdir(parents=True)
    torch.save(source.state_dict(), path)
    return path, source


def test_weights_url_gives_the_cache_file_name() -> None:
    assert Path(models.ResNet18_Weights.IMAGENET1K_V1.url).name == FILE


def test_loads_from_cache_with_metadata_and_same_outputs(seeded) -> None:
    path, source = seeded
    t = teachers.load("torchvision:resnet18", check_hash=False, features={"l3": "layer3"})
    assert isinstance(t, Teacher)
    meta = t.meta
    assert meta["input_size"] == (224, 224)
    assert meta["mean"] == pytest.approx(IMAGENET_MEAN) and meta["std"] == pytest.approx(
        IMAGENET_STD
    )
    assert meta["output"] == "logits" and meta["num_outputs"] == 1000
    assert meta["label_names"][:2] == ["tench", "goldfish"] and len(meta["label_names"]) == 1000
    assert meta["source"] == str(path)
    assert meta["name"] == "torchvision:resnet18.IMAGENET1K_V1"
    assert not any(p.requires_grad for p in t.parameters())
    x = torch.randn(2, 3, 32, 32)  # already in the teacher's format
    with torch.no_grad():
        expected = source(x)
    out = t(x, prepared=True)
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-5)
    assert out.features["l3"].shape == (2, 256, 2, 2)  # (B, C, H/16, W/16)
    # The student-side path resizes to 224 (same normalisation here).
    assert t(x[:1]).features["l3"].shape == (1, 256, 14, 14)


def test_named_weights_and_unknown_names(seeded) -> None:
    t = teachers.load("torchvision:resnet18", weights="IMAGENET1K_V1", check_hash=False)
    assert t.meta["num_outputs"] == 1000
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        teachers.load("torchvision:resnet18", weights="IMAGENET9K")
    with pytest.raises(ValueError, match=r"no classification model 'resnet19'.*resnet18"):
        teachers.load("torchvision:resnet19")
    with pytest.raises(TypeError, match=r"unexpected keyword.*colour.*check_hash"):
        teachers.load("torchvision:resnet18", colour="red")


def test_hash_in_file_name_is_checked(seeded) -> None:
    with pytest.raises(ValueError, match=r"(?s)checksum mismatch.*f37072fd.*check_hash=False"):
        teachers.load("torchvision:resnet18")


def test_num_classes_replaces_head(seeded) -> None:
    _, source = seeded
    t = teachers.load("torchvision:resnet18", num_classes=40, output="multilabel", check_hash=False)
    assert t.meta["num_outputs"] == 40 and t.meta["output"] == "multilabel"
    assert t.meta["label_names"] is None
    assert "classifier replaced" in t.meta["source"]
    assert t.model.fc.out_features == 40
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    for k, v in backbone.items():
        assert torch.equal(t.model.state_dict()[k], v), k
    assert t(torch.randn(1, 3, 32, 32), prepared=True).output.shape == (1, 40)


def test_missing_file_offline_names_file_folder_and_url(torch_home: Path) -> None:
    with pytest.raises(teachers.MissingWeightsError) as info:
        teachers.load("torchvision:resnet18")
    msg = str(info.value)
    assert FILE in msg
    assert str(torch_home / "hub" / "checkpoints") in msg
    assert "https://download.pytorch.org/models/" + FILE in msg
    assert not (torch_home / "hub" / "checkpoints" / FILE).exists()


def test_malicious_file_in_cache_is_refused(torch_home: Path) -> None:
    marker = torch_home / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = torch_home / "hub" / "checkpoints" / FILE
    path.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(1), "x": Evil()}, path)
    with pytest.raises(teachers_unsafe_error(), match="refusing to load"):
        teachers.load("torchvision:resnet18", check_hash=False)
    assert not marker.exists()


def teachers_unsafe_error() -> type[Exception]:
    from distill.serialization import UnsafeCheckpointError

    return UnsafeCheckpointError


def test_weights_none_is_random_with_default_preprocessing(torch_home: Path) -> None:
    t = teachers.load("torchvision:resnet18", weights=None, num_classes=10)
    assert t.meta["num_outputs"] == 10 and "random init" in t.meta["source"]
    assert t.meta["input_size"] == (224, 224) and t.meta["label_names"] is None
