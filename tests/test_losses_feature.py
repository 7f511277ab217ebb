"""FitNets hints and attention transfer: golden values, adapter, resizing, hooks, errors.

Golden values: float64 explicit sums over maps x[i] = sin(0.37 i + 0.5) (student) and
2 cos(0.23 i) (teacher) in C order, with block averaging for the resize, stored as literals.
AT pools the larger feature map before squaring (RepDistiller/mdistiller) unless
resize="attention"; the comparisons with torchdistill and the written-out references are in
test_losses_references.py.
"""

from __future__ import annotations

import pytest
import torch

from distill.losses import (
    ATLoss,
    CrossEntropy,
    DKDLoss,
    FitNetLoss,
    KDLoss,
    at_loss,
    hint_loss,
)
from distill.types import Outputs


def _student(shape: tuple[int, ...]) -> torch.Tensor:
    n = torch.arange(torch.Size(shape).numel(), dtype=torch.float64)
    return torch.sin(0.37 * n + 0.5).reshape(shape).float()


def _teacher(shape: tuple[int, ...]) -> torch.Tensor:
    n = torch.arange(torch.Size(shape).numel(), dtype=torch.float64)
    return (2 * torch.cos(0.23 * n)).reshape(shape).float()


def test_hint_golden_values() -> None:
    s = _student((2, 5, 2, 2))
    assert hint_loss(s, _teacher((2, 5, 2, 2))).item() == pytest.approx(2.470908132, rel=1e-5)
    # teacher 4x4 -> area-averaged to the student's 2x2
    assert hint_loss(s, _teacher((2, 5, 4, 4))).item() == pytest.approx(2.2011785, rel=1e-5)


def test_attention_transfer_golden_values() -> None:
    s = _student((2, 3, 4, 4))
    assert at_loss(s, _teacher((2, 5, 4, 4))).item() == pytest.approx(0.01938183624, rel=1e-5)
    # the teacher's 8x8 feature map is 2x2-averaged, then squared (changed on purpose: the
    # attention map used to be averaged instead, which resize="attention" still does)
    assert at_loss(s, _teacher((2, 5, 8, 8))).item() == pytest.approx(0.01893768265, rel=1e-5)
    attention = at_loss(s, _teacher((2, 5, 8, 8)), resize="attention")
    assert attention.item() == pytest.approx(0.01659061267, rel=1e-5)
    # a larger student is pooled down to the teacher's size (it used to upsample the teacher)
    big = at_loss(_student((2, 3, 8, 8)), _teacher((2, 5, 4, 4)))
    assert big.item() == pytest.approx(0.003574368560, rel=1e-5)


def _fitnet(logit_loss=None, weight: float = 100.0) -> FitNetLoss:  # type: ignore[no-untyped-def]
    return FitNetLoss(
        student_layer="blocks.10",
        teacher_layer="layer3",
        student_channels=3,
        teacher_channels=5,
        weight=weight,
        logit_loss=logit_loss,
    )


def test_fitnet_uses_its_learnable_adapter() -> None:
    obj = _fitnet()
    assert obj.student_features == {"hint": "blocks.10"}
    assert obj.teacher_features == {"hint": "layer3"}
    f_s, f_t = _student((4, 3, 4, 4)), _teacher((4, 5, 8, 8))
    out = obj(
        Outputs(torch.zeros(4, 2), {"hint": f_s}), Outputs(torch.zeros(4, 2), {"hint": f_t}), None
    )
    assert set(out) == {"loss", "hint"}
    assert out["loss"].item() == pytest.approx(100 * out["hint"].item(), rel=1e-6)
    expected = hint_loss(torch.relu(obj.adapter.bn(obj.adapter.conv(f_s))), f_t)
    assert out["hint"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert obj.adapter.conv.weight.grad is not None
    assert obj.adapter.conv.weight.grad.abs().sum() > 0
    # a step on the adapter lowers the hint (it is what makes 3 channels comparable to 5)
    with torch.no_grad():
        obj.adapter.conv.weight -= 1e-3 * obj.adapter.conv.weight.grad
    again = obj(
        Outputs(torch.zeros(4, 2), {"hint": f_s}), Outputs(torch.zeros(4, 2), {"hint": f_t}), None
    )
    assert again["hint"].item() < out["hint"].item()


def test_regressor_ends_in_a_relu_unless_asked_not_to() -> None:
    # RepDistiller's ConvReg: conv -> BN -> ReLU (the teacher's hint is post-activation)
    f_s = _student((4, 3, 4, 4))
    relu = _fitnet()
    assert relu.adapter(f_s).min().item() == 0.0
    plain = FitNetLoss(
        student_layer="a",
        teacher_layer="b",
        student_channels=3,
        teacher_channels=5,
        logit_loss=None,
        adapter_relu=False,
    )
    plain.adapter.load_state_dict(relu.adapter.state_dict())
    assert plain.adapter(f_s).min().item() < 0
    assert torch.equal(torch.relu(plain.adapter(f_s)), relu.adapter(f_s))


def test_logit_loss_parts_are_combined() -> None:
    g = torch.Generator().manual_seed(0)
    s, t, y = (
        torch.randn(4, 6, generator=g),
        torch.randn(4, 6, generator=g),
        torch.tensor([0, 1, 2, 3]),
    )
    feats_s, feats_t = {"hint": _student((4, 3, 2, 2))}, {"hint": _teacher((4, 5, 2, 2))}
    kd = KDLoss(temperature=4.0, alpha=0.9)
    obj = _fitnet(logit_loss=kd, weight=10.0)
    out = obj(Outputs(s, feats_s), Outputs(t, feats_t), y)
    assert set(out) == {"loss", "hint", "kd", "ce"}
    logit = kd(Outputs(s), Outputs(t), y)["loss"]
    assert out["loss"].item() == pytest.approx(10 * out["hint"].item() + logit.item(), rel=1e-5)


def test_nested_objectives_share_hooks_and_progress() -> None:
    dkd = DKDLoss(warmup_epochs=10)
    obj = ATLoss({"blocks.5": "layer2"}, logit_loss=_fitnet(logit_loss=dkd))
    assert obj.student_features == {"hint": "blocks.10", "at0": "blocks.5"}
    obj.on_progress(step=30, epoch=5.0)
    # the warm-up reaches the innermost objective: the 6th epoch (mdistiller counts from 1)
    assert dkd.warmup_factor == pytest.approx(0.6)
    with pytest.raises(ValueError, match=r"feature name 'hint' is already used"):
        _fitnet(logit_loss=_fitnet())


def test_attention_transfer_objective() -> None:
    obj = ATLoss(
        {"blocks.5": "layer2", "blocks.11": "layer3"}, logit_loss=CrossEntropy(), beta=1000.0
    )
    assert obj.student_features == {"at0": "blocks.5", "at1": "blocks.11"}
    assert obj.teacher_features == {"at0": "layer2", "at1": "layer3"}
    s_feats = {"at0": _student((2, 3, 4, 4)), "at1": _student((2, 3, 4, 4))}
    t_feats = {"at0": _teacher((2, 5, 4, 4)), "at1": _teacher((2, 5, 8, 8))}
    logits, y = torch.zeros(2, 3), torch.tensor([0, 2])
    out = obj(Outputs(logits, s_feats), Outputs(logits, t_feats), y)
    assert set(out) == {"loss", "at", "ce"}
    assert out["at"].item() == pytest.approx(0.01938183624 + 0.01893768265, rel=1e-5)
    # beta · Σ (the authors' code, RepDistiller, mdistiller); it used to be beta/2 · Σ
    assert out["loss"].item() == pytest.approx(1000 * out["at"].item() + out["ce"].item(), rel=1e-5)


def test_attention_is_invariant_to_feature_scale() -> None:
    s, t = _student((2, 3, 4, 4)), _teacher((2, 5, 4, 4))
    assert at_loss(s, 7.0 * t).item() == pytest.approx(at_loss(s, t).item(), rel=1e-5)
    assert at_loss(s, s).item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_extreme_features_stay_finite(scale: float) -> None:
    f_s = (_student((1, 3, 2, 2)) * scale).requires_grad_()
    f_t = _teacher((1, 5, 4, 4)) * scale
    obj = _fitnet()
    out = obj(
        Outputs(torch.zeros(1, 2), {"hint": f_s}), Outputs(torch.zeros(1, 2), {"hint": f_t}), None
    )
    loss = out["loss"] + at_loss(f_s, f_t)
    loss.backward()
    assert torch.isfinite(loss) and f_s.grad is not None and torch.isfinite(f_s.grad).all()


def test_errors_name_the_problem() -> None:
    obj = _fitnet()
    logits = torch.zeros(2, 2)
    with pytest.raises(
        KeyError, match=r"student's feature 'hint' \(module 'blocks.10'\) is missing"
    ):
        obj(Outputs(logits), Outputs(logits, {"hint": _teacher((2, 5, 2, 2))}), None)
    with pytest.raises(ValueError, match=r"has 4 channels .* set student_channels=4"):
        obj(
            Outputs(logits, {"hint": _student((2, 4, 2, 2))}),
            Outputs(logits, {"hint": _teacher((2, 5, 2, 2))}),
            None,
        )
    with pytest.raises(ValueError, match=r"set teacher_channels=6"):
        obj(
            Outputs(logits, {"hint": _student((2, 3, 2, 2))}),
            Outputs(logits, {"hint": _teacher((2, 6, 2, 2))}),
            None,
        )
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) map"):
        at_loss(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"layers is empty"):
        ATLoss({}, logit_loss=None)
    with pytest.raises(ValueError, match=r"resize must be one of \('feature', 'attention'\)"):
        ATLoss({"a": "b"}, logit_loss=None, resize="bilinear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"weight must be"):
        _fitnet(weight=-1.0)
