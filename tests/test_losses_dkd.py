"""Decoupled KD: golden values, the target/non-target split, warm-up, stability, errors.

Golden values: float64 explicit sums on these literal logits: binary KL over (p_gt, 1 − p_gt)
and KL over softmax of the non-target logits, each × T² and averaged over the batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses import DKDLoss, dkd_loss, dkd_parts, kd_parts
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
Y = [3, 4, 1, 0]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(S), torch.tensor(T), torch.tensor(Y)


@pytest.mark.parametrize(
    ("temperature", "tckd", "nckd", "a1b8", "a05b2"),
    [
        (4.0, 0.08215938533, 0.2611472778, 2.171337608, 0.5633742483),
        (1.0, 0.1278216584, 0.1567718049, 1.381996098, 0.377454439),
    ],
)
def test_golden_values(
    temperature: float, tckd: float, nckd: float, a1b8: float, a05b2: float
) -> None:
    s, t, y = _inputs()
    parts = dkd_parts(s, t, y, temperature=temperature)
    assert parts["tckd"].item() == pytest.approx(tckd, rel=1e-5)
    assert parts["nckd"].item() == pytest.approx(nckd, rel=1e-5)
    assert dkd_loss(s, t, y, temperature=temperature).item() == pytest.approx(a1b8, rel=1e-5)
    half = dkd_loss(s, t, y, alpha=0.5, beta=2.0, temperature=temperature)
    assert half.item() == pytest.approx(a05b2, rel=1e-5)


def _probability_form(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The paper's definition written with probabilities (float64 reference, moderate logits)."""
    gt = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
    tckd = (b_t * (b_t / b_s).log()).sum() / len(y)
    q_s = p_s[~gt].view(len(y), -1)
    q_t = p_t[~gt].view(len(y), -1)
    q_s, q_t = q_s / q_s.sum(1, keepdim=True), q_t / q_t.sum(1, keepdim=True)
    nckd = (q_t * (q_t / q_s).log()).sum() / len(y)
    return (tckd + 8.0 * nckd) * temperature**2


def test_agrees_with_the_probability_form_on_random_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    for temperature in (1.0, 4.0):
        s = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
        t = torch.randn(16, 10, generator=g, dtype=torch.float64) * 3
        y = torch.randint(0, 10, (16,), generator=g)
        ours = dkd_loss(s.float(), t.float(), y, alpha=1.0, beta=8.0, temperature=temperature)
        assert ours.item() == pytest.approx(
            _probability_form(s, t, y, temperature).item(), rel=1e-5
        )


def test_target_class_split() -> None:
    s, t, y = _inputs()
    base = dkd_parts(s, t, y, temperature=2.0)
    # Moving the student's target logit changes only the binary (target-class) term...
    bumped = s.clone()
    bumped[torch.arange(4), y] += 1.5
    moved = dkd_parts(bumped, t, y, temperature=2.0)
    assert moved["nckd"].item() == pytest.approx(base["nckd"].item(), rel=1e-6)
    assert moved["tckd"].item() != pytest.approx(base["tckd"].item(), rel=1e-3)
    # ...and the decomposition of KD holds per sample: KD = TCKD + (1 − p_gt_teacher)·NCKD.
    for i in range(4):
        one = dkd_parts(s[i : i + 1], t[i : i + 1], y[i : i + 1], temperature=2.0)
        kd = kd_parts(s[i : i + 1], t[i : i + 1], temperature=2.0, alpha=1.0)["kd"]
        p_gt = F.softmax(t[i] / 2.0, 0)[y[i]]
        assert kd.item() == pytest.approx((one["tckd"] + (1 - p_gt) * one["nckd"]).item(), rel=1e-5)
    # the split follows the labels: another target gives other terms
    other = dkd_parts(s, t, (y + 1) % 5, temperature=2.0)
    assert other["tckd"].item() != pytest.approx(base["tckd"].item(), rel=1e-3)


def _factors(obj: DKDLoss, progress: list[tuple[int, float]]) -> list[float]:
    """The DKD term's weight in the loss at each (step, 0-based fractional epoch)."""
    s, t, y = _inputs()
    ce = F.cross_entropy(s, y).item()
    seen = []
    for step, epoch in progress:
        obj.on_progress(step, epoch)
        out = obj(Outputs(s), Outputs(t), y)
        assert set(out) == {"loss", "ce", "tckd", "nckd"}
        seen.append((out["loss"].item() - ce) / 2.171337608)
    return seen


PROGRESS = [(0, 0.0), (5, 0.5), (50, 5.0), (99, 9.99), (100, 10.0), (200, 20.0), (300, 30.0)]


def test_warmup_follows_mdistillers_whole_epochs_by_default() -> None:
    # min(e / 20, 1), e = the 1-based integer epoch, constant within an epoch
    obj = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0, ce_weight=1.0, warmup_epochs=20)
    assert _factors(obj, PROGRESS) == pytest.approx(
        [1 / 20, 1 / 20, 6 / 20, 10 / 20, 11 / 20, 1.0, 1.0], abs=1e-5
    )
    # warmup_epochs=1 (the ImageNet setting): the full term from the very first step
    assert _factors(DKDLoss(warmup_epochs=1.0, beta=8.0), [(0, 0.0), (3, 0.3)]) == pytest.approx(
        [1.0, 1.0], abs=1e-5
    )


def test_linear_warmup_ramps_per_step_when_asked() -> None:
    obj = DKDLoss(alpha=1.0, beta=8.0, temperature=4.0, warmup_epochs=20, warmup_schedule="linear")
    assert _factors(obj, PROGRESS) == pytest.approx(
        [0.0, 0.025, 0.25, 0.4995, 0.5, 1.0, 1.0], abs=1e-5
    )


def test_warmup_without_progress_reports_raises() -> None:
    s, t, y = _inputs()
    with pytest.raises(RuntimeError, match=r"never told the epoch: call objective.on_progress"):
        DKDLoss(warmup_epochs=20)(Outputs(s), Outputs(t), y)
    out = DKDLoss(warmup_epochs=0)(Outputs(s), Outputs(t), y)  # no warm-up, no report needed
    assert out["loss"].item() == pytest.approx(F.cross_entropy(s, y).item() + 2.171337608, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0, 100.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_extreme_logits_stay_finite(temperature: float, batch: int) -> None:
    g = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(batch, 6, generator=g) > 0.5, 1.0, -1.0)
    s = (sign * 1e4).requires_grad_()
    y = torch.randint(0, 6, (batch,), generator=g)
    obj = DKDLoss(temperature=temperature, warmup_epochs=0)
    out = obj(Outputs(s), Outputs(-sign * 1e4), y)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_two_classes_have_no_non_target_term() -> None:
    s, t, y = _inputs()
    parts = dkd_parts(s[:, :2], t[:, :2], y % 2, temperature=4.0)
    assert parts["nckd"].item() == pytest.approx(0.0, abs=1e-7)


def test_errors_name_the_problem() -> None:
    s, t, y = _inputs()
    with pytest.raises(ValueError, match=r"hard class labels .* use KDLoss"):
        dkd_loss(s, t, F.one_hot(y, 5).float())
    with pytest.raises(ValueError, match=r"at least 2 classes"):
        dkd_loss(s[:, :1], t[:, :1], torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"temperature must be"):
        DKDLoss(temperature=0)
    with pytest.raises(ValueError, match=r"beta must be a finite number >= 0"):
        DKDLoss(beta=-1)
    with pytest.raises(ValueError, match=r"warmup_epochs must be"):
        DKDLoss(warmup_epochs=-5)
    with pytest.raises(ValueError, match=r"warmup_schedule must be one of \('epoch', 'linear'\)"):
        DKDLoss(warmup_schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"DKD needs class labels"):
        DKDLoss(warmup_epochs=0)(Outputs(s), Outputs(t), None)
