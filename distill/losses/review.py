"""ReviewKD: knowledge review with attention-based fusion and a hierarchical context loss.

Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021. Followed: the
authors' ImageNet code (dvlab-research/ReviewKD, ImageNet/models/reviewkd.py: `ABF`,
`ReviewKD`, `hcl`; ImageNet/imagenet_amp.py: loss = CE + weight · hcl), which torchdistill
1.1.5 refactors as `AttentionBasedFusion`, `Student4KnowledgeReview` and
`HierarchicalContextLoss`.

The student's stage maps f_1 .. f_n (shallow to deep; the authors' last "stage" is the pooled
pre-classifier feature as a (B, C, 1, 1) map) are reviewed deepest first by a chain of ABF
modules: ABF_n maps f_n to the teacher's channels; each shallower ABF_i reduces f_i to
`mid_channels`, fuses it with the residual carried up from ABF_{i+1} (nearest-upsampled to
f_i's size) through a two-channel sigmoid attention, and maps the fused map to the teacher's
channels with a 3×3 conv + BN. The output at each level is compared with the teacher's map at
that level by the hierarchical context loss

    hcl(s, t) = [mse(s, t) + Σ_k w_k · mse(pool_k(s), pool_k(t))] / (1 + Σ_k w_k),

pool_k the adaptive average pool to k × k for k in (4, 2, 1), w_k = 1/2, 1/4, 1/8 in that order,
levels with k >= H skipped (the weights halve over the levels kept); the loss sums hcl over the
levels. Both networks' stage maps are taken before their last ReLU, as the authors'
`extract_feature(preReLU=True)` / `is_last` ResNet blocks do; the pooled features are pooled
after it. The authors' ImageNet weight for ResNet-50 -> MobileNet is 8.0 (ResNet-34 -> ResNet-18:
1.0; README of ImageNet/).

Where ours differs, and why:
- the residual is upsampled to the student map's own (H, W), not to the authors' hard-coded
  sizes (1, 7, 14, 28, 56), which only hold for a 224 px student;
- a student at a lower resolution than its teacher (128 px against 224 px) is compared at the
  student's resolution: each teacher map is resized to the ABF output's size (area-averaged
  when shrinking, bilinear otherwise, as FitNets here); the authors fed both networks the same
  224 px input. The pyramid levels are then taken of the student-sized maps;
- (B, C) pooled features (our MobileNetV1, timm) are viewed as (B, C, 1, 1) maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import Objective, as_float, check_non_negative, feature, full_precision
from distill.losses.ce import CrossEntropy
from distill.losses.feature import _FeatureObjective, refuse_layers, resize_map
from distill.models.stages import match_stages, penultimate, stage_map
from distill.types import Outputs

__all__ = ["ABF", "HCL_LEVELS", "ReviewKDLoss", "hcl_loss", "review_maps"]

HCL_LEVELS: tuple[int, ...] = (4, 2, 1)
LogitLoss = Objective | None | Literal["ce"]


def as_map(x: Tensor, side: str) -> Tensor:
    """(B, C) pooled features -> (B, C, 1, 1); (B, C, H, W) maps as they are."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() != 4:
        raise ValueError(
            f"{side} feature must be a (B, C, H, W) map or a pooled (B, C) vector, got shape "
            f"{tuple(x.shape)}"
        )
    return x


def _hcl_pair(s: Tensor, t: Tensor, levels: Sequence[int]) -> Tensor:
    h = s.shape[-2]
    loss = F.mse_loss(s, t)
    weight, total = 1.0, 1.0
    for k in levels:
        if k >= h:  # the authors' rule: a pyramid level must be smaller than the map
            continue
        weight /= 2.0
        loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, k), F.adaptive_avg_pool2d(t, k))
        total += weight
    return loss / total


def hcl_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    *,
    levels: Sequence[int] = HCL_LEVELS,
) -> Tensor:
    """Σ over levels of the hierarchical context loss (module docstring). Each student map is
    (B, C, H, W) (already mapped to the teacher's C by the ABF chain); each teacher map is
    resized to its student map's (H, W) and detached."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ValueError(
            f"hcl_loss needs as many student as teacher maps (at least one), got "
            f"{len(student_maps)} and {len(teacher_maps)}"
        )
    total: Tensor | None = None
    for i, (s_map, t_map) in enumerate(zip(student_maps, teacher_maps, strict=True)):
        s, t = as_float(as_map(s_map, "student")), as_float(as_map(t_map, "teacher").detach())
        if s.shape[:2] != t.shape[:2]:
            raise ValueError(
                f"level {i}: student map {tuple(s.shape)} and teacher map {tuple(t.shape)} "
                "disagree in batch or channels; the ABF chain must map to the teacher's channels"
            )
        t = resize_map(t, (s.shape[-2], s.shape[-1])).to(s.dtype)
        term = _hcl_pair(s, t, levels)
        total = term if total is None else total + term
    assert total is not None
    return total


class ABF(nn.Module):
    """Attention-based fusion (Chen et al. 2021, Fig. 3 (a); the authors' `ABF`).

    reduce: 1×1 conv (no bias) + BN to `mid_channels`; output: 3×3 conv (no bias) + BN to the
    teacher's channels; attention (only when `fuse`): 1×1 conv (with bias) from the
    concatenated (reduced, residual) maps to two sigmoid weights per pixel. Conv weights use
    the authors' kaiming_uniform_(a=1). `forward` returns (output, residual for the next, shallower
    ABF).
    """

    def __init__(
        self, in_channels: int, mid_channels: int, out_channels: int, *, fuse: bool
    ) -> None:
        super().__init__()
        reduce = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        output = nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False)
        for conv in (reduce, output):
            nn.init.kaiming_uniform_(conv.weight, a=1)
        self.reduce = nn.Sequential(reduce, nn.BatchNorm2d(mid_channels))
        self.output = nn.Sequential(output, nn.BatchNorm2d(out_channels))
        self.attention = nn.Conv2d(2 * mid_channels, 2, kernel_size=1) if fuse else None

    def forward(self, x: Tensor, residual: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)  # (B, mid, H, W)
        if self.attention is not None:
            if residual is None:
                raise ValueError("this ABF fuses: pass the residual of the next deeper ABF")
            # upsample the deeper level's residual (B, mid, h, w) to this level's (H, W)
            residual = F.interpolate(residual, size=x.shape[-2:], mode="nearest")
            z = torch.sigmoid(self.attention(torch.cat([x, residual], dim=1)))  # (B, 2, H, W)
            x = x * z[:, 0:1] + residual * z[:, 1:2]
        return self.output(x), x

    @property
    def dtype(self) -> torch.dtype:
        return cast(nn.Conv2d, self.output[0]).weight.dtype

    def extra_repr(self) -> str:
        return f"fuse={self.attention is not None}"


def review_maps(abfs: Sequence[ABF], student_maps: Sequence[Tensor]) -> list[Tensor]:
    """Run the ABF chain deepest first; returns its outputs shallow to deep (abfs[i] takes
    student_maps[i]; the last ABF does not fuse)."""
    if len(abfs) != len(student_maps):
        raise ValueError(f"{len(abfs)} ABF modules for {len(student_maps)} student maps")
    out, residual = abfs[-1](student_maps[-1])
    outputs = [out]
    for abf, x in zip(reversed(abfs[:-1]), reversed(student_maps[:-1]), strict=True):
        out, residual = abf(x, residual)
        outputs.append(out)
    return outputs[::-1]


def resolve_logit_loss(logit_loss: LogitLoss) -> Objective | None:
    """The `logit_loss` of the stage-wise objectives: the default "ce" becomes a new
    CrossEntropy() (the authors' CE term); an Objective or None stays as it is."""
    if isinstance(logit_loss, str):
        if logit_loss != "ce":
            raise ValueError(
                f"logit_loss={logit_loss!r}: give an Objective (e.g. KDLoss()), 'ce' for "
                "CrossEntropy() (the authors' setting) or None; other names are resolved by "
                "distill.losses.create_objective"
            )
        return CrossEntropy()
    return logit_loss


def _check_channels(name: str, values: Sequence[int], n: int) -> list[int]:
    out = list(values)
    if len(out) != n or not all(isinstance(c, int) and c >= 1 for c in out):
        raise ValueError(f"{name} must be {n} positive ints (one per layer), got {values!r}")
    return out


class ReviewKDLoss(_FeatureObjective):
    """ReviewKD objective; parts "review" (Σ hcl) (+ logit_loss's, by default "ce");
    loss = weight · review + logit loss.

    `student_layers` / `teacher_layers` are module paths, shallow to deep, paired one to one
    (the last pair usually the pooled features); hooked as "review0", "review1", ... The ABF
    chain is learnable: add `objective.parameters()` to the optimizer. `from_models` fills in
    paths and channels from the default stage maps.
    """

    def __init__(
        self,
        student_layers: Sequence[str],
        teacher_layers: Sequence[str],
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        *,
        mid_channels: int = 256,
        weight: float = 8.0,
        logit_loss: LogitLoss = "ce",
        levels: Sequence[int] = HCL_LEVELS,
    ) -> None:
        super().__init__(resolve_logit_loss(logit_loss))
        n = len(student_layers)
        if n < 1 or len(teacher_layers) != n:
            raise ValueError(
                f"give as many teacher_layers as student_layers (at least one), got "
                f"{len(student_layers)} and {len(teacher_layers)}"
            )
        s_ch = _check_channels("student_channels", student_channels, n)
        t_ch = _check_channels("teacher_channels", teacher_channels, n)
        if not isinstance(mid_channels, int) or mid_channels < 1:
            raise ValueError(f"mid_channels must be a positive int, got {mid_channels!r}")
        if not levels or not all(isinstance(k, int) and k >= 1 for k in levels):
            raise ValueError(f"levels must be pyramid sizes >= 1, e.g. (4, 2, 1); got {levels!r}")
        self.weight = check_non_negative(
            "weight", weight, "the authors use 8.0 for ResNet-50 -> MobileNet on ImageNet"
        )
        self.levels = tuple(levels)
        self.student_channels, self.teacher_channels = s_ch, t_ch
        self.mid_channels = mid_channels
        self.abfs = nn.ModuleList(
            ABF(cs, mid_channels, ct, fuse=i < n - 1)
            for i, (cs, ct) in enumerate(zip(s_ch, t_ch, strict=True))
        )
        self.names = [f"review{i}" for i in range(n)]
        for name, s_path, t_path in zip(self.names, student_layers, teacher_layers, strict=True):
            self._hook(name, s_path, t_path)

    @classmethod
    def from_models(
        cls, student: nn.Module, teacher: nn.Module | None, *, preact: bool = True, **options: Any
    ) -> ReviewKDLoss:
        """Hook the stages both networks share by stride (pre-ReLU when `preact`, as the
        authors) plus the pooled pre-classifier features; `options` go to the constructor."""
        taken = {"student_layers", "teacher_layers", "student_channels", "teacher_channels"}
        refuse_layers(cls.__name__, taken & set(options))
        if teacher is None:
            raise ValueError("ReviewKD needs a teacher to read its stages from")
        pairs = match_stages(stage_map(student), stage_map(teacher))
        (s_pool, s_dim), (t_pool, t_dim) = penultimate(student), penultimate(teacher)
        return cls(
            [*(s.hook_path(preact) for s, _ in pairs), s_pool],
            [*(t.hook_path(preact) for _, t in pairs), t_pool],
            [s.channels for s, _ in pairs] + [s_dim],
            [t.channels for _, t in pairs] + [t_dim],
            **options,
        )

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        s_maps, t_maps = [], []
        for i, name in enumerate(self.names):
            s = as_map(feature(student, name, "student", self.student_features[name]), "student")
            t = as_map(feature(t_out, name, "teacher", self.teacher_features[name]), "teacher")
            if s.shape[1] != self.student_channels[i] or t.shape[1] != self.teacher_channels[i]:
                raise ValueError(
                    f"layer {i} ({name}): got student {tuple(s.shape)} and teacher "
                    f"{tuple(t.shape)} but the ABF chain was built for "
                    f"{self.student_channels[i]} and {self.teacher_channels[i]} channels: set "
                    f"student_channels[{i}]={s.shape[1]}, teacher_channels[{i}]={t.shape[1]}"
                )
            s_maps.append(s)
            t_maps.append(t)
        if self.training and s_maps[-1].shape[0] == 1 and s_maps[-1].shape[-2:].numel() == 1:
            raise ValueError(
                "ReviewKD's deepest level is a 1x1 map, whose ABF BatchNorm needs a batch of at "
                "least 2 in training; use drop_last=True in the training loader"
            )
        abfs = cast(list[ABF], list(self.abfs))
        dtype = abfs[0].dtype
        with full_precision(s_maps[0]):  # the ABF chain is part of the loss: float32 or wider
            outs = review_maps(abfs, [as_float(s).to(dtype) for s in s_maps])
            review = hcl_loss(outs, t_maps, levels=self.levels)
        own = {"loss": self.weight * review, "review": review}
        return self._combine(own, student, t_out, target)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, mid_channels={self.mid_channels}, levels={self.levels}"
