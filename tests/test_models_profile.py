"""distill.profile: golden counts on a hand-checkable model, mode/device handling, latency."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.models import mobilenet_v1
from distill.profiling import Profile, profile


def _tiny() -> nn.Module:
    # conv: 8 out x 8x8 positions x 3*3*3 = 13,824 MACs; linear: 512 x 4 = 2,048 MACs.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 4)
    )


def test_golden_counts_for_any_module() -> None:
    p = profile(_tiny(), 10)
    assert p.mult_adds == 13_824 + 2_048
    assert p.params == (8 * 27 + 8) + 2 * 8 + (512 * 4 + 4)
    assert p.trainable_params == p.params
    assert p.input_size == (3, 10, 10) and p.latency_ms is None


def test_input_size_forms_and_channels() -> None:
    assert profile(_tiny(), (10, 10)).input_size == (3, 10, 10)
    assert profile(_tiny(), (3, 10, 10)).input_size == (3, 10, 10)
    gray = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    assert profile(gray, 12).input_size == (1, 12, 12)  # channels from the first conv
    m = mobilenet_v1(alpha=0.25, resolution=96, in_chans=1)
    assert profile(m).input_size == (1, 96, 96)  # from pretrained_cfg
    with pytest.raises(ValueError, match="input_size"):
        profile(_tiny(), (1, 2, 3, 4))


def test_batch_size_gives_per_image_mult_adds() -> None:
    assert profile(_tiny(), 10, batch_size=3).mult_adds == profile(_tiny(), 10).mult_adds


def test_trainable_params_and_modes_are_restored() -> None:
    m = mobilenet_v1(alpha=0.25)
    m.stem.requires_grad_(False)
    m.train()
    m.blocks[0].eval()
    before = {name: mod.training for name, mod in m.named_modules()}
    p = profile(m, 32)  # BN in train mode would fail on 1x1 maps at batch 1; profile uses eval
    assert {name: mod.training for name, mod in m.named_modules()} == before
    assert p.trainable_params == p.params - sum(t.numel() for t in m.stem.parameters())
    assert all(t.grad is None for t in m.parameters())


def test_latency_and_str() -> None:
    p = profile(_tiny(), 10, latency=True, device="cpu", warmup=1, repeats=3)
    assert isinstance(p, Profile) and p.latency_ms is not None and p.latency_ms > 0
    assert "mult-adds" in str(p) and "ms per batch" in str(p)
    assert p.to_dict()["mult_adds"] == p.mult_adds and p.row()["input"] == "3x10x10"


def test_meta_device_rules() -> None:
    with torch.device("meta"):
        m = mobilenet_v1()
    assert profile(m).mult_adds_m == pytest.approx(568.7, abs=0.1)
    with pytest.raises(ValueError, match="real device"):
        profile(m, latency=True)
    with pytest.raises(ValueError, match="drop its weights"):
        profile(_tiny(), 10, device="meta")
