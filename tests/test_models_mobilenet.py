"""MobileNetV1: architecture as in the paper's Table 1, the feature API and hooks by name."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.models import MobileNetV1, mobilenet_v1, mobilenet_v1_fullconv, mobilenet_v1_shallow
from distill.models.mobilenet import ConvBNAct, DepthwiseSeparable


@pytest.fixture(scope="module")
def small() -> MobileNetV1:
    torch.manual_seed(0)
    return mobilenet_v1(alpha=0.25, num_classes=10).eval()


def test_table1_layout_at_alpha_1() -> None:
    with torch.device("meta"):
        m = mobilenet_v1()
    assert m.stem.conv.in_channels == 3 and m.stem.conv.out_channels == 32
    assert m.stem.conv.stride == (2, 2)
    assert len(m.blocks) == 13
    outs = [b.out_channels for b in m.blocks]
    assert outs == [64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    strides = [b.dw.conv.stride[0] for b in m.blocks]
    # The last depthwise layer has stride 1 (Table 1's stride 2 there is a typo).
    assert strides == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    for b in m.blocks:
        assert isinstance(b, DepthwiseSeparable)
        assert b.dw.conv.groups == b.dw.conv.in_channels == b.dw.conv.out_channels
        assert b.dw.conv.kernel_size == (3, 3) and b.pw.conv.kernel_size == (1, 1)
        assert isinstance(b.dw.bn, nn.BatchNorm2d) and isinstance(b.pw.act, nn.ReLU)
    assert isinstance(m.classifier, nn.Linear)
    assert (m.classifier.in_features, m.classifier.out_features) == (1024, 1000)
    assert m.num_features == 1024


def test_exact_parameter_count_of_1_0_224() -> None:
    with torch.device("meta"):
        m = mobilenet_v1()
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 4_231_976


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.25, 0.3])
def test_width_multiplier_is_int_of_c_times_alpha(alpha: float) -> None:
    with torch.device("meta"):
        m = mobilenet_v1(alpha=alpha)
    assert m.stem.out_channels == int(32 * alpha)
    assert [b.out_channels for b in m.blocks][-1] == int(1024 * alpha) == m.num_features
    assert [d["num_chs"] for d in m.feature_info[1:3]] == [int(64 * alpha), int(128 * alpha)]


def test_variants() -> None:
    with torch.device("meta"):
        full = mobilenet_v1_fullconv()
        shallow = mobilenet_v1_shallow()
    assert full.variant == "fullconv" and len(full.blocks) == 13
    assert all(isinstance(b, ConvBNAct) and b.conv.kernel_size == (3, 3) for b in full.blocks)
    assert shallow.variant == "shallow" and len(shallow.blocks) == 8
    assert [b.out_channels for b in shallow.blocks] == [64, 128, 128, 256, 256, 512, 1024, 1024]
    assert shallow.feature_aliases["reduction_16"] == "blocks.5"
    assert mobilenet_v1(variant="shallow", alpha=0.25).pretrained_cfg["architecture"] == (
        "mobilenet_v1_shallow"
    )


@pytest.mark.parametrize("size", [(32, 32), (33, 33), (128, 128), (160, 160), (192, 192), (97, 61)])
def test_forward_any_size(small: MobileNetV1, size: tuple[int, int]) -> None:
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        feats = small.forward_features(x)
        logits = small(x)
    assert feats.shape == (2, 256, math.ceil(size[0] / 32), math.ceil(size[1] / 32))
    assert logits.shape == (2, 10)
    assert torch.isfinite(logits).all()


def test_forward_at_224_full_width() -> None:
    m = mobilenet_v1().eval()
    with torch.no_grad():
        feats = m.forward_features(torch.randn(1, 3, 224, 224))
    assert feats.shape == (1, 1024, 7, 7)  # the 7x7 average pool of Table 1


def test_forward_head_and_pre_logits(small: MobileNetV1) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = small.forward_features(x)
        pooled = small.forward_head(feats, pre_logits=True)
        logits = small.forward_head(feats)
        full = small(x)
    assert pooled.shape == (2, small.num_features)
    torch.testing.assert_close(pooled, feats.mean((2, 3)))
    torch.testing.assert_close(logits, full)
    torch.testing.assert_close(logits, small.get_classifier()(pooled))


def test_small_inputs_and_wrong_channels_raise(small: MobileNetV1) -> None:
    with pytest.raises(ValueError, match="at least 32x32"):
        small(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match="in_chans=1"):
        small(torch.randn(1, 1, 64, 64))


def test_in_chans_and_metadata() -> None:
    m = mobilenet_v1(alpha=0.25, resolution=160, in_chans=1, num_classes=3)
    cfg = m.pretrained_cfg
    assert cfg["input_size"] == (1, 160, 160) and cfg["resolution"] == 160
    assert cfg["alpha"] == 0.25 and cfg["interpolation"] == "bilinear"
    assert len(cfg["mean"]) == len(cfg["std"]) == 1
    assert mobilenet_v1(alpha=0.25).pretrained_cfg["mean"] == (0.485, 0.456, 0.406)
    assert m.eval()(torch.randn(1, 1, 40, 40)).shape == (1, 3)


def test_reset_classifier(small: MobileNetV1) -> None:
    m = mobilenet_v1(alpha=0.25, num_classes=10).eval()
    m.reset_classifier(4)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert m.num_classes == m.pretrained_cfg["num_classes"] == 4
    m.reset_classifier(0)
    assert isinstance(m.get_classifier(), nn.Identity)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, m.num_features)
    assert mobilenet_v1(alpha=0.25, num_classes=0).eval()(torch.randn(1, 3, 32, 32)).shape == (
        1,
        256,
    )


def test_feature_info_matches_hooked_shapes(small: MobileNetV1) -> None:
    assert [d["module"] for d in small.feature_info] == ["stem"] + [
        f"blocks.{i}" for i in range(13)
    ]
    seen: dict[str, torch.Size] = {}
    handles = [
        small.get_submodule(d["module"]).register_forward_hook(
            lambda _m, _i, out, name=d["module"]: seen.__setitem__(name, out.shape)
        )
        for d in small.feature_info
    ]
    with torch.no_grad():
        small(torch.randn(1, 3, 64, 64))
    for h in handles:
        h.remove()
    for d in small.feature_info:
        side = math.ceil(64 / d["reduction"])
        assert seen[d["module"]] == (1, d["num_chs"], side, side), d


def test_hooks_by_alias_and_nested_name(small: MobileNetV1) -> None:
    assert small.feature_aliases["reduction_16"] == "blocks.10"
    assert small.feature_aliases["reduction_32"] == "blocks.12"
    assert small.get_submodule("reduction_16") is small.blocks[10]
    assert small.get_submodule("pre_logits") is small.global_pool
    captured: dict[str, torch.Tensor] = {}
    handles = [
        small.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out)
        )
        for name in ("reduction_16", "blocks.3.pw.bn", "pre_logits")
    ]
    with torch.no_grad():
        small(torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    assert captured["reduction_16"].shape == (2, 128, 4, 4)
    assert captured["pre_logits"].shape == (2, 256)
    # The ReLU is not in-place, so a hook on a BN still holds the pre-activation (has negatives).
    assert (captured["blocks.3.pw.bn"] < 0).any()


def test_state_dict_names_are_stable() -> None:
    keys = set(mobilenet_v1(alpha=0.25).state_dict())
    for key in (
        "stem.conv.weight",
        "blocks.0.dw.conv.weight",
        "blocks.12.pw.bn.running_mean",
        "classifier.weight",
        "classifier.bias",
    ):
        assert key in keys


def test_fx_feature_extractor() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    m = mobilenet_v1(alpha=0.25).eval()
    extractor = create_feature_extractor(m, {"blocks.10": "c4", "blocks.12": "c5"})
    out = extractor(torch.randn(1, 3, 64, 64))
    assert out["c4"].shape == (1, 128, 4, 4) and out["c5"].shape == (1, 256, 2, 2)


def test_norm_and_activation_layers_are_pluggable() -> None:
    m = mobilenet_v1(
        alpha=0.25,
        norm_layer=lambda c: nn.GroupNorm(1, c),
        activation_layer=nn.ReLU6,
    )
    assert isinstance(m.blocks[0].dw.bn, nn.GroupNorm)
    assert isinstance(m.stem.act, nn.ReLU6)
    m(torch.randn(1, 3, 32, 32)).sum().backward()
    assert m.stem.conv.weight.grad is not None


def test_train_step_reduces_loss() -> None:
    torch.manual_seed(0)
    m = mobilenet_v1(alpha=0.25, num_classes=3, dropout=0.0)
    x, y = torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # memorises 8 samples


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": 0.01}, "1/32"),
        ({"resolution": 16}, "resolution"),
        ({"num_classes": -1}, "num_classes"),
        ({"dropout": 1.0}, "dropout"),
        ({"in_chans": 0}, "in_chans"),
        ({"variant": "wide"}, "standard, fullconv, shallow"),
    ],
)
def test_invalid_arguments_say_what_to_change(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mobilenet_v1(**kwargs)
