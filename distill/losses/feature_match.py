"""Feature matching with a learned or given transform: VID and factor transfer.

VID (Ahn et al., CVPR 2019, "Variational Information Distillation for Knowledge Transfer"; the
layout of RepDistiller's `VIDLoss`, HobbitLong/RepDistiller distiller_zoo/VID.py): a Gaussian
q(t | s) = N(μ(s), σ²) per teacher channel, with μ a 1×1-conv regressor
conv -> ReLU -> conv -> ReLU -> conv (student -> mid -> mid -> teacher channels) and a learnable
variance σ²_c = softplus(α_c) + eps, eps = 1e-5, α initialised so σ² starts at `init_var` = 5.
The term per layer pair is the negative log-likelihood without its constant,

    mean_{B, C, H, W} ½ · ((μ − t)² / σ² + log σ²)

(torchdistill's `VIDLoss` on the same μ, σ²), and loss = weight · Σ_layers (the paper's λ; the
VID-I ImageNet / CIFAR setting and RepDistiller use 1). The term is a bound that can go below 0.
Maps of different spatial sizes meet at the smaller one: the larger map, student's or
teacher's, is average-pooled (RepDistiller pools to the smaller square; resize_map below).

Factor transfer (Kim et al., NeurIPS 2018, "Paraphrasing Complex Network: Network Compression
via Factor Transfer"), its second stage only: given the teacher's factor F_T (the output of a
paraphraser trained beforehand to reconstruct the teacher's map) and the student's F_S (the
output of a translator trained with the student), the term is
‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖_p per sample, averaged over the batch, with p = 1 taken as the
element-wise mean (torchdistill's `FTLoss(p=1, reduction="mean")`). The default β = 500 is
our reading of the paper's CIFAR setting, not checked against its text here: verify it (and
RepDistiller's own FT weight) before quoting it. Not included: the paraphraser, its reconstruction pre-training and the
translator; hook their outputs (teacher_layer = the paraphraser's encoder, student_layer = the
translator) from models that carry them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import (
    Objective,
    as_float,
    check_non_negative,
    check_positive,
    feature,
    full_precision,
)
from distill.losses.feature import _check_map, _FeatureObjective, resize_map
from distill.types import Outputs

# ---------------------------------------------------------------- VID


def vid_nll(mean: Tensor, variance: Tensor, teacher_map: Tensor) -> Tensor:
    """mean ½((μ − t)²/σ² + log σ²) over all elements; `variance` broadcasts against `mean`."""
    t = as_float(teacher_map.detach()).to(mean.dtype)
    if mean.shape != t.shape:
        raise ValueError(
            f"VID's predicted mean {tuple(mean.shape)} and the teacher's map {tuple(t.shape)} "
            "differ: the regressor must map to the teacher's channels and size"
        )
    return (0.5 * ((mean - t).pow(2) / variance + torch.log(variance))).mean()


class VIDRegressor(nn.Module):
    """μ(s): three 1×1 convs with ReLUs between, and σ²_c = softplus(α_c) + eps per channel."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        mid_channels: int,
        init_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(student_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, teacher_channels, kernel_size=1, bias=False),
        )
        self.eps = eps
        # softplus⁻¹(init_var − eps), so that σ² starts at init_var
        self.log_scale = nn.Parameter(
            torch.full((teacher_channels,), math.log(math.expm1(init_var - eps)))
        )

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + self.eps  # (C,)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ (B, Ct, H, W), σ² (1, Ct, 1, 1)) in float32 or wider, outside autocast."""
        with full_precision(x):
            mean = self.mean(as_float(x).to(self.log_scale.dtype))
            return mean, self.variance().to(mean.dtype).view(1, -1, 1, 1)


def _meet(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger map, student's or teacher's, to (min H, min W)."""
    size = (
        min(student_map.shape[-2], teacher_map.shape[-2]),
        min(student_map.shape[-1], teacher_map.shape[-1]),
    )
    return resize_map(student_map, size), resize_map(teacher_map, size)


class VIDLoss(_FeatureObjective):
    """Variational information distillation; part "vid" (Σ over layer pairs) (+ logit_loss's);
    loss = weight · vid + logit loss.

    `layers` maps student to teacher module paths, `channels` gives (student, teacher) channels
    per pair in the same order; hooked as "vid0", "vid1", ... The regressors and variances are
    learnable: add `objective.parameters()` to the optimizer. `mid_channels=None` uses the
    teacher's channels (RepDistiller).
    """

    def __init__(
        self,
        layers: Mapping[str, str],
        channels: list[tuple[int, int]],
        *,
        logit_loss: Objective | None,
        weight: float = 1.0,
        mid_channels: int | None = None,
        init_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(logit_loss)
        if not layers or len(channels) != len(layers):
            raise ValueError(
                f"give one (student, teacher) channel pair per layer pair: {len(layers)} layers, "
                f"{len(channels)} channel pairs, e.g. layers={{'blocks.11': 'layer3'}}, "
                "channels=[(512, 1024)]"
            )
        self.weight = check_non_negative("weight", weight, "VID's lambda; the paper uses 1")
        check_positive("eps", eps, "RepDistiller uses 1e-5")
        if not isinstance(init_var, (int, float)) or not init_var > eps:
            raise ValueError(f"init_var must be > eps={eps}, got {init_var!r}; RepDistiller uses 5")
        self.names: list[str] = []
        self.regressors = nn.ModuleList()
        for i, ((s_path, t_path), (cs, ct)) in enumerate(zip(layers.items(), channels)):
            for what, c in (("student", cs), ("teacher", ct), ("mid", mid_channels or ct)):
                if not isinstance(c, int) or c < 1:
                    raise ValueError(f"{what} channels must be a positive int, got {c!r}")
            self._hook(f"vid{i}", s_path, t_path)
            self.names.append(f"vid{i}")
            self.regressors.append(
                VIDRegressor(cs, ct, mid_channels=mid_channels or ct, init_var=init_var, eps=eps)
            )
        self.channels = [tuple(c) for c in channels]

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        total: Tensor | None = None
        for n, reg, (cs, ct) in zip(self.names, self.regressors, self.channels):
            f_s = feature(student, n, "student", self.student_features[n])
            f_t = feature(t_out, n, "teacher", self.teacher_features[n])
            _check_map(f_s, "student")
            _check_map(f_t, "teacher")
            if (f_s.shape[1], f_t.shape[1]) != (cs, ct):
                raise ValueError(
                    f"{n}: maps have (student, teacher) channels {(f_s.shape[1], f_t.shape[1])} "
                    f"but channels gives {(cs, ct)}: set channels[{self.names.index(n)}] = "
                    f"{(f_s.shape[1], f_t.shape[1])}"
                )
            f_s, f_t = _meet(as_float(f_s), as_float(f_t.detach()))  # pool in float32
            mean, var = reg(f_s)
            value = vid_nll(mean, var, f_t)
            total = value if total is None else total + value
        assert total is not None  # layers is non-empty
        return self._combine({"loss": self.weight * total, "vid": total}, student, t_out, target)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


# ---------------------------------------------------------------- factor transfer


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, *, p: float = 1.0) -> Tensor:
    """Factor transfer on given factors (B, ...): p = 1 is the mean |F̂_S − F̂_T| over all
    elements, otherwise the batch mean of ‖F̂_S − F̂_T‖_p, with F̂ = F/‖F‖₂ per sample."""
    check_positive("p", p, "factor transfer uses p = 1")
    if student_factor.shape != teacher_factor.shape:
        raise ValueError(
            f"factors differ in shape: student {tuple(student_factor.shape)}, teacher "
            f"{tuple(teacher_factor.shape)}; the translator must output the paraphraser's shape"
        )
    if student_factor.dim() < 2:
        raise ValueError(f"factors must be (B, ...), got shape {tuple(student_factor.shape)}")
    s = F.normalize(as_float(student_factor).flatten(1), dim=1)  # (B, D)
    t = F.normalize(as_float(teacher_factor.detach()).flatten(1), dim=1).to(s.dtype)
    if p == 1.0:
        return (s - t).abs().mean()
    diff = (s - t).abs()  # (B, D)
    # ‖d‖_p = max|d| · ‖d / max|d|‖_p: no overflow for large p, and the inner sum is ≥ 1 unless
    # d = 0, so clamping it at 1 only keeps the gradient of d = 0 finite (the value stays 0)
    top = diff.amax(dim=1, keepdim=True)  # (B, 1)
    inner = (diff / top.clamp_min(1e-30)).pow(p).sum(1).clamp_min(1.0)
    return (top.squeeze(1) * inner.pow(1.0 / p)).mean()


class FTLoss(_FeatureObjective):
    """Factor transfer (stage 2) on hooked factors; part "ft" (+ logit_loss's);
    loss = beta · ft + logit loss. `student_layer` is the translator's output in the student,
    `teacher_layer` the paraphraser's encoder output in the teacher (see the module docstring)."""

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        logit_loss: Objective | None,
        beta: float = 500.0,
        p: float = 1.0,
    ) -> None:
        super().__init__(logit_loss)
        self.beta = check_non_negative("beta", beta, "FT's term weight, e.g. 500 with p = 1")
        self.p = check_positive("p", p, "factor transfer uses p = 1")
        self._hook("ft", student_layer, teacher_layer)

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        f_s = feature(student, "ft", "student", self.student_features["ft"])
        f_t = feature(t_out, "ft", "teacher", self.teacher_features["ft"])
        ft = ft_loss(f_s, f_t, p=self.p)
        return self._combine({"loss": self.beta * ft, "ft": ft}, student, t_out, target)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, p={self.p}"
