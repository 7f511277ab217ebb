"""The one method registry: names to objectives, the shared settings mapped onto each method's
own arguments (and never onto one it lacks), default layers from the stage maps, and the
run record's method/temperature/kd_weight read back from the built objective."""

from __future__ import annotations

import pytest
import torchvision

from distill.losses import (
    LOSSES,
    CrossEntropy,
    DKDLoss,
    KDLoss,
    create_objective,
    method_name,
    methods_for,
)
from distill.models import mobilenet_v1
from distill.step import describe_objective
from distill.teacher import Teacher

COMMON = {"temperature": 2.0, "kd_weight": 0.7, "label_smoothing": 0.1}


def test_every_name_belongs_to_one_task() -> None:
    tasks = {name: LOSSES[name].tasks for name in LOSSES}
    assert methods_for("multilabel") == ("multilabel_bce", "multilabel_kd")
    assert methods_for("embedding") == ("embedding",)
    logits = set(methods_for("logits"))
    assert {"ce", "kd", "dkd", "dist", "mlkd", "crd", "reviewkd", "ofd", "at"} <= logits
    assert all(len(t) == 1 for t in tasks.values())
    assert {method_name(create_objective("kd")), method_name(CrossEntropy())} == {"kd", "ce"}


def test_shared_settings_reach_only_the_arguments_a_method_has() -> None:
    kd = create_objective("kd", common=COMMON)
    assert isinstance(kd, KDLoss) and (kd.temperature, kd.alpha) == (2.0, 0.7)
    dkd = create_objective("dkd", common=COMMON, beta=2.0)
    assert isinstance(dkd, DKDLoss) and (dkd.temperature, dkd.alpha, dkd.beta) == (2.0, 1.0, 2.0)
    ce = create_objective("ce", common=COMMON)
    assert isinstance(ce, CrossEntropy) and ce.label_smoothing == 0.1
    assert create_objective("kd", common=COMMON, temperature=8.0).temperature == 8.0  # type: ignore[union-attr]
    record = describe_objective(dkd)
    assert record == {"method": "dkd", "temperature": 2.0, "kd_weight": None}
    assert describe_objective(kd)["kd_weight"] == 0.7


def test_a_logit_loss_by_name_and_the_default_one() -> None:
    at = create_objective("at", layers={"a": "b"}, logit_loss="kd", common=COMMON)
    assert isinstance(at.logit_loss, KDLoss) and at.logit_loss.temperature == 2.0  # type: ignore[union-attr]
    nested = create_objective("at", layers={"a": "b"}, logit_loss={"method": "dkd", "beta": 3})
    assert isinstance(nested.logit_loss, DKDLoss) and nested.logit_loss.beta == 3.0  # type: ignore[union-attr]
    plain = create_objective("sp", layers={"a": "b"}, common=COMMON)
    assert isinstance(plain.logit_loss, CrossEntropy)  # type: ignore[union-attr]
    assert plain.logit_loss.label_smoothing == 0.1  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="give a method name, or a mapping with 'method'"):
        create_objective("at", layers={"a": "b"}, logit_loss={"beta": 3})


def test_unknown_arguments_list_what_the_method_takes() -> None:
    with pytest.raises(TypeError, match=r"dkd .*unexpected argument\(s\) \['gama'\]; it takes"):
        create_objective("dkd", gama=2.0)
    with pytest.raises(ValueError, match="common settings"):
        create_objective("kd", common={"temprature": 1.0})


def test_models_fill_in_layers_and_the_dataset_size() -> None:
    student = mobilenet_v1(alpha=0.25, num_classes=10, resolution=32)
    teacher = Teacher(torchvision.models.resnet18(num_classes=10), input_size=32)
    at = create_objective("at", student=student, teacher=teacher)
    assert list(at.teacher_features.values()) == ["layer1", "layer2", "layer3", "layer4"]
    crd = create_objective("crd", student=student, teacher=teacher, num_samples=50, nce_k=4)
    assert crd.memory_student.shape[0] == 50  # type: ignore[union-attr]
    direct = create_objective(
        "crd", student_layer="a", teacher_layer="b", student_dim=3, teacher_dim=4,
        num_samples=20, nce_k=4,
    )  # fmt: skip
    assert direct.memory_teacher.shape[0] == 20  # type: ignore[union-attr]
    with pytest.raises(TypeError, match=r"picks .*layers.* from the stage maps"):
        create_objective("at", student=student, teacher=teacher, layers={"a": "b"})
    with pytest.raises(ValueError, match="needs a teacher"):
        create_objective("sp", student=student, teacher=None)
