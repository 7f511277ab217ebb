"""Top-k compression of teacher logits and its reconstruction (pure tensor functions).

What is kept per row, with z the teacher's logits (C,) and m = max(z):
- `values`   (k,): the top-k logits minus m (so the top-1 is 0, and fp16, as the cache stores
  them, spends its precision near the classes that carry the mass);
- `indices`  (k,): their class ids;
- `tail_lse` (): logsumexp of the C - k other logits, minus m (-inf when k == C);
- `offset`   (): m itself, so raw logits can be recovered (softmax never needs it).

Reconstruction (`reconstruct_logits`): the C - k tail classes share the tail's exp-mass equally,
each getting the logit `tail_lse - log(C - k)`. At temperature T = 1 this is exact for the top-k
probabilities and for the total tail mass; only how the tail mass splits among tail classes is
lost. For T != 1 the loss computes softmax(z / T) of the reconstructed logits; the tail's
tempered mass is then over-estimated for T > 1 (power-mean inequality: a uniform tail has the
largest tempered mass for a given T = 1 mass). `benchmarks/cache_fidelity.py` measures the KL
between the full and the reconstructed distributions for k = 1, 5, 10, 20 at T = 1 and T = 4
(`topk_kl`); k == C reconstructs exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["TopK", "compress_topk", "reconstruct_logits", "topk_kl"]

# A finite floor for reconstructed logits (relative to the row max): exp() of it is 0 in fp32,
# and, unlike -inf, it keeps kl_div(log_target=True) free of 0 * inf = nan.
_LOGIT_FLOOR = -1.0e4


@dataclass
class TopK:
    """A compressed teacher answer for a batch. Shapes: values/indices (B, k), others (B,)."""

    values: Tensor  # top-k logits minus the row max
    indices: Tensor  # class ids, int64
    tail_lse: Tensor  # logsumexp of the other logits minus the row max; -inf when k == C
    offset: Tensor  # the row max of the logits


def compress_topk(logits: Tensor, k: int) -> TopK:
    """Keep the k largest logits of each row of `logits` (B, C) and the log of the rest's mass."""
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, C), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk={k} must be between 1 and the number of classes ({num_classes})")
    z = logits.detach().float()
    offset = z.amax(dim=1)  # (B,)
    z = z - offset[:, None]
    values, indices = z.topk(k, dim=1)  # sorted, largest first
    if k == num_classes:
        tail = torch.full_like(offset, -math.inf)
    else:
        rest = z.scatter(1, indices, -math.inf)
        tail = torch.logsumexp(rest, dim=1)
    return TopK(values=values, indices=indices, tail_lse=tail, offset=offset)


def reconstruct_logits(
    values: Tensor,
    indices: Tensor,
    tail_lse: Tensor,
    num_classes: int,
    offset: Tensor | None = None,
) -> Tensor:
    """Dense (B, C) float32 logits whose softmax approximates the teacher's (see module doc).

    The top-k classes get their stored logits; every other class gets `tail_lse - log(C - k)`,
    so the tail's total exp-mass matches the teacher's exactly at T = 1. Without `offset` the
    logits are relative to the row max, which no softmax at any temperature can tell apart.
    Works on any leading shape: values/indices (..., k), tail_lse/offset (...).
    """
    k = values.shape[-1]
    if k > num_classes:
        raise ValueError(f"{k} stored classes but num_classes={num_classes}")
    values = values.float()
    lead = values.shape[:-1]
    if k == num_classes:
        fill = torch.full(lead, _LOGIT_FLOOR, dtype=torch.float32, device=values.device)
    else:
        fill = tail_lse.float() - math.log(num_classes - k)
        fill = torch.nan_to_num(fill, neginf=_LOGIT_FLOOR).clamp_min(_LOGIT_FLOOR)
    dense = fill[..., None].expand(*lead, num_classes).clone()
    dense.scatter_(-1, indices.long(), values)
    if offset is not None:
        dense = dense + offset.float()[..., None]
    return dense


def topk_kl(logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Per-row KL(p_T || q_T) between the teacher's softmax(z / T) and that of its top-k
    reconstruction, in nats, shape (B,). Measures what the cache loses (fp16 rounding included)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    c = compress_topk(logits, k)
    approx = reconstruct_logits(c.values.half(), c.indices, c.tail_lse, logits.shape[1])
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    log_q = F.log_softmax(approx / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
