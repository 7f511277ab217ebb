"""Embedding distillation (FaceNet teacher -> MobileNet student).

- "mse": the MobileNet paper's squared difference between student and teacher embeddings
  (Howard et al. 2017, §4.6), as the squared L2 distance per sample, averaged over the batch:
  mean_b ||e_s − e_t||². On L2-normalised embeddings (the default) this equals 2 − 2·cos.
- "cosine": mean_b (1 − cos(e_s, e_t)).
- "rkd": relational KD (Park et al., CVPR 2019): distance-wise term (pairwise distances, each
  side divided by its mean distance, Huber/smooth-L1 between the sides, averaged over pairs
  i ≠ j) plus angle-wise term (cosines of the angles formed by every triplet of distinct samples,
  smooth-L1, averaged over triplets). Default weights 1 and 2 follow the paper's metric-learning
  setting. It compares relations, so the embedding sizes may differ. Memory is O(B²·D + B³).

`EmbeddingDistillLoss` adds a learnable linear projection (student_dim -> teacher_dim, no bias)
for "mse"/"cosine" when the sizes differ. The projection is a training aid: the student's own
embedding is what gets evaluated.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import Objective, as_float, check_non_negative, full_precision
from distill.types import Outputs

Kind = Literal["mse", "cosine", "rkd"]
KINDS: tuple[str, ...] = ("mse", "cosine", "rkd")
_SQ_EPS = 1e-12  # squared distances below this count as 0 (duplicates): no direction, no gradient


def _check_embeddings(student: Tensor, teacher: Tensor, same_dim: bool) -> None:
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 2:
            raise ValueError(f"{side} embeddings must have shape (N, D), got {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher embeddings have different batch sizes: {student.shape[0]} vs "
            f"{teacher.shape[0]}"
        )
    if same_dim and student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"student embeddings have {student.shape[1]} dimensions, the teacher's "
            f"{teacher.shape[1]}: use EmbeddingDistillLoss(student_dim={student.shape[1]}, "
            f"teacher_dim={teacher.shape[1]}) to learn a projection, or kind='rkd'"
        )


def _prepare(x: Tensor, normalize: bool) -> Tensor:
    x = as_float(x)
    return F.normalize(x, dim=1) if normalize else x


def embedding_mse_loss(student: Tensor, teacher: Tensor, *, normalize: bool = True) -> Tensor:
    """mean_b ||e_s − e_t||² (sum over dimensions); L2-normalises both sides first by default."""
    _check_embeddings(student, teacher, same_dim=True)
    s, t = _prepare(student, normalize), _prepare(teacher.detach(), normalize)
    return (s - t).pow(2).sum(dim=1).mean()


def embedding_cosine_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """mean_b (1 − cos(e_s, e_t))."""
    _check_embeddings(student, teacher, same_dim=True)
    s, t = as_float(student), as_float(teacher.detach())
    return (1.0 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()


def _pairwise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Differences (B, B, D) with diff[i, j] = x[j] − x[i], squared distances (B, B), valid mask."""
    diff = x.unsqueeze(0) - x.unsqueeze(1)
    sq = diff.pow(2).sum(dim=2)
    return diff, sq, (sq > _SQ_EPS).to(x.dtype)


def rkd_distance_loss(student: Tensor, teacher: Tensor, *, normalize: bool = True) -> Tensor:
    """Smooth-L1 between mean-normalised pairwise distances, averaged over pairs i ≠ j."""
    _check_embeddings(student, teacher, same_dim=False)
    b = student.shape[0]
    s, t = _prepare(student, normalize), _prepare(teacher.detach(), normalize)
    if b < 2:
        return s.sum() * 0.0  # no pairs: no relation to match
    off = 1.0 - torch.eye(b, dtype=s.dtype, device=s.device)  # (B, B)
    n_pairs = b * (b - 1)

    def distances(x: Tensor) -> Tensor:
        _, sq, valid = _pairwise(x)
        d = sq.clamp_min(_SQ_EPS).sqrt() * valid * off  # (B, B), 0 on the diagonal
        return d / (d.sum() / n_pairs).clamp_min(1e-12)

    per = F.smooth_l1_loss(distances(s), distances(t), reduction="none")
    return (per * off).sum() / n_pairs


def rkd_angle_loss(student: Tensor, teacher: Tensor, *, normalize: bool = True) -> Tensor:
    """Smooth-L1 between cos∠(x_j − x_i, x_k − x_i), averaged over triplets of distinct i, j, k."""
    _check_embeddings(student, teacher, same_dim=False)
    b = student.shape[0]
    s, t = _prepare(student, normalize), _prepare(teacher.detach(), normalize)
    if b < 3:
        return s.sum() * 0.0  # no triplets
    eye = torch.eye(b, dtype=s.dtype, device=s.device)
    distinct = (1.0 - eye).unsqueeze(0) * (1.0 - eye).unsqueeze(1) * (1.0 - eye).unsqueeze(2)

    def angles(x: Tensor) -> tuple[Tensor, Tensor]:
        diff, sq, valid = _pairwise(x)
        unit = diff / sq.clamp_min(_SQ_EPS).sqrt().unsqueeze(2)  # (B, B, D)
        cos = torch.bmm(unit, unit.transpose(1, 2))  # (B, B, B): [i, j, k]
        return cos, valid.unsqueeze(2) * valid.unsqueeze(1)

    cos_s, valid_s = angles(s)
    cos_t, valid_t = angles(t)
    weight = distinct * valid_s * valid_t  # duplicates define no angle
    per = F.smooth_l1_loss(cos_s, cos_t, reduction="none")
    return (per * weight).sum() / (b * (b - 1) * (b - 2))


def rkd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
    normalize: bool = True,
) -> Tensor:
    """distance_weight · RKD-D + angle_weight · RKD-A (Park et al. 2019)."""
    return distance_weight * rkd_distance_loss(
        student, teacher, normalize=normalize
    ) + angle_weight * rkd_angle_loss(student, teacher, normalize=normalize)


class EmbeddingDistillLoss(Objective):
    """Embedding objective; parts: "mse" | "cosine" | "rkd_distance" + "rkd_angle".

    With kind "mse"/"cosine" and student_dim != teacher_dim, a learnable
    `nn.Linear(student_dim, teacher_dim, bias=False)` maps the student's embedding first
    (add `objective.parameters()` to the optimizer).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        kind: Kind = "mse",
        *,
        normalize: bool = True,
        distance_weight: float = 1.0,
        angle_weight: float = 2.0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        for name, dim in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            if not isinstance(dim, int) or dim < 1:
                raise ValueError(f"{name} must be a positive int (embedding size), got {dim!r}")
        self.kind = kind
        self.normalize = normalize
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.distance_weight = check_non_negative("distance_weight", distance_weight)
        self.angle_weight = check_non_negative("angle_weight", angle_weight)
        self.projection: nn.Module = (
            nn.Linear(student_dim, teacher_dim, bias=False)
            if kind != "rkd" and student_dim != teacher_dim
            else nn.Identity()
        )

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        s, t = student.output, self._teacher(teacher).output
        for side, x, dim in (("student", s, self.student_dim), ("teacher", t, self.teacher_dim)):
            if x.dim() != 2 or x.shape[1] != dim:
                raise ValueError(
                    f"{side} embeddings have shape {tuple(x.shape)}, expected (N, {dim}): set "
                    f"{side}_dim to the {side}'s embedding size"
                )
        if self.kind == "rkd":
            dist = rkd_distance_loss(s, t, normalize=self.normalize)
            angle = rkd_angle_loss(s, t, normalize=self.normalize)
            loss = self.distance_weight * dist + self.angle_weight * angle
            return {"loss": loss, "rkd_distance": dist, "rkd_angle": angle}
        if isinstance(self.projection, nn.Linear):
            with full_precision(s):
                s = self.projection(as_float(s).to(self.projection.weight.dtype))
        if self.kind == "mse":
            mse = embedding_mse_loss(s, t, normalize=self.normalize)
            return {"loss": mse, "mse": mse}
        cos = embedding_cosine_loss(s, t)
        return {"loss": cos, "cosine": cos}

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, normalize={self.normalize}"
