"""FaceNet: our Inception-ResNet-v1 is state_dict-compatible with facenet-pytorch 2.6.0.

facenet-pytorch is installed with --no-deps only for this test; its model is randomly
initialised, saved under the real release file name in a temporary facenet-pytorch cache
($TORCH_HOME/checkpoints), and loaded through `teachers.load("facenet:...")`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import teachers
from teachers.inception_resnet_v1 import InceptionResnetV1

VGG = "20180402-114759-vggface2.pt"


def _reference_class() -> type[torch.nn.Module]:
    try:
        from facenet_pytorch import InceptionResnetV1 as Ref
    except ImportError:  # a dependency of another facenet-pytorch module is missing
        spec = importlib.util.find_spec("facenet_pytorch")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(
                "facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0)"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        file = folder / "models" / "inception_resnet_v1.py"
        mod_spec = importlib.util.spec_from_file_location("_fnp_irv1", file)
        assert mod_spec and mod_spec.loader
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules["_fnp_irv1"] = module
        mod_spec.loader.exec_module(module)
        Ref = module.InceptionResnetV1
    return Ref


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    """facenet-pytorch's model as `pretrained="vggface2"` builds it, with random weights."""
    Ref = _reference_class()
    torch.manual_seed(0)
    ref = Ref(classify=False)
    ref.logits = torch.nn.Linear(512, 8631)  # the released files carry the identity layer
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm1d | torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return ref.eval()


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "torch"


def test_state_dict_keys_and_shapes_match(reference: torch.nn.Module) -> None:
    ours = InceptionResnetV1(num_identities=8631).state_dict()
    theirs = reference.state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_release_file_loads_strict_and_embeds_identically(
    reference: torch.nn.Module, torch_home: Path
) -> None:
    path = torch_home / "checkpoints" / VGG  # facenet-pytorch's own cache location
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    torch.load(path, weights_only=True)  # the release format is a plain state_dict

    t = teachers.load("facenet:vggface2")
    meta = t.meta
    assert meta["input_size"] == (160, 160)
    assert meta["mean"] == (0.5, 0.5, 0.5) and meta["std"] == pytest.approx((128 / 255,) * 3)
    assert meta["output"] == "embedding" and meta["num_outputs"] == 512
    assert meta["source"] == str(path)

    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 160, 160) * 255  # 0..255 face crops
    prepared = (pixels - 127.5) / 128.0  # facenet-pytorch's fixed_image_standardization
    with torch.no_grad():
        expected = reference(prepared)
    got = t(prepared, prepared=True).output
    assert got.shape == (2, 512)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)
    # From a student batch normalised with ImageNet stats, the Teacher re-standardises.
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    student_batch = (pixels / 255 - mean) / std
    torch.testing.assert_close(t(student_batch).output, expected, atol=1e-4, rtol=1e-4)

    logits = teachers.load("facenet:vggface2", output="logits")
    assert logits.meta["num_outputs"] == 8631 and logits.meta["output"] == "logits"
    reference.classify = True
    try:
        with torch.no_grad():
            expected_logits = reference(prepared[:1])
    finally:
        reference.classify = False
    torch.testing.assert_close(
        logits(prepared[:1], prepared=True).output, expected_logits, atol=1e-4, rtol=1e-4
    )

    heads = teachers.load("facenet:vggface2", num_classes=40, output="multilabel")
    assert heads.meta["num_outputs"] == 40
    assert heads(prepared[:1], prepared=True).output.shape == (1, 40)


def test_missing_release_file_names_it(torch_home: Path) -> None:
    with pytest.raises(teachers.MissingWeightsError) as info:
        teachers.load("facenet:casia-webface")
    msg = str(info.value)
    assert "20180408-102900-casia-webface.pt" in msg
    assert str(torch_home / "checkpoints") in msg
    assert "https://github.com/timesler/facenet-pytorch/releases/download/v2.2.9/" in msg
    with pytest.raises(ValueError, match="vggface2, casia-webface"):
        teachers.load("facenet:ms1m")
