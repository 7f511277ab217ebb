"""Multi-label (attribute) KD: golden values, masking, label format, gradient, stability.

Golden values: float64 explicit sums of BCE(p, q) = −(q log p + (1 − q) log(1 − p)) over these
literal logits, labels and mask, stored as literals.
"""

from __future__ import annotations

import pytest
import torch

from distill.losses import (
    MultiLabelBCE,
    MultiLabelKDLoss,
    multilabel_bce_loss,
    multilabel_kd_loss,
    multilabel_kd_parts,
)
from distill.types import Outputs

S = [
    [1.5, -0.3, 0.2, 2.1, -1.0],
    [0.0, 0.7, -2.2, 0.4, 1.1],
    [-0.5, 3.0, 0.9, -1.4, 0.3],
    [0.8, 0.8, -0.6, 0.0, 2.5],
]
T = [
    [2.0, -1.0, 0.5, 1.0, 0.0],
    [-0.4, 1.6, -0.9, 0.2, 0.8],
    [0.1, 2.2, 1.7, -2.0, -0.6],
    [1.2, -0.3, 0.4, 0.9, 1.9],
]
Y = [[1, 0, 1, 1, 0], [0, 0, 1, 0, 1], [1, 1, 0, 0, 0], [0, 1, 1, 1, 1]]
M = [[1, 1, 0, 1, 1], [1, 1, 1, 1, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(S), torch.tensor(T), torch.tensor(Y, dtype=torch.float32), torch.tensor(M)


def test_golden_values_with_mask() -> None:
    s, t, y, m = _inputs()
    parts = multilabel_kd_parts(s, t, y, temperature=2.0, alpha=0.7, mask=m)
    assert parts["kd"].item() == pytest.approx(2.679460375, rel=1e-5)
    assert parts["bce"].item() == pytest.approx(0.700895389, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(2.085890879, rel=1e-5)


def test_golden_values_without_mask() -> None:
    s, t, y, _ = _inputs()
    loss = multilabel_kd_loss(s, t, y, temperature=1.0, alpha=0.5)
    assert loss.item() == pytest.approx(0.655361724, rel=1e-5)
    assert multilabel_bce_loss(s, y).item() == pytest.approx(0.6887386396, rel=1e-5)


def test_mask_excludes_missing_labels() -> None:
    s, _, y, m = _inputs()
    garbage = torch.where(m.bool(), y, torch.full_like(y, 0.5))  # different values where missing
    a = multilabel_bce_loss(s, y, m)
    b = multilabel_bce_loss(s, garbage, m)
    assert a.item() == pytest.approx(b.item(), rel=1e-7)
    assert a.item() != pytest.approx(multilabel_bce_loss(s, y).item(), rel=1e-3)
    s.requires_grad_()
    multilabel_bce_loss(s, y, m).backward()
    assert s.grad is not None
    assert (s.grad[m == 0] == 0).all() and (s.grad[m == 1] != 0).all()


def test_objective_missing_label_value_builds_the_mask() -> None:
    s, t, y, m = _inputs()
    with_missing = torch.where(m.bool(), y, torch.full_like(y, -1.0))
    out = MultiLabelKDLoss(temperature=2.0, alpha=0.7, missing_label=-1)(
        Outputs(s), Outputs(t), with_missing
    )
    assert set(out) == {"loss", "kd", "bce"}
    assert out["loss"].item() == pytest.approx(2.085890879, rel=1e-5)
    nan_missing = torch.where(m.bool(), y, torch.full_like(y, float("nan")))
    out = MultiLabelKDLoss(2.0, 0.7, missing_label=float("nan"))(
        Outputs(s), Outputs(t), nan_missing
    )
    assert out["loss"].item() == pytest.approx(2.085890879, rel=1e-5)
    scratch = MultiLabelBCE(missing_label=-1)(Outputs(s), None, with_missing)
    assert scratch["bce"].item() == pytest.approx(0.700895389, rel=1e-5)
    assert MultiLabelBCE.needs_teacher is False


def test_celeba_minus_one_labels_are_refused_with_the_fix() -> None:
    s, t, y, _ = _inputs()
    with pytest.raises(ValueError, match=r"\(y \+ 1\) / 2"):
        multilabel_kd_loss(s, t, 2 * y - 1, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"collides with real labels"):
        MultiLabelKDLoss(missing_label=0)


def test_soft_term_scaling_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(6, 8, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(6, 8, generator=g, dtype=torch.float64) * 3
    for temperature in (1.0, 4.0):
        soft = multilabel_kd_parts(s, t, None, temperature=temperature, alpha=1.0)["kd"]
        (grad,) = torch.autograd.grad(soft, s)
        # T²·mean BCE(s/T, σ(t/T)) has gradient T·(σ(s/T) − σ(t/T))/(B·A): pins the T² factor
        expected = temperature * (torch.sigmoid(s / temperature) - torch.sigmoid(t / temperature))
        torch.testing.assert_close(grad, expected.detach() / 48, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0, 100.0])
def test_extreme_logits_stay_finite(temperature: float) -> None:
    g = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(1, 40, generator=g) > 0.5, 1.0, -1.0)
    s = (sign * 1e4).requires_grad_()
    y = (torch.rand(1, 40, generator=g) > 0.5).float()
    loss = multilabel_kd_loss(s, -sign * 1e4, y, temperature=temperature, alpha=0.5)
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None and torch.isfinite(s.grad).all()


def test_fully_masked_batch_gives_zero_hard_term() -> None:
    s, _, y, _ = _inputs()
    assert multilabel_bce_loss(s, y, torch.zeros_like(y)).item() == 0.0


def test_errors_name_the_problem() -> None:
    s, t, y, m = _inputs()
    with pytest.raises(ValueError, match=r"target must match the logits' shape \(4, 5\)"):
        multilabel_kd_loss(s, t, y[:, :3], temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"mask must match"):
        multilabel_kd_loss(s, t, y, temperature=2.0, alpha=0.5, mask=m[:2])
    with pytest.raises(ValueError, match=r"5 outputs but the teacher's have 4"):
        multilabel_kd_loss(s, t[:, :4], y, temperature=2.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"temperature must be"):
        MultiLabelKDLoss(temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha=1.0 for pure teacher emulation"):
        multilabel_kd_loss(s, t, None, temperature=2.0, alpha=0.5)
