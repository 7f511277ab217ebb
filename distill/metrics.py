"""Evaluation metrics: top-k accuracy, mean AP over attributes, face verification.

Accuracies are returned in percent, the way papers report them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


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


def mean_average_precision(scores: Tensor, target: Tensor, mask: Tensor | None = None) -> float:
    """Mean over attributes of the average precision (sklearn's definition), in percent.

    scores (N, A) logits or probabilities; target (N, A) in {0, 1}; mask (N, A), 1 where the
    label is known. Attributes without both a positive and a negative known label are skipped.
    """
    from sklearn.metrics import average_precision_score

    s = scores.detach().float().cpu().numpy()
    y = target.detach().cpu().numpy() > 0.5
    m = np.ones_like(y, dtype=bool) if mask is None else mask.detach().cpu().numpy() > 0.5
    aps = []
    for a in range(s.shape[1]):
        keep = m[:, a]
        ya = y[keep, a]
        if ya.all() or not ya.any():
            continue
        aps.append(average_precision_score(ya, s[keep, a]))
    if not aps:
        raise ValueError("no attribute has both positive and negative labels: mean AP undefined")
    return float(np.mean(aps) * 100.0)


def multilabel_accuracy(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> float:
    """Mean per-attribute accuracy of `logits > 0` against binary targets, in percent."""
    pred = logits.detach().float() > 0
    y = target.detach() > 0.5
    m = torch.ones_like(y) if mask is None else mask.detach() > 0.5
    per_attr = ((pred == y) & m).sum(0).float() / m.sum(0).clamp(min=1).float()
    return float(per_attr.mean() * 100.0)


def pair_distances(emb1: Tensor, emb2: Tensor) -> np.ndarray:
    """Squared L2 distance between L2-normalised embeddings of each pair, as FaceNet uses."""
    a = torch.nn.functional.normalize(emb1.detach().float(), dim=-1)
    b = torch.nn.functional.normalize(emb2.detach().float(), dim=-1)
    return ((a - b) ** 2).sum(-1).cpu().numpy()


def verification_accuracy(distances: np.ndarray, same: np.ndarray, folds: int = 10) -> float:
    """k-fold verification accuracy (LFW protocol), in percent.

    For each fold, the threshold that maximises accuracy on the other folds is applied to it.
    `same` is 1 for a matching pair. Folds are contiguous, as in LFW's pairs.txt.
    """
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(same).astype(bool)
    n = len(d)
    if n < folds:
        raise ValueError(f"{n} pairs cannot be split into {folds} folds")
    thresholds = np.unique(np.concatenate([d, [d.min() - 1e-6, d.max() + 1e-6]]))
    idx = np.array_split(np.arange(n), folds)
    accs = []
    for f in range(folds):
        test = idx[f]
        train = np.concatenate([idx[g] for g in range(folds) if g != f])
        # (T, n_train) accuracy of "same iff distance < threshold" for every candidate
        train_acc = ((d[train][None, :] < thresholds[:, None]) == y[train][None, :]).mean(1)
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(((d[test] < best) == y[test]).mean())
    return float(np.mean(accs) * 100.0)


def tar_at_far(distances: np.ndarray, same: np.ndarray, far: float = 1e-4) -> float:
    """True accept rate at the largest threshold whose false accept rate is <= `far`, in percent.

    This is the paper's "1e-4 accuracy" for FaceNet. With N negative pairs the finest FAR that
    can be resolved is 1/N; below that the threshold admits no false accept at all.
    """
    from sklearn.metrics import roc_curve

    y = np.asarray(same).astype(int)
    if y.min() == y.max():
        raise ValueError("TAR@FAR needs both matching and non-matching pairs")
    fpr, tpr, _ = roc_curve(y, -np.asarray(distances, dtype=np.float64))
    ok = fpr <= far
    return float(tpr[ok].max() * 100.0) if ok.any() else 0.0
