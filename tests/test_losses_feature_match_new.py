"""VID, factor transfer and logit-standardised KD: against torchdistill 1.1.5 (values and
gradients in float64, 1e-6 relative), the behaviour each is named for, and errors.

Mapping: torchdistill's `VIDLoss` takes the regressor's (μ, σ²) from the student's io_dict and
returns Σ_pairs weight · mean ½((μ − t)²/σ² + log σ²): our `vid_nll` per pair. `FTLoss(p=1,
reduction="mean")` is our `ft_loss(p=1)`, `FTLoss(p=2)` our `ft_loss(p=2)`. `LogitStdKDLoss(T,
alpha=a_td, beta=b_td)` returns a_td·CE + b_td·T²·KL(batchmean) on z-scored logits: our
`kd_parts(standardize=True, alpha=b_td)` with a_td = 1 − b_td.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distill.losses import (
    FTLoss,
    KDLoss,
    VIDLoss,
    ft_loss,
    kd_loss,
    soft_kd_loss,
    standardize_logits,
    vid_nll,
)
from distill.types import Outputs
from tests.test_losses_relation_new import _assert_close, _gen, _io, _td, rel_diffs

D = torch.float64


# --- VID ----------------------------------------------------------------------------------


def test_vid_nll_matches_torchdistill() -> None:
    pair = {"student": {"io": "output", "path": "reg"}, "teacher": {"io": "output", "path": "l3"}}
    ref = _td().VIDLoss({"p": {**pair, "weight": 1}})
    g = _gen(20)
    mean, t = (
        torch.randn(3, 4, 2, 2, generator=g, dtype=D),
        torch.randn(3, 4, 2, 2, generator=g, dtype=D),
    )
    var = F.softplus(torch.randn(1, 4, 1, 1, generator=g, dtype=D)) + 1e-5

    def td(x: torch.Tensor) -> torch.Tensor:
        return ref({"reg": {"output": (x, var)}}, _io(t, "l3"))

    _assert_close(rel_diffs(lambda x: vid_nll(x, var, t), td, mean))


def test_vid_objective_regressor_variance_and_pooling() -> None:
    g = _gen(21)
    obj = VIDLoss({"b": "l"}, [(3, 5)], logit_loss=None, weight=2.0).double()
    reg = obj.regressors[0]
    torch.testing.assert_close(reg.variance(), torch.full((5,), 5.0, dtype=D))  # init_var
    s, t = (
        torch.randn(2, 3, 4, 4, generator=g, dtype=D),
        torch.randn(2, 5, 8, 8, generator=g, dtype=D),
    )
    out = obj(
        Outputs(torch.zeros(2, 1), {"vid0": s}), Outputs(torch.zeros(2, 1), {"vid0": t}), None
    )
    mean, var = reg(s)
    expected = vid_nll(mean, var, F.adaptive_avg_pool2d(t, (4, 4)))  # the teacher pooled to 4x4
    torch.testing.assert_close(out["vid"], expected)
    torch.testing.assert_close(out["loss"], 2.0 * expected)
    out["loss"].backward()
    assert reg.log_scale.grad is not None and reg.mean[0].weight.grad is not None


def test_vid_learns_the_variance_it_is_named_for() -> None:
    """The optimum σ² is the regressor's residual variance per channel (the variational bound
    is tight there): the gradient of the learnable variance vanishes there and not elsewhere."""
    g = _gen(22)
    obj = VIDLoss({"b": "l"}, [(2, 3)], logit_loss=None).double()
    s, t = (
        torch.randn(8, 2, 3, 3, generator=g, dtype=D),
        torch.randn(8, 3, 3, 3, generator=g, dtype=D),
    )
    reg = obj.regressors[0]
    with torch.no_grad():
        residual = (reg(s)[0] - t).pow(2).mean(dim=(0, 2, 3))  # (C,)
    grads = []
    for scale in (1.0, 2.0):
        with torch.no_grad():  # softplus⁻¹(scale · residual − eps)
            reg.log_scale.copy_(torch.log(torch.expm1(scale * residual - reg.eps)))
        reg.log_scale.grad = None
        obj(Outputs(s, {"vid0": s}), Outputs(t, {"vid0": t}), None)["loss"].backward()
        assert reg.log_scale.grad is not None
        grads.append(reg.log_scale.grad.abs().max().item())
    assert grads[0] < 1e-12 < 1e-3 < grads[1]


def test_vid_errors_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="one \\(student, teacher\\) channel pair per layer"):
        VIDLoss({"a": "b"}, [], logit_loss=None)
    with pytest.raises(ValueError, match="init_var must be > eps"):
        VIDLoss({"a": "b"}, [(1, 1)], logit_loss=None, init_var=0.0)
    obj = VIDLoss({"a": "b"}, [(3, 4)], logit_loss=None)
    with pytest.raises(ValueError, match=r"set channels\[0\] = \(2, 4\)"):
        obj(
            Outputs(torch.zeros(1), {"vid0": torch.randn(1, 2, 2, 2)}),
            Outputs(torch.zeros(1), {"vid0": torch.randn(1, 4, 2, 2)}),
            None,
        )


# --- factor transfer ----------------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2])
def test_ft_matches_torchdistill(p: int) -> None:
    ref = _td().FTLoss(p=p, reduction="mean", paraphraser_path="para", translator_path="trans")
    g = _gen(23)
    s, t = (
        torch.randn(4, 3, 2, 2, generator=g, dtype=D),
        torch.randn(4, 3, 2, 2, generator=g, dtype=D),
    )
    _assert_close(
        rel_diffs(lambda x: ft_loss(x, t, p=p), lambda x: ref(_io(x, "trans"), _io(t, "para")), s)
    )


def test_ft_transfers_the_factor_direction_not_its_scale() -> None:
    t = torch.randn(3, 4, 2, 2, generator=_gen(24), dtype=D)
    assert float(ft_loss(7.0 * t, t)) < 1e-15
    assert float(ft_loss(-t, t)) > 0.1
    obj = FTLoss(
        student_layer="translator", teacher_layer="paraphraser.encoder", logit_loss=KDLoss()
    )
    assert obj.student_features == {"ft": "translator"}
    y = torch.tensor([0, 1, 1])
    logits = torch.randn(3, 2, generator=_gen(25), dtype=D)
    out = obj(Outputs(logits, {"ft": -t}), Outputs(logits, {"ft": t}), y)
    torch.testing.assert_close(
        out["loss"], 500.0 * ft_loss(-t, t) + kd_loss(logits, logits, y, temperature=4.0, alpha=0.9)
    )
    with pytest.raises(ValueError, match="translator must output the paraphraser's shape"):
        ft_loss(torch.randn(3, 4), torch.randn(3, 5))


# --- logit standardisation ----------------------------------------------------------------


@pytest.mark.parametrize(("temperature", "alpha"), [(2.0, 0.9), (4.0, 0.5), (1.0, 1.0)])
def test_standardized_kd_matches_torchdistill(temperature: float, alpha: float) -> None:
    ref = _td().LogitStdKDLoss(
        ".", "output", ".", "output", temperature, alpha=1 - alpha, beta=alpha
    )
    g = _gen(26)
    s, t = 3 * torch.randn(5, 7, generator=g, dtype=D), 5 * torch.randn(5, 7, generator=g, dtype=D)
    y = torch.tensor([0, 6, 2, 3, 3])

    def td(x: torch.Tensor) -> torch.Tensor:
        if alpha == 1.0:  # torchdistill then returns the KL without T²
            return ref(_io(x, "."), _io(t, "."), y) * temperature**2
        return ref(_io(x, "."), _io(t, "."), y)

    ours = KDLoss(temperature, alpha, standardize=True)
    _assert_close(rel_diffs(lambda x: ours(Outputs(x), Outputs(t), y)["loss"], td, s))


def test_standardized_kd_ignores_the_students_logit_scale() -> None:
    """Named for: the student need not match the teacher's logit range, only its relations."""
    t = 6 * torch.randn(4, 9, generator=_gen(27), dtype=D)
    s = 0.2 * t + 3.0  # same ranking and relative gaps, a fifth of the range
    assert float(soft_kd_loss(s, t, temperature=2.0, standardize=True)) < 1e-12
    assert float(soft_kd_loss(s, t, temperature=2.0)) > 1.0
    z = standardize_logits(t)
    torch.testing.assert_close(z.mean(1), torch.zeros(4, dtype=D), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(1), torch.ones(4, dtype=D), rtol=1e-6, atol=0)
    ties = torch.zeros(2, 3, dtype=D, requires_grad=True)
    soft_kd_loss(ties, t[:2, :3], temperature=1.0, standardize=True).backward()
    assert ties.grad is not None and torch.isfinite(ties.grad).all()
    with pytest.raises(TypeError, match="standardize must be True or False"):
        KDLoss(standardize="yes")  # type: ignore[arg-type]
