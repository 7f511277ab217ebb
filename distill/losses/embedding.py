"""Embedding distillation (FaceNet teacher -> MobileNet student).

- "mse": the MobileNet paper's squared difference between student and teacher embeddings
  (Howard et al. 2017, §4.6), as the squared L2 distance per sample, averaged over the batch:
  mean_b ||e_s − e_t||². On L2-normalised embeddings (the default) this equals 2 − 2·cos.
- "cosine": mean_b (1 − cos(e_s, e_t)).
- "rkd": relational KD (Park et al., CVPR 2019): distance-wise term (pairwise distances, each
  side divided by its mean over pairs i ≠ j, smooth-L1 between the sides) plus angle-wise term
  (cos∠(x_j − x_i, x_k − x_i) per triplet, smooth-L1). The default follows the authors' code
  (lenscloth/RKD, metric/loss.py), which torchdistill's `RKDLoss` refactors and RepDistiller
  copies: the smooth-L1 is averaged over all B² pairs and all B³ triplets, the entries with
  i = j or a repeated index included (they add 0), and the weights 1 and 2 are those of the
  authors' metric-learning runs (`--dist_ratio 1 --angle_ratio 2`, examples/*.sh). RepDistiller's
  CIFAR setting is distance_weight=25, angle_weight=50 on the raw penultimate features
  (normalize=False). `average="distinct"` divides by the B(B − 1) pairs and B(B − 1)(B − 2)
  triplets of distinct samples instead, which keeps the scale independent of the batch size
  (×B/(B − 1) and ×B²/((B − 1)(B − 2)) of the default: ×1.14 and ×1.52 at B = 8). Where ours
  differs: `normalize=True` (the default) L2-normalises both embeddings first, because FaceNet
  embeddings are compared on the unit sphere; the authors' example normalises the teacher only
  and torchdistill neither, so normalize=False equals torchdistill's `RKDLoss` on the given
  features. A duplicated sample defines no distance or angle and is left out here; the
  references count it as distance 1e-6 and cosine 0. It compares relations, so the embedding
  sizes may differ. Memory is O(B²·D + B³).

`EmbeddingDistillLoss` adds a learnable linear projection (student_dim -> teacher_dim, no bias)
for "mse"/"cosine" when the sizes differ. The projection is a training aid: the student's own
embedding is what gets evaluated.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import Objective, as_float, check_non_negative, full_precision
from distill.types import Outputs

Kind = Literal["mse", "cosine", "rkd"]
KINDS: tuple[str, ...] = ("mse", "cosine", "rkd")
Average = Literal["all", "distinct"]
AVERAGES: tuple[str, ...] = ("all", "distinct")
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


def _check_average(average: str) -> None:
    if average not in AVERAGES:
        raise ValueError(
            f"average must be one of {AVERAGES}, got {average!r}: 'all' averages over all B² "
            "pairs / B³ triplets (the RKD authors' code, torchdistill), 'distinct' over distinct ones"
        )


def rkd_distance_loss(
    student: Tensor, teacher: Tensor, *, normalize: bool = True, average: Average = "all"
) -> Tensor:
    """Smooth-L1 between pairwise distances, each side divided by its mean over pairs i ≠ j;
    averaged over all B² pairs (average="all") or the B(B − 1) pairs i ≠ j ("distinct")."""
    _check_embeddings(student, teacher, same_dim=False)
    _check_average(average)
    b = student.shape[0]
    s, t = _prepare(student, normalize), _prepare(teacher.detach(), normalize)
    if b < 2:
        return s.sum() * 0.0  # no pairs: no relation to match
    off = 1.0 - torch.eye(b, dtype=s.dtype, device=s.device)  # (B, B)
    n_pairs = b * (b - 1)
    count = b * b if average == "all" else n_pairs

    def distances(x: Tensor) -> Tensor:
        _, sq, valid = _pairwise(x)
        d = sq.clamp_min(_SQ_EPS).sqrt() * valid * off  # (B, B), 0 on the diagonal
        return d / (d.sum() / n_pairs).clamp_min(1e-12)

    per = F.smooth_l1_loss(distances(s), distances(t), reduction="none")
    return (per * off).sum() / count  # the diagonal is 0 on both sides


def rkd_angle_loss(
    student: Tensor, teacher: Tensor, *, normalize: bool = True, average: Average = "all"
) -> Tensor:
    """Smooth-L1 between cos∠(x_j − x_i, x_k − x_i); averaged over all B³ triplets
    (average="all") or the B(B − 1)(B − 2) triplets of distinct i, j, k ("distinct")."""
    _check_embeddings(student, teacher, same_dim=False)
    _check_average(average)
    b = student.shape[0]
    s, t = _prepare(student, normalize), _prepare(teacher.detach(), normalize)
    if b < 3:
        return s.sum() * 0.0  # no triplets
    eye = torch.eye(b, dtype=s.dtype, device=s.device)
    distinct = (1.0 - eye).unsqueeze(0) * (1.0 - eye).unsqueeze(1) * (1.0 - eye).unsqueeze(2)

    def angles(x: Tensor) -> tuple[Tensor, Tensor]:
        diff, sq, valid = _pairwise(x)
        unit = diff / sq.clamp_min(_SQ_EPS).sqrt().unsqueeze(2)  # (B, B, D)
        with full_precision(unit):  # autocast would run bmm in 16 bit
            cos = torch.bmm(unit, unit.transpose(1, 2))  # (B, B, B): [i, j, k]
        return cos, valid.unsqueeze(2) * valid.unsqueeze(1)

    cos_s, valid_s = angles(s)
    cos_t, valid_t = angles(t)
    # Triplets with a repeated index add 0 in the references too (cos 0 or 1 on both sides);
    # duplicated samples define no angle.
    weight = distinct * valid_s * valid_t
    per = F.smooth_l1_loss(cos_s, cos_t, reduction="none")
    count = b**3 if average == "all" else b * (b - 1) * (b - 2)
    return (per * weight).sum() / count


def rkd_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
    normalize: bool = True,
    average: Average = "all",
) -> Tensor:
    """distance_weight · RKD-D + angle_weight · RKD-A (Park et al. 2019)."""
    dist = rkd_distance_loss(student, teacher, normalize=normalize, average=average)
    angle = rkd_angle_loss(student, teacher, normalize=normalize, average=average)
    return distance_weight * dist + angle_weight * angle


class EmbeddingDistillLoss(Objective):
    """Embedding objective; parts: "mse" | "cosine" | "rkd_distance" + "rkd_angle".

    With kind "rkd", `distance_weight`, `angle_weight` and `average` are those of `rkd_loss`.

    With kind "mse"/"cosine" and student_dim != teacher_dim, a learnable
    `nn.Linear(student_dim, teacher_dim, bias=False)` maps the student's embedding first
    (add `objective.parameters()` to the optimizer).
    """

    tasks: ClassVar[tuple[str, ...]] = ("embedding",)

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        kind: Kind = "mse",
        *,
        normalize: bool = True,
        distance_weight: float = 1.0,
        angle_weight: float = 2.0,
        average: Average = "all",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        _check_average(average)
        self.average: Average = average
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
            dist = rkd_distance_loss(s, t, normalize=self.normalize, average=self.average)
            angle = rkd_angle_loss(s, t, normalize=self.normalize, average=self.average)
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
        if self.kind == "rkd":
            return (
                f"kind='rkd', normalize={self.normalize}, distance_weight="
                f"{self.distance_weight}, angle_weight={self.angle_weight}, "
                f"average={self.average!r}"
            )
        return f"kind={self.kind!r}, normalize={self.normalize}"
