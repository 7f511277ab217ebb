"""MLKD: against the authors' equations written out here (values and gradients in float64, 1e-6
relative), what each level is named for, the confidence mask, hostile inputs and errors.

The reference follows Jin-Ying/Multi-Level-Logit-Distillation (KD_ours.py) term by term, with
its two views: CE_WEIGHT·(CE_weak + CE_strong) + KD_WEIGHT·(m·Σ KD_T(weak) + Σ KD_T(strong) +
m_c·Σ CC_T(weak) + m·Σ BC_T(weak)), the masks' fractions m, m_c from numpy's percentile as there.
Ours maps ce_weight = 2·CE_WEIGHT (its "ce" is the mean over the views), kd_weight = KD_WEIGHT.
torchdistill 1.1.5 has no MLKD.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from distill.losses.mlkd import (
    DEFAULT_TEMPERATURES,
    MLKDLoss,
    batch_correlation_loss,
    class_correlation_loss,
    confidence_masks,
    mlkd_loss,
    mlkd_parts,
)
from distill.types import Outputs

D = torch.float64
Temps = tuple[float, ...]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int, b: int = 6, k: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    s = 2 * torch.randn(b, k, generator=g, dtype=D)
    t = 3 * torch.randn(b, k, generator=g, dtype=D)
    return s, t, torch.randint(0, k, (b,), generator=g)


# --- the reference, written from the authors' code without calling ours -------------------


def _softmax(z: torch.Tensor, temp: float) -> torch.Tensor:
    e = torch.exp((z - z.max(dim=1, keepdim=True).values) / temp)
    return e / e.sum(dim=1, keepdim=True)


def _kd(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """T² · mean_i Σ_k p_t,ik (log p_t,ik − log p_s,ik)."""
    p_s, p_t = _softmax(s, temp), _softmax(t, temp)
    total = torch.zeros((), dtype=s.dtype)
    for i in range(s.shape[0]):
        total = total + (p_t[i] * (p_t[i].log() - p_s[i].log())).sum()
    return total / s.shape[0] * temp**2


def _gram_loss(p_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """Σ_ij (Σ_k t_ik t_jk − Σ_k s_ik s_jk)² over the rows of (N, M) inputs, explicit sums."""
    n = p_s.shape[0]
    total = torch.zeros((), dtype=p_s.dtype)
    for i in range(n):
        for j in range(n):
            total = total + ((p_t[i] * p_t[j]).sum() - (p_s[i] * p_s[j]).sum()) ** 2
    return total


def _bc(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    return _gram_loss(_softmax(s, temp), _softmax(t, temp)) / s.shape[0]  # / batch size


def _cc(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    return _gram_loss(_softmax(s, temp).T, _softmax(t, temp).T) / s.shape[1]  # / classes


def _fractions(t_weak: torch.Tensor, percentile: float = 50.0) -> tuple[float, float]:
    p = _softmax(t_weak, 1.0).numpy()
    conf, per_class = p.max(axis=1), p.sum(axis=0)
    m = float((conf <= np.percentile(conf, percentile)).mean())
    m_c = float((per_class <= np.percentile(per_class, percentile)).mean())
    return m, m_c


def _zscore(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(dim=-1, keepdim=True)) / (1e-7 + z.std(dim=-1, keepdim=True))


def _ce(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    log_p = s - s.logsumexp(dim=1, keepdim=True)
    return -torch.stack([log_p[i, y[i]] for i in range(s.shape[0])]).mean()


def _authors(
    sw: torch.Tensor,
    tw: torch.Tensor,
    y: torch.Tensor,
    temps: Temps,
    *,
    ce_w: float,
    kd_w: float,
    ss: torch.Tensor | None = None,
    ts: torch.Tensor | None = None,
    logit_stand: bool = False,
) -> torch.Tensor:
    ss, ts = (sw, tw) if ss is None or ts is None else (ss, ts)
    m, m_c = _fractions(tw)
    kd_in = _zscore if logit_stand else (lambda z: z)
    loss_ce = ce_w * (_ce(sw, y) + _ce(ss, y))
    loss_kd = sum(kd_w * m * _kd(kd_in(sw), kd_in(tw), T) for T in temps) + sum(
        kd_w * _kd(kd_in(ss), kd_in(ts), T) for T in temps
    )
    loss_cc = sum(kd_w * m_c * _cc(sw, tw, T) for T in temps)
    loss_bc = sum(kd_w * m * _bc(sw, tw, T) for T in temps)
    return loss_ce + loss_kd + loss_cc + loss_bc  # type: ignore[return-value]


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
    dv = float((va.detach() - vb.detach()).abs() / vb.detach().abs().clamp_min(1e-300))
    dg = float((ga - gb).abs().max() / gb.abs().max().clamp_min(1e-300))
    return dv, dg


def _assert_close(diffs: tuple[float, float]) -> None:
    assert diffs[0] < 1e-6 and diffs[1] < 1e-6, diffs


def _kd_parts(s: torch.Tensor, t: torch.Tensor, **kwargs: float) -> dict[str, torch.Tensor]:
    """The teacher terms alone (no labels, ce_weight=0)."""
    return mlkd_parts(s, t, ce_weight=0.0, **kwargs)  # type: ignore[arg-type]


# --- equality with the reference ----------------------------------------------------------


@pytest.mark.parametrize(
    ("temps", "ce_w", "kd_w", "b"),
    [
        (DEFAULT_TEMPERATURES, 0.1, 0.9, 6),
        ((1.0, 3.0, 5.0, 2.0, 6.0), 0.5, 0.5, 7),
        ((4.0,), 1, 2, 3),
    ],
)
def test_one_view_matches_the_authors_code_with_strong_equal_to_weak(
    temps: Temps, ce_w: float, kd_w: float, b: int
) -> None:
    s, t, y = _batch(1, b=b)
    _assert_close(
        rel_diffs(
            lambda x: mlkd_loss(x, t, y, temperatures=temps, ce_weight=2 * ce_w, kd_weight=kd_w),
            lambda x: _authors(x, t, y, temps, ce_w=ce_w, kd_w=kd_w),
            s,
        )
    )


def test_two_views_match_the_authors_code_through_either_view() -> None:
    s, t, y = _batch(2)
    s_strong, t_strong, _ = _batch(3)
    temps = (1.0, 2.0, 3.0, 5.0, 6.0)

    def ours(sw: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        return mlkd_parts(
            sw,
            t,
            y,
            temperatures=temps,
            ce_weight=1.0,
            kd_weight=0.5,
            student_strong=ss,
            teacher_strong=t_strong,
        )["loss"]

    def ref(sw: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
        return _authors(sw, t, y, temps, ce_w=0.5, kd_w=0.5, ss=ss, ts=t_strong)

    _assert_close(rel_diffs(lambda x: ours(x, s_strong), lambda x: ref(x, s_strong), s))
    _assert_close(rel_diffs(lambda x: ours(s, x), lambda x: ref(s, x), s_strong))


def test_standardize_matches_the_ls_authors_mlkd() -> None:
    """MLKD+LS: z-scored logits in the instance term only; masks, batch and class terms raw."""
    s, t, y = _batch(4)
    temps = (2.0, 3.0, 5.0, 2.0, 6.0)  # their --base-temp 2: T = 2 twice
    _assert_close(
        rel_diffs(
            lambda x: mlkd_loss(
                x, t, y, temperatures=temps, ce_weight=0.2, kd_weight=9.0, standardize=True
            ),
            lambda x: _authors(x, t, y, temps, ce_w=0.1, kd_w=9.0, logit_stand=True),
            s,
        )
    )


def test_parts_are_the_unweighted_terms_and_the_masks_match_numpy() -> None:
    s, t, y = _batch(5, b=9, k=7)  # odd batch: the median itself is kept
    p = mlkd_parts(s, t, y, temperatures=(2.0, 4.0))
    m, m_c = _fractions(t)
    instance = (1 + m) * (_kd(s, t, 2.0) + _kd(s, t, 4.0))
    torch.testing.assert_close(p["instance"], instance, rtol=1e-9, atol=0)
    torch.testing.assert_close(p["batch"], m * (_bc(s, t, 2.0) + _bc(s, t, 4.0)), rtol=1e-9, atol=0)
    torch.testing.assert_close(p["class"], m_c * (_cc(s, t, 2) + _cc(s, t, 4)), rtol=1e-9, atol=0)
    torch.testing.assert_close(p["ce"], _ce(s, y), rtol=1e-12, atol=0)
    torch.testing.assert_close(
        p["loss"], 0.2 * p["ce"] + 0.9 * (p["instance"] + p["batch"] + p["class"])
    )
    for b in (1, 2, 5, 8):
        for q in (0.0, 30.0, 50.0, 100.0):
            tl = torch.randn(b, 6, generator=_gen(b), dtype=D)
            samples, classes = confidence_masks(tl, q)
            conf, per_class = _softmax(tl, 1.0).max(1).values.numpy(), _softmax(tl, 1.0).sum(0)
            assert samples.tolist() == (conf <= np.percentile(conf, q)).tolist()
            assert classes.tolist() == (per_class.numpy() <= np.percentile(per_class, q)).tolist()


# --- what each part is named for ----------------------------------------------------------


def test_the_mask_keeps_the_less_confident_half_and_scales_by_the_kept_fraction() -> None:
    """Named for the confidence mask: it keeps samples whose teacher is *less* sure than the
    median, and (as in the authors' code) scales the batch-mean term by the kept fraction, so
    switching it off (mask_percentile=100) changes the loss whenever confidences differ."""
    t = torch.tensor([[4.0, 0, 0], [1.0, 0, 0], [9.0, 0, 0], [0.5, 0, 0]], dtype=D)
    s = torch.randn(4, 3, generator=_gen(6), dtype=D)
    samples, _ = confidence_masks(t)
    assert samples.tolist() == [False, True, False, True]
    masked, unmasked = _kd_parts(s, t), _kd_parts(s, t, mask_percentile=100.0)
    torch.testing.assert_close(
        masked["instance"] / unmasked["instance"], torch.tensor(1.5 / 2, dtype=D)
    )
    torch.testing.assert_close(masked["batch"], 0.5 * unmasked["batch"])
    assert float((masked["loss"] - unmasked["loss"]).abs()) > 1e-3
    # a teacher equally (un)sure of every sample and class: every entry is at the median
    tied = torch.zeros(3, 3, dtype=D)
    torch.testing.assert_close(
        _kd_parts(s[:3], tied)["loss"], _kd_parts(s[:3], tied, mask_percentile=100.0)["loss"]
    )


def test_class_level_sees_classes_and_batch_level_sees_samples() -> None:
    """P_sᵀP_s ignores the order of the samples, P_sP_sᵀ that of the classes: a student whose
    rows are the teacher's shuffled matches it at the class level only, one whose columns are
    shuffled at the batch level only."""
    t = torch.randn(5, 6, generator=_gen(7), dtype=D)
    rows, cols = t[[2, 0, 4, 1, 3]], t[:, [5, 3, 4, 0, 1, 2]]
    assert float(class_correlation_loss(rows, t, temperature=2.0)) < 1e-15
    assert float(batch_correlation_loss(rows, t, temperature=2.0)) > 1e-4
    assert float(batch_correlation_loss(cols, t, temperature=2.0)) < 1e-15
    assert float(class_correlation_loss(cols, t, temperature=2.0)) > 1e-4
    assert float(_kd_parts(t, t)["loss"]) < 1e-12


def test_standardize_makes_the_instance_term_blind_to_each_rows_scale_and_shift() -> None:
    s, t, _ = _batch(8)
    a = torch.linspace(0.5, 3.0, 6, dtype=D).unsqueeze(1)
    moved = a * s + torch.linspace(-4, 4, 6, dtype=D).unsqueeze(1)
    std, raw = _kd_parts(s, t, standardize=True), _kd_parts(moved, t, standardize=True)
    torch.testing.assert_close(std["instance"], raw["instance"], rtol=1e-6, atol=0)
    assert float((_kd_parts(s, t)["instance"] - _kd_parts(moved, t)["instance"]).abs()) > 1e-2
    assert float((std["batch"] - raw["batch"]).abs()) > 0  # batch/class terms stay on raw logits


# --- hostile inputs -----------------------------------------------------------------------

BIG = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), b=st.sampled_from([1, 2]), k=st.integers(2, 5), std=st.booleans())
def test_finite_values_and_gradients_at_extreme_logits(
    data: st.DataObject, b: int, k: int, std: bool
) -> None:
    s = torch.from_numpy(data.draw(arrays(np.float32, (b, k), elements=BIG)).copy())
    t = torch.from_numpy(data.draw(arrays(np.float32, (b, k), elements=BIG)).copy())
    y = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)))
    s.requires_grad_()
    out = MLKDLoss(standardize=std)(Outputs(s), Outputs(t), y)
    assert all(math.isfinite(float(v.detach())) for v in out.values()), out
    (grad,) = torch.autograd.grad(out["loss"], s)
    assert torch.isfinite(grad).all()


# --- the objective and its errors ---------------------------------------------------------


def test_objective_parts_record_and_no_label_case() -> None:
    s, t, y = _batch(9)
    obj = MLKDLoss(temperatures=[1, 2, 3, 5, 6], ce_weight=1.0, kd_weight=0.5)
    out = obj(Outputs(s), Outputs(t), y)
    assert set(out) == {"loss", "instance", "batch", "class", "ce"}
    want = mlkd_parts(s, t, y, temperatures=(1, 2, 3, 5, 6), ce_weight=1.0, kd_weight=0.5)
    torch.testing.assert_close(out["loss"], want["loss"])
    assert obj.temperatures == (1.0, 2.0, 3.0, 5.0, 6.0) and obj.temperature is None
    assert dict(MLKDLoss.common_args) == {}  # its kd_weight is not the recipes' convex weight
    unlabelled = MLKDLoss(ce_weight=0.0)(Outputs(s), Outputs(t), None)
    assert set(unlabelled) == {"loss", "instance", "batch", "class"}
    soft = torch.softmax(torch.randn(6, 5, generator=_gen(10), dtype=D), dim=1)
    assert math.isfinite(float(obj(Outputs(s), Outputs(t), soft)["ce"]))  # mixup labels
    assert "temperatures=(1.0, 2.0, 3.0, 5.0, 6.0)" in repr(obj)


def test_errors_say_what_to_change() -> None:
    s, t, y = _batch(11)
    with pytest.raises(ValueError, match=r"sequence of numbers.*\(4,\) for one"):
        MLKDLoss(temperatures=4.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperatures is empty"):
        MLKDLoss(temperatures=())
    with pytest.raises(ValueError, match=r"temperatures\[1\] must be a finite number > 0"):
        MLKDLoss(temperatures=(2.0, -1.0))
    with pytest.raises(ValueError, match=r"mask_percentile must lie in \[0, 100\].*no mask"):
        MLKDLoss(mask_percentile=150.0)
    with pytest.raises(ValueError, match=r"ce_weight must be a finite number >= 0.*CE_WEIGHT"):
        MLKDLoss(ce_weight=-1.0)
    with pytest.raises(TypeError, match="standardize must be True or False"):
        MLKDLoss(standardize="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"set ce_weight=0\.0"):
        MLKDLoss()(Outputs(s), Outputs(t), None)
    with pytest.raises(ValueError, match="pass both student_strong and teacher_strong"):
        mlkd_parts(s, t, y, student_strong=s)
    with pytest.raises(ValueError, match="two augmentations of the same batch"):
        mlkd_parts(s, t, y, student_strong=s[:3], teacher_strong=t[:3])
    with pytest.raises(ValueError, match="num_classes=5"):
        mlkd_loss(torch.randn(6, 4), t, y)
    with pytest.raises(ValueError, match="needs teacher outputs"):
        MLKDLoss()(Outputs(s), None, y)
