"""timm teachers from a seeded Hugging Face hub cache, through timm.create_model(pretrained=True)."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch

import teachers
from distill.serialization import UnsafeCheckpointError, save_safetensors

MODEL = "test_resnet.r160_in1k"  # timm's tiny test model (0.47M parameters), hosted on the hub
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return home


def seed_hub(hub: Path, repo: str, files: dict[str, object]) -> Path:
    """Write files in the hub cache layout: models--org--name/{refs/main, snapshots/<commit>/}."""
    repo_dir = hub / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        if isinstance(content, dict):
            save_safetensors(content, snapshot / name)
        else:
            raise TypeError(name)
    return snapshot


@pytest.fixture
def seeded(hf_home: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    source = timm.create_model(MODEL, pretrained=False).eval()
    snapshot = seed_hub(
        hf_home / "hub", f"timm/{MODEL}", {"model.safetensors": source.state_dict()}
    )
    return snapshot / "model.safetensors", source


def test_loads_through_timm_from_hub_cache(seeded) -> None:
    path, source = seeded
    t = teachers.load(f"timm:{MODEL}")
    meta = t.meta
    assert meta["input_size"] == (160, 160)
    assert meta["mean"] == pytest.approx((0.5, 0.5, 0.5)) and meta["std"] == pytest.approx(
        (0.5,) * 3
    )
    assert meta["output"] == "logits" and meta["num_outputs"] == 1000
    assert meta["label_names"][0].startswith("tench") and len(meta["label_names"]) == 1000
    assert meta["source"] == str(path)
    assert t.interpolation == "bilinear"
    assert t.model.pretrained_cfg["file"] == str(path)  # timm read the cached file itself
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
    torch.testing.assert_close(t(x, prepared=True).output, expected, atol=1e-5, rtol=1e-5)


def test_pickle_weights_in_hub_cache(hf_home: Path) -> None:
    """Older hub repos hold pytorch_model.bin: read with weights_only, code-running ones refused."""
    torch.manual_seed(0)
    source = timm.create_model(MODEL, pretrained=False).eval()
    snapshot = seed_hub(hf_home / "hub", f"timm/{MODEL}", {})
    torch.save(source.state_dict(), snapshot / "pytorch_model.bin")
    t = teachers.load(f"timm:{MODEL}")
    assert t.meta["source"] == str(snapshot / "pytorch_model.bin")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x, prepared=True).output, source(x))

    marker = hf_home / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"fc.weight": torch.zeros(1), "x": Evil()}, snapshot / "pytorch_model.bin")
    with pytest.raises(UnsafeCheckpointError, match="refusing to load"):
        teachers.load(f"timm:{MODEL}")
    assert not marker.exists()


def test_num_classes_resets_classifier(seeded) -> None:
    _, source = seeded
    t = teachers.load(f"timm:{MODEL}", num_classes=40, output="multilabel")
    assert t.meta["num_outputs"] == 40 and t.meta["output"] == "multilabel"
    assert t.meta["label_names"] is None
    assert t.model.get_classifier().out_features == 40
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(t.model.state_dict()[k], v), k
    assert t(torch.randn(1, 3, 32, 32), prepared=True).output.shape == (1, 40)


def test_missing_weights_offline_names_file_and_folder(hf_home: Path) -> None:
    with pytest.raises(teachers.MissingWeightsError) as info:
        teachers.load(f"timm:{MODEL}")
    msg = str(info.value)
    assert "model.safetensors" in msg
    assert str(hf_home / "hub" / f"models--timm--{MODEL}" / "snapshots") in msg
    assert f"https://huggingface.co/timm/{MODEL}" in msg


def test_unknown_model_and_tag(hf_home: Path) -> None:
    with pytest.raises(ValueError, match="no model 'not_a_model'"):
        teachers.load("timm:not_a_model")
    with pytest.raises(ValueError, match=r"no pretrained tag 'nope'.*test_resnet\.r160_in1k"):
        teachers.load("timm:test_resnet.nope")


def test_pretrained_false(hf_home: Path) -> None:
    t = teachers.load(f"timm:{MODEL}", pretrained=False, num_classes=7)
    assert t.meta["num_outputs"] == 7 and "random init" in t.meta["source"]


def test_test_resolution_is_said_and_can_be_switched(caplog: pytest.LogCaptureFixture) -> None:
    """timm's resnet18.a1_in1k trains at 224 px and is validated at 288 px: the teacher is fed
    at 288 by default (as timm validates), the log says so and what it costs, and size=train
    feeds it at 224."""
    import logging

    import teachers

    with caplog.at_level(logging.WARNING, logger="teachers.timm_zoo"):
        test = teachers.load("timm:resnet18.a1_in1k", pretrained=False)
    assert test.input_size == (288, 288)
    assert "test resolution 288 px (training resolution 224 px, test 1.65x" in caplog.text
    train = teachers.load("timm:resnet18.a1_in1k", pretrained=False, size="train")
    assert train.input_size == (224, 224)
    with pytest.raises(ValueError, match="size must be 'test' or 'train'"):
        teachers.load("timm:resnet18.a1_in1k", pretrained=False, size="big")
