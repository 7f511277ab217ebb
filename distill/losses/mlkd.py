"""Multi-level logit distillation (Jin, Wang & Lin, CVPR 2023, "Multi-Level Logit
Distillation", MLKD): align teacher and student predictions at three levels, each over a set of
temperatures 𝒯 (summed, not averaged). With P = softmax(z / T), (B, K):

    instance = m · Σ_T KD_T(weak) + Σ_T KD_T(strong)   KD_T = T² · KL(P_t ‖ P_s), batch mean
    batch    = m · Σ_T ‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B     (B, B) sample-correlation matrices
    class    = m_c · Σ_T ‖P_tᵀ P_t − P_sᵀ P_s‖²_F / K   (K, K) class-correlation matrices
    loss     = ce_weight · ce + kd_weight · (instance + batch + class)

This is the arithmetic of the authors' code (Jin-Ying/Multi-Level-Logit-Distillation,
mdistiller/distillers/KD_ours.py, `kd_loss`/`bc_loss`/`cc_loss`), read closely:

- Temperatures: the config's KD.TEMPERATURE plus 2, 3, 5 and 6; with the CIFAR-100 default
  T = 4 that is (2, 3, 4, 5, 6), our default; their ImageNet configs set T = 1: (1, 2, 3, 5, 6).
  Only the instance term carries T²; the batch and class terms have none.
- Confidence masks: from the teacher's weak-view softmax at T = 1 (never standardised), a
  sample is kept when its max probability is ≤ the batch's 50th percentile (numpy's linear
  interpolation; `mask_percentile`), a class when its summed probability over the batch is ≤
  the 50th percentile of those sums. Their kd/bc/cc functions reduce to a scalar before the
  mask multiplies them (`reduce=False` is commented out), so the mask does not select samples:
  it scales each term by the *fraction* kept, m (samples) or m_c (classes), ½ ≤ m ≤ 1 at the
  median (more with ties or an odd batch). We compute exactly that, on the device (no host
  sync); mask_percentile=100 keeps everything (m = m_c = 1), i.e. no mask.
- Views: they run a weak and a strong augmentation. The strong view enters the cross-entropy
  and, unmasked, the instance term; its batch/class terms are computed but never added to the
  loss. Their strong-view instance sum takes the T = 2 and T = 6 terms from the weak view (a
  copy slip); with `student_strong`/`teacher_strong` we use the strong view for every T.
- One view (the default; our loop gives one view per batch): strong := weak, so instance =
  (1 + m) · Σ_T KD_T. For two views, pass the strong-view logits to `mlkd_parts`.
- Cross-entropy: they add CE_WEIGHT · (CE(weak) + CE(strong)). Our "ce" part is the mean over
  the views, so it logs the plain cross-entropy like every other method; hence ce_weight = 2 ×
  their CE_WEIGHT (kd_weight is their KD_WEIGHT as it is).

Published settings: CIFAR-100 uses mdistiller's defaults (engine/cfg.py: T 4, CE 0.1, KD 0.9;
configs/cifar100/ours/*.yaml set only the solver), i.e. ce_weight=0.2, kd_weight=0.9 here.
ImageNet ResNet-50 -> MobileNetV1 (configs/imagenet/r50_mv2/kd_ours.yaml; its "MobileNetV2" is
mdistiller's MobileNetV1 network): T 1, CE 0.5, KD 0.5, i.e. temperatures=(1, 2, 3, 5, 6),
ce_weight=1.0, kd_weight=0.5, with SGD lr 0.2, batch 512, 100 epochs, ×0.1 at 30/60/90.

`standardize=True` is MLKD with logit standardisation (Sun et al., CVPR 2024; their
sunshangquan/logit-standardization-KD mdistiller/distillers/MLKD.py): only the instance term
sees z-scored logits (`distill.losses.kd.standardize_logits`); the masks and the batch/class
terms keep the raw ones, as there. Their --base-temp 2 --kd-weight 9 give the temperatures
(2, 3, 5, 2, 6) (2 twice: duplicates are allowed, the set is a sum) and kd_weight=9.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.losses.base import (
    Objective,
    as_float,
    check_class_target,
    check_non_negative,
    check_pair,
    check_positive,
    full_precision,
)
from distill.losses.kd import soft_kd_loss, standardize_logits
from distill.types import Outputs

DEFAULT_TEMPERATURES: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)


def check_temperatures(temperatures: Sequence[float]) -> tuple[float, ...]:
    """A non-empty sequence of finite temperatures > 0, as floats (duplicates allowed)."""
    if isinstance(temperatures, (str, bytes)) or not isinstance(temperatures, Sequence):
        raise ValueError(
            f"temperatures must be a sequence of numbers, got {temperatures!r}: e.g. (2, 3, 4, 5, "
            "6) (the authors' CIFAR-100 set) or (1, 2, 3, 5, 6) (ImageNet); (4,) for one"
        )
    if not temperatures:
        raise ValueError("temperatures is empty: give at least one, e.g. (2, 3, 4, 5, 6)")
    return tuple(
        check_positive(f"temperatures[{i}]", t, "the authors use 1-6")
        for i, t in enumerate(temperatures)
    )


def _check_percentile(value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 100.0:
        raise ValueError(
            f"mask_percentile must lie in [0, 100], got {value!r}: the authors use 50 (the "
            "median); 100 keeps every sample and class (no mask)"
        )
    return float(value)


def confidence_masks(teacher_logits: Tensor, percentile: float = 50.0) -> tuple[Tensor, Tensor]:
    """MLKD's masks from the teacher's softmax at T = 1: samples (B,) whose max probability is ≤
    its `percentile`-th percentile over the batch, and classes (K,) whose probability summed over
    the batch is ≤ the same percentile of those sums (linear interpolation, as numpy's)."""
    q = _check_percentile(percentile) / 100.0
    p = F.softmax(as_float(teacher_logits).detach(), dim=1)  # (B, K)
    confidence = p.amax(dim=1)  # (B,)
    per_class = p.sum(dim=0)  # (K,)
    return confidence <= torch.quantile(confidence, q), per_class <= torch.quantile(per_class, q)


def _probabilities(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    check_pair(student, teacher)
    t = check_positive("temperature", temperature, "the authors use 1-6")
    s_prob = F.softmax(as_float(student) / t, dim=1)  # (B, K)
    t_prob = F.softmax(as_float(teacher).detach() / t, dim=1)  # (B, K)
    return s_prob, t_prob


def batch_correlation_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float
) -> Tensor:
    """‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B with P = softmax(z / T): the (B, B) similarity of the
    batch's predictions (MLKD's batch level; no T² factor, as in the authors' code)."""
    s_prob, t_prob = _probabilities(student_logits, teacher_logits, temperature)
    with full_precision(s_prob):  # a bf16 Gram matrix would swamp the difference
        diff = t_prob @ t_prob.T - s_prob @ s_prob.T  # (B, B)
    return diff.pow(2).sum() / s_prob.shape[0]


def class_correlation_loss(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float
) -> Tensor:
    """‖P_tᵀ P_t − P_sᵀ P_s‖²_F / K with P = softmax(z / T): the (K, K) co-occurrence of
    classes over the batch (MLKD's class level; no T² factor, as in the authors' code)."""
    s_prob, t_prob = _probabilities(student_logits, teacher_logits, temperature)
    with full_precision(s_prob):
        diff = t_prob.T @ t_prob - s_prob.T @ s_prob  # (K, K)
    return diff.pow(2).sum() / s_prob.shape[1]


def _instance_sum(
    student: Tensor, teacher: Tensor, temperatures: tuple[float, ...], standardize: bool
) -> Tensor:
    """Σ_T T² · KL(softmax(t/T) ‖ softmax(s/T)), on z-scored logits when `standardize`."""
    s, t = as_float(student), as_float(teacher).detach()
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    return torch.stack([soft_kd_loss(s, t, temperature=temp) for temp in temperatures]).sum()


def _strong_view(
    weak: Tensor, student_strong: Tensor | None, teacher_strong: Tensor | None
) -> tuple[Tensor, Tensor] | None:
    if student_strong is None and teacher_strong is None:
        return None
    if student_strong is None or teacher_strong is None:
        raise ValueError(
            "pass both student_strong and teacher_strong (the strong view's logits), or neither "
            "for one view"
        )
    check_pair(student_strong, teacher_strong, "strong-view logits")
    if student_strong.shape != weak.shape:
        raise ValueError(
            f"the strong view's logits {tuple(student_strong.shape)} must match the weak view's "
            f"{tuple(weak.shape)}: the two views are two augmentations of the same batch"
        )
    return student_strong, teacher_strong


def mlkd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    ce_weight: float = 0.2,
    kd_weight: float = 0.9,
    mask_percentile: float = 50.0,
    standardize: bool = False,
    student_strong: Tensor | None = None,
    teacher_strong: Tensor | None = None,
) -> dict[str, Tensor]:
    """{"loss", "instance", "batch", "class", "ce" (with a target)}, the parts unweighted; see
    the module docstring. Logits (B, K) are the weak view; the optional strong view's logits
    (B, K) enter the instance term and the cross-entropy."""
    temps = check_temperatures(temperatures)
    ce_weight = check_non_negative("ce_weight", ce_weight, "2 × the authors' CE_WEIGHT")
    kd_weight = check_non_negative("kd_weight", kd_weight, "the authors' KD_WEIGHT")
    check_pair(student_logits, teacher_logits)
    strong = _strong_view(student_logits, student_strong, teacher_strong)
    s, t = as_float(student_logits), as_float(teacher_logits).detach()
    keep_samples, keep_classes = confidence_masks(t, mask_percentile)
    m, m_c = keep_samples.to(s.dtype).mean(), keep_classes.to(s.dtype).mean()
    weak_kd = _instance_sum(s, t, temps, standardize)
    strong_kd = weak_kd if strong is None else _instance_sum(*strong, temps, standardize)
    bc = torch.stack([batch_correlation_loss(s, t, temperature=T) for T in temps]).sum()
    cc = torch.stack([class_correlation_loss(s, t, temperature=T) for T in temps]).sum()
    parts = {"instance": m * weak_kd + strong_kd, "batch": m * bc, "class": m_c * cc}
    loss = kd_weight * (parts["instance"] + parts["batch"] + parts["class"])
    if target is None:
        if ce_weight > 0:
            raise ValueError(
                f"target=None (unlabelled data) but ce_weight={ce_weight}: pass the labels, or "
                "set ce_weight=0.0"
            )
        return {"loss": loss, **parts}
    check_class_target(target, s)
    y = as_float(target) if target.is_floating_point() else target
    views = [s] if strong is None else [s, as_float(strong[0])]
    ce = torch.stack([F.cross_entropy(v, y) for v in views]).mean()
    return {"loss": loss + ce_weight * ce, **parts, "ce": ce}


def mlkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    ce_weight: float = 0.2,
    kd_weight: float = 0.9,
    mask_percentile: float = 50.0,
    standardize: bool = False,
) -> Tensor:
    """ce_weight · CE + kd_weight · (instance + batch + class), one view; logits (B, K),
    `target` class indices (B,) or probabilities (B, K). See the module docstring."""
    return mlkd_parts(
        student_logits,
        teacher_logits,
        target,
        temperatures=temperatures,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        mask_percentile=mask_percentile,
        standardize=standardize,
    )["loss"]


class MLKDLoss(Objective):
    """MLKD objective (one view per batch); parts "instance", "batch", "class" and "ce";
    loss = ce_weight·ce + kd_weight·(instance + batch + class). ce_weight is 2 × the authors'
    CE_WEIGHT (module docstring). `standardize=True` is MLKD + logit standardisation.

    A set of temperatures has no single value: `temperature` (what the run record shows) is
    None, and `temperatures` holds the set.
    """

    # no shared settings: its temperatures are a set, and its kd_weight is not the recipes'
    # convex teacher weight (CE has its own ce_weight)
    common_args: ClassVar[Mapping[str, str]] = {}

    def __init__(
        self,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
        ce_weight: float = 0.2,
        kd_weight: float = 0.9,
        *,
        mask_percentile: float = 50.0,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        self.temperatures = check_temperatures(temperatures)
        self.temperature: float | None = None
        self.ce_weight = check_non_negative(
            "ce_weight", ce_weight, "2 × the authors' CE_WEIGHT: 0.2 on CIFAR-100, 1 on ImageNet"
        )
        self.kd_weight = check_non_negative(
            "kd_weight", kd_weight, "the authors' KD_WEIGHT: 0.9 on CIFAR-100, 0.5 on ImageNet"
        )
        self.mask_percentile = _check_percentile(mask_percentile)
        if not isinstance(standardize, bool):
            raise TypeError(f"standardize must be True or False, got {standardize!r}")
        self.standardize = standardize

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        return mlkd_parts(
            student.output,
            self._teacher(teacher).output,
            target,
            temperatures=self.temperatures,
            ce_weight=self.ce_weight,
            kd_weight=self.kd_weight,
            mask_percentile=self.mask_percentile,
            standardize=self.standardize,
        )

    def extra_repr(self) -> str:
        return (
            f"temperatures={self.temperatures}, ce_weight={self.ce_weight}, "
            f"kd_weight={self.kd_weight}, mask_percentile={self.mask_percentile}, "
            f"standardize={self.standardize}"
        )
