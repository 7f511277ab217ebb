"""CTKD's learnable temperature in KDLoss: against torchdistill 1.1.5's KDLoss/LogitStdKDLoss fed
the same learned temperature and against the authors' equations written out (values and
gradients in float64, 1e-6 relative), the gradient reversal, the λ curriculum, hostile inputs
and errors.

Mapping: torchdistill's KDLoss(temperature=T, alpha=α_td, beta=β_td) is α_td·CE + β_td·T²·KL, so
ours (alpha·kd + (1 − alpha)·ce) is theirs with α_td = 1 − alpha, β_td = alpha; it accepts a
tensor T, which carries the gradient of T = 1 + 20·σ(p) back to p. The authors' (zhengli97/CTKD)
gradient reversal multiplies p's gradient by their cosine value, from 0 down to −1: here −λ.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from distill.losses.ctkd import (
    AUTHORS_INITIAL_TEMPERATURE,
    CurriculumTemperature,
    ctkd_lambda,
    reverse_gradient,
)
from distill.losses.kd import KDLoss, soft_kd_loss
from distill.step import check_optimizer
from distill.types import Outputs

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(seed: int, b: int = 6, k: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    s = 2 * torch.randn(b, k, generator=g, dtype=D)
    t = 3 * torch.randn(b, k, generator=g, dtype=D)
    return s, t, torch.randint(0, k, (b,), generator=g)


def _td() -> Any:
    return pytest.importorskip("torchdistill.losses.mid_level")


def _authors_lambda(epoch: int, loops: float) -> float:
    """train_student.py's CosineDecay(max_value=0, min_value=-1, num_loops).get_value(epoch)."""
    i = min(max(epoch, 0), loops)
    value = (math.cos(i * math.pi / loops) + 1.0) * 0.5
    return value * (0.0 - (-1.0)) + (-1.0)


def _ctkd(epoch: float, **kwargs: Any) -> KDLoss:
    obj = KDLoss(learnable_temperature=True, **kwargs).double()
    obj.on_progress(0, epoch)
    return obj


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _check_against(
    obj: KDLoss, ref: Any, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor, lam: float
) -> None:
    """Value, the student's gradient and p's gradient (theirs × −λ) to 1e-6 relative."""
    assert obj.ctkd is not None
    a = s.clone().requires_grad_()
    out = obj(Outputs(a), Outputs(t), y)
    ga, gp = torch.autograd.grad(out["loss"], [a, obj.ctkd.raw])
    b = s.clone().requires_grad_()
    p = obj.ctkd.raw.detach().clone().requires_grad_()  # a plain leaf: no reversal
    temperature = 1.0 + 20.0 * torch.sigmoid(p)  # the authors' t_start + t_end·σ(p)
    value = ref(b, temperature)
    gb, gq = torch.autograd.grad(value, [b, p])
    assert _rel(out["loss"].detach(), value.detach()) < 1e-6
    assert _rel(ga, gb) < 1e-6
    assert _rel(gp, -lam * gq) < 1e-6
    torch.testing.assert_close(out["temperature"], temperature.detach().to(out["temperature"]))


# --- equality with the references ---------------------------------------------------------


@pytest.mark.parametrize(("alpha", "epoch"), [(0.9, 0.0), (0.5, 3.4), (1.0, 12.0)])
def test_learned_temperature_matches_torchdistill_fed_the_same_temperature(
    alpha: float, epoch: float
) -> None:
    s, t, y = _batch(1)
    obj = _ctkd(epoch, alpha=alpha, temperature=AUTHORS_INITIAL_TEMPERATURE)
    td = _td()

    def ref(x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        if alpha == 1.0:  # torchdistill's alpha_td=0 returns the bare KL, without T²
            kl = td.KDLoss(".", "output", ".", "output", temperature, alpha=0.0)
            return kl({".": {"output": x}}, {".": {"output": t}}) * temperature**2
        loss = td.KDLoss(".", "output", ".", "output", temperature, alpha=1 - alpha, beta=alpha)
        return loss({".": {"output": x}}, {".": {"output": t}}, y)

    _check_against(obj, ref, s, t, y, ctkd_lambda(epoch))


def test_learned_temperature_with_standardize_matches_torchdistill_logit_std_kd() -> None:
    """CTKD + logit standardisation (the LS authors' CTKD/ DistillKL_logit_stand)."""
    s, t, y = _batch(2)
    obj = _ctkd(6.0, alpha=0.9, temperature=3.0, standardize=True)

    def ref(x: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        loss = _td().LogitStdKDLoss(".", "output", ".", "output", temperature, alpha=0.1, beta=0.9)
        return loss({".": {"output": x}}, {".": {"output": t}}, y)

    _check_against(obj, ref, s, t, y, ctkd_lambda(6.0))


def test_tensor_temperature_is_the_float_path_with_a_gradient() -> None:
    s, t, _ = _batch(3)
    temp = torch.tensor(2.5, dtype=D, requires_grad=True)
    fixed = float(soft_kd_loss(s, t, temperature=2.5))
    assert float(soft_kd_loss(s, t, temperature=temp).detach()) == fixed
    torch.autograd.gradcheck(lambda x: soft_kd_loss(s, t, temperature=x), (temp,))
    assert float(soft_kd_loss(s, t, temperature=temp.detach().reshape(1))) == fixed


def test_lambda_follows_the_authors_cosine_decay() -> None:
    """schedule="epoch": their value at the 1-based epoch floor(e) + 1, held for the epoch."""
    for loops in (5.0, 10.0):
        for epoch in range(16):
            for within in (0.0, 0.5, 0.99):
                ours = ctkd_lambda(epoch + within, warmup_epochs=loops)
                assert ours == pytest.approx(-_authors_lambda(epoch + 1, loops), abs=1e-15)
    ramp = [ctkd_lambda(e, warmup_epochs=10.0, schedule="step", lambda_max=2.0) for e in range(12)]
    assert ramp[0] == 0.0 and ramp[5] == pytest.approx(1.0) and ramp[10:] == [2.0, 2.0]
    assert all(a < b for a, b in itertools.pairwise(ramp[:11]))
    assert ctkd_lambda(0.0, warmup_epochs=0.0, lambda_max=0.7) == 0.7


# --- what CTKD is named for ---------------------------------------------------------------


def test_the_reversal_flips_the_sign_and_scales_by_lambda() -> None:
    x = torch.tensor([0.3, -1.2], dtype=D, requires_grad=True)
    (g,) = torch.autograd.grad(
        (reverse_gradient(x, 0.25) * torch.tensor([2.0, -3.0], dtype=D)).sum(), x
    )
    torch.testing.assert_close(g, torch.tensor([-0.5, 0.75], dtype=D))
    torch.testing.assert_close(reverse_gradient(x, 0.25), x)


def test_the_temperature_learns_to_make_distillation_harder() -> None:
    """Named for the adversarial temperature: an SGD step on p raises the KD loss (the student
    fixed), where a plain gradient would lower it; with λ = 0 (before the curriculum starts) p
    does not move."""
    s, t, y = _batch(4)
    obj = _ctkd(20.0, temperature=4.0)
    assert obj.ctkd is not None
    opt = torch.optim.SGD(obj.parameters(), lr=0.5)
    before = obj(Outputs(s), Outputs(t), y)
    before["kd"].backward()
    opt.step()
    after = obj(Outputs(s), Outputs(t), y)
    assert float(after["kd"].detach()) > float(before["kd"].detach()) + 1e-4
    assert float(after["temperature"]) != float(before["temperature"])
    start = _ctkd(0.0, temperature=4.0, ctkd_schedule="step")
    assert start.ctkd is not None
    start(Outputs(s), Outputs(t), y)["loss"].backward()
    assert float(start.ctkd.raw.grad) == 0.0  # type: ignore[arg-type]


def test_the_starting_temperature_and_the_optimizer_check() -> None:
    authors = CurriculumTemperature()
    authors.set_epoch(0.0)
    assert authors().item() == pytest.approx(1 + 20 / (1 + math.exp(-1)))
    assert float(authors.raw.detach()) == pytest.approx(1.0, abs=1e-6)  # theirs: torch.ones(1)
    obj = KDLoss(temperature=7.5, learnable_temperature=True, ctkd_t_start=2.0, ctkd_t_range=8.0)
    obj.on_progress(0, 0.0)
    assert obj.ctkd is not None and obj.ctkd().item() == pytest.approx(7.5)
    assert obj.temperature == 7.5  # the run record's value stays the starting one
    assert [n for n, _ in obj.named_parameters()] == ["ctkd.raw"]
    assert "ctkd.raw" in obj.state_dict()
    student = torch.nn.Linear(3, 4)
    with pytest.raises(ValueError, match=r"\['ctkd.raw'\].*objective.parameters\(\)"):
        check_optimizer(student, obj, torch.optim.SGD(student.parameters(), lr=0.1))
    both = torch.optim.SGD([*student.parameters(), *obj.parameters()], lr=0.1)
    check_optimizer(student, obj, both)
    assert list(KDLoss().parameters()) == []  # the fixed temperature owns nothing


# --- hostile inputs -----------------------------------------------------------------------

BIG = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(
    data=st.data(),
    b=st.sampled_from([1, 2]),
    k=st.integers(2, 5),
    std=st.booleans(),
    epoch=st.floats(0.0, 30.0),
)
def test_finite_values_and_gradients_at_extreme_logits(
    data: st.DataObject, b: int, k: int, std: bool, epoch: float
) -> None:
    s = torch.from_numpy(data.draw(arrays(np.float32, (b, k), elements=BIG)).copy())
    t = torch.from_numpy(data.draw(arrays(np.float32, (b, k), elements=BIG)).copy())
    y = torch.tensor(data.draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)))
    obj = KDLoss(alpha=0.5, standardize=std, learnable_temperature=True)
    obj.on_progress(0, epoch)
    assert obj.ctkd is not None
    s.requires_grad_()
    out = obj(Outputs(s), Outputs(t), y)
    assert all(math.isfinite(float(v.detach())) for v in out.values()), out
    gs, gp = torch.autograd.grad(out["loss"], [s, obj.ctkd.raw])
    assert torch.isfinite(gs).all() and torch.isfinite(gp).all()


# --- errors -------------------------------------------------------------------------------


def test_errors_say_what_to_change() -> None:
    s, t, y = _batch(5)
    with pytest.raises(ValueError, match=r"\['ctkd_t_start'\].*pass learnable_temperature=True"):
        KDLoss(ctkd_t_start=2.0)
    with pytest.raises(ValueError, match=r"strictly between t_start=1 and t_start \+ t_range=21"):
        KDLoss(temperature=0.5, learnable_temperature=True)
    with pytest.raises(ValueError, match="schedule must be one of"):
        KDLoss(learnable_temperature=True, ctkd_schedule="cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_range must be a finite number > 0"):
        KDLoss(learnable_temperature=True, ctkd_t_range=0.0)
    with pytest.raises(ValueError, match="warmup_epochs must be a finite number >= 0"):
        CurriculumTemperature(warmup_epochs=-1.0)
    with pytest.raises(TypeError, match="learnable_temperature must be True or False"):
        KDLoss(learnable_temperature=1)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"call objective.on_progress\(step, epoch\)"):
        KDLoss(learnable_temperature=True)(Outputs(s), Outputs(t), y)
    with pytest.raises(ValueError, match="one floating-point value"):
        soft_kd_loss(s, t, temperature=torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        soft_kd_loss(s, t, temperature=0.0)
