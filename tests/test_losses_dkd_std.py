"""DKD with logit standardisation: against the LS authors' DKD written out here, on logits
z-scored by torchdistill 1.1.5's `LogitStdKDLoss.standardize` (values and gradients in float64,
1e-6 relative), its invariance to each row's scale and shift, hostile inputs and errors.

The reference is sunshangquan/logit-standardization-KD's mdistiller/distillers/DKD.py read term
by term: z-score both logits, then mdistiller's DKD (probabilities gathered with the target
mask, the non-target softmax by subtracting 1000 at the target), CE on the raw logits, and the
warm-up min(epoch / WARMUP, 1) with epochs counted from 1. torchdistill has no DKD.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from distill.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from distill.types import Outputs

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int, b: int = 6, k: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    s = 2 * torch.randn(b, k, generator=g, dtype=D)
    t = 5 * torch.randn(b, k, generator=g, dtype=D) + 1.0
    return s, t, torch.randint(0, k, (b,), generator=g)


def _standardize(z: torch.Tensor) -> torch.Tensor:
    td = pytest.importorskip("torchdistill.losses.mid_level")
    z_scored: torch.Tensor = td.LogitStdKDLoss(
        ".", "output", ".", "output", 1.0, alpha=0.0
    ).standardize(z)
    return z_scored


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum()


def _authors_dkd(
    s_in: torch.Tensor, t_in: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, temp: float
) -> torch.Tensor:
    """dkd_loss(..., logit_stand=True) of the LS authors, one sample at a time."""
    s, t = _standardize(s_in), _standardize(t_in.detach())
    tckd = nckd = torch.zeros((), dtype=s.dtype)
    for i in range(s.shape[0]):
        gt = F.one_hot(y[i], s.shape[1]).to(s.dtype)  # (K,)
        p_s, p_t = torch.softmax(s[i] / temp, 0), torch.softmax(t[i] / temp, 0)
        b_s = torch.stack([(p_s * gt).sum(), (p_s * (1 - gt)).sum()])
        b_t = torch.stack([(p_t * gt).sum(), (p_t * (1 - gt)).sum()])
        tckd = tckd + _kl(b_t, b_s)
        q_s = torch.softmax(s[i] / temp - 1000.0 * gt, 0)
        q_t = torch.softmax(t[i] / temp - 1000.0 * gt, 0)
        keep = gt == 0  # 0·log 0 at the target: their kl_div counts it as 0
        nckd = nckd + _kl(q_t[keep], q_s[keep])
    n = s.shape[0]
    return alpha * tckd * temp**2 / n + beta * nckd * temp**2 / n


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _compare(ours: Any, ref: Any, s: torch.Tensor) -> tuple[float, float]:
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    va, vb = ours(a), ref(b)
    (ga,) = torch.autograd.grad(va, a)
    (gb,) = torch.autograd.grad(vb, b)
    return _rel(va.detach(), vb.detach()), _rel(ga, gb)


@pytest.mark.parametrize(
    ("alpha", "beta", "temp"),
    [(1.0, 8.0, 4.0), (9.0, 72.0, 2.0), (9.0, 18.0, 2.0), (1.0, 2.0, 1.0)],
)
def test_matches_the_ls_authors_dkd(alpha: float, beta: float, temp: float) -> None:
    s, t, y = _batch(1)
    dv, dg = _compare(
        lambda x: dkd_loss(x, t, y, alpha=alpha, beta=beta, temperature=temp, standardize=True),
        lambda x: _authors_dkd(x, t, y, alpha, beta, temp),
        s,
    )
    assert dv < 1e-6 and dg < 1e-6, (dv, dg)


def test_objective_matches_the_ls_authors_forward_train() -> None:
    """DKD+LS on ImageNet R50->MV1 as their flags would set it: CE 1, alpha 9, beta 18, T 2,
    warm-up 1 (full weight from the first step); the cross-entropy on the raw logits."""
    s, t, y = _batch(2, b=5, k=9)
    obj = DKDLoss(9.0, 18.0, 2.0, ce_weight=1.0, warmup_epochs=1.0, standardize=True)
    obj.on_progress(0, 0.0)

    def ref(x: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(x, 1)
        ce = -torch.stack([log_p[i, y[i]] for i in range(x.shape[0])]).mean()
        return 1.0 * ce + min(1 / 1.0, 1.0) * _authors_dkd(x, t, y, 9.0, 18.0, 2.0)

    dv, dg = _compare(lambda x: obj(Outputs(x), Outputs(t), y)["loss"], ref, s)
    assert dv < 1e-6 and dg < 1e-6, (dv, dg)
    out = obj(Outputs(s), Outputs(t), y)
    torch.testing.assert_close(out["ce"], F.cross_entropy(s, y))
    assert "standardize=True" in repr(obj)


def test_standardize_ignores_each_rows_scale_and_shift_and_nothing_else() -> None:
    """Named for z-scoring: s -> a_i·s + c_i (a_i > 0) per row, on either side, leaves DKD
    unchanged; a student that is the teacher at another scale costs nothing, where plain DKD
    charges for the scale."""
    s, t, y = _batch(3)
    a = torch.linspace(0.3, 4.0, 6, dtype=D).unsqueeze(1)
    c = torch.linspace(-5.0, 5.0, 6, dtype=D).unsqueeze(1)
    base = dkd_parts(s, t, y, temperature=2.0, standardize=True)
    for s2, t2 in ((a * s + c, t), (s, a.flip(0) * t - c)):
        moved = dkd_parts(s2, t2, y, temperature=2.0, standardize=True)
        for name in ("tckd", "nckd"):
            torch.testing.assert_close(moved[name], base[name], rtol=1e-6, atol=0)
        raw = dkd_parts(s2, t2, y, temperature=2.0)
        assert float((raw["nckd"] - dkd_parts(s, t, y, temperature=2.0)["nckd"]).abs()) > 1e-3
    scaled = 0.2 * t + 3.0
    std = dkd_parts(scaled, t, y, temperature=2.0, standardize=True)
    assert float(std["tckd"]) < 1e-12 and float(std["nckd"]) < 1e-12
    assert float(dkd_loss(scaled, t, y, temperature=2.0)) > 0.1


def test_off_by_default_and_identical_to_plain_dkd() -> None:
    s, t, y = _batch(4)
    plain, off = dkd_parts(s, t, y), dkd_parts(s, t, y, standardize=False)
    assert all(torch.equal(plain[k], off[k]) for k in plain)
    assert DKDLoss().standardize is False
    assert float((dkd_loss(s, t, y, standardize=True) - dkd_loss(s, t, y)).abs()) > 1e-3


BIG = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), b=st.sampled_from([1, 2]), k=st.integers(2, 5), temp=st.floats(0.5, 8.0))
def test_finite_values_and_gradients_at_extreme_logits(
    data: st.DataObject, b: int, k: int, temp: float
) -> None:
    s = torch.from_numpy(data.draw(arrays(np.float32, (b, k), elements=BIG)).copy())
    t = torch.from_numpy(data.draw(arrays(np.float32, (b, k), elements=BIG)).copy())
    y = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)))
    obj = DKDLoss(temperature=temp, warmup_epochs=1.0, standardize=True)
    obj.on_progress(0, 0.0)
    s.requires_grad_()
    out = obj(Outputs(s), Outputs(t), y)
    assert all(math.isfinite(float(v.detach())) for v in out.values()), out
    (grad,) = torch.autograd.grad(out["loss"], s)
    assert torch.isfinite(grad).all()


def test_errors_say_what_to_change() -> None:
    with pytest.raises(TypeError, match="standardize must be True or False"):
        DKDLoss(standardize="yes")  # type: ignore[arg-type]
    s, t, _ = _batch(5)
    with pytest.raises(ValueError, match="soft/mixup labels are not supported"):
        dkd_parts(s, t, torch.softmax(s, 1), standardize=True)
