"""Evaluation metrics: top-k accuracy, mean AP over attributes, face verification.

Accuracies and rates are returned in percent, the way papers report them; the false accept rate
a verification threshold actually reached is a fraction, comparable to the target in its name.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

# FaceNet's grid for LFW thresholds: the squared L2 distance of unit vectors lies in [0, 4]
# (davidsandberg/facenet `lfw.evaluate`, also used by facenet-pytorch's LFW notebook)
FACENET_THRESHOLDS = np.arange(0.0, 4.0, 0.001)


def topk_hits(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """(B, len(ks)) float: 1 where the target is among the top-k logits (stays on device).

    logits (B, K), target (B,) int. k larger than K counts as K.
    """
    maxk = min(max(ks), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices  # (B, maxk)
    hit = pred.eq(target.view(-1, 1))  # (B, maxk)
    return torch.stack([hit[:, : min(k, maxk)].any(dim=-1) for k in ks], dim=1).float()


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose target is among the top-k logits, one entry per k."""
    return topk_hits(logits, target, ks).sum(0)


def average_precisions(scores: Tensor, target: Tensor, mask: Tensor | None = None) -> np.ndarray:
    """(A,) float64: sklearn's average precision of each attribute over its known labels.

    scores (N, A) logits or probabilities; target (N, A) in {0, 1}; mask (N, A), 1 where the
    label is known (the target is ignored elsewhere). An attribute whose known labels are all
    positive has AP 1 (precision is 1 at every recall), as sklearn computes it. One with no known
    positive has no recall to average over: its AP is NaN here (sklearn warns and returns 0,
    which would count a gap in the annotation as a model error).
    """
    from sklearn.metrics import average_precision_score

    s = scores.detach().double().cpu().numpy()
    y = target.detach().cpu().numpy() > 0.5
    m = np.ones_like(y, dtype=bool) if mask is None else mask.detach().cpu().numpy() > 0.5
    aps = np.full(s.shape[1], np.nan)
    for a in range(s.shape[1]):
        ya = y[m[:, a], a]
        if ya.any():
            aps[a] = average_precision_score(ya, s[m[:, a], a])
    return aps


def mean_average_precision(scores: Tensor, target: Tensor, mask: Tensor | None = None) -> float:
    """Mean over attributes of `average_precisions`, in percent.

    Attributes with no known positive label (AP undefined) are left out of the mean with a
    warning that names them; if no attribute has one, this raises.
    """
    aps = average_precisions(scores, target, mask)
    undefined = np.flatnonzero(np.isnan(aps))
    if len(undefined) == len(aps):
        raise ValueError("no attribute has a known positive label: mean AP is undefined")
    if len(undefined):
        warnings.warn(
            f"mean AP leaves out {len(undefined)} of {len(aps)} attributes with no known "
            f"positive label (AP undefined): columns {undefined.tolist()}",
            stacklevel=2,
        )
    return float(np.nanmean(aps) * 100.0)


def multilabel_accuracy(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> float:
    """Mean per-attribute accuracy of `logits > 0` against binary targets over the known labels,
    in percent; attributes with no known label are left out (0 if none has one)."""
    pred = logits.detach().float() > 0
    y = target.detach() > 0.5
    m = torch.ones_like(y) if mask is None else mask.detach() > 0.5
    known = m.sum(0)  # (A,)
    per_attr = ((pred == y) & m).sum(0).double() / known.clamp(min=1).double()
    return float(per_attr[known > 0].mean() * 100.0) if bool((known > 0).any()) else 0.0


def pair_distances(emb1: Tensor, emb2: Tensor) -> np.ndarray:
    """Squared L2 distance between L2-normalised embeddings of each pair, as FaceNet uses;
    float64, so thresholds compare the same numbers a float64 reference computes."""
    a = torch.nn.functional.normalize(emb1.detach().double(), dim=-1)
    b = torch.nn.functional.normalize(emb2.detach().double(), dim=-1)
    return ((a - b) ** 2).sum(-1).cpu().numpy()


def _folds(n: int, folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(test, train) indices of `folds` contiguous folds, as LFW's pairs.txt lists them (and as
    sklearn's KFold(shuffle=False) splits)."""
    if n < folds:
        raise ValueError(f"{n} pairs cannot be split into {folds} folds")
    idx = np.array_split(np.arange(n), folds)
    return [
        (idx[f], np.concatenate([idx[g] for g in range(folds) if g != f])) for f in range(folds)
    ]


def _pairs(distances: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(same).astype(bool)
    if y.all() or not y.any():
        raise ValueError("verification metrics need both matching and non-matching pairs")
    return d, y


def verification_accuracy(distances: np.ndarray, same: np.ndarray, folds: int = 10) -> float:
    """k-fold verification accuracy (LFW protocol), in percent.

    For each fold, the threshold that maximises accuracy on the other folds is applied to it.
    `same` is 1 for a matching pair. Folds are contiguous, as in LFW's pairs.txt.
    """
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(same).astype(bool)
    thresholds = np.unique(np.concatenate([d, [d.min() - 1e-6, d.max() + 1e-6]]))
    accs = []
    for test, train in _folds(len(d), folds):
        # (T, n_train) accuracy of "same iff distance < threshold" for every candidate
        train_acc = ((d[train][None, :] < thresholds[:, None]) == y[train][None, :]).mean(1)
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(((d[test] < best) == y[test]).mean())
    return float(np.mean(accs) * 100.0)


def far_threshold(
    negatives: np.ndarray, far_target: float, thresholds: np.ndarray = FACENET_THRESHOLDS
) -> float:
    """The distance threshold at which non-matching pairs reach the false accept rate
    `far_target` (a pair is accepted when its distance is < the threshold).

    FAR(t) = #(negatives < t) / #negatives is evaluated on the ascending grid `thresholds` and
    linearly interpolated to `far_target` between the largest grid point below the target and
    the first one at or above it (FaceNet's `calculate_val`). If no grid point reaches the
    target, the threshold is 0 (nothing is accepted), as there.
    """
    neg = np.sort(np.asarray(negatives, dtype=np.float64))
    far = np.searchsorted(neg, thresholds, side="left") / len(neg)  # (T,) non-decreasing
    hi = int(np.searchsorted(far, far_target, side="left"))  # first grid point with FAR >= target
    if hi == len(thresholds):
        return 0.0
    if hi == 0:
        return float(thresholds[0])
    f0, f1, t0, t1 = far[hi - 1], far[hi], thresholds[hi - 1], thresholds[hi]
    return float(t0 + (far_target - f0) * (t1 - t0) / (f1 - f0))


def val_at_far(
    distances: np.ndarray,
    same: np.ndarray,
    far_target: float = 1e-3,
    folds: int = 10,
    thresholds: np.ndarray = FACENET_THRESHOLDS,
) -> tuple[float, float]:
    """FaceNet's validation rate at a target false accept rate (Schroff et al. 2015, the LFW
    protocol of davidsandberg/facenet and facenet-pytorch): (VAL in percent, FAR reached).

    For each of `folds` contiguous folds, `far_threshold` is found on the other folds'
    non-matching pairs and applied to the fold. VAL = true accepts / matching pairs and the FAR
    reached = false accepts / non-matching pairs, counted over all test folds (on LFW's balanced
    folds that is FaceNet's mean over folds). The FAR reached is a fraction: with 300
    non-matching pairs per LFW fold it moves in steps of 1/300, so it shows how far the target
    was from reachable.
    """
    if not 0 < far_target < 1:
        raise ValueError(f"far_target must be in (0, 1), got {far_target}")
    d, y = _pairs(distances, same)
    accepted_same = accepted_diff = 0
    for test, train in _folds(len(d), folds):
        negatives = d[train][~y[train]]
        if not len(negatives):
            raise ValueError("a training split has no non-matching pairs: FAR is undefined")
        accept = d[test] < far_threshold(negatives, far_target, thresholds)
        accepted_same += int((accept & y[test]).sum())
        accepted_diff += int((accept & ~y[test]).sum())
    return 100.0 * accepted_same / int(y.sum()), accepted_diff / int((~y).sum())


def tar_at_far(distances: np.ndarray, same: np.ndarray, far: float = 1e-4) -> float:
    """Strict TAR: the true accept rate at the largest threshold whose false accept rate is
    <= `far`, pooled over all pairs with no folds (the threshold is chosen on the pairs it
    scores), in percent.

    With N non-matching pairs the finest FAR that can be resolved is 1/N; when far < 1/N (LFW:
    3,000 pairs, far = 1e-4) this is the TAR at zero false accepts. `val_at_far` is the
    cross-validated protocol.
    """
    from sklearn.metrics import roc_curve

    d, y = _pairs(distances, same)
    fpr, tpr, _ = roc_curve(y.astype(int), -d)
    ok = fpr <= far
    return float(tpr[ok].max() * 100.0) if ok.any() else 0.0
