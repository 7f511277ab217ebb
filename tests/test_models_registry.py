"""Student registry: names, duplicates, errors, and the timm:/torchvision: prefixes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.models import create_student, list_students, register_student, registry
from distill.profiling import profile


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_STUDENTS", dict(registry._STUDENTS))


def test_paper_students_are_registered() -> None:
    assert {"mobilenet_v1", "mobilenet_v1_fullconv", "mobilenet_v1_shallow"} <= set(list_students())


@pytest.mark.parametrize("name", list_students())
def test_every_registered_student_builds_runs_and_profiles(name: str) -> None:
    model = create_student(name, num_classes=3).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    assert profile(model, 32).mult_adds > 0


def test_register_and_duplicate(isolated_registry: None) -> None:
    @register_student("tiny_test_net")
    def tiny_test_net(*, num_classes: int = 2) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes))

    assert "tiny_test_net" in list_students()
    assert isinstance(create_student("tiny_test_net", num_classes=4), nn.Sequential)
    with pytest.raises(ValueError, match="already registered"):
        register_student("tiny_test_net")(tiny_test_net)
    with pytest.raises(ValueError, match="already registered"):
        register_student("mobilenet_v1")(tiny_test_net)


def test_bad_names_and_arguments() -> None:
    with pytest.raises(ValueError, match="':'"):
        register_student("my:net")
    with pytest.raises(KeyError, match="mobilenet_v1_shallow") as err:
        create_student("mobilenet_v3")
    assert "timm:" in str(err.value)
    with pytest.raises(TypeError, match="It accepts: alpha, resolution"):
        create_student("mobilenet_v1", width=0.5)
    with pytest.raises(TypeError, match="variant"):
        create_student("mobilenet_v1_shallow", variant="standard")


def test_kwargs_reach_the_builder() -> None:
    m = create_student("mobilenet_v1", alpha=0.5, resolution=160, num_classes=7)
    assert m.pretrained_cfg["input_size"] == (3, 160, 160)
    assert m.get_classifier().out_features == 7


def test_torchvision_prefix() -> None:
    m = create_student("torchvision:mobilenet_v2", num_classes=5, width_mult=0.35).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="torchvision has no model"):
        create_student("torchvision:mobilenet_v9")


def test_timm_prefix() -> None:
    pytest.importorskip("timm")
    m = create_student("timm:mobilenetv3_small_050", num_classes=5).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    # timm models carry pretrained_cfg["input_size"], which profile() uses by default.
    assert profile(m).input_size == (3, 224, 224)
    with pytest.raises(ValueError, match="timm has no model"):
        create_student("timm:no_such_model_xyz")
