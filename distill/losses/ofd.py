"""OFD: feature distillation before the ReLU, with a margin and a partial L2 distance.

Heo, Kim, Yun, Park, Kwak & Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019.
Followed: the authors' ImageNet code (clovaai/overhaul-distillation, ImageNet/distiller.py,
ImageNet/train_with_distillation.py, ImageNet/models/ResNet.py and MobileNet.py).

- Features: at the end of each stage, *before* its ReLU, for both networks. In a ResNet that
  is the last block's output after the residual addition (the authors' blocks move the ReLU to
  the start of the next block); in MobileNetV1 the stage's last pointwise BN output (the
  input of its last ReLU).
- Teacher transform: t̂ = max(t, m_c), with a per-channel margin m_c < 0 (Eq. 3), the
  expectation of the teacher's response given that it is negative, m = E[x | x < 0] for
  x ~ N(μ, σ):  m = μ − σ·φ(μ/σ)/Φ(−μ/σ). As in the authors' `get_margin_from_BN`, μ and σ are
  the BatchNorm's affine bias and |weight| (its output is β + γ·x̂ with x̂ ≈ N(0, 1) under the
  running statistics, which therefore do not enter), and m = −3σ where Φ(−μ/σ) ≤ 0.001. The
  BatchNorm is the last one before the stage's ReLU (`bn3` of a Bottleneck, `bn2` of a
  BasicBlock); the residual added after it is ignored, as the authors do.
- Student transform: a connector conv1×1 (no bias) + BN to the teacher's channels, initialised
  as the authors' `build_feature_connector` (He-normal over the output fan, BN 1/0).
- Distance (Eq. 5), partial L2: Σ over elements of (s − t̂)², skipping the elements where
  s ≤ t̂ and t̂ ≤ 0 (a student below a non-positive target is already right after the ReLU).
- Normalisation: the distance of stage i = 0 .. n−1 (shallow to deep) is divided by 2^(n−i−1), the
  stages summed, and the sum divided by the batch size; the training loss is
  CE + that / 10000 on ImageNet (`loss_distill.sum() / batch_size / 10000`; the CIFAR code uses
  1000). Our `weight` is that factor: 1e-4 by default (ImageNet, ResNet-50 -> MobileNet).

Where ours differs, and why: a student at a lower resolution than its teacher (128 px against
224 px) has its connector output resized to the teacher's map size (bilinear when enlarging,
area when shrinking). Resizing the student keeps the margin acting on the teacher's true
pre-ReLU values (pooling the teacher would average values of both signs before the max) and
keeps the sum over the teacher's number of elements, so the authors' weight keeps its scale.
The authors fed both networks the same 224 px input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from distill.losses.base import as_float, check_non_negative, feature, full_precision
from distill.losses.feature import _FeatureObjective, resize_map
from distill.losses.review import LogitLoss, refuse_layers, resolve_logit_loss
from distill.models.stages import match_stages, stage_map
from distill.teacher import Teacher
from distill.types import Outputs

__all__ = [
    "MIN_NEGATIVE_MASS",
    "OFDConnector",
    "OFDLoss",
    "bn_margin",
    "gaussian_margin",
    "ofd_loss",
    "partial_l2",
]

# The authors' cut-off: below this probability of a negative response the margin is −3σ.
MIN_NEGATIVE_MASS = 1e-3
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_margin(mean: Tensor, std: Tensor) -> Tensor:
    """E[x | x < 0] for x ~ N(mean, |std|) per channel, in float64 (module docstring);
    −3·|std| where P(x < 0) ≤ MIN_NEGATIVE_MASS. σ = 0 gives `mean` if it is negative, else 0."""
    m, s = mean.detach().double(), std.detach().double().abs()
    if m.shape != s.shape:
        raise ValueError(f"mean {tuple(m.shape)} and std {tuple(s.shape)} shapes differ")
    inf = torch.full_like(m, math.inf)
    a = torch.where(s > 0, m / s.clamp_min(1e-300), torch.where(m < 0, -inf, inf))  # μ/σ
    used = torch.special.ndtr(-a) > MIN_NEGATIVE_MASS  # P(x < 0) = Φ(−μ/σ)
    a = torch.where(used, a, torch.zeros_like(a))
    # the inverse Mills ratio φ(a)/Φ(−a) in logs: finite for a → −∞, where it tends to 0
    ratio = torch.exp(-0.5 * a * a - _LOG_SQRT_2PI - torch.special.log_ndtr(-a))
    return torch.where(used, m - s * ratio, -3.0 * s)


def bn_margin(bn: nn.Module) -> Tensor:
    """The OFD margin (C,) of the responses a BatchNorm produces: from its affine bias (μ) and
    weight (σ); a BatchNorm without affine parameters outputs ≈ N(0, 1)."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"OFD's margin needs a BatchNorm layer, got {type(bn).__name__}")
    c = bn.num_features
    weight = bn.weight if bn.weight is not None else torch.ones(c)
    bias = bn.bias if bn.bias is not None else torch.zeros(c)
    return gaussian_margin(bias, weight)


def partial_l2(student: Tensor, teacher: Tensor, margin: Tensor) -> Tensor:
    """Σ (s − t̂)² over the elements of (B, C, H, W) maps of the same shape, t̂ = max(t, margin_c),
    skipping elements where s ≤ t̂ ≤ 0 (not divided by anything)."""
    target = torch.maximum(teacher, margin.to(teacher.dtype).view(1, -1, 1, 1))
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep).sum()


def ofd_loss(
    student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor], margins: Sequence[Tensor]
) -> Tensor:
    """Σ_i partial_l2_i / 2^(n−i−1), divided by the batch size (without the authors' 1/10000,
    which is `OFDLoss.weight`). Student maps are the connectors' outputs, resized to the teacher
    maps' sizes; teacher maps are pre-ReLU and detached."""
    n = len(student_maps)
    if n < 1 or len(teacher_maps) != n or len(margins) != n:
        raise ValueError(
            f"ofd_loss needs as many student maps, teacher maps and margins (at least one), got "
            f"{n}, {len(teacher_maps)} and {len(margins)}"
        )
    total: Tensor | None = None
    for i, (s_map, t_map, margin) in enumerate(zip(student_maps, teacher_maps, margins)):
        s, t = as_float(s_map), as_float(t_map.detach())
        if s.dim() != 4 or s.shape[:2] != t.shape[:2] or margin.shape != (t.shape[1],):
            raise ValueError(
                f"stage {i}: student {tuple(s.shape)}, teacher {tuple(t.shape)} and margin "
                f"{tuple(margin.shape)} must be (B, C, H, W), (B, C, H', W') and (C,)"
            )
        s = resize_map(s, (t.shape[-2], t.shape[-1]))
        term = partial_l2(s, t.to(s.dtype), margin) / 2 ** (n - i - 1)
        total = term if total is None else total + term
    assert total is not None
    return total / student_maps[0].shape[0]


class OFDConnector(nn.Sequential):
    """Student -> teacher channels: 1×1 conv (no bias) + BatchNorm, the authors' init."""

    def __init__(self, student_channels: int, teacher_channels: int) -> None:
        conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / teacher_channels))  # fan-out He init
        bn = nn.BatchNorm2d(teacher_channels)
        super().__init__(conv, bn)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        with full_precision(x):  # part of the loss: float32 or wider
            dtype = cast(nn.Conv2d, self[0]).weight.dtype
            return cast(Tensor, super().forward(as_float(x).to(dtype)))


class OFDLoss(_FeatureObjective):
    """OFD objective; parts "ofd" (+ logit_loss's, by default "ce"); loss = weight·ofd + logit.

    `student_layers` / `teacher_layers`: pre-ReLU module paths, shallow to deep, paired one to
    one; hooked as "ofd0", "ofd1", ... `margins`: one (C_teacher,) tensor per pair (see
    `bn_margin`), kept as buffers. The connectors are learnable: add `objective.parameters()`
    to the optimizer. `from_models` reads all of it from the default stage maps.
    """

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        margins: Sequence[Tensor],
        *,
        weight: float = 1e-4,
        logit_loss: LogitLoss = "ce",
    ) -> None:
        super().__init__(resolve_logit_loss(logit_loss))
        n = len(student_layers)
        if n < 1 or len(teacher_layers) != n or len(margins) != n:
            raise ValueError(
                f"give one teacher layer and one margin per student layer (at least one), got "
                f"{n} student layers, {len(teacher_layers)} teacher layers, {len(margins)} margins"
            )
        for name, values in (("student", student_channels), ("teacher", teacher_channels)):
            if len(values) != n or not all(isinstance(c, int) and c >= 1 for c in values):
                raise ValueError(f"{name}_channels must be {n} positive ints, got {values!r}")
        self.weight = check_non_negative(
            "weight", weight, "the authors divide by 10000 on ImageNet (weight=1e-4), 1000 on CIFAR"
        )
        self.student_channels, self.teacher_channels = (
            list(student_channels),
            list(teacher_channels),
        )
        self.connectors = nn.ModuleList(
            OFDConnector(cs, ct) for cs, ct in zip(student_channels, teacher_channels, strict=True)
        )
        for i, (margin, ct) in enumerate(zip(margins, teacher_channels, strict=True)):
            margin = torch.as_tensor(margin).detach().float()
            if margin.shape != (ct,) or not torch.isfinite(margin).all() or (margin > 0).any():
                raise ValueError(
                    f"margins[{i}] must be {ct} finite values <= 0 (one per teacher channel, see "
                    f"bn_margin), got shape {tuple(margin.shape)}"
                )
            self.register_buffer(f"margin{i}", margin.clone())
        self.names = [f"ofd{i}" for i in range(n)]
        for name, s_path, t_path in zip(self.names, student_layers, teacher_layers, strict=True):
            self._hook(name, s_path, t_path)

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module | None, **options: Any) -> OFDLoss:
        """Pair the stages both networks share by stride, hook both before their ReLU and take
        each margin from the teacher's BatchNorm before that ReLU; `options` go to the
        constructor (weight, logit_loss)."""
        taken = {"student_layers", "teacher_layers", "student_channels", "teacher_channels"}
        refuse_layers(cls.__name__, (taken | {"margins"}) & set(options))
        if teacher is None:
            raise ValueError("OFD needs a teacher to read its stages and margins from")
        t_model = teacher.model if isinstance(teacher, Teacher) else teacher
        pairs = match_stages(stage_map(student), stage_map(teacher))
        margins = []
        for _, t in pairs:
            if t.norm_path is None:
                raise ValueError(
                    f"no BatchNorm known before the teacher's stage {t.name}: build OFDLoss(...) "
                    "with margins=[bn_margin(...), ...]"
                )
            margins.append(bn_margin(t_model.get_submodule(t.norm_path)))
        return cls(
            [s.hook_path(True) for s, _ in pairs],
            [t.hook_path(True) for _, t in pairs],
            [s.channels for s, _ in pairs],
            [t.channels for _, t in pairs],
            margins,
            **options,
        )

    @property
    def margins(self) -> list[Tensor]:
        return [cast(Tensor, getattr(self, f"margin{i}")) for i in range(len(self.names))]

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        s_maps, t_maps = [], []
        for i, name in enumerate(self.names):
            s = feature(student, name, "student", self.student_features[name])
            t = feature(t_out, name, "teacher", self.teacher_features[name])
            if s.dim() != 4 or s.shape[1] != self.student_channels[i]:
                raise ValueError(
                    f"the student's {name} map has shape {tuple(s.shape)}; expected (B, "
                    f"{self.student_channels[i]}, H, W): set student_channels[{i}]"
                )
            if t.dim() != 4 or t.shape[1] != self.teacher_channels[i]:
                raise ValueError(
                    f"the teacher's {name} map has shape {tuple(t.shape)}; expected (B, "
                    f"{self.teacher_channels[i]}, H, W): set teacher_channels[{i}]"
                )
            s_maps.append(self.connectors[i](s))
            t_maps.append(t)
        ofd = ofd_loss(s_maps, t_maps, self.margins)
        own = {"loss": self.weight * ofd, "ofd": ofd}
        return self._combine(own, student, t_out, target)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
