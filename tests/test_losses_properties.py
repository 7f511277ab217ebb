"""Every registered loss: built by name, and finite (with finite gradients) on hostile inputs.

Hypothesis draws logits/embeddings/features up to ±1e4 (including ties and zeros), temperatures
from 0.1 to 100 and batches down to 1 for each objective in `LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from distill.losses import LOSSES, KDLoss, Objective, create_objective
from distill.types import Outputs

Case = tuple[Objective, Outputs, Outputs | None, torch.Tensor | None]

BIG = st.floats(-1e4, 1e4, allow_nan=False, width=32)
P_NORM = st.sampled_from([1.0, 2.0, 50.0])
TEMPERATURE = st.one_of(st.sampled_from([0.1, 1.0, 100.0]), st.floats(0.1, 100.0))


def _tensor(draw: st.DrawFn, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(draw(arrays(np.float32, shape, elements=BIG)).copy())


@st.composite
def _logit_case(draw: st.DrawFn, name: str) -> Case:
    b, k = draw(st.integers(1, 4)), draw(st.integers(2, 6))
    s, t = _tensor(draw, (b, k)), _tensor(draw, (b, k))
    y = torch.tensor(draw(st.lists(st.integers(0, k - 1), min_size=b, max_size=b)))
    kwargs: dict[str, Any] = {"temperature": draw(TEMPERATURE)}
    if name == "ce":
        return create_objective("ce", label_smoothing=0.1), Outputs(s), None, y
    if name == "kd":
        kwargs["alpha"] = draw(st.floats(0.0, 1.0))
        kwargs["standardize"] = draw(st.booleans())
    if name == "mlkd":
        temps = draw(st.lists(TEMPERATURE, min_size=1, max_size=3))
        kwargs = {"temperatures": tuple(temps), "standardize": draw(st.booleans())}
    if name == "kd" and draw(st.booleans()):  # CTKD's learnable temperature, in (1, 21)
        kwargs.update(learnable_temperature=True, temperature=draw(st.floats(1.01, 20.9)))
    if name == "dkd":
        kwargs["standardize"] = draw(st.booleans())
        kwargs["warmup_epochs"] = draw(st.sampled_from([0.0, 1.0, 20.0]))
        kwargs["warmup_schedule"] = draw(st.sampled_from(["epoch", "linear"]))
    obj = create_objective(name, **kwargs)
    obj.on_progress(0, draw(st.floats(0.0, 30.0)))  # what the Distiller does before each step
    return obj, Outputs(s), Outputs(t), y


@st.composite
def _multilabel_case(draw: st.DrawFn, name: str) -> Case:
    b, a = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    s, t = _tensor(draw, (b, a)), _tensor(draw, (b, a))
    y = torch.from_numpy(
        draw(arrays(np.float32, (b, a), elements=st.sampled_from([0.0, 1.0, -1.0])))
    )
    if name == "multilabel_bce":
        return create_objective(name, missing_label=-1), Outputs(s), None, y
    obj = create_objective(
        name, temperature=draw(TEMPERATURE), alpha=draw(st.floats(0.0, 1.0)), missing_label=-1
    )
    return obj, Outputs(s), Outputs(t), y


@st.composite
def _embedding_case(draw: st.DrawFn, name: str) -> Case:
    b, ds, dt = draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    kind = draw(st.sampled_from(["mse", "cosine", "rkd"]))
    obj = create_objective(
        name,
        student_dim=ds,
        teacher_dim=dt,
        kind=kind,
        normalize=draw(st.booleans()),
        average=draw(st.sampled_from(["all", "distinct"])),
    )
    return obj, Outputs(_tensor(draw, (b, ds))), Outputs(_tensor(draw, (b, dt))), None


@st.composite
def _feature_case(draw: st.DrawFn, name: str) -> Case:
    b, cs, ct = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    hs, ht = draw(st.integers(2, 4)), draw(st.integers(1, 6))  # BN in train mode needs B·H·W > 1
    f_s, f_t = _tensor(draw, (b, cs, hs, hs)), _tensor(draw, (b, ct, ht, ht))
    s, t = _tensor(draw, (b, 3)), _tensor(draw, (b, 3))
    logit = KDLoss(temperature=draw(TEMPERATURE), alpha=0.5)
    y = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=b, max_size=b)))
    if name == "fitnet":
        obj = create_objective(
            "fitnet",
            student_layer="a",
            teacher_layer="b",
            student_channels=cs,
            teacher_channels=ct,
            logit_loss=logit,
            adapter_relu=draw(st.booleans()),
        )
        return obj, Outputs(s, {"hint": f_s}), Outputs(t, {"hint": f_t}), y
    if name in ("sp", "pkt", "cc"):
        obj = create_objective(name, layers={"a": "b"}, logit_loss=logit)
        return obj, Outputs(s, {f"{name}0": f_s}), Outputs(t, {f"{name}0": f_t}), y
    if name == "vid":
        obj = create_objective("vid", layers={"a": "b"}, channels=[(cs, ct)], logit_loss=logit)
        return obj, Outputs(s, {"vid0": f_s}), Outputs(t, {"vid0": f_t}), y
    if name == "ft":
        obj = create_objective(
            "ft", student_layer="a", teacher_layer="b", logit_loss=logit, p=draw(P_NORM)
        )
        f_t = _tensor(draw, tuple(f_s.shape))
        return obj, Outputs(s, {"ft": f_s}), Outputs(t, {"ft": f_t}), y
    if name == "crd":
        obj = _WithIndex(
            create_objective(
                "crd",
                student_layer="a",
                teacher_layer="b",
                student_dim=cs * hs * hs,
                teacher_dim=ct * ht * ht,
                num_samples=8,
                nce_k=4,
                logit_loss=logit,
            ),
            torch.arange(b),
        )
        return obj, Outputs(s, {"crd": f_s}), Outputs(t, {"crd": f_t}), y
    if name in ("reviewkd", "ofd"):
        b = max(b, 2)  # ReviewKD's deepest BatchNorm needs a batch of 2 in training
        f_s, f_t = _tensor(draw, (b, cs, hs, hs)), _tensor(draw, (b, ct, ht, ht))
        s, t = _tensor(draw, (b, 3)), _tensor(draw, (b, 3))
        y = torch.tensor(draw(st.lists(st.integers(0, 2), min_size=b, max_size=b)))
        extra: dict[str, Any] = (
            {"margins": [-torch.rand(ct, generator=torch.Generator().manual_seed(0))]}
            if name == "ofd"
            else {"mid_channels": 2}
        )
        obj = create_objective(name, student_layers=["a"], teacher_layers=["b"],
                               student_channels=[cs], teacher_channels=[ct], logit_loss=logit,
                               **extra)  # fmt: skip
        key = "review0" if name == "reviewkd" else "ofd0"
        return obj, Outputs(s, {key: f_s}), Outputs(t, {key: f_t}), y
    resize = draw(st.sampled_from(["feature", "attention"]))
    obj = create_objective("at", layers={"a": "b"}, logit_loss=logit, resize=resize)
    return obj, Outputs(s, {"at0": f_s}), Outputs(t, {"at0": f_t}), y


class _WithIndex(Objective):
    """Feeds an objective that reads the batch's "index" (CRD) the indices the loop would."""

    def __init__(self, inner: Objective, index: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.index = inner, index

    def forward(self, student: Outputs, teacher: Outputs | None, target: Any) -> Any:
        return self.inner(student, teacher, target, index=self.index)


CASES: dict[str, Callable[[str], st.SearchStrategy[Case]]] = {
    "ce": _logit_case,
    "kd": _logit_case,
    "dkd": _logit_case,
    "multilabel_bce": _multilabel_case,
    "multilabel_kd": _multilabel_case,
    "embedding": _embedding_case,
    "fitnet": _feature_case,
    "at": _feature_case,
    "dist": _logit_case,
    "sp": _feature_case,
    "pkt": _feature_case,
    "cc": _feature_case,
    "vid": _feature_case,
    "ft": _feature_case,
    "mlkd": _logit_case,
    "crd": _feature_case,
    "reviewkd": _feature_case,
    "ofd": _feature_case,
}


def test_every_registered_loss_has_a_property_case() -> None:
    assert set(CASES) == set(LOSSES), "add a hypothesis case for every new loss"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_finite_loss_and_gradients(name: str) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=CASES[name](name))
    def check(case: Case) -> None:
        obj, student, teacher, target = case
        student.output.requires_grad_()
        for f in student.features.values():
            f.requires_grad_()
        out = obj(student, teacher, target)
        assert "loss" in out and out["loss"].dim() == 0
        for part, value in out.items():
            assert torch.isfinite(value), f"{name}: part {part!r} = {value}"
        out["loss"].backward()
        leaves = [student.output, *student.features.values(), *obj.parameters()]
        for leaf in leaves:
            assert leaf.grad is None or torch.isfinite(leaf.grad).all(), f"{name}: gradient"

    check()


def test_create_objective_errors_name_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'kld'; choose one of \['at', 'cc', 'ce'"):
        create_objective("kld")
    with pytest.raises(TypeError, match=r"kd \(KDLoss\(temperature.*\): .*'temp'"):
        create_objective("kd", temp=4.0)
    assert create_objective("kd", temperature=2.0, alpha=0.5).temperature == 2.0  # type: ignore[union-attr]


def _example(name: str) -> Case:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    y = torch.tensor([0, 1, 2, 4])
    labels = (torch.rand(4, 5, generator=g) > 0.5).float()
    maps_s, maps_t = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 6, 8, 8, generator=g)
    examples: dict[str, Case] = {
        "ce": (create_objective("ce"), Outputs(s), None, y),
        "kd": (create_objective("kd"), Outputs(s), Outputs(t), y),
        "dkd": (create_objective("dkd", warmup_epochs=0), Outputs(s), Outputs(t), y),
        "multilabel_bce": (create_objective("multilabel_bce"), Outputs(s), None, labels),
        "multilabel_kd": (create_objective("multilabel_kd"), Outputs(s), Outputs(t), labels),
        "embedding": (
            create_objective("embedding", student_dim=5, teacher_dim=3),
            Outputs(s),
            Outputs(t[:, :3]),
            None,
        ),
        "fitnet": (
            create_objective(
                "fitnet",
                student_layer="a",
                teacher_layer="b",
                student_channels=3,
                teacher_channels=6,
                logit_loss=KDLoss(),
            ),
            Outputs(s, {"hint": maps_s}),
            Outputs(t, {"hint": maps_t}),
            y,
        ),
        "at": (
            create_objective("at", layers={"a": "b"}, logit_loss=KDLoss()),
            Outputs(s, {"at0": maps_s}),
            Outputs(t, {"at0": maps_t}),
            y,
        ),
        "dist": (create_objective("dist"), Outputs(s), Outputs(t), y),
        "mlkd": (create_objective("mlkd"), Outputs(s), Outputs(t), y),
        "reviewkd": (
            create_objective(
                "reviewkd",
                student_layers=["a"],
                teacher_layers=["b"],
                student_channels=[3],
                teacher_channels=[6],
                mid_channels=4,
                logit_loss=KDLoss(),
            ),
            Outputs(s, {"review0": maps_s}),
            Outputs(t, {"review0": maps_t}),
            y,
        ),
        "ofd": (
            create_objective(
                "ofd",
                student_layers=["a"],
                teacher_layers=["b"],
                student_channels=[3],
                teacher_channels=[6],
                margins=[-torch.ones(6)],
                logit_loss=KDLoss(),
            ),
            Outputs(s, {"ofd0": maps_s}),
            Outputs(t, {"ofd0": maps_t}),
            y,
        ),
        "crd": (
            _WithIndex(
                create_objective(
                    "crd",
                    student_layer="a",
                    teacher_layer="b",
                    student_dim=48,
                    teacher_dim=384,
                    num_samples=8,
                    nce_k=4,
                    logit_loss=KDLoss(),
                ),
                torch.arange(4),
            ),
            Outputs(s, {"crd": maps_s}),
            Outputs(t, {"crd": maps_t}),
            y,
        ),
        "vid": (
            create_objective("vid", layers={"a": "b"}, channels=[(3, 6)], logit_loss=KDLoss()),
            Outputs(s, {"vid0": maps_s}),
            Outputs(t, {"vid0": maps_t}),
            y,
        ),
        "ft": (
            create_objective("ft", student_layer="a", teacher_layer="b", logit_loss=KDLoss()),
            Outputs(s, {"ft": maps_s}),
            Outputs(t, {"ft": maps_t[:, :3, :4, :4]}),
            y,
        ),
    }
    for relation in ("sp", "pkt", "cc"):
        examples[relation] = (
            create_objective(relation, layers={"a": "b"}, logit_loss=KDLoss()),
            Outputs(s, {f"{relation}0": maps_s}),
            Outputs(t, {f"{relation}0": maps_t}),
            y,
        )
    return examples[name]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_bf16_autocast_does_not_lower_the_loss_precision(name: str) -> None:
    obj, student, teacher, target = _example(name)
    obj.eval()  # same BatchNorm statistics in both calls

    def rounded(o: Outputs | None, dtype: torch.dtype) -> Outputs | None:
        if o is None:
            return None
        return Outputs(
            o.output.bfloat16().to(dtype),
            {k: v.bfloat16().to(dtype) for k, v in o.features.items()},
        )

    # float32 reference on the bf16-rounded inputs: autocast must change nothing beyond that
    reference = obj(rounded(student, torch.float32), rounded(teacher, torch.float32), target)  # type: ignore[arg-type]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(rounded(student, torch.bfloat16), rounded(teacher, torch.bfloat16), target)  # type: ignore[arg-type]
    for part, value in out.items():
        assert value.dtype == torch.float32, f"{name}: part {part!r} is {value.dtype}"
        assert value.item() == pytest.approx(reference[part].item(), rel=1e-5, abs=1e-6), part
