"""Embedding distillation: squared difference, cosine, RKD; projection; stability.

Golden values: float64 explicit sums (norms, dot products, Huber with delta 1, summed over
all B² pairs and B³ triplets and divided by B² / B³ as in the RKD authors' code, or over pairs
i ≠ j and triplets of distinct i, j, k for average="distinct") on these literal embeddings,
stored as literals. The comparison with torchdistill's RKDLoss is in test_losses_references.py.
"""

from __future__ import annotations

import pytest
import torch

from distill.losses import (
    EmbeddingDistillLoss,
    embedding_cosine_loss,
    embedding_mse_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
)
from distill.losses.embedding import Kind
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


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(S), torch.tensor(T)


def test_golden_values() -> None:
    s, t = _inputs()
    assert embedding_mse_loss(s, t).item() == pytest.approx(0.4050662684, rel=1e-5)
    assert embedding_mse_loss(s, t, normalize=False).item() == pytest.approx(3.045, rel=1e-5)
    assert embedding_cosine_loss(s, t).item() == pytest.approx(0.2025331342, rel=1e-5)
    # averaged over all B² / B³ entries (changed on purpose from the distinct-only averages
    # below, which were the default before: ×12/16 and ×24/64 at B = 4)
    assert rkd_distance_loss(s, t).item() == pytest.approx(0.02950274205, rel=1e-5)
    assert rkd_angle_loss(s, t).item() == pytest.approx(0.02339024224, rel=1e-5)
    raw_d = rkd_distance_loss(s, t, normalize=False)
    raw_a = rkd_angle_loss(s, t, normalize=False)
    assert raw_d.item() == pytest.approx(0.02593441576, rel=1e-5)
    assert raw_a.item() == pytest.approx(0.02430539454, rel=1e-5)
    both = rkd_loss(s, t, normalize=False, distance_weight=1.0, angle_weight=2.0)
    assert both.item() == pytest.approx(0.02593441576 + 2 * 0.02430539454, rel=1e-5)
    distinct_d = rkd_distance_loss(s, t, average="distinct")
    distinct_a = rkd_angle_loss(s, t, average="distinct")
    assert distinct_d.item() == pytest.approx(0.03933698761, rel=1e-5)
    assert distinct_a.item() == pytest.approx(0.06237397786, rel=1e-5)
    raw_distinct = rkd_loss(s, t, normalize=False, average="distinct")
    assert raw_distinct.item() == pytest.approx(0.03457922021 + 2 * 0.06481438509, rel=1e-5)


def test_normalised_mse_is_two_minus_two_cosine() -> None:
    s, t = _inputs()
    assert embedding_mse_loss(s, t).item() == pytest.approx(
        2 * embedding_cosine_loss(s, t).item(), rel=1e-5
    )


def test_rkd_is_invariant_to_scale_and_rotation_of_the_teacher() -> None:
    # Relations, not positions: a rotated, scaled teacher teaches the same thing.
    s, t = _inputs()
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(0)))
    moved = 3.0 * t @ q
    for fn in (rkd_distance_loss, rkd_angle_loss):
        a = fn(s, t, normalize=False).item()
        assert fn(s, moved, normalize=False).item() == pytest.approx(a, rel=1e-4)


def test_projection_is_used_when_dimensions_differ() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 8, generator=g), torch.randn(6, 16, generator=g)
    obj = EmbeddingDistillLoss(student_dim=8, teacher_dim=16, kind="mse")
    assert isinstance(obj.projection, torch.nn.Linear)
    assert obj.projection.weight.shape == (16, 8)
    out = obj(Outputs(s), Outputs(t), None)
    out["loss"].backward()
    assert obj.projection.weight.grad is not None and obj.projection.weight.grad.abs().sum() > 0
    expected = embedding_mse_loss(s @ obj.projection.weight.detach().T, t)
    assert out["mse"].item() == pytest.approx(expected.item(), rel=1e-5)
    # equal sizes or RKD: nothing to learn
    assert isinstance(EmbeddingDistillLoss(16, 16).projection, torch.nn.Identity)
    assert isinstance(EmbeddingDistillLoss(8, 16, kind="rkd").projection, torch.nn.Identity)


def test_objective_kinds_and_parts() -> None:
    s, t = _inputs()
    assert set(EmbeddingDistillLoss(5, 5, "cosine")(Outputs(s), Outputs(t), None)) == {
        "loss",
        "cosine",
    }
    out = EmbeddingDistillLoss(5, 5, "rkd", angle_weight=2.0)(Outputs(s), Outputs(t), None)
    assert set(out) == {"loss", "rkd_distance", "rkd_angle"}
    assert out["loss"].item() == pytest.approx(0.02950274205 + 2 * 0.02339024224, rel=1e-5)
    distinct = EmbeddingDistillLoss(
        5, 5, "rkd", distance_weight=25, angle_weight=50, average="distinct"
    )
    out = distinct(Outputs(s), Outputs(t), None)
    assert out["loss"].item() == pytest.approx(25 * 0.03933698761 + 50 * 0.06237397786, rel=1e-5)


def test_rkd_angles_keep_full_precision_under_autocast() -> None:
    # the angle term's bmm would run in bfloat16 under autocast (rel. error ~1e-4)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    reference = rkd_angle_loss(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rkd_angle_loss(s, t)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(reference.item(), rel=1e-6)


def test_duplicates_and_tiny_batches_stay_finite() -> None:
    s = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss = rkd_loss(s, t)
    loss.backward()
    assert torch.isfinite(loss) and s.grad is not None and torch.isfinite(s.grad).all()
    for b in (1, 2):
        x = torch.randn(b, 4, requires_grad=True)
        assert rkd_loss(x, torch.randn(b, 4)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("kind", ["mse", "cosine", "rkd"])
@pytest.mark.parametrize("normalize", [True, False])
def test_extreme_embeddings_stay_finite(kind: Kind, normalize: bool) -> None:
    g = torch.Generator().manual_seed(2)
    s = (torch.randn(4, 6, generator=g).sign() * 1e4).requires_grad_()
    t = torch.randn(4, 6, generator=g).sign() * -1e4
    out = EmbeddingDistillLoss(6, 6, kind, normalize=normalize)(Outputs(s), Outputs(t), None)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and s.grad is not None and torch.isfinite(s.grad).all()


def test_errors_name_the_problem() -> None:
    s, t = _inputs()
    with pytest.raises(ValueError, match=r"EmbeddingDistillLoss\(student_dim=5, teacher_dim=3\)"):
        embedding_mse_loss(s, t[:, :3])
    with pytest.raises(ValueError, match=r"kind must be one of"):
        EmbeddingDistillLoss(5, 5, kind="l1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"expected \(N, 8\): set student_dim"):
        EmbeddingDistillLoss(8, 5)(Outputs(s), Outputs(t), None)
    with pytest.raises(ValueError, match=r"different batch sizes"):
        rkd_loss(s, t[:3])
    with pytest.raises(ValueError, match=r"average must be one of \('all', 'distinct'\)"):
        EmbeddingDistillLoss(5, 5, "rkd", average="pairs")  # type: ignore[arg-type]
