"""Default stage maps (distill.models.stages) and FeatureHooks' ":input" paths.

Channels and strides are checked against plain PyTorch forward hooks at 96 px (the map itself
measures at 64 px), and each pre-activation path against its stage: relu(pre-activation) must
be the stage's output.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torchvision
from torch import nn

from distill.models import mobilenet_v1
from distill.models.stages import Stage, match_stages, penultimate, stage_map
from distill.teacher import FeatureHooks, Teacher

SIZE = 96


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = pytest.importorskip("timm")
        # zero_init_last=False: timm zeroes each block's last BN, leaving no negative pre-activation
        model = timm.create_model(name, pretrained=False, num_classes=10, zero_init_last=False)
        return model  # type: ignore[no-any-return]

    return build


MODELS: dict[str, tuple[Callable[[], nn.Module], list[int], int]] = {
    # name: (builder, channels at strides 4, 8, 16, 32, penultimate dim)
    "mobilenet_a0.5": (lambda: mobilenet_v1(alpha=0.5, num_classes=10), [64, 128, 256, 512], 512),
    "mobilenet_a1": (lambda: mobilenet_v1(num_classes=10), [128, 256, 512, 1024], 1024),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), [64, 128, 256, 512], 512),
    "tv_resnet50": (
        lambda: torchvision.models.resnet50(num_classes=10),
        [256, 512, 1024, 2048],
        2048,
    ),
    "timm_resnet50": (_timm("resnet50"), [256, 512, 1024, 2048], 2048),
}


def _measure(model: nn.Module, stages: list[Stage]) -> dict[str, torch.Tensor]:
    """Each stage's output, captured with torch's own hooks in a real forward."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for st in stages:

        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = st.name) -> None:
            seen[name] = out.detach().clone()

        handles.append(model.get_submodule(st.path).register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_channels_strides_and_preactivations_match_a_real_forward(name: str) -> None:
    build, channels, dim = MODELS[name]
    model = build().eval()
    stages = stage_map(model)
    seen = _measure(model, stages)
    for st in stages:
        out = seen[st.name]
        assert st.channels == out.shape[1], st
        assert st.stride == SIZE // out.shape[-1] == SIZE // out.shape[-2], st
    assert [s.channels for s in stages if s.stride >= 4] == channels
    assert [s.stride for s in stages if s.stride >= 4] == [4, 8, 16, 32]
    # the pre-activation hook sees the map before the stage's last ReLU (after the residual
    # addition in a ResNet): ReLU of it is the stage output, and it has negative values
    hooks = FeatureHooks(model, {s.name: s.hook_path(True) for s in stages})
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)))
        pre = hooks.pop()
    finally:
        hooks.remove()
    for st in stages:
        torch.testing.assert_close(torch.relu(pre[st.name]), seen[st.name])
        assert (pre[st.name] < 0).any(), st
        bn = model.get_submodule(st.norm_path or "")
        assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == st.channels
    path, got_dim = penultimate(model)
    assert got_dim == dim
    assert path in {"global_pool", "avgpool"}


def test_teacher_is_read_through_its_model_and_training_state_is_kept() -> None:
    model = torchvision.models.resnet18(num_classes=10)
    bn = model.layer1[0].bn1
    before = bn.running_mean.clone()
    model.train()
    stages = stage_map(model)
    assert model.training and bn.training  # flags restored
    assert torch.equal(bn.running_mean, before)  # the dry forward ran in eval mode
    teacher = Teacher(copy.deepcopy(model))
    assert stage_map(teacher) == stages
    assert penultimate(teacher) == ("avgpool", 512)


def test_stage_names_and_paths() -> None:
    stages = stage_map(torchvision.models.resnet50(num_classes=10))
    assert [s.name for s in stages] == ["layer1", "layer2", "layer3", "layer4"]
    assert stages[3].preact_path == "layer4.2.relu:input"
    assert stages[3].norm_path == "layer4.2.bn3"
    assert stage_map(torchvision.models.resnet18())[0].norm_path == "layer1.1.bn2"
    mnet = stage_map(mobilenet_v1(alpha=0.25))
    assert [s.path for s in mnet] == ["blocks.0", "blocks.2", "blocks.4", "blocks.10", "blocks.12"]
    assert mnet[1].preact_path == "blocks.2.pw.act:input"
    shallow = stage_map(mobilenet_v1(variant="shallow"))
    assert [s.stride for s in shallow] == [2, 4, 8, 16, 32]
    assert [s.path for s in stage_map(mobilenet_v1(variant="fullconv"))][1] == "blocks.2"
    assert stage_map(mobilenet_v1(variant="fullconv"))[1].preact_path == "blocks.2.act:input"


def test_match_stages_pairs_by_stride() -> None:
    pairs = match_stages(stage_map(mobilenet_v1()), stage_map(torchvision.models.resnet18()))
    assert [(s.path, t.path) for s, t in pairs] == [
        ("blocks.2", "layer1"),
        ("blocks.4", "layer2"),
        ("blocks.10", "layer3"),
        ("blocks.12", "layer4"),
    ]
    with pytest.raises(ValueError, match="none in common"):
        match_stages([Stage("a", "a", 1, 2)], [Stage("b", "b", 1, 4)])


def test_unknown_models_say_to_pass_paths() -> None:
    with pytest.raises(ValueError, match=r"no default stage map for Sequential.*module paths"):
        stage_map(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    with pytest.raises(ValueError, match="no default stage map for VGG"):
        penultimate(torchvision.models.vgg11())
    with pytest.raises(ValueError, match="preact=False"):
        Stage("s", "s", 1, 1).hook_path(True)
    assert Stage("s", "s", 1, 1).hook_path(False) == "s"


# --- FeatureHooks ":input" --------------------------------------------------------------


class Reuse(nn.Module):
    """One in-place ReLU called twice, like torchvision's residual blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv(x))
        return self.relu(y - 1.0)


def test_input_paths_capture_the_last_call_before_an_inplace_module() -> None:
    model = Reuse()
    x = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    hooks = FeatureHooks(model, {"pre": "relu:input", "post": "relu", "conv": "conv"})
    out = model(x)
    got = hooks.pop()
    hooks.remove()
    expected = torch.relu(model.conv(x)) - 1.0  # the second call's input
    torch.testing.assert_close(got["pre"], expected)
    assert (got["pre"] < 0).any()  # kept although the ReLU ran in place afterwards
    torch.testing.assert_close(got["post"], out)
    assert got["conv"].shape == (2, 2, 3, 3)
    model(x)
    assert hooks.pop() == {}


def test_input_paths_under_teacher_and_errors() -> None:
    t = Teacher(Reuse(), features={"pre": "relu:input"})
    out = t(torch.randn(2, 2, 3, 3))
    assert not out.features["pre"].is_inference()  # usable in a loss
    with pytest.raises(ValueError, match=r"no module named \['nope:input'\].*':input'"):
        FeatureHooks(Reuse(), {"x": "nope:input"})

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(input=x)  # type: ignore[no-any-return]

    model = Keywords()
    FeatureHooks(model, {"x": "inner:input"})
    with pytest.raises(TypeError, match="without a tensor as its first positional argument"):
        model(torch.zeros(1))
