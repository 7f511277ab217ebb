"""The teacher's own precision (`DistillerConfig.teacher_dtype`, `--teacher-precision`): a
bf16/fp16 teacher's logits are close to fp32's, come back in float32, and leave the student
in fp32; "auto" is fp32 on the CPU; wrong values are config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distill import Distiller, DistillerConfig, Teacher
from distill.config import ConfigError, from_dict
from distill.losses import KDLoss
from distill.teacher import auto_teacher_dtype, teacher_dtype
from distill.types import Outputs
from tests.test_distiller import NoisyImages, tiny_student

# Relative to the largest |logit|: bf16 keeps 8 significant bits (rounding error 2^-9 = 0.2%
# per operation), and errors add up over a few layers: measured 0.3-0.6% on this ConvNet and a
# random-init ResNet-18; fp16 keeps 11 bits (measured 0.05-0.07%).
BF16_TOL, FP16_TOL = 0.02, 0.002


def conv_teacher() -> Teacher:
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )
    for m in model.modules():  # non-trivial running statistics, cast with the weights
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return Teacher(model, input_size=12, mean=(0.4,) * 3, std=(0.3,) * 3, features={"mid": "3"})


@pytest.mark.parametrize(("precision", "tol"), [("bf16", BF16_TOL), ("fp16", FP16_TOL)])
def test_low_precision_logits_are_close_to_fp32(precision: str, tol: float) -> None:
    fp32 = conv_teacher()
    low = conv_teacher().to_precision(precision)  # type: ignore[arg-type]  # same seed
    assert low.dtype == teacher_dtype(precision, "cpu")  # type: ignore[arg-type]
    assert all(p.dtype == low.dtype for p in low.model.parameters())
    x = torch.randn(8, 3, 8, 8)  # student batch: re-normalised and resized in fp32, then cast
    ref, out = fp32(x), low(x)
    assert out.output.dtype == torch.float32 and out.features["mid"].dtype == torch.float32
    err = (out.output - ref.output).abs().max() / ref.output.abs().max()
    assert err < tol, f"{precision}: max |logit difference| = {err:.2%} of max |logit|"
    # what the KD loss sees at T = 4: nearly the same distribution
    t = 4.0
    kl = F.kl_div(
        F.log_softmax(out.output / t, -1),
        F.log_softmax(ref.output / t, -1),
        reduction="batchmean",
        log_target=True,
    )
    assert kl < 1e-4
    # the loop's autocast does not override the teacher's own precision
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(low(x).output, out.output)


def test_outputs_are_plain_tensors_for_the_loss() -> None:
    t = conv_teacher().to_precision("bf16")
    s = nn.Linear(3, 4)
    x = torch.randn(2, 3, 8, 8)
    loss = F.cross_entropy(s(x.mean((2, 3))), t(x).output.softmax(-1))
    loss.backward()  # inference tensors could not be saved for backward
    assert s.weight.grad is not None and s.weight.dtype == torch.float32


def test_auto_is_fp32_on_the_cpu() -> None:
    assert auto_teacher_dtype("cpu") == torch.float32
    assert teacher_dtype("auto", "cpu") == torch.float32
    assert conv_teacher().to_precision("auto").dtype == torch.float32


class Recording(KDLoss):
    """KDLoss that notes the dtype of the teacher outputs it is given."""

    seen: set[torch.dtype]

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        assert teacher is not None
        self.seen = getattr(self, "seen", set()) | {teacher.output.dtype}
        return super().forward(student, teacher, target)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "auto"])
def test_distiller_runs_the_teacher_in_its_own_precision(tmp_path: Path, precision: str) -> None:
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    cfg = DistillerConfig(
        output_dir=str(tmp_path), progress=False, max_steps=3, log_every=1, teacher_dtype=precision
    )  # type: ignore[arg-type]
    objective = Recording(temperature=2.0, alpha=0.7)
    d = Distiller(student, conv_teacher(), objective, opt, config=cfg)
    d.fit(DataLoader(NoisyImages(), batch_size=8))
    assert d.teacher is not None
    assert d.teacher.dtype == teacher_dtype(precision, "cpu")  # type: ignore[arg-type]
    assert objective.seen == {torch.float32}  # the loss gets float32 teacher logits
    assert all(p.dtype == torch.float32 for p in d.unwrapped_student.parameters())
    losses = [r["train/loss"] for r in d._history if "train/loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


class HalfUnsupported(nn.Module):
    """Stands in for a model with an op that has no fp16 CPU kernel (the error torch gives)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float16:
            raise RuntimeError("\"some_op_cpu\" not implemented for 'Half'")
        return self.head(x.mean((2, 3)))


def test_unsupported_fp16_op_says_what_to_change() -> None:
    t = Teacher(HalfUnsupported(), name="odd").to_precision("fp16")
    with pytest.raises(RuntimeError, match=r"teacher odd cannot run in fp16 on cpu.*fp32"):
        t(torch.randn(2, 3, 4, 4))
    assert t.to_precision("fp32")(torch.randn(2, 3, 4, 4)).output.dtype == torch.float32


def test_wrong_precision_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="teacher_dtype must be auto, fp32, bf16, fp16"):
        Distiller(
            tiny_student(),
            conv_teacher(),
            KDLoss(temperature=2.0, alpha=0.5),
            torch.optim.SGD(tiny_student().parameters(), lr=0.1),
            config=DistillerConfig(teacher_dtype="int8"),  # type: ignore[arg-type]
        )
    with pytest.raises(ConfigError, match="teacher_dtype: expected one of auto, fp32"):
        from_dict(DistillerConfig, {"teacher_dtype": "float16"})
    with pytest.raises(ValueError, match="teacher precision must be one of"):
        conv_teacher().to_precision("half")  # type: ignore[arg-type]


def test_recipe_flag_maps_onto_the_distiller() -> None:
    from recipes._config import parse_config
    from recipes.imagenet import ImageNetConfig

    cfg, _ = parse_config(ImageNetConfig, ["--data-dir", "/d", "--teacher-precision", "bf16"])
    assert cfg.distiller_config().teacher_dtype == "bf16"
    assert parse_config(ImageNetConfig, ["--data-dir", "/d"])[0].teacher_precision == "auto"
    with pytest.raises(ConfigError, match="teacher_precision: expected one of auto"):
        parse_config(ImageNetConfig, ["--data-dir", "/d", "--teacher-precision", "fp8"])
