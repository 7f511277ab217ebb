"""Our losses against references this project did not write.

- torchdistill 1.1.5 (installed by `make install`): `ATLoss(mode="code")` and `RKDLoss`, called
  through their io_dict interface ({module path: {"output": tensor}}), values and gradients in
  float64.
- Where torchdistill has no counterpart, the authors' equations written out here in float64:
  AT with maps of different sizes (RepDistiller's `Attention` / mdistiller's `AT` pool the larger
  feature map), DKD's warm-up (mdistiller: min(epoch / WARMUP, 1), epochs counted from 1), and
  FitNets' regressor (RepDistiller's `ConvReg`: conv -> BatchNorm -> ReLU).

Mapping of conventions: torchdistill's ATLoss returns Σ_pairs weight · mean (a_s − a_t)² with
a = normalize(mean_c f²) and no pooling; its pair weight 1 and our beta multiply that sum. Its
RKDLoss works on the flattened raw outputs (our normalize=False) with SmoothL1Loss(reduction=
"mean") over all B² distances and B³ angles (our average="all"); dist_factor and angle_factor are
our distance_weight and angle_weight.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from distill.losses import ATLoss, DKDLoss, EmbeddingDistillLoss, FitNetLoss, at_loss, rkd_loss
from distill.types import Outputs

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-6) -> None:
    """Agreement to `rel` relative to the largest reference entry (gradients have zeros)."""
    scale = float(ref.detach().abs().max())
    torch.testing.assert_close(ours, ref, rtol=rel, atol=rel * scale)


# --- attention transfer --------------------------------------------------------------------


def _td_io(maps: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    return {path: {"output": x} for path, x in maps.items()}


def test_at_equals_torchdistill_code_mode_times_beta() -> None:
    mid_level: Any = pytest.importorskip("torchdistill.losses.mid_level")
    g = _gen(0)
    s = {
        "s1": torch.randn(4, 3, 8, 8, generator=g, dtype=D, requires_grad=True),
        "s2": torch.randn(4, 6, 4, 4, generator=g, dtype=D, requires_grad=True),
    }
    t = {
        "t1": torch.randn(4, 5, 8, 8, generator=g, dtype=D),
        "t2": torch.randn(4, 7, 4, 4, generator=g, dtype=D),
    }
    pairs = {
        f"p{i}": {
            "student": {"io": "output", "path": sp},
            "teacher": {"io": "output", "path": tp},
            "weight": 1,
        }
        for i, (sp, tp) in enumerate((("s1", "t1"), ("s2", "t2")))
    }
    ref = 1000.0 * mid_level.ATLoss(pairs, mode="code")(_td_io(s), _td_io(t))
    obj = ATLoss({"s1": "t1", "s2": "t2"}, logit_loss=None, beta=1000.0)
    out = obj(
        Outputs(torch.zeros(4, 2), {"at0": s["s1"], "at1": s["s2"]}),
        Outputs(torch.zeros(4, 2), {"at0": t["t1"], "at1": t["t2"]}),
    )
    _close(out["loss"], ref, rel=1e-12)  # was half of it (beta/2 · Σ)
    _close(out["at"], ref / 1000.0, rel=1e-12)
    grads = torch.autograd.grad(out["loss"], [s["s1"], s["s2"]])
    ref_grads = torch.autograd.grad(ref, [s["s1"], s["s2"]])
    for ours, theirs in zip(grads, ref_grads):
        _close(ours, theirs, rel=1e-10)


def _adaptive_pool(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Adaptive average pooling written out: output cell i covers rows
    floor(i·H/h) .. ceil((i+1)·H/h) − 1 (and the same for columns)."""
    rows = []
    for i in range(h):
        r0, r1 = (i * x.shape[2]) // h, math.ceil((i + 1) * x.shape[2] / h)
        cols = []
        for j in range(w):
            c0, c1 = (j * x.shape[3]) // w, math.ceil((j + 1) * x.shape[3] / w)
            cols.append(x[:, :, r0:r1, c0:c1].mean(dim=(2, 3)))
        rows.append(torch.stack(cols, dim=-1))
    return torch.stack(rows, dim=-2)


def _at_reference(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller / mdistiller: pool the larger feature map, then a = normalize(mean_c f²),
    mean over (B, H·W) of (a_s − a_t)²."""
    h, w = min(f_s.shape[2], f_t.shape[2]), min(f_s.shape[3], f_t.shape[3])
    if f_s.shape[2:] != (h, w):
        f_s = _adaptive_pool(f_s, h, w)
    if f_t.shape[2:] != (h, w):
        f_t = _adaptive_pool(f_t, h, w)

    def att(f: torch.Tensor) -> torch.Tensor:
        q = (f * f).sum(dim=1).reshape(f.shape[0], -1) / f.shape[1]
        return q / (q * q).sum(dim=1, keepdim=True).sqrt()

    return ((att(f_s) - att(f_t)) ** 2).sum() / (f_s.shape[0] * h * w)


@pytest.mark.parametrize(
    ("student_hw", "teacher_hw"),
    [(4, 8), (8, 4), (4, 7), (7, 4), (5, 5)],  # teacher larger, student larger, uneven windows
)
def test_at_pools_the_larger_feature_map_like_the_references(
    student_hw: int, teacher_hw: int
) -> None:
    g = _gen(1)
    f_s = torch.randn(3, 4, student_hw, student_hw, generator=g, dtype=D, requires_grad=True)
    f_t = torch.randn(3, 6, teacher_hw, teacher_hw, generator=g, dtype=D)
    ours, ref = at_loss(f_s, f_t), _at_reference(f_s, f_t)
    _close(ours, ref, rel=1e-10)  # before: the attention map was resized (×0.75 / ×0.19 off)
    _close(torch.autograd.grad(ours, f_s)[0], torch.autograd.grad(ref, f_s)[0], rel=1e-9)


# --- DKD warm-up ---------------------------------------------------------------------------


def _dkd_reference(
    s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """TCKD, NCKD from probabilities (Zhao et al. Eq. 2-4), each · T², summed over the batch / B."""
    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    tckd = torch.zeros((), dtype=D)
    nckd = torch.zeros((), dtype=D)
    for i, k in enumerate(y.tolist()):
        b_s = torch.stack([p_s[i, k], 1 - p_s[i, k]])
        b_t = torch.stack([p_t[i, k], 1 - p_t[i, k]])
        tckd = tckd + (b_t * (b_t.log() - b_s.log())).sum()
        keep = [j for j in range(s.shape[1]) if j != k]
        q_s, q_t = p_s[i, keep] / p_s[i, keep].sum(), p_t[i, keep] / p_t[i, keep].sum()
        nckd = nckd + (q_t * (q_t.log() - q_s.log())).sum()
    n = len(y)
    return tckd / n * temperature**2, nckd / n * temperature**2


@pytest.mark.parametrize(("warmup", "beta", "temperature"), [(1.0, 2.0, 1.0), (20.0, 8.0, 4.0)])
def test_dkd_follows_mdistillers_warmup_as_fed_by_the_distiller(
    warmup: float, beta: float, temperature: float
) -> None:
    g = _gen(2)
    s = torch.randn(6, 10, generator=g, dtype=D) * 2
    t = torch.randn(6, 10, generator=g, dtype=D) * 2
    y = torch.randint(0, 10, (6,), generator=g)
    tckd, nckd = _dkd_reference(s, t, y, temperature)
    ce = -F.log_softmax(s, dim=1)[torch.arange(6), y].mean()
    obj = DKDLoss(alpha=1.0, beta=beta, temperature=temperature, warmup_epochs=warmup)
    batches, step = 4, 0
    for epoch in range(3):  # the Distiller's feed: 0-based epoch + (batch − 1) / batches
        for batch in range(1, batches + 1):
            obj.on_progress(step, epoch + (batch - 1) / batches)
            step += 1
            mdistiller_weight = min((epoch + 1) / warmup, 1.0)  # its epoch counts from 1
            expected = ce + mdistiller_weight * (tckd + beta * nckd)
            out = obj(Outputs(s), Outputs(t), y)
            _close(out["loss"], expected, rel=1e-10)
    # the ImageNet setting (warmup 1): the first step already carries the full DKD term
    first = DKDLoss(warmup_epochs=1.0)
    first.on_progress(0, 0.0)
    assert first.warmup_factor == 1.0  # was 0.0


# --- RKD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [3, 8, 16])
@pytest.mark.parametrize(
    ("dist_factor", "angle_factor"), [(1.0, 2.0), (25.0, 50.0), (1.0, 0.0), (0.0, 1.0)]
)
def test_rkd_equals_torchdistill_values_and_gradients(
    batch: int, dist_factor: float, angle_factor: float
) -> None:
    mid_level: Any = pytest.importorskip("torchdistill.losses.mid_level")
    g = _gen(batch)
    s = torch.randn(batch, 5, generator=g, dtype=D, requires_grad=True)
    t = torch.randn(batch, 7, generator=g, dtype=D)
    td = mid_level.RKDLoss("s", "t", dist_factor, angle_factor, "mean")
    ref = td({"s": {"output": s}}, {"t": {"output": t}})
    ours = rkd_loss(s, t, normalize=False, distance_weight=dist_factor, angle_weight=angle_factor)
    _close(ours, ref)  # before: ×1.14 (distance) and ×1.52 (angle) at B = 8
    _close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(ref, s)[0])


def test_rkd_objective_maps_onto_torchdistill() -> None:
    mid_level: Any = pytest.importorskip("torchdistill.losses.mid_level")
    g = _gen(3)
    s, t = torch.randn(8, 5, generator=g, dtype=D), torch.randn(8, 7, generator=g, dtype=D)

    def td(a: torch.Tensor, b: torch.Tensor, dist: float, angle: float) -> torch.Tensor:
        loss = mid_level.RKDLoss("s", "t", dist, angle, "mean")
        return loss({"s": {"output": a}}, {"t": {"output": b}})  # type: ignore[no-any-return]

    def ours(**kwargs: Any) -> dict[str, torch.Tensor]:
        return EmbeddingDistillLoss(5, 7, "rkd", **kwargs)(Outputs(s), Outputs(t), None)

    # normalize=True (our default) is torchdistill on L2-normalised embeddings
    out = ours()
    _close(out["loss"], td(F.normalize(s, dim=1), F.normalize(t, dim=1), 1.0, 2.0))
    raw = ours(normalize=False, distance_weight=25.0, angle_weight=50.0)  # RepDistiller's CIFAR
    _close(raw["loss"], td(s, t, 25.0, 50.0))
    # average="distinct" rescales by the share of distinct pairs / triplets: 8/7 and 64/42
    distinct = ours(normalize=False, average="distinct")
    _close(distinct["rkd_distance"], td(s, t, 1.0, 0.0) * 8 / 7)
    _close(distinct["rkd_angle"], td(s, t, 0.0, 1.0) * 64 / 42)


# --- FitNets regressor ---------------------------------------------------------------------


def test_fitnet_regressor_is_conv_bn_relu_like_repdistillers_convreg() -> None:
    g = _gen(4)
    f_s = torch.randn(4, 3, 5, 5, generator=g, dtype=D)
    f_t = torch.relu(torch.randn(4, 6, 5, 5, generator=g, dtype=D))  # a post-ReLU teacher map
    obj = FitNetLoss(
        student_layer="a",
        teacher_layer="b",
        student_channels=3,
        teacher_channels=6,
        logit_loss=None,
    ).double()
    with torch.no_grad():  # a BN affine that is not the identity, so the ReLU matters
        obj.adapter.bn.weight.copy_(torch.rand(6, generator=g, dtype=D) + 0.5)
        obj.adapter.bn.bias.copy_(torch.randn(6, generator=g, dtype=D))
    out = obj(Outputs(torch.zeros(4, 2), {"hint": f_s}), Outputs(torch.zeros(4, 2), {"hint": f_t}))
    # written out: 1×1 conv, BatchNorm with the batch's biased statistics (eps 1e-5), ReLU
    w = obj.adapter.conv.weight.detach()[:, :, 0, 0]  # (Ct, Cs)
    z = torch.einsum("oc,bchw->bohw", w, f_s)
    mu = z.mean(dim=(0, 2, 3), keepdim=True)
    var = ((z - mu) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    gamma = obj.adapter.bn.weight.detach().view(1, -1, 1, 1)
    shift = obj.adapter.bn.bias.detach().view(1, -1, 1, 1)
    r = torch.clamp((z - mu) / torch.sqrt(var + 1e-5) * gamma + shift, min=0.0)
    expected = ((r - f_t) ** 2).sum() / r.numel()
    _close(out["hint"], expected, rel=1e-10)  # before: no ReLU
