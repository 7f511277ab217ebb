"""ReviewKD: HCL and ABF against torchdistill 1.1.5 (float64 values and gradients, 1e-6
relative), the ABF chain against the authors' loop, the behaviour the method is named for,
a real forward+backward through hooks, and errors.

Mapping of conventions: torchdistill's `HierarchicalContextLoss(output_sizes=[4, 2, 1])` is our
`hcl_loss` for one level pair (ours sums the pairs); its `AttentionBasedFusion` keeps our
`reduce` / `output` / `attention` as `conv1` / `conv2` / `attention_conv.0`, and takes the
residual's target size as an int (square maps), ours reads it from the map.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.losses.base import Objective
from distill.losses.ce import CrossEntropy
from distill.losses.kd import KDLoss
from distill.losses.review import ABF, ReviewKDLoss, hcl_loss, review_maps
from distill.models import mobilenet_v1
from distill.step import StudentStep
from distill.teacher import Teacher
from distill.types import Outputs

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _td_losses() -> Any:
    return pytest.importorskip("torchdistill.losses.mid_level")


def _td_abf(in_c: int, mid: int, out_c: int, fuse: bool) -> Any:
    wrapper = pytest.importorskip("torchdistill.models.wrapper")
    return wrapper.AttentionBasedFusion(in_c, mid, out_c, uses_attention=fuse)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# --- HCL ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8])
def test_hcl_matches_torchdistill(size: int) -> None:
    ref = _td_losses().HierarchicalContextLoss("s", "output", "t", "output", output_sizes=[4, 2, 1])
    g = _gen(size)
    s = torch.randn(3, 4, size, size, generator=g, dtype=D)
    t = 2 * torch.randn(3, 4, size, size, generator=g, dtype=D) + 0.5
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = hcl_loss([a], [t])
    theirs = ref({"s": {"output": (b, None)}}, {"t": {"output": t}})
    (ga,), (gb,) = torch.autograd.grad(ours, a), torch.autograd.grad(theirs, b)
    assert _rel(ours.detach(), theirs.detach()) < 1e-6
    assert _rel(ga, gb) < 1e-6


def test_hcl_sums_the_levels() -> None:
    g = _gen(0)
    s = [torch.randn(2, 3, h, h, generator=g, dtype=D) for h in (8, 4, 1)]
    t = [torch.randn(2, 3, h, h, generator=g, dtype=D) for h in (8, 4, 1)]
    total = hcl_loss(s, t)
    parts = sum(hcl_loss([a], [b]) for a, b in zip(s, t, strict=True))
    torch.testing.assert_close(total, parts)


def test_hcl_pyramid_levels_matter() -> None:
    """Two teachers at the same pixel-wise distance: a checkerboard error pools to 0 at every
    level, a constant offset survives every level; only the pyramid tells them apart."""
    s = torch.zeros(1, 1, 8, 8, dtype=D)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2.0 - 1.0
    t_checker, t_offset = s + checker.to(D), s + 1.0
    assert F.mse_loss(s, t_checker) == F.mse_loss(s, t_offset) == 1.0
    w = (1.0, 0.5, 0.25, 0.125)  # full map, then 4x4, 2x2, 1x1
    assert float(hcl_loss([s], [t_checker])) == pytest.approx(1.0 / sum(w))
    assert float(hcl_loss([s], [t_offset])) == pytest.approx(1.0)
    assert float(hcl_loss([s], [t_checker], levels=())) == pytest.approx(1.0)
    # a 4x4 map skips the 4x4 level (k >= H), and the halving goes on over the kept levels
    s4 = torch.zeros(1, 1, 4, 4, dtype=D)
    assert float(hcl_loss([s4], [s4 + 1.0])) == pytest.approx(1.0)
    c4 = checker[:4, :4].to(D)[None, None]
    assert float(hcl_loss([s4], [s4 + c4])) == pytest.approx(1.0 / 1.75)


def test_hcl_resizes_the_teacher_to_the_student() -> None:
    g = _gen(2)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=D)
    big = torch.randn(2, 3, 8, 8, generator=g, dtype=D)
    expected = hcl_loss([s], [F.avg_pool2d(big, 2)])
    torch.testing.assert_close(hcl_loss([s], [big]), expected)
    with pytest.raises(ValueError, match="disagree in batch or channels"):
        hcl_loss([s], [big[:, :2]])
    with pytest.raises(ValueError, match="as many student as teacher maps"):
        hcl_loss([s], [])


# --- ABF ----------------------------------------------------------------------------------


def _copy_into_td(ours: ABF, theirs: Any) -> None:
    mapping = {"reduce.": "conv1.", "output.": "conv2.", "attention.": "attention_conv.0."}
    state = {}
    for key, value in ours.state_dict().items():
        prefix = next(p for p in mapping if key.startswith(p))
        state[mapping[prefix] + key[len(prefix) :]] = value
    theirs.load_state_dict(state)


@pytest.mark.parametrize("fuse", [True, False])
def test_abf_matches_torchdistill(fuse: bool) -> None:
    torch.manual_seed(0)
    ours = ABF(3, 5, 7, fuse=fuse).double()
    theirs = _td_abf(3, 5, 7, fuse).double()
    _copy_into_td(ours, theirs)
    with torch.no_grad():  # a non-trivial affine BN and attention bias
        for m in (ours, theirs):
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=_gen(p.numel()), dtype=D))
    g = _gen(3)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=D)
    r = torch.randn(4, 5, 3, 3, generator=g, dtype=D)
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    ya, res_a = ours(xa, ra if fuse else None)
    yb, res_b = theirs(xb, rb, 6) if fuse else theirs(xb)
    assert _rel(ya, yb) < 1e-6 and _rel(res_a, res_b) < 1e-6
    loss_a = (ya * torch.cos(ya)).sum() + res_a.pow(2).sum()
    loss_b = (yb * torch.cos(yb)).sum() + res_b.pow(2).sum()
    inputs_a = [xa, ra] if fuse else [xa]
    inputs_b = [xb, rb] if fuse else [xb]
    grads_a = torch.autograd.grad(loss_a, [*inputs_a, *ours.parameters()])
    grads_b = torch.autograd.grad(loss_b, [*inputs_b, *theirs.parameters()])
    assert max(_rel(a, b) for a, b in zip(grads_a, grads_b, strict=True)) < 1e-6


def test_review_chain_matches_the_authors_loop() -> None:
    """Deepest first, each residual upsampled to the next shallower map (the authors' loop in
    ReviewKD.forward / Student4KnowledgeReview.secondary_forward)."""
    torch.manual_seed(1)
    s_ch, t_ch, sizes = [2, 3, 4], [5, 6, 7], [8, 4, 1]
    ours = [ABF(cs, 3, ct, fuse=i < 2).double() for i, (cs, ct) in enumerate(zip(s_ch, t_ch))]
    theirs = [_td_abf(cs, 3, ct, i < 2).double() for i, (cs, ct) in enumerate(zip(s_ch, t_ch))]
    for a, b in zip(ours, theirs, strict=True):
        _copy_into_td(a, b)
    g = _gen(4)
    feats = [torch.randn(2, c, h, h, generator=g, dtype=D) for c, h in zip(s_ch, sizes)]
    got = review_maps(ours, feats)
    abfs, xs = theirs[::-1], feats[::-1]
    out, res = abfs[0](xs[0])
    expected = [out]
    for x, abf in zip(xs[1:], abfs[1:], strict=True):
        out, res = abf(x, res, x.shape[-1])
        expected.insert(0, out)
    assert [tuple(o.shape) for o in got] == [(2, 5, 8, 8), (2, 6, 4, 4), (2, 7, 1, 1)]
    assert max(_rel(a, b) for a, b in zip(got, expected, strict=True)) < 1e-6


# --- the objective ------------------------------------------------------------------------


def _small(logit_loss: Any = "ce", weight: float = 8.0) -> ReviewKDLoss:
    return ReviewKDLoss(
        ["a", "b", "pool"],
        ["x", "y", "tpool"],
        [2, 3, 3],
        [4, 5, 6],
        mid_channels=3,
        weight=weight,
        logit_loss=logit_loss,
    )


def _outputs(b: int, scale: float, seed: int) -> tuple[Outputs, Outputs]:
    g = _gen(seed)
    s = {
        "review0": scale * torch.randn(b, 2, 4, 4, generator=g),
        "review1": scale * torch.randn(b, 3, 2, 2, generator=g),
        "review2": scale * torch.randn(b, 3, generator=g),  # pooled (B, C)
    }
    t = {
        "review0": scale * torch.randn(b, 4, 8, 8, generator=g),
        "review1": scale * torch.randn(b, 5, 4, 4, generator=g),
        "review2": scale * torch.randn(b, 6, 1, 1, generator=g),  # torchvision's avgpool
    }
    logits = torch.randn(b, 3, generator=g)
    return Outputs(logits.requires_grad_(), s), Outputs(logits.detach().clone(), t)


def test_objective_parts_and_weight() -> None:
    obj = _small()
    assert obj.student_features == {"review0": "a", "review1": "b", "review2": "pool"}
    assert obj.teacher_features == {"review0": "x", "review1": "y", "review2": "tpool"}
    s, t = _outputs(4, 1.0, 0)
    y = torch.tensor([0, 1, 2, 0])
    out = {k: v.detach() for k, v in obj(s, t, y).items()}
    assert set(out) == {"loss", "review", "ce"}
    ce = F.cross_entropy(s.output.detach(), y)
    assert float(out["loss"]) == pytest.approx(8.0 * float(out["review"]) + float(ce), rel=1e-6)
    alone = _small(logit_loss=None)
    alone.load_state_dict(obj.state_dict())
    assert set(alone(s, t, None)) == {"loss", "review"}
    assert set(_small(logit_loss=KDLoss())(s, t, y)) == {"loss", "review", "kd", "ce"}


@settings(max_examples=12, deadline=None)
@given(b=st.sampled_from([1, 2]), scale=st.sampled_from([1e-4, 1.0, 1e4]), seed=st.integers(0, 9))
def test_finite_at_extreme_features_and_tiny_batches(b: int, scale: float, seed: int) -> None:
    obj = _small()
    if b == 1:
        obj.eval()  # a 1x1 level cannot be batch-normalised over one sample in training
    s, t = _outputs(b, scale, seed)
    out = obj(s, t, torch.zeros(b, dtype=torch.long))
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    grads = [p.grad for p in obj.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert s.output.grad is not None and torch.isfinite(s.output.grad).all()


def test_batch_of_one_in_training_says_what_to_do() -> None:
    s, t = _outputs(1, 1.0, 0)
    with pytest.raises(ValueError, match="drop_last=True"):
        _small()(s, t, torch.zeros(1, dtype=torch.long))


def test_from_models_runs_through_real_hooks_at_two_resolutions() -> None:
    torch.manual_seed(0)
    student = mobilenet_v1(num_classes=10)
    teacher = Teacher(torchvision.models.resnet18(num_classes=10), input_size=96)
    obj = ReviewKDLoss.from_models(student, teacher, mid_channels=16)
    assert obj.student_features["review0"] == "blocks.2.pw.act:input"
    assert obj.teacher_features["review3"] == "layer4.1.relu:input"
    assert obj.teacher_features["review4"] == "avgpool"
    assert obj.student_channels == [128, 256, 512, 1024, 1024]
    assert obj.teacher_channels == [64, 128, 256, 512, 512]
    assert obj.weight == 8.0 and isinstance(obj.logit_loss, CrossEntropy)
    teacher.add_features(obj.teacher_features)
    step = StudentStep(student, obj)
    x, y = torch.randn(2, 3, 64, 64, generator=_gen(5)), torch.tensor([1, 7])
    t_out = teacher(x)  # 96 px: maps 24, 12, 6, 3 against the student's 16, 8, 4, 2
    assert t_out.features["review0"].shape == (2, 64, 24, 24)
    assert (t_out.features["review0"] < 0).any()  # pre-ReLU
    out = step(x, t_out, y)
    assert set(out) == {"loss", "review", "ce"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    for name, p in obj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert student.get_parameter("blocks.0.dw.conv.weight").grad is not None


def test_from_models_preact_false_and_a_timm_teacher() -> None:
    obj = ReviewKDLoss.from_models(
        mobilenet_v1(alpha=0.5), torchvision.models.resnet18(), preact=False, logit_loss=None
    )
    assert obj.student_features["review0"] == "blocks.2"
    assert obj.teacher_features["review0"] == "layer1"
    assert obj.logit_loss is None
    timm = pytest.importorskip("timm")
    obj = ReviewKDLoss.from_models(mobilenet_v1(), Teacher(timm.create_model("resnet50")))
    assert obj.teacher_features["review0"] == "layer1.2.act3:input"
    assert obj.teacher_features["review4"] == "global_pool"
    assert obj.teacher_channels == [256, 512, 1024, 2048, 2048]


def test_errors_name_the_problem() -> None:
    with pytest.raises(TypeError, match=r"picks \['student_layers'\]"):
        ReviewKDLoss.from_models(mobilenet_v1(), torchvision.models.resnet18(), student_layers=[])
    with pytest.raises(ValueError, match="needs a teacher"):
        ReviewKDLoss.from_models(mobilenet_v1(), None)
    with pytest.raises(ValueError, match="as many teacher_layers"):
        ReviewKDLoss(["a"], [], [1], [1])
    with pytest.raises(ValueError, match="student_channels must be 1 positive ints"):
        ReviewKDLoss(["a"], ["b"], [0], [1])
    with pytest.raises(ValueError, match=r"weight must be .*8\.0"):
        ReviewKDLoss(["a"], ["b"], [1], [1], weight=-1.0)
    with pytest.raises(ValueError, match="logit_loss='kd'"):
        ReviewKDLoss(["a"], ["b"], [1], [1], logit_loss="kd")  # type: ignore[arg-type]
    obj = _small(logit_loss=None)
    s, t = _outputs(2, 1.0, 0)
    bad = copy.copy(s)
    bad.features = {**s.features, "review1": torch.zeros(2, 4, 2, 2)}
    with pytest.raises(ValueError, match=r"set student_channels\[1\]=4"):
        obj(bad, t, None)
    with pytest.raises(KeyError, match=r"student's feature 'review0' \(module 'a'\)"):
        obj(Outputs(s.output), t, None)
    assert isinstance(obj, Objective)
