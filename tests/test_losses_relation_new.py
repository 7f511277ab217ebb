"""DIST, SP, PKT and CC: against torchdistill 1.1.5 (values and gradients in float64, 1e-6
relative), the behaviour each method is named for, hooks and errors.

Mapping of conventions: torchdistill's `DISTLoss(beta, gamma, tau)` is our `dist_loss` with the
same names; `SPKDLoss(reduction="batchmean")` is our `sp_loss`; `PKTLoss(eps)` is our `pkt_loss`;
`CCKDLoss(kernel gaussian, gamma, max_p, reduction="batchmean")` returns ‖ψ_s − ψ_t‖_F / B² on
its raw inputs, so on unit-norm inputs ours = (td · B²)² / B².
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    CCLoss,
    DISTLoss,
    KDLoss,
    PKTLoss,
    SPLoss,
    cc_loss,
    dist_loss,
    dist_parts,
    pkt_loss,
    rbf_correlation,
    soft_kd_loss,
    sp_loss,
)
from distill.types import Outputs

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _td() -> Any:
    return pytest.importorskip("torchdistill.losses.mid_level")


def _io(x: torch.Tensor, path: str = "m") -> dict[str, dict[str, torch.Tensor]]:
    return {path: {"output": x}}


def rel_diffs(
    ours: Callable[[torch.Tensor], torch.Tensor],
    ref: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
) -> tuple[float, float]:
    """(value, gradient) differences relative to the reference's largest entry, in float64."""
    a = x.detach().clone().requires_grad_()
    b = x.detach().clone().requires_grad_()
    va, vb = ours(a), ref(b)
    (ga,) = torch.autograd.grad(va, a)
    (gb,) = torch.autograd.grad(vb, b)
    va, vb = va.detach(), vb.detach()
    dv = float((va - vb).abs() / vb.abs().clamp_min(1e-300))
    dg = float((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-300))
    return dv, dg


def _assert_close(diffs: tuple[float, float]) -> None:
    assert diffs[0] < 1e-6 and diffs[1] < 1e-6, diffs


# --- DIST ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tau", "beta", "gamma"), [(1.0, 1.0, 1.0), (4.0, 2.0, 2.0), (2.0, 0.5, 3)]
)
def test_dist_matches_torchdistill(tau: float, beta: float, gamma: float) -> None:
    ref = _td().DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)
    g = _gen(1)
    s, t = (
        3 * torch.randn(6, 10, generator=g, dtype=D),
        3 * torch.randn(6, 10, generator=g, dtype=D),
    )
    _assert_close(
        rel_diffs(
            lambda x: dist_loss(x, t, temperature=tau, beta=beta, gamma=gamma),
            lambda x: ref(_io(x, "."), _io(t, ".")),
            s,
        )
    )


def test_dist_is_zero_for_a_linear_copy_of_the_teachers_probabilities() -> None:
    """The relation, not the values: p_s = (a·p_t + c)/(a + K·c) matches the teacher's ranking
    of classes (inter) and of samples (intra) exactly, while KL still sees a mismatch."""
    t = torch.randn(5, 8, generator=_gen(2), dtype=D)
    s = torch.log(0.5 * F.softmax(t, dim=1) + 0.05)  # softmax(s) is affine in softmax(t)
    parts = dist_parts(s, t)
    assert abs(float(parts["inter"])) < 1e-12 and abs(float(parts["intra"])) < 1e-12
    assert float(soft_kd_loss(s, t, temperature=1.0)) > 1e-3
    # swap two samples' student probabilities: both relations break
    swapped = dist_parts(s[[1, 0, 2, 3, 4]], t)
    assert float(swapped["inter"]) > 0.05 and float(swapped["intra"]) > 0.05


def test_dist_intra_term_sees_the_batch_inter_term_the_classes() -> None:
    t = torch.randn(4, 6, generator=_gen(3), dtype=D)
    p = F.softmax(t, dim=1)
    # every class column shifted by its own constant (kept a distribution): only inter changes
    shift = torch.linspace(-0.5, 0.5, 6, dtype=D).expand(4, 6) * p.min() * 0.9
    s = torch.log(p + shift)
    parts = dist_parts(s, t)
    assert float(parts["intra"]) < 1e-12 < float(parts["inter"])


def test_dist_objective_parts_and_errors() -> None:
    g = _gen(4)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    y = torch.tensor([0, 3, 4])
    out = DISTLoss(beta=2.0, gamma=0.5, ce_weight=0.3)(Outputs(s), Outputs(t), y)
    parts = dist_parts(s, t)
    expected = 2.0 * parts["inter"] + 0.5 * parts["intra"] + 0.3 * F.cross_entropy(s, y)
    torch.testing.assert_close(out["loss"], expected)
    assert set(out) == {"loss", "inter", "intra", "ce"}
    assert set(DISTLoss(ce_weight=0.0)(Outputs(s), Outputs(t), None)) == {"loss", "inter", "intra"}
    with pytest.raises(ValueError, match=r"set ce_weight=0\.0"):
        DISTLoss()(Outputs(s), Outputs(t), None)
    with pytest.raises(ValueError, match=r"temperature must be a finite number > 0.*ImageNet"):
        DISTLoss(temperature=0.0)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        DISTLoss(beta=-1.0)
    with pytest.raises(ValueError, match="num_classes=5"):
        dist_loss(torch.randn(3, 4), t)


# --- SP, PKT, CC --------------------------------------------------------------------------


def _maps(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(5, 3, 4, 4, generator=g, dtype=D), torch.randn(
        5, 7, 2, 2, generator=g, dtype=D
    )


def _sp_paper(s: torch.Tensor, t: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Tung & Mori's Eqs. 2-4 with explicit sums: G[i, j] = q_i·q_j / ‖G[i, :]‖_p."""
    b = s.shape[0]
    qs, qt = s.flatten(1), t.flatten(1)
    total = torch.zeros((), dtype=s.dtype)
    for i in range(b):
        row_s = torch.stack([(qs[i] * qs[j]).sum() for j in range(b)])
        row_t = torch.stack([(qt[i] * qt[j]).sum() for j in range(b)])
        row_s = row_s / row_s.abs().pow(p).sum().pow(1.0 / p)
        row_t = row_t / row_t.abs().pow(p).sum().pow(1.0 / p)
        total = total + ((row_s - row_t) ** 2).sum()
    return total / b**2


def test_sp_matches_the_papers_equation() -> None:
    s, t = _maps(5)
    _assert_close(rel_diffs(lambda x: sp_loss(x, t), lambda x: _sp_paper(x, t), s))


def test_torchdistill_sp_row_normalises_with_the_l1_norm() -> None:
    """torchdistill 1.1.5's SPKDLoss calls normalize(G, 1), i.e. p=1: not the paper's (nor
    RepDistiller's) L2 rows, so we compare with the paper's equation above instead."""
    ref = _td().SPKDLoss("s", "t", reduction="batchmean")
    s, t = _maps(5)
    _assert_close(
        rel_diffs(lambda x: _sp_paper(x, t, p=1), lambda x: ref(_io(x, "s"), _io(t, "t")), s)
    )


def test_pkt_matches_torchdistill() -> None:
    ref = _td().PKTLoss("s", "output", "t", "output", eps=1e-7)
    s, t = _maps(6)
    s, t = s.flatten(1), t.flatten(1)  # PKT works on penultimate vectors
    _assert_close(rel_diffs(lambda x: pkt_loss(x, t), lambda x: ref(_io(x, "s"), _io(t, "t")), s))


@pytest.mark.parametrize(("gamma", "order"), [(0.4, 2), (1.0, 3)])
def test_cc_matches_torchdistill_squared(gamma: float, order: int) -> None:
    kernel = {"type": "gaussian", "gamma": gamma, "max_p": order}
    ref = _td().CCKDLoss("s", "t", kernel_config=kernel, reduction="batchmean")
    s, t = _maps(7)
    s, t = s.flatten(1), t.flatten(1)
    b = s.shape[0]

    def td(x: torch.Tensor) -> torch.Tensor:  # torchdistill on unit rows, squared back
        value = ref(_io(F.normalize(x, dim=1), "s"), _io(F.normalize(t, dim=1), "t"))
        return (value * b * b) ** 2 / (b * b)

    _assert_close(rel_diffs(lambda x: cc_loss(x, t, gamma=gamma, order=order), td, s))


def test_cc_kernel_approaches_the_gaussian_rbf() -> None:
    x = F.normalize(torch.randn(6, 9, generator=_gen(8), dtype=D), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(x, x).pow(2))
    torch.testing.assert_close(rbf_correlation(x, gamma=0.4, order=20), exact, rtol=0, atol=1e-12)
    assert float((rbf_correlation(x, gamma=0.4, order=2) - exact).abs().max()) < 0.05


@pytest.mark.parametrize("loss", [sp_loss, pkt_loss, cc_loss])
def test_relations_ignore_the_feature_basis_but_not_the_pairing(loss: Any) -> None:
    """Named for relations between samples: a student that is the teacher in another basis and
    scale (different width) costs nothing; swapping two samples does."""
    t = torch.randn(6, 5, generator=_gen(9), dtype=D)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=_gen(10), dtype=D))
    s = 3.0 * torch.cat([t, torch.zeros(6, 3, dtype=D)], dim=1) @ q  # (6, 8), isometric copy
    assert float(loss(s, t)) < 1e-12
    assert float(loss(s[[1, 0, 2, 3, 4, 5]], t)) > 1e-4


def test_relation_objectives_hook_sum_and_combine() -> None:
    s_maps, t_maps = _maps(11)
    logits = torch.randn(5, 4, generator=_gen(12), dtype=D)
    y = torch.tensor([0, 1, 2, 3, 0])
    obj = SPLoss({"b1": "l1", "b2": "l2"}, logit_loss=KDLoss(), weight=10.0)
    assert obj.student_features == {"sp0": "b1", "sp1": "b2"}
    assert obj.teacher_features == {"sp0": "l1", "sp1": "l2"}
    feats_s = {"sp0": s_maps, "sp1": s_maps.flatten(2)}
    feats_t = {"sp0": t_maps, "sp1": t_maps.flatten(1)}
    out = obj(Outputs(logits, feats_s), Outputs(logits.flip(1), feats_t), y)
    sp = sp_loss(s_maps, t_maps) + sp_loss(s_maps.flatten(2), t_maps.flatten(1))
    torch.testing.assert_close(out["sp"], sp)
    torch.testing.assert_close(out["loss"], 10.0 * sp + out["kd"] * 0.9 + out["ce"] * 0.1)
    pkt = PKTLoss({"fc_in": "fc_in"}, logit_loss=None, weight=2.0)
    value = pkt(Outputs(logits, {"pkt0": s_maps}), Outputs(logits, {"pkt0": t_maps}), None)
    torch.testing.assert_close(value["loss"], 2.0 * pkt_loss(s_maps, t_maps))
    assert set(value) == {"loss", "pkt"}


def test_relation_errors_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="layers is empty"):
        CCLoss({}, logit_loss=None)
    with pytest.raises(ValueError, match="order must be an int >= 1"):
        CCLoss({"a": "b"}, logit_loss=None, order=0)
    with pytest.raises(ValueError, match="gamma must be a finite number > 0"):
        CCLoss({"a": "b"}, logit_loss=None, gamma=-1.0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        sp_loss(torch.randn(3, 4), torch.randn(2, 4))
    with pytest.raises(KeyError, match=r"student_features=\{'pkt0': 'fc'\}"):
        PKTLoss({"fc": "fc"}, logit_loss=None)(
            Outputs(torch.randn(2, 3)), Outputs(torch.randn(2, 3))
        )
