"""transformers teachers from a seeded hub cache (and a save_pretrained folder), offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import teachers

REPO = "tiny-org/tiny-resnet"
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
LABELS = ["cat", "dog", "fox", "owl", "emu"]


@pytest.fixture
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def _tiny_model(folder: Path) -> torch.nn.Module:
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )
    model = ResNetForImageClassification(config).eval()
    model.save_pretrained(folder)
    # microsoft/resnet-50 ships a ConvNext processor: shortest_edge + crop_pct, bicubic.
    ConvNextImageProcessor(
        size={"shortest_edge": 48},
        crop_pct=0.875,
        image_mean=[0.5, 0.4, 0.3],
        image_std=[0.2, 0.25, 0.3],
        resample=3,
    ).save_pretrained(folder)
    return model


@pytest.fixture
def seeded(hf_home: Path) -> tuple[Path, torch.nn.Module]:
    repo_dir = hf_home / "hub" / ("models--" + REPO.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / COMMIT
    model = _tiny_model(snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return snapshot, model


def test_loads_from_hub_cache(seeded) -> None:
    snapshot, source = seeded
    t = teachers.load(f"hf:{REPO}")
    meta = t.meta
    assert meta["input_size"] == (48, 48)
    assert meta["mean"] == pytest.approx((0.5, 0.4, 0.3))
    assert meta["std"] == pytest.approx((0.2, 0.25, 0.3))
    assert t.interpolation == "bicubic"
    assert meta["output"] == "logits" and meta["num_outputs"] == 5
    assert meta["label_names"] == LABELS
    assert meta["source"] == str(snapshot)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixel_values=x).logits
    out = t(x, prepared=True).output
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # forward of the wrapped model returns the logits tensor itself
    assert isinstance(t.model(x), torch.Tensor)
    # `python -m teachers list/where` read the same metadata from the cached JSON alone.
    info = teachers.hf_zoo.describe(REPO)
    assert info["cached"] and info["file"] == str(snapshot)
    assert info["input_size"] == (48, 48) and info["interpolation"] == "bicubic"
    assert info["mean"] == (0.5, 0.4, 0.3) and info["num_outputs"] == 5


def test_num_classes_reinitialises_classifier(seeded) -> None:
    _, source = seeded
    t = teachers.load(f"hf:{REPO}", num_classes=40, output="multilabel")
    assert t.meta["num_outputs"] == 40 and t.meta["label_names"] is None
    assert t.meta["output"] == "multilabel"
    assert t(torch.randn(1, 3, 32, 32), prepared=True).output.shape == (1, 40)
    own = t.model.model.state_dict()
    for k, v in source.state_dict().items():
        if not k.startswith("classifier."):
            assert torch.equal(own[k], v), k


def test_local_folder(tmp_path: Path, hf_home: Path) -> None:
    source = _tiny_model(tmp_path / "export")
    t = teachers.load(f"hf:{tmp_path / 'export'}")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(t(x, prepared=True).output, source(pixel_values=x).logits)


def test_missing_offline_names_files_and_folder(hf_home: Path, seeded) -> None:
    snapshot, _ = seeded
    shutil.rmtree(snapshot.parent.parent)
    with pytest.raises(teachers.MissingWeightsError) as info:
        teachers.load(f"hf:{REPO}")
    msg = str(info.value)
    assert "config.json" in msg and "model.safetensors" in msg
    assert str(hf_home / "hub" / "models--tiny-org--tiny-resnet" / "snapshots") in msg
    assert f"https://huggingface.co/{REPO}" in msg
