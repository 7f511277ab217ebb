"""Factor transfer end to end: the paraphraser and translator against torchdistill 1.1.5 and
the authors' layout, the factor term against torchdistill's FTLoss (float64, 1e-6 relative),
the two phases of one run through real hooks, finiteness, the behaviour and errors.

Mapping: torchdistill's `Paraphraser4FactorTransfer(k, C, uses_bn=b)` has our `Paraphraser(C,
rate=k, batch_norm=b)`'s state-dict keys (encoder.*, decoder.*); its
`Translator4FactorTransfer(Cs, F, uses_bn=b)` is an nn.Sequential whose keys are our
`Translator`'s without the "encoder." prefix. torchdistill rounds k·C down, the authors (and
we) to the nearest int: the channel counts below make k·C an integer, where both agree.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from distill.losses import create_objective
from distill.losses.ce import CrossEntropy
from distill.losses.factor import Paraphraser, Translator, factor_channels, reconstruction_loss
from distill.losses.feature_match import FTLoss
from distill.models import mobilenet_v1
from distill.step import StudentStep
from distill.teacher import Teacher
from distill.types import Outputs
from tests.test_losses_relation_new import _assert_close, _gen, _io, _td, rel_diffs

D = torch.float64


def _wrapper() -> Any:
    return pytest.importorskip("torchdistill.models.wrapper")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _td_pair(para: Paraphraser, trans: Translator, bn: bool = False) -> tuple[Any, Any]:
    """torchdistill's modules with our weights copied over."""
    w = _wrapper()
    td_para = w.Paraphraser4FactorTransfer(para.rate, para.channels, uses_bn=bn).to(D)
    td_trans = w.Translator4FactorTransfer(trans.channels, trans.factor_channels, uses_bn=bn)
    td_para.load_state_dict(para.state_dict())
    td_trans.to(D).load_state_dict({k[len("encoder.") :]: v for k, v in trans.state_dict().items()})
    return td_para, td_trans


def _maps(b: int, cs: int, ct: int, hs: int, ht: int, seed: int, scale: float = 1.0) -> Any:
    g = _gen(seed)
    s = scale * torch.randn(b, cs, hs, hs, generator=g, dtype=D)
    t = scale * F.relu(torch.randn(b, ct, ht, ht, generator=g, dtype=D))  # a post-ReLU map
    return s, t


def _ft(epochs: float = 0.0, **kw: Any) -> FTLoss:
    kw.setdefault("logit_loss", None)
    return FTLoss(
        student_layer="s", teacher_layer="t", inputs="maps", channels=(4, 6),
        paraphraser_epochs=epochs, **kw,
    ).double()  # fmt: skip


def _run(obj: FTLoss, s: torch.Tensor, t: torch.Tensor, y: Any = None) -> dict[str, torch.Tensor]:
    logits = torch.zeros(s.shape[0], 3, dtype=s.dtype)
    return obj(Outputs(logits, {"ft": s}), Outputs(logits, {"ft": t}), y)


# --- the modules --------------------------------------------------------------------------


@pytest.mark.parametrize("bn", [False, True])
def test_modules_match_torchdistill(bn: bool) -> None:
    torch.manual_seed(0)
    para = Paraphraser(6, rate=0.5, batch_norm=bn).double()
    trans = Translator(4, 3, batch_norm=bn).double()
    td_para, td_trans = _td_pair(para, trans, bn)
    s, t = _maps(3, 4, 6, 5, 5, seed=1)
    factor, rec = para(t)
    assert factor.shape == (3, 3, 5, 5) and rec.shape == t.shape
    assert _rel(factor, td_para.encoder(t)) < 1e-6
    assert _rel(rec, td_para(t)) < 1e-6  # uses_decoder=True: encoder then decoder
    assert _rel(trans(s), td_trans(s)) < 1e-6
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    (ga,) = torch.autograd.grad(trans(a).sin().sum(), a)
    (gb,) = torch.autograd.grad(td_trans(b).sin().sum(), b)
    assert _rel(ga, gb) < 1e-6


def test_the_authors_layout() -> None:
    """Models/FeatureProjection.py, written out: 3×3 convs with bias, stride 1, padding 1, each
    followed by LeakyReLU(0.1), no BatchNorm; Paraphraser(64, round(64·0.5)) in their scripts."""
    para, trans = Paraphraser(64), Translator(48, factor_channels(64))
    expected = {
        "encoder": [(nn.Conv2d, 64, 64), (nn.Conv2d, 64, 32), (nn.Conv2d, 32, 32)],
        "decoder": [
            (nn.ConvTranspose2d, 32, 32),
            (nn.ConvTranspose2d, 32, 64),
            (nn.ConvTranspose2d, 64, 64),
        ],
        "translator": [(nn.Conv2d, 48, 48), (nn.Conv2d, 48, 32), (nn.Conv2d, 32, 32)],
    }
    for name, seq in (
        ("encoder", para.encoder),
        ("decoder", para.decoder),
        ("translator", trans.encoder),
    ):
        layers = list(seq)
        convs, acts = layers[0::2], layers[1::2]
        assert [(type(c), c.in_channels, c.out_channels) for c in convs] == expected[name]
        for c in convs:
            assert c.kernel_size == (3, 3) and c.stride == (1, 1) and c.padding == (1, 1)
            assert c.bias is not None
        assert all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts)
    assert factor_channels(63) == 32 and factor_channels(5, 0.25) == 1  # round, as the authors


@pytest.mark.parametrize("sizes", [(3, 3), (2, 4)])
def test_factor_term_matches_torchdistill(sizes: tuple[int, int]) -> None:
    """The objective's "ft" (phase two) is torchdistill's FTLoss(p=1) on its translator's and
    paraphraser encoder's outputs; a 4×4 teacher factor meets a 2×2 student one average-pooled."""
    torch.manual_seed(2)
    obj = _ft(beta=7.0)
    td_para, td_trans = _td_pair(obj.paraphraser, obj.translator)
    ref = _td().FTLoss(p=1, reduction="mean", paraphraser_path="para", translator_path="trans")
    hs, ht = sizes
    s, t = _maps(4, 4, 6, hs, ht, seed=3)

    def ours(x: torch.Tensor) -> torch.Tensor:
        return _run(obj, x, t)["ft"]

    def theirs(x: torch.Tensor) -> torch.Tensor:
        factor_t = td_para.encoder(t)
        if ht != hs:
            factor_t = F.adaptive_avg_pool2d(factor_t, (hs, hs))
        return ref(_io(td_trans(x), "trans"), _io(factor_t, "para"))

    _assert_close(rel_diffs(ours, theirs, s))
    out = _run(obj, s, t)
    torch.testing.assert_close(out["loss"], 7.0 * out["ft"])
    rec = td_para(t)
    torch.testing.assert_close(out["ft_recon"], (rec - t).abs().mean())  # nn.L1Loss


# --- one run, two phases, real hooks ------------------------------------------------------


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_from_models_trains_the_paraphraser_then_the_translator() -> None:
    torch.manual_seed(0)
    student = mobilenet_v1(num_classes=10, alpha=0.25)
    teacher = Teacher(torchvision.models.resnet18(num_classes=10), input_size=96)
    obj = FTLoss.from_models(student, teacher, paraphraser_epochs=2)
    assert obj.student_features == {"ft": "blocks.12"} and obj.teacher_features == {"ft": "layer4"}
    assert obj.channels == (256, 512) and obj.paraphraser.factor_channels == 256
    assert obj.inputs == "maps" and obj.beta == 500.0 and isinstance(obj.logit_loss, CrossEntropy)
    teacher.add_features(obj.teacher_features)
    step = StudentStep(student, obj)
    x, y = torch.randn(2, 3, 64, 64, generator=_gen(5)), torch.tensor([1, 7])
    t_out = teacher(x)  # 96 px: a 3x3 layer4 map against the student's 2x2
    assert t_out.features["ft"].shape == (2, 512, 3, 3)
    for epoch, first in ((0.0, True), (1.99, True), (2.0, False), (7.5, False)):
        obj.on_progress(0, epoch)
        assert obj.training_paraphraser is first
        step.zero_grad(set_to_none=True)
        out = step(x, t_out, y)
        assert set(out) == {"loss", "ce", "ft", "ft_recon"}
        weighted = out["ft_recon"] if first else 500.0 * out["ft"]
        torch.testing.assert_close(out["loss"], out["ce"] + weighted)
        out["loss"].backward()
        trained, idle = (
            (obj.paraphraser, obj.translator) if first else (obj.translator, obj.paraphraser)
        )
        assert all(g is not None and g.abs().sum() > 0 for g in _grads(trained))
        assert all(g is None for g in _grads(idle))
        assert student.get_parameter("blocks.0.dw.conv.weight").grad is not None
    # without the logit loss the student learns from the factor term only, in phase two only
    alone = FTLoss.from_models(student, teacher.model, logit_loss=None, paraphraser_epochs=1)
    step = StudentStep(student, alone)
    for epoch in (0.5, 1.0):
        alone.on_progress(0, epoch)
        step.zero_grad(set_to_none=True)
        step(x, t_out, y)["loss"].backward()
        got = student.get_parameter("blocks.12.pw.conv.weight").grad
        assert (got is None) if epoch < 1 else (got is not None and got.abs().sum() > 0)


def test_create_objective_builds_the_paraphrasing_mode() -> None:
    obj = create_objective(
        "ft", student=mobilenet_v1(alpha=0.25), teacher=torchvision.models.resnet18()
    )
    assert isinstance(obj, FTLoss) and obj.inputs == "maps"
    assert obj.paraphraser_epochs == 5.0 and isinstance(obj.logit_loss, CrossEntropy)


# --- finiteness ---------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(
    b=st.sampled_from([1, 2]),
    scale=st.sampled_from([1e-4, 1.0, 1e4]),
    first=st.booleans(),
    seed=st.integers(0, 9),
)
def test_finite_at_extreme_features_and_tiny_batches(
    b: int, scale: float, first: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    obj = _ft(epochs=1.0, logit_loss=CrossEntropy()).float()
    obj.on_progress(0, 0.0 if first else 1.0)
    s, t = (m.float() for m in _maps(b, 4, 6, 2, 3, seed=seed, scale=scale))
    s.requires_grad_()
    logits = torch.randn(b, 3, generator=_gen(seed)).requires_grad_()
    out = obj(
        Outputs(logits, {"ft": s}), Outputs(logits.detach(), {"ft": t}), torch.zeros(b).long()
    )
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    grads = [p.grad for p in obj.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    if not first:
        assert s.grad is not None and torch.isfinite(s.grad).all()


# --- behaviour ----------------------------------------------------------------------------


def test_paraphraser_learns_then_stays_frozen_while_the_translator_learns() -> None:
    """Phase one: a few steps on fixed teacher maps lower the reconstruction error. Phase two,
    same optimizer (its moment estimates of the paraphraser kept, weight decay 5e-4 as the
    authors'): the paraphraser does not move at all, and the translator lowers the factor term."""
    torch.manual_seed(4)
    obj = _ft(epochs=1.0)
    s, t = _maps(8, 4, 6, 4, 4, seed=6)
    opt = torch.optim.AdamW(obj.parameters(), lr=1e-2, weight_decay=5e-4)

    def train(epoch: float, steps: int) -> list[dict[str, float]]:
        history = []
        for _ in range(steps):
            obj.on_progress(0, epoch)
            opt.zero_grad(set_to_none=True)
            out = _run(obj, s, t)
            out["loss"].backward()
            opt.step()
            history.append({k: float(v.detach()) for k, v in out.items()})
        return history

    first = train(0.0, 60)
    assert first[-1]["ft_recon"] < 0.7 * first[0]["ft_recon"]
    frozen = [p.detach().clone() for p in obj.paraphraser.parameters()]
    second = train(1.0, 60)
    assert all(torch.equal(a, b) for a, b in zip(frozen, obj.paraphraser.parameters()))
    assert second[-1]["ft"] < 0.8 * second[0]["ft"]
    assert len({h["ft_recon"] for h in second}) == 1  # logged from the frozen paraphraser


def test_reconstruction_loss_kinds() -> None:
    r, t = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 1.0]])
    assert float(reconstruction_loss(r, t)) == pytest.approx(2.0)
    assert float(reconstruction_loss(r, t, kind="l2")) == pytest.approx(5.0)
    obj = _ft(recon_loss="l2")
    s, t4 = _maps(2, 4, 6, 2, 2, seed=7)
    _, rec = obj.paraphraser(t4)
    torch.testing.assert_close(_run(obj, s, t4)["ft_recon"], F.mse_loss(rec, t4))


# --- errors -------------------------------------------------------------------------------


def test_errors_say_what_to_change() -> None:
    mnet, resnet = mobilenet_v1(alpha=0.25), torchvision.models.resnet18()
    with pytest.raises(TypeError, match=r"picks \['channels'\]"):
        FTLoss.from_models(mnet, resnet, channels=(1, 2))
    with pytest.raises(ValueError, match="needs a teacher"):
        FTLoss.from_models(mnet, None)
    with pytest.raises(ValueError, match="builds inputs='maps'"):
        FTLoss.from_models(mnet, resnet, inputs="factors")
    with pytest.raises(ValueError, match="needs channels=\\(student, teacher\\)"):
        FTLoss(student_layer="a", teacher_layer="b", logit_loss=None, inputs="maps")
    with pytest.raises(ValueError, match=r"\['paraphraser_epochs'\] only apply with inputs='maps'"):
        FTLoss(student_layer="a", teacher_layer="b", logit_loss=None, paraphraser_epochs=1)
    with pytest.raises(ValueError, match="inputs must be one of"):
        FTLoss(student_layer="a", teacher_layer="b", logit_loss=None, inputs="map")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="recon_loss must be one of"):
        _ft(recon_loss="l3")
    with pytest.raises(ValueError, match="rate of at least"):
        Paraphraser(4, rate=0.1)
    untold = _ft(epochs=5.0)
    s, t = _maps(2, 4, 6, 2, 2, seed=8)
    with pytest.raises(RuntimeError, match="never told the epoch"):
        _run(untold, s, t)
    with pytest.raises(ValueError, match=r"set channels=\(5, 6\)"):
        _run(_ft(), torch.randn(2, 5, 2, 2, dtype=D), t)
    with pytest.raises(ValueError, match=r"set channels=\(4, 7\)"):
        _run(_ft(), s, torch.randn(2, 7, 2, 2, dtype=D))
