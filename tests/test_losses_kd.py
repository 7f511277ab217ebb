"""Hinton KD and the cross-entropy baseline: golden values, peers, gradient, stability, errors.

Golden values were computed once in float64 with explicit sums over these literal logits
(softmax by exp/normalise, KL = Σ p log(p/q), CE = −log p_y) and are stored as literals.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses import CrossEntropy, KDLoss, kd_loss, kd_parts, soft_kd_loss
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


# (temperature, alpha) -> (T²·KL, CE, total)
GOLDEN = {
    (4.0, 0.9): (0.2804728179, 0.961657759, 0.348591312),
    (1.0, 0.5): (0.2349527729, 0.961657759, 0.598305266),
    (2.0, 1.0): (0.2680552877, 0.961657759, 0.2680552877),
}


@pytest.mark.parametrize(("temperature", "alpha"), list(GOLDEN))
def test_kd_golden_values(temperature: float, alpha: float) -> None:
    s, t, y = _inputs()
    soft, ce, total = GOLDEN[(temperature, alpha)]
    parts = kd_parts(s, t, y, temperature=temperature, alpha=alpha)
    assert parts["kd"].dtype == torch.float32
    assert parts["kd"].item() == pytest.approx(soft, rel=1e-5)
    assert parts["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(total, rel=1e-5)
    assert kd_loss(s, t, y, temperature=temperature, alpha=alpha).item() == pytest.approx(
        total, rel=1e-5
    )


def test_kd_soft_term_is_scaled_by_t_squared() -> None:
    # Without T² the T=4 value would be 16x smaller; this pins the factor (and batchmean:
    # an element-wise mean would be another 5x smaller).
    s, t, _ = _inputs()
    assert soft_kd_loss(s, t, temperature=4.0).item() == pytest.approx(0.2804728179, rel=1e-5)
    kl_t4 = F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1), reduction="sum") / 4
    assert soft_kd_loss(s, t, temperature=4.0).item() == pytest.approx(16 * kl_t4.item(), rel=1e-5)


def test_ce_golden_values_and_label_smoothing() -> None:
    s, _, y = _inputs()
    assert CrossEntropy()(Outputs(s), None, y)["ce"].item() == pytest.approx(0.961657759, rel=1e-5)
    smoothed = CrossEntropy(label_smoothing=0.1)(Outputs(s), None, y)
    assert smoothed["loss"].item() == pytest.approx(1.095157759, rel=1e-5)
    assert CrossEntropy.needs_teacher is False


def test_kd_objective_parts_and_weights() -> None:
    s, t, y = _inputs()
    out = KDLoss(temperature=4.0, alpha=0.9)(Outputs(s), Outputs(t), y)
    assert set(out) == {"loss", "kd", "ce"}
    assert out["loss"].item() == pytest.approx(0.9 * out["kd"].item() + 0.1 * out["ce"].item())
    assert out["loss"].item() == pytest.approx(0.348591312, rel=1e-5)


def test_soft_labels_are_accepted_as_targets() -> None:
    s, t, y = _inputs()
    probs = F.one_hot(y, 5).float()
    assert kd_loss(s, t, probs, temperature=2.0, alpha=0.5).item() == pytest.approx(
        kd_loss(s, t, y, temperature=2.0, alpha=0.5).item(), rel=1e-6
    )


def test_unlabelled_needs_alpha_one() -> None:
    s, t, _ = _inputs()
    out = KDLoss(temperature=2.0, alpha=1.0)(Outputs(s), Outputs(t), None)
    assert set(out) == {"loss", "kd"}
    assert out["loss"].item() == pytest.approx(0.2680552877, rel=1e-5)
    with pytest.raises(ValueError, match=r"alpha=1\.0 for pure teacher emulation"):
        kd_loss(s, t, None, temperature=2.0, alpha=0.9)


def test_torchdistill_kdloss_agrees() -> None:
    mid_level = pytest.importorskip("torchdistill.losses.mid_level")
    g = torch.Generator().manual_seed(1)
    for temperature, alpha in [(1.0, 0.5), (4.0, 0.9), (8.0, 0.3), (0.5, 0.0)]:
        s = torch.randn(16, 10, generator=g) * 3
        t = torch.randn(16, 10, generator=g) * 3
        y = torch.randint(0, 10, (16,), generator=g)
        # torchdistill's alpha weighs CE and beta the KL: alpha_td = 1 − alpha, beta_td = alpha.
        peer = mid_level.KDLoss(
            "s", "o", "t", "o", temperature=temperature, alpha=1 - alpha, beta=alpha
        )
        expected = peer({"s": {"o": s}}, {"t": {"o": t}}, y)
        ours = kd_loss(s, t, y, temperature=temperature, alpha=alpha)
        assert ours.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    # alpha = 1 (alpha_td = 0): torchdistill silently returns the KL without T², so compare ×T².
    peer = mid_level.KDLoss("s", "o", "t", "o", temperature=4.0, alpha=0.0, beta=1.0)
    kl = peer({"s": {"o": s}}, {"t": {"o": t}}, y)
    ours = kd_loss(s, t, y, temperature=4.0, alpha=1.0)
    assert ours.item() == pytest.approx(16 * kl.item(), rel=1e-5)


class _Pick(torch.nn.Module):
    """Returns one slice of a (B, 2, K) input: lets timm's task run on given logits."""

    def __init__(self, index: int, num_classes: int) -> None:
        super().__init__()
        self.index, self.num_classes, self.in_chans = index, num_classes, 2
        self.pretrained_cfg = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.index]


def test_timm_logit_distillation_task_agrees() -> None:
    distillation = pytest.importorskip("timm.task.distillation")
    g = torch.Generator().manual_seed(2)
    for temperature, alpha in [(1.0, 0.5), (4.0, 0.9), (2.0, 1.0), (10.0, 0.1)]:
        s = torch.randn(8, 7, generator=g) * 4
        t = torch.randn(8, 7, generator=g) * 4
        y = torch.randint(0, 7, (8,), generator=g)
        task = distillation.LogitDistillationTask(
            _Pick(0, 7),
            _Pick(1, 7),
            criterion=torch.nn.CrossEntropyLoss(),
            distill_loss_weight=alpha,
            task_loss_weight=1 - alpha,
            temperature=temperature,
            verbose=False,
        )
        # Student and teacher share the same mean/std, so the task feeds the input unchanged.
        out = task(torch.stack([s, t], dim=1), y)
        ours = kd_parts(s, t, y, temperature=temperature, alpha=alpha)
        assert ours["kd"].item() == pytest.approx(out["kd_loss"].item(), rel=1e-5, abs=1e-6)
        assert ours["ce"].item() == pytest.approx(out["task_loss"].item(), rel=1e-5)
        assert ours["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_soft_gradient_matches_closed_form(temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    s = (torch.randn(6, 9, generator=g, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randn(6, 9, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 9, (6,), generator=g)
    alpha = 0.7
    soft = alpha * kd_parts(s, t, y, temperature=temperature, alpha=alpha)["kd"]
    (grad,) = torch.autograd.grad(soft, s)
    expected = alpha * temperature * (F.softmax(s / temperature, 1) - F.softmax(t / temperature, 1))
    torch.testing.assert_close(grad, expected.detach() / 6, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0, 100.0])
@pytest.mark.parametrize("batch", [1, 5])
def test_extreme_logits_stay_finite(temperature: float, batch: int) -> None:
    g = torch.Generator().manual_seed(4)
    sign = torch.where(torch.rand(batch, 10, generator=g) > 0.5, 1.0, -1.0)
    s = (sign * 1e4).requires_grad_()
    t = -sign * 1e4
    y = torch.randint(0, 10, (batch,), generator=g)
    loss = kd_loss(s, t, y, temperature=temperature, alpha=0.5)
    loss.backward()
    assert torch.isfinite(loss)
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_half_precision_inputs_are_computed_in_float32() -> None:
    s, t, y = _inputs()
    out = kd_loss(s.bfloat16(), t.bfloat16(), y, temperature=4.0, alpha=0.9)
    assert out.dtype == torch.float32
    ref = kd_loss(s.bfloat16().float(), t.bfloat16().float(), y, temperature=4.0, alpha=0.9)
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)


def test_teacher_receives_no_gradient() -> None:
    s, t, y = _inputs()
    s.requires_grad_()
    t.requires_grad_()
    kd_loss(s, t, y, temperature=4.0, alpha=0.9).backward()
    assert t.grad is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": 0.0, "alpha": 0.5}, r"temperature must be a finite number > 0, got 0"),
        ({"temperature": -1.0, "alpha": 0.5}, r"temperature must be .* > 0"),
        ({"temperature": float("nan"), "alpha": 0.5}, r"temperature must be a finite"),
        ({"temperature": 4.0, "alpha": 1.5}, r"alpha must lie in \[0, 1\], got 1.5"),
        ({"temperature": 4.0, "alpha": -0.1}, r"alpha must lie in \[0, 1\]"),
    ],
)
def test_invalid_hyper_parameters_are_explained(kwargs: dict, message: str) -> None:
    s, t, y = _inputs()
    with pytest.raises(ValueError, match=message):
        kd_loss(s, t, y, **kwargs)
    with pytest.raises(ValueError, match=message):
        KDLoss(**kwargs)


def test_shape_mismatches_are_explained() -> None:
    s, t, y = _inputs()
    with pytest.raises(ValueError, match=r"5 outputs but the teacher's have 4.*num_classes=4"):
        kd_loss(s, t[:, :4], y, temperature=4.0, alpha=0.9)
    with pytest.raises(ValueError, match=r"different batch sizes: 4 vs 3"):
        kd_loss(s, t[:3], y, temperature=4.0, alpha=0.9)
    with pytest.raises(ValueError, match=r"shape \(N, K\).*flatten"):
        kd_loss(s[None], t[None], y, temperature=4.0, alpha=0.9)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 5\)"):
        kd_loss(s, t, torch.tensor([0, 1, 2, 5]), temperature=4.0, alpha=0.9)
    with pytest.raises(ValueError, match=r"target has 3 labels for a batch of 4"):
        kd_loss(s, t, y[:3], temperature=4.0, alpha=0.9)


def test_missing_teacher_or_labels_are_explained() -> None:
    s, _, _ = _inputs()
    with pytest.raises(ValueError, match=r"needs teacher outputs.*CrossEntropy\(\)"):
        KDLoss()(Outputs(s), None, None)
    with pytest.raises(ValueError, match=r"CrossEntropy needs labels"):
        CrossEntropy()(Outputs(s), None, None)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 1\]"):
        CrossEntropy(label_smoothing=2.0)
