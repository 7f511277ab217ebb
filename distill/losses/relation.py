"""Relation-based distillation: DIST on logits; SP, PKT and CC on hooked features.

DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher"; the
authors' hunto/image_classification_sota `dist_kd.py`, torchdistill's `DISTLoss`): with
p = softmax(z/T) per sample, (B, K),

    inter = T² · (1 − mean_b pearson(p_s[b, :], p_t[b, :]))     (each sample's class ranking)
    intra = T² · (1 − mean_k pearson(p_s[:, k], p_t[:, k]))     (each class across the batch)
    loss  = beta · inter + gamma · intra + ce_weight · CE(z_s, target)

Pearson is the cosine of the centred vectors (torch's cosine_similarity, eps = 1e-8). The paper
uses beta = gamma = 1, T = 1, CE weight 1 on ImageNet (beta = gamma = 2, T = 4 on CIFAR-100) and
reports ResNet-50 -> MobileNet (v1) 73.24 % top-1 (teacher 76.16, student 70.13; its Table 3).

SP (Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation"): G = row-L2-normalised
Q·Qᵀ of the flattened features Q (B, D); per layer pair ‖G_s − G_t‖²_F / B² (the paper's Eq. 4,
torchdistill's `SPKDLoss(reduction="batchmean")`); loss = weight · Σ_layers (paper γ = 3000).

PKT (Passalis & Tefas, ECCV 2018, "Learning Deep Representations with Probabilistic Knowledge
Transfer"; the authors' passalis/probabilistic_kt `cosine_similarity_loss`, torchdistill's
`PKTLoss`): cosine similarities of L2-normalised (B, D) features, mapped to [0, 1] and
row-normalised into conditional probabilities P (B, B); the term is
mean_{i,j} P_t log((P_t + eps) / (P_s + eps)), eps = 1e-7 (a mean over B², not a batch mean).

CC (Peng et al., ICCV 2019, "Correlation Congruence for Knowledge Distillation"): the
correlation matrix of the L2-normalised embeddings under the Gaussian RBF kernel
exp(−γ‖x − y‖²) = e^{−2γ} e^{2γ xᵀy}, Taylor-expanded to order P:
ψ(x, y) ≈ e^{−2γ} Σ_{p=0..P} (2γ)^p / p! · (xᵀy)^p, and the term is ‖ψ_s − ψ_t‖²_F / B² (the
paper's Eq. 3). torchdistill's `CCKDLoss` uses the unsquared norm ‖·‖_F / B² and does not
normalise (its example feeds a learnable Linear's output); we normalise because the e^{−2γ}
factor assumes unit vectors. Paper values: γ = 0.4, P = 2.

Features of any shape (B, ...) are flattened to (B, D); student and teacher D may differ (the
relations are (B, B)). The teacher's side is detached.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import (
    Objective,
    as_float,
    check_class_target,
    check_non_negative,
    check_pair,
    check_positive,
    feature,
    full_precision,
)
from distill.losses.feature import _FeatureObjective, refuse_layers, stage_pairs
from distill.models.stages import penultimate
from distill.types import Outputs

# ---------------------------------------------------------------- DIST


def pearson(a: Tensor, b: Tensor, *, eps: float = 1e-8) -> Tensor:
    """Row-wise Pearson correlation of (N, M) tensors: the cosine of the centred rows, (N,)."""
    return F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True), eps=eps)


def dist_parts(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0
) -> dict[str, Tensor]:
    """{"inter", "intra"}: T²·(1 − mean Pearson) over samples / over classes (unweighted)."""
    check_positive("temperature", temperature, "DIST uses 1 on ImageNet, 4 on CIFAR-100")
    check_pair(student_logits, teacher_logits)
    t = float(temperature)
    p_s = F.softmax(as_float(student_logits) / t, dim=1)  # (B, K)
    p_t = F.softmax(as_float(teacher_logits).detach() / t, dim=1).to(p_s.dtype)  # (B, K)
    inter = (1.0 - pearson(p_s, p_t).mean()) * (t * t)
    intra = (1.0 - pearson(p_s.t(), p_t.t()).mean()) * (t * t)  # (K, B): classes as rows
    return {"inter": inter, "intra": intra}


def dist_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> Tensor:
    """beta · inter + gamma · intra (DIST without the label term); see the module docstring."""
    parts = dist_parts(student_logits, teacher_logits, temperature=temperature)
    return beta * parts["inter"] + gamma * parts["intra"]


class DISTLoss(Objective):
    """DIST; parts "inter", "intra" and "ce" (with a target);
    loss = beta·inter + gamma·intra + ce_weight·ce. Defaults are the paper's ImageNet ones."""

    common_args: ClassVar[Mapping[str, str]] = {"temperature": "temperature"}

    def __init__(
        self,
        *,
        beta: float = 1.0,
        gamma: float = 1.0,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.beta = check_non_negative("beta", beta, "DIST's inter-class weight, 1 in the paper")
        self.gamma = check_non_negative("gamma", gamma, "DIST's intra-class weight, 1 in the paper")
        self.temperature = check_positive("temperature", temperature, "DIST uses 1 on ImageNet")
        self.ce_weight = check_non_negative("ce_weight", ce_weight, "the label term's weight")

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        s = student.output
        parts = dist_parts(s, self._teacher(teacher).output, temperature=self.temperature)
        loss = self.beta * parts["inter"] + self.gamma * parts["intra"]
        if target is None:
            if self.ce_weight > 0:
                raise ValueError(
                    f"target=None (unlabelled data) but ce_weight={self.ce_weight}: pass the "
                    "labels, or set ce_weight=0.0 to train on the relation terms alone"
                )
            return {"loss": loss, **parts}
        check_class_target(target, s)
        ce = F.cross_entropy(
            as_float(s), as_float(target) if target.is_floating_point() else target
        )
        return {"loss": loss + self.ce_weight * ce, **parts, "ce": ce}

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, gamma={self.gamma}, temperature={self.temperature}, "
            f"ce_weight={self.ce_weight}"
        )


# ---------------------------------------------------------------- feature relations


def _flat_pair(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """(B, ...) features -> float (B, Ds), (B, Dt) with the teacher detached."""
    for side, x in (("student", student), ("teacher", teacher)):
        if x.dim() < 2:
            raise ValueError(
                f"{side} feature must be (B, D) or (B, C, H, W), got shape {tuple(x.shape)}"
            )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"batch sizes differ: student {student.shape[0]}, teacher {teacher.shape[0]}; feed "
            "both models the same batch"
        )
    s = as_float(student).flatten(1)
    return s, as_float(teacher.detach()).flatten(1).to(s.dtype)


def _gram(x: Tensor) -> Tensor:
    """x·xᵀ (B, B) in x's own precision: autocast would run the product in 16 bit."""
    with full_precision(x):
        return x @ x.t()


def sp_loss(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """‖G_s − G_t‖²_F / B² for one layer pair, G = row-normalised Q·Qᵀ (without the weight)."""
    s, t = _flat_pair(student_feature, teacher_feature)
    g_s = F.normalize(_gram(s), dim=1)  # (B, B)
    g_t = F.normalize(_gram(t), dim=1)  # (B, B)
    return (g_s - g_t).pow(2).sum() / (s.shape[0] ** 2)


def _unit_rows(x: Tensor, eps: float) -> Tensor:
    # x / (‖x‖ + eps) as in PKT's code; clamping the squared norm keeps the gradient of a zero
    # row finite (it changes ‖x‖ only below 1e-15, where eps dominates the denominator)
    return x / (x.pow(2).sum(1, keepdim=True).clamp_min(1e-30).sqrt() + eps)


def pkt_loss(student_feature: Tensor, teacher_feature: Tensor, *, eps: float = 1e-7) -> Tensor:
    """mean_{i,j} P_t log((P_t + eps)/(P_s + eps)) over the (B, B) cosine-similarity
    probabilities (the authors' code; without the weight)."""
    check_positive("eps", eps, "PKT's code uses 1e-7")
    s, t = _flat_pair(student_feature, teacher_feature)

    def probabilities(x: Tensor) -> Tensor:
        u = _unit_rows(x, eps)
        sim = (_gram(u) + 1.0) / 2.0  # (B, B) in [0, 1]; each row sums to ≥ B/2
        return sim / sim.sum(1, keepdim=True)

    p_s, p_t = probabilities(s), probabilities(t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def rbf_correlation(x: Tensor, *, gamma: float, order: int) -> Tensor:
    """(B, B) Taylor approximation e^{−2γ} Σ_{p≤P} (2γ)^p/p! (xᵀy)^p of exp(−γ‖x − y‖²) for
    unit rows of x (B, D)."""
    dot = _gram(x)  # (B, B), in [−1, 1]
    out = torch.ones_like(dot)
    for p in range(1, order + 1):
        out = out + ((2.0 * gamma) ** p / math.factorial(p)) * dot.pow(p)
    return out * math.exp(-2.0 * gamma)


def cc_loss(
    student_feature: Tensor, teacher_feature: Tensor, *, gamma: float = 0.4, order: int = 2
) -> Tensor:
    """‖ψ_s − ψ_t‖²_F / B² of the RBF correlation matrices of the L2-normalised features."""
    check_positive("gamma", gamma, "the CC paper uses 0.4")
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an int >= 1 (Taylor terms), got {order!r}; CC uses 2")
    s, t = _flat_pair(student_feature, teacher_feature)
    psi_s = rbf_correlation(F.normalize(s, dim=1), gamma=gamma, order=order)
    psi_t = rbf_correlation(F.normalize(t, dim=1), gamma=gamma, order=order)
    return (psi_s - psi_t).pow(2).sum() / (s.shape[0] ** 2)


class _RelationObjective(_FeatureObjective):
    """Hooks {student path: teacher path} as "<prefix>0", "<prefix>1", ...; loss = weight · Σ."""

    part = ""

    def __init__(
        self, layers: Mapping[str, str], *, logit_loss: Objective | None, weight: float, hint: str
    ) -> None:
        super().__init__(logit_loss)
        if not layers:
            raise ValueError(
                'layers is empty: map student to teacher layers, e.g. {"blocks.12": "layer4"}'
            )
        self.weight = check_non_negative("weight", weight, hint)
        self.names: list[str] = []
        for i, (s_path, t_path) in enumerate(layers.items()):
            self._hook(f"{self.part}{i}", s_path, t_path)
            self.names.append(f"{self.part}{i}")

    def term(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        raise NotImplementedError

    # where from_models hooks the two networks: "last" (the deepest shared stage, as
    # RepDistiller's SP) or "penultimate" (the pooled pre-classifier features, as PKT and CC)
    default_layer = "last"

    @classmethod
    def from_models(
        cls, student: nn.Module, teacher: nn.Module | None, **options: Any
    ) -> _RelationObjective:
        """Hook `default_layer` of both networks; `options` go to the constructor."""
        if cls.default_layer == "last":
            s, t = stage_pairs(cls.__name__, student, teacher, options)[-1]
            return cls({s.path: t.path}, **options)
        refuse_layers(cls.__name__, {"layers"} & set(options))
        if teacher is None:
            raise ValueError(f"{cls.__name__} needs a teacher to read its features from")
        (s_path, _), (t_path, _) = penultimate(student), penultimate(teacher)
        return cls({s_path: t_path}, **options)

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        total: Tensor | None = None
        for n in self.names:
            value = self.term(
                feature(student, n, "student", self.student_features[n]),
                feature(t_out, n, "teacher", self.teacher_features[n]),
            )
            total = value if total is None else total + value
        assert total is not None  # layers is non-empty
        own = {"loss": self.weight * total, self.part: total}
        return self._combine(own, student, t_out, target)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class SPLoss(_RelationObjective):
    """Similarity-preserving KD; part "sp" (Σ over layer pairs) (+ logit_loss's);
    loss = weight · sp + logit loss. `layers` maps student to teacher module paths."""

    part = "sp"

    def __init__(
        self, layers: Mapping[str, str], *, logit_loss: Objective | None, weight: float = 3000.0
    ) -> None:
        super().__init__(layers, logit_loss=logit_loss, weight=weight, hint="SP's paper uses 3000")

    def term(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return sp_loss(student_feature, teacher_feature)


class PKTLoss(_RelationObjective):
    """Probabilistic knowledge transfer; part "pkt" (+ logit_loss's); loss = weight · pkt +
    logit loss. Hook the penultimate features (e.g. {"global_pool": "avgpool"})."""

    part = "pkt"
    default_layer = "penultimate"

    def __init__(
        self,
        layers: Mapping[str, str],
        *,
        logit_loss: Objective | None,
        weight: float = 1.0,
        eps: float = 1e-7,
    ) -> None:
        super().__init__(layers, logit_loss=logit_loss, weight=weight, hint="PKT's term weight")
        self.eps = check_positive("eps", eps, "PKT's code uses 1e-7")

    def term(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return pkt_loss(student_feature, teacher_feature, eps=self.eps)


class CCLoss(_RelationObjective):
    """Correlation congruence (Gaussian RBF, Taylor order `order`); part "cc" (+ logit_loss's);
    loss = weight · cc + logit loss. Hook embeddings (B, D) or maps (flattened)."""

    part = "cc"
    default_layer = "penultimate"

    def __init__(
        self,
        layers: Mapping[str, str],
        *,
        logit_loss: Objective | None,
        weight: float = 1.0,
        gamma: float = 0.4,
        order: int = 2,
    ) -> None:
        super().__init__(layers, logit_loss=logit_loss, weight=weight, hint="CC's term weight")
        self.gamma = check_positive("gamma", gamma, "the CC paper uses 0.4")
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be an int >= 1 (Taylor terms), got {order!r}; CC uses 2")
        self.order = order

    def term(self, student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
        return cc_loss(student_feature, teacher_feature, gamma=self.gamma, order=self.order)

    def extra_repr(self) -> str:
        return f"weight={self.weight}, gamma={self.gamma}, order={self.order}"
