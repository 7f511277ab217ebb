"""The Teacher wrapper: frozen, eval, converts input, captures features, checks shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distill import Teacher
from distill.teacher import IMAGENET_MEAN, IMAGENET_STD


class Probe(nn.Module):
    """Records what it was fed; has BatchNorm and Dropout to reveal train/eval mode."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, classes)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.head(self.drop(self.body(x).mean((2, 3))))


def test_frozen_and_kept_in_eval_mode() -> None:
    t = Teacher(Probe(), input_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert all(not p.requires_grad for p in t.parameters())
    wrapper = nn.ModuleDict({"t": t, "other": nn.Linear(2, 2)})
    wrapper.train()
    assert not t.model.training and not t.model.body[1].training
    x = torch.randn(4, 3, 16, 16)
    stats = t.model.body[1].running_mean.clone()
    a, b = t(x).output, t(x).output
    assert torch.equal(a, b)  # dropout off
    assert torch.equal(stats, t.model.body[1].running_mean)  # BN statistics untouched
    assert not a.requires_grad


def test_outputs_usable_in_a_student_loss() -> None:
    """Inference-mode tensors cannot be saved for backward; the Teacher returns plain ones."""
    t = Teacher(Probe(), input_size=8)
    s = nn.Linear(3, 5)
    x = torch.randn(2, 3, 8, 8)
    soft = t(x).output
    loss = F.kl_div(
        s(x.mean((2, 3))).log_softmax(-1),
        soft.log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )
    loss.backward()
    assert s.weight.grad is not None


def test_renormalises_from_student_to_teacher_statistics() -> None:
    probe = Probe()
    t = Teacher(
        probe,
        input_size=8,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.25, 0.125),
        student_mean=IMAGENET_MEAN,
        student_std=IMAGENET_STD,
    )
    pixels = torch.rand(2, 3, 8, 8)  # 0..1
    student_x = (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    t(student_x)
    expected = (pixels - 0.5) / torch.tensor([0.5, 0.25, 0.125]).view(1, 3, 1, 1)
    assert probe.seen is not None
    torch.testing.assert_close(probe.seen, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("student_px", "teacher_px"), [(128, 224), (224, 160), (16, 16)])
def test_resizes_to_the_teachers_resolution(student_px: int, teacher_px: int) -> None:
    probe = Probe()
    t = Teacher(probe, input_size=teacher_px)
    t(torch.randn(1, 3, student_px, student_px))
    assert probe.seen is not None and tuple(probe.seen.shape[-2:]) == (teacher_px, teacher_px)


def test_prepared_input_is_passed_through() -> None:
    probe = Probe()
    t = Teacher(probe, input_size=12, mean=(0.1,) * 3, std=(0.2,) * 3)
    x = torch.randn(2, 3, 12, 12)
    t(x, prepared=True)
    assert probe.seen is x


def test_feature_hooks_capture_named_modules_without_editing_model() -> None:
    probe = Probe()
    t = Teacher(probe, input_size=8, features={"conv": "body.0", "act": "body.2"})
    out = t(torch.randn(2, 3, 8, 8))
    assert set(out.features) == {"conv", "act"}
    assert out.features["conv"].shape == (2, 4, 8, 8)
    assert (out.features["act"] >= 0).all()
    with pytest.raises(ValueError, match=r"no module named \['layer9'\]"):
        Teacher(Probe(), features={"x": "layer9"})


def test_check_compatible_names_the_disagreeing_shapes() -> None:
    t = Teacher(Probe(classes=1000), input_size=8)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    with pytest.raises(ValueError, match=r"student has 10 classes, the teacher 1000"):
        t.check_compatible(student, torch.randn(2, 3, 8, 8))
    t.check_compatible(nn.Sequential(nn.Flatten(), nn.Linear(192, 1000)), torch.randn(2, 3, 8, 8))
    assert t.num_outputs == 1000


def test_huggingface_style_outputs_are_unwrapped() -> None:
    class HFLike(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"logits": x.flatten(1)[:, :3]}

    out = Teacher(HFLike())(torch.randn(2, 3, 4, 4)).output
    assert out.shape == (2, 3)


def test_bad_arguments_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="output must be one of"):
        Teacher(Probe(), output="probabilities")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="both mean and std"):
        Teacher(Probe(), mean=(0.5, 0.5, 0.5))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        Teacher(lambda x: x)  # type: ignore[arg-type]
