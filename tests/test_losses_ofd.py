"""OFD: the margin against the authors' closed form (written out with math/scipy) and a Monte
Carlo estimate, the partial L2 and its normalisation against explicit loops (float64 values and
gradients, 1e-6 relative), what the method is named for, a real forward+backward, and errors.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from torch import nn

from distill.losses.ce import CrossEntropy
from distill.losses.ofd import OFDLoss, bn_margin, gaussian_margin, ofd_loss, partial_l2
from distill.models import mobilenet_v1
from distill.step import StudentStep
from distill.teacher import Teacher
from distill.types import Outputs

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _authors_margin(weight: list[float], bias: list[float]) -> list[float]:
    """get_margin_from_BN of clovaai/overhaul-distillation, per channel, in plain floats."""
    out = []
    for w, b in zip(weight, bias, strict=True):
        s, m = abs(w), b
        p = norm.cdf(-m / s)
        if p > 0.001:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / p + m)
        else:
            out.append(-3 * s)
    return out


def _loop_partial_l2(s: torch.Tensor, t: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Eq. 5 element by element: skip where s <= t̂ and t̂ <= 0, t̂ = max(t, m_c)."""
    total = torch.zeros((), dtype=s.dtype)
    b, c, h, w = s.shape
    values = s.detach()
    for i in range(b):
        for j in range(c):
            for y in range(h):
                for x in range(w):
                    target = max(float(t[i, j, y, x]), float(margin[j]))
                    if float(values[i, j, y, x]) <= target and target <= 0:
                        continue
                    total = total + (s[i, j, y, x] - target) ** 2
    return total


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --- margin -------------------------------------------------------------------------------


def test_margin_matches_the_authors_closed_form() -> None:
    g = _gen(0)
    weight = torch.randn(64, generator=g, dtype=D) * 2  # negative weights too: σ = |γ|
    bias = torch.randn(64, generator=g, dtype=D) * 3  # some with P(x < 0) <= 0.001: −3σ
    # either side of the authors' cut-off P(x < 0) = 0.001 (μ/σ = 3.09)
    weight[:2], bias[:2] = torch.tensor([1.0, -2.0], dtype=D), torch.tensor([3.0, 6.4], dtype=D)
    bn = nn.BatchNorm2d(64).double()
    with torch.no_grad():
        bn.weight.copy_(weight)
        bn.bias.copy_(bias)
        assert bn.running_mean is not None and bn.running_var is not None
        bn.running_mean.fill_(5.0)  # the running statistics do not enter
        bn.running_var.fill_(9.0)
    ref = torch.tensor(_authors_margin(weight.tolist(), bias.tolist()), dtype=D)
    assert (bias / weight.abs() > 3.1).any()  # the −3σ branch is exercised
    assert _rel(bn_margin(bn), ref) < 1e-6
    assert _rel(gaussian_margin(bias, weight), ref) < 1e-6
    assert (bn_margin(bn) < 0).all()


def test_margin_is_the_mean_of_the_negative_responses() -> None:
    """Monte Carlo: E[x | x < 0] for x ~ N(μ, σ), 2·10^6 samples per channel."""
    mean = torch.tensor([-1.0, 0.0, 0.7, 2.0], dtype=D)
    std = torch.tensor([0.5, 1.0, 2.0, 1.0], dtype=D)
    x = mean[:, None] + std[:, None] * torch.randn(4, 2_000_000, generator=_gen(1), dtype=D)
    neg = torch.where(x < 0, x, torch.nan)
    mc = torch.nanmean(neg, dim=1)
    se = torch.sqrt(torch.nanmean((neg - mc[:, None]) ** 2, dim=1) / (x < 0).sum(1))
    assert ((gaussian_margin(mean, std) - mc).abs() < 5 * se).all()


def test_margin_is_finite_where_the_formula_is_not() -> None:
    mean = torch.tensor([-1e4, 1e4, -2.0, 0.0, 3.0], dtype=D)
    std = torch.tensor([1.0, 1.0, 0.0, 0.0, 1e-12], dtype=D)
    m = gaussian_margin(mean, std)
    assert torch.isfinite(m).all()
    torch.testing.assert_close(m, torch.tensor([-1e4, -3.0, -2.0, 0.0, -3e-12], dtype=D))
    assert bn_margin(nn.BatchNorm2d(3, affine=False)).tolist() == pytest.approx(
        [_authors_margin([1.0], [0.0])[0]] * 3
    )


# --- distance -----------------------------------------------------------------------------


def test_partial_l2_and_normalisation_match_loops() -> None:
    g = _gen(2)
    shapes = [(2, 3, 4, 4), (2, 4, 2, 2), (2, 2, 1, 1)]
    s_maps = [torch.randn(sh, generator=g, dtype=D) for sh in shapes]
    t_maps = [torch.randn(sh, generator=g, dtype=D) for sh in shapes]
    margins = [-0.3 - torch.rand(sh[1], generator=g, dtype=D) for sh in shapes]
    a = [s.clone().requires_grad_() for s in s_maps]
    b = [s.clone().requires_grad_() for s in s_maps]
    ours = ofd_loss(a, t_maps, margins)
    n = len(shapes)
    ref = (
        sum(
            _loop_partial_l2(s, t, m) / 2 ** (n - i - 1)
            for i, (s, t, m) in enumerate(zip(b, t_maps, margins, strict=True))
        )
        / 2
    )  # / batch size
    assert isinstance(ref, torch.Tensor)
    assert _rel(ours, ref) < 1e-6
    ga, gb = torch.autograd.grad(ours, a), torch.autograd.grad(ref, b)
    assert max(_rel(x, y) for x, y in zip(ga, gb, strict=True)) < 1e-6
    one = partial_l2(s_maps[0], t_maps[0], margins[0])
    assert _rel(one, _loop_partial_l2(s_maps[0], t_maps[0], margins[0])) < 1e-6


def test_student_below_a_negative_target_is_ignored() -> None:
    margin = torch.tensor([-1.0], dtype=D)
    t = torch.tensor([-3.0, -0.5, 2.0], dtype=D).view(1, 1, 1, 3)  # targets −1, −0.5, 2
    low = torch.tensor([-5.0, -0.7, 1.0], dtype=D).view(1, 1, 1, 3)
    lower = torch.tensor([-50.0, -9.0, 1.0], dtype=D).view(1, 1, 1, 3)
    # below a non-positive target: nothing to learn (both sit at 0 after the ReLU)
    assert float(partial_l2(low, t, margin)) == pytest.approx(1.0)  # only (1 − 2)²
    assert float(partial_l2(lower, t, margin)) == pytest.approx(1.0)
    # above a negative target, or anywhere around a positive one: counted
    above = torch.tensor([0.0, 0.5, 3.0], dtype=D).view(1, 1, 1, 3)
    assert float(partial_l2(above, t, margin)) == pytest.approx(1.0 + 1.0 + 1.0)
    # a target of exactly 0 is non-positive: a student at or below it is not penalised
    zero = torch.zeros(1, 1, 1, 2, dtype=D)
    assert float(partial_l2(torch.tensor([[[[-1.0, 0.5]]]], dtype=D), zero, margin)) == 0.25
    # the teacher is raised to the margin: −3 counts as −1
    assert float(partial_l2(torch.full_like(t, 1.0), t, margin)) == pytest.approx(4 + 2.25 + 1)


def test_a_smaller_student_map_is_upsampled_to_the_teacher() -> None:
    g = _gen(3)
    s = torch.randn(2, 3, 2, 2, generator=g, dtype=D)
    t = torch.randn(2, 3, 4, 4, generator=g, dtype=D)
    m = torch.full((3,), -0.5, dtype=D)
    up = nn.functional.interpolate(s, size=(4, 4), mode="bilinear", align_corners=False)
    torch.testing.assert_close(ofd_loss([s], [t], [m]), partial_l2(up, t, m) / 2)


# --- the objective ------------------------------------------------------------------------


def _small(logit_loss: object = "ce") -> OFDLoss:
    margins = [torch.full((4,), -0.5), torch.full((5,), -1.0)]
    return OFDLoss(["a", "b"], ["x", "y"], [2, 3], [4, 5], margins, logit_loss=logit_loss)  # type: ignore[arg-type]


def _outputs(b: int, scale: float, seed: int) -> tuple[Outputs, Outputs]:
    g = _gen(seed)
    s = {"ofd0": scale * torch.randn(b, 2, 4, 4, generator=g)}
    s["ofd1"] = scale * torch.randn(b, 3, 2, 2, generator=g)
    t = {"ofd0": scale * torch.randn(b, 4, 8, 8, generator=g)}
    t["ofd1"] = scale * torch.randn(b, 5, 4, 4, generator=g)
    logits = torch.randn(b, 3, generator=g)
    return Outputs(logits.requires_grad_(), s), Outputs(logits.detach().clone(), t)


def test_objective_parts_weight_and_buffers() -> None:
    obj = _small()
    assert obj.student_features == {"ofd0": "a", "ofd1": "b"}
    assert [tuple(m.shape) for m in obj.margins] == [(4,), (5,)]
    assert {"margin0", "margin1"} <= set(obj.state_dict())
    s, t = _outputs(3, 1.0, 0)
    y = torch.tensor([0, 1, 2])
    out = {k: v.detach() for k, v in obj(s, t, y).items()}
    assert set(out) == {"loss", "ofd", "ce"}
    assert float(out["loss"]) == pytest.approx(1e-4 * float(out["ofd"]) + float(out["ce"]))
    maps = [obj.connectors[i](s.features[f"ofd{i}"]) for i in range(2)]
    expected = ofd_loss(maps, [t.features["ofd0"], t.features["ofd1"]], obj.margins)
    assert float(out["ofd"]) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert set(_small(None)(s, t, None)) == {"loss", "ofd"}


@settings(max_examples=12, deadline=None)
@given(b=st.sampled_from([1, 2]), scale=st.sampled_from([1e-4, 1.0, 1e4]), seed=st.integers(0, 9))
def test_finite_at_extreme_features_and_tiny_batches(b: int, scale: float, seed: int) -> None:
    obj = _small()
    s, t = _outputs(b, scale, seed)
    out = obj(s, t, torch.zeros(b, dtype=torch.long))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in obj.parameters())


def test_from_models_runs_through_real_hooks() -> None:
    torch.manual_seed(0)
    student = mobilenet_v1(num_classes=10)
    resnet = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():  # a trained-looking last BN, so that the margins differ per channel
        for k in range(1, 5):
            bn = getattr(resnet, f"layer{k}")[-1].bn2
            bn.weight.normal_(0.5, 0.2)
            bn.bias.normal_(-0.2, 0.3)
    teacher = Teacher(resnet, input_size=96)
    obj = OFDLoss.from_models(student, teacher)
    assert obj.student_features["ofd0"] == "blocks.2.pw.act:input"
    assert obj.teacher_features["ofd3"] == "layer4.1.relu:input"
    assert obj.teacher_channels == [64, 128, 256, 512]
    assert obj.weight == 1e-4 and isinstance(obj.logit_loss, CrossEntropy)
    torch.testing.assert_close(obj.margins[2], bn_margin(resnet.layer3[1].bn2).float())
    teacher.add_features(obj.teacher_features)
    step = StudentStep(student, obj)
    x, y = torch.randn(2, 3, 64, 64, generator=_gen(5)), torch.tensor([1, 7])
    t_out = teacher(x)
    assert (t_out.features["ofd0"] < 0).any()  # pre-ReLU, after the residual addition
    out = step(x, t_out, y)
    assert set(out) == {"loss", "ofd", "ce"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.get_parameter("stem.conv.weight").grad is not None


def test_from_models_reads_bn3_of_a_bottleneck_teacher() -> None:
    resnet = torchvision.models.resnet50()
    obj = OFDLoss.from_models(mobilenet_v1(alpha=0.5), resnet, weight=1e-3, logit_loss=None)
    assert obj.teacher_features["ofd0"] == "layer1.2.relu:input"
    torch.testing.assert_close(obj.margins[3], bn_margin(resnet.layer4[2].bn3).float())
    assert obj.student_channels == [64, 128, 256, 512] and obj.weight == 1e-3


def test_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match=r"picks \['margins'\]"):
        OFDLoss.from_models(mobilenet_v1(), torchvision.models.resnet18(), margins=[])
    with pytest.raises(ValueError, match="needs a teacher"):
        OFDLoss.from_models(mobilenet_v1(), None)
    with pytest.raises(ValueError, match=r"margins\[0\] must be 4 finite values <= 0"):
        OFDLoss(["a"], ["b"], [1], [4], [torch.zeros(3)])
    with pytest.raises(ValueError, match=r"margins\[0\] must be"):
        OFDLoss(["a"], ["b"], [1], [2], [torch.tensor([0.5, -1.0])])
    with pytest.raises(ValueError, match="one margin per student layer"):
        OFDLoss(["a"], ["b"], [1], [2], [])
    with pytest.raises(ValueError, match=r"weight must be .*10000"):
        OFDLoss(["a"], ["b"], [1], [2], [torch.full((2,), -1.0)], weight=-1.0)
    with pytest.raises(TypeError, match="needs a BatchNorm"):
        bn_margin(nn.Identity())
    s, t = _outputs(2, 1.0, 0)
    s.features["ofd1"] = torch.zeros(2, 4, 2, 2)
    with pytest.raises(ValueError, match=r"set student_channels\[1\]"):
        _small()(s, t, torch.zeros(2, dtype=torch.long))
