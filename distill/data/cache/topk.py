"""Top-k compression of teacher logits and its reconstruction (pure tensor functions).

What is kept per row, with z the teacher's logits (C,), m = max(z) and the *tail* R the C - k
classes outside the top k:
- `values`     (k,): the top-k logits minus m, stored in fp16 (so the top-1 is exactly 0 and fp16
  spends its precision near the classes that carry the mass);
- `indices`    (k,): their class ids;
- `tail_lse`   (): logsumexp over R of z - m (-inf when k == C): the tail's total mass at T = 1;
- `offset`     (): m itself, in fp32, so raw logits can be recovered (softmax never needs it);
- with `tail="quantized"`, every tail logit: `tail_codes` (C - k,) uint8, in class-id order,
  and `tail_range` (2,) = (lo, hi), the range the 256 codes span (`quantize_tail`).
`tempered_tail_lse` gives the tail's mass at other temperatures, logsumexp over R of (z - m) / T.

What the KD loss needs. soft = T^2 KL(p_T || q_T), p_T = softmax(z / T), and its gradient with
respect to the student's logits is T (q_T - p_T) / B: it reads p_T of *every* class, the tail's
included, and at T = 4 on 1000 classes the tail holds most of p_T. So:
- `tail="quantized"` (the default of `build_cache`): each tail logit is known to within half a
  code step, (hi - lo) / 510 (lo is clipped to hi - 60, see `quantize_tail`), so every class's
  tempered log-probability is within that / T, at every temperature: the loss and its gradient
  follow the teacher's at any T (benchmarks/RESULTS.md: within 0.02% on the loss and 0.6% on
  the gradient at T = 1-8, k = 5-20, 1000 classes). When the tail's mass at T is stored the
  reconstructed tail is shifted to match it, which makes that mass exact;
- `tail="mass"`: only the tail's mass at listed temperatures. The C - k tail classes share it
  equally (each gets logit T * (lse_T - log(C - k))), so at a listed T the top-k probabilities
  and the tail's total mass are exact, but not how the tail's mass splits among its classes:
  the loss is off by the cross-entropy of that split with the student's tail, its gradient by
  T (p_j - mean tail p) / B on every tail class (tens of percent at T >= 2, 1000 classes). The
  tail's tempered entropy, if stored, would fix the teacher's own term of the KL, a constant
  for the student: the value would then be right only for a student whose tail is unrelated
  to the teacher's, the gradient never, so it is not stored. Using the T = 1 mass at another
  T, as format version 1 did, gets even the tail's total wrong (for T > 1 it over-states it: a
  uniform tail has the largest tempered mass for a given T = 1 mass), so such a cache refuses
  the temperatures whose mass it does not hold.

fp16 rounding: even with k == C, the top-k values are rounded to fp16 (11 significant bits), so
a logit d below the max comes back within d * 2**-11 (0.004 for d in [8, 16)), and its tempered
log-probability within that / T; the max (0 exactly), the offset and the indices are exact, and
logits more than 1e4 below the max come back as 1e4 below (`_LOGIT_FLOOR`). `topk_kl` measures
what all this loses; `benchmarks/cache_fidelity.py` tabulates it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "TAIL_KINDS",
    "TailKind",
    "TopK",
    "compress_topk",
    "dequantize_tail",
    "quantize_tail",
    "reconstruct_logits",
    "tempered_tail_lse",
    "topk_kl",
]

TailKind = Literal["quantized", "mass"]
TAIL_KINDS: tuple[TailKind, ...] = ("quantized", "mass")

# A finite floor for reconstructed logits (relative to the row max): exp() of it is 0 in fp32,
# and, unlike -inf, it keeps kl_div(log_target=True) free of 0 * inf = nan.
_LOGIT_FLOOR = -1.0e4
# The widest range the 8-bit tail codes span: a tail logit more than this below the tail's
# largest is stored at that depth, over-stating a tempered mass that is below e^(-60 / T) of
# that class's (5.5e-4 at T = 8); a wider span would coarsen every code step (60 / 255 = 0.24
# at most; a 1000-class ImageNet-like row spans 14-30).
_TAIL_SPAN = 60.0
_CODES = 255


@dataclass
class TopK:
    """A compressed teacher answer for a batch. Shapes: values/indices (B, k), tail_codes
    (B, C - k), tail_range (B, 2), others (B,)."""

    values: Tensor  # top-k logits minus the row max
    indices: Tensor  # class ids, int64
    tail_lse: Tensor  # logsumexp of the other logits minus the row max; -inf when k == C
    offset: Tensor  # the row max of the logits
    tail_codes: Tensor | None = None  # uint8 codes of the other logits (tail="quantized")
    tail_range: Tensor | None = None  # (lo, hi) those codes span


def _tail_indices(indices: Tensor, num_classes: int) -> Tensor:
    """(..., C - k) int64: the classes outside `indices` (..., k), in ascending order (a stable
    sort of the tail mask, which, unlike boolean indexing, needs no host sync on a GPU)."""
    lead = indices.shape[:-1]
    tail = torch.ones(*lead, num_classes, dtype=torch.int32, device=indices.device)
    tail.scatter_(-1, indices.long(), 0)
    order = torch.sort(tail, dim=-1, descending=True, stable=True).indices
    return order[..., : num_classes - indices.shape[-1]]


def quantize_tail(rest: Tensor) -> tuple[Tensor, Tensor]:
    """8-bit codes (B, R) of tail logits `rest` (B, R) and the (lo, hi) range (B, 2) they span:
    hi is the tail's largest logit, lo its smallest, but at most `_TAIL_SPAN` below hi. Each
    logit comes back (`dequantize_tail`) within (hi - lo) / 510 (or clipped to lo)."""
    if rest.shape[-1] == 0:
        empty = torch.zeros(*rest.shape[:-1], 2, dtype=torch.float32, device=rest.device)
        return rest.to(torch.uint8), empty
    hi = rest.amax(-1)
    lo = torch.maximum(rest.amin(-1), hi - _TAIL_SPAN)
    step = ((hi - lo) / _CODES).clamp_min(1e-12)[..., None]
    codes = ((rest - lo[..., None]) / step).round().clamp(0, _CODES).to(torch.uint8)
    return codes, torch.stack([lo, hi], dim=-1)


def dequantize_tail(codes: Tensor, tail_range: Tensor) -> Tensor:
    """Float32 tail logits (..., R) from `quantize_tail`'s codes and range (..., 2)."""
    lo, hi = tail_range[..., :1].float(), tail_range[..., 1:].float()
    return lo + codes.float() * ((hi - lo) / _CODES)


def compress_topk(logits: Tensor, k: int, *, tail: TailKind = "mass") -> TopK:
    """Keep the k largest logits of each row of `logits` (B, C) and the log of the rest's mass,
    and with `tail="quantized"` every other logit in 8 bits (see the module docstring)."""
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, C), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk={k} must be between 1 and the number of classes ({num_classes})")
    if tail not in TAIL_KINDS:
        raise ValueError(f"tail must be one of {', '.join(TAIL_KINDS)}, got {tail!r}")
    z = logits.detach().float()
    offset = z.amax(dim=1)  # (B,)
    z = z - offset[:, None]
    values, indices = z.topk(k, dim=1)  # sorted, largest first
    rest = z.gather(1, _tail_indices(indices, num_classes))  # (B, C - k), class-id order
    out = TopK(values=values, indices=indices, tail_lse=_lse(rest), offset=offset)
    if tail == "quantized":
        out.tail_codes, out.tail_range = quantize_tail(rest.clamp_min(_LOGIT_FLOOR))
    return out


def _lse(rest: Tensor) -> Tensor:
    """logsumexp over the last dim; -inf for an empty tail (k == C)."""
    if rest.shape[-1] == 0:
        return torch.full(rest.shape[:-1], -math.inf, dtype=rest.dtype, device=rest.device)
    return torch.logsumexp(rest, dim=-1)


def tempered_tail_lse(logits: Tensor, indices: Tensor, temperatures: Sequence[float]) -> Tensor:
    """(B, len(temperatures)): logsumexp over the classes outside `indices` (B, k) of
    (z - max z) / T, the tail's total mass at each temperature T."""
    z = logits.detach().float()
    z = z - z.amax(dim=1, keepdim=True)
    rest = z.gather(1, _tail_indices(indices, z.shape[1]))  # (B, C - k)
    return torch.stack([_lse(rest / float(t)) for t in temperatures], dim=-1)


def reconstruct_logits(
    values: Tensor,
    indices: Tensor,
    tail_lse: Tensor | None,
    num_classes: int,
    offset: Tensor | None = None,
    *,
    temperature: float | Tensor = 1.0,
    tail_codes: Tensor | None = None,
    tail_range: Tensor | None = None,
) -> Tensor:
    """Dense (..., C) float32 logits z' for a loss at `temperature` (a float, or a 0-d tensor on
    the batch's device; see the module docstring).

    `tail_lse` is the tail's mass at `temperature` (`tempered_tail_lse`; None if not stored).
    With `tail_codes`/`tail_range` the tail classes get their dequantized logits, shifted so
    that their tempered mass is `tail_lse` when it is given; without them they share
    `tail_lse` equally in softmax(z' / T). The top-k classes get their stored logits. Without
    `offset` the logits are relative to the row max, which no softmax can tell apart.
    Shapes: values/indices (..., k), tail_lse/offset (...), tail_codes (..., C - k).
    """
    k = values.shape[-1]
    if k > num_classes:
        raise ValueError(f"{k} stored classes but num_classes={num_classes}")
    t = temperature if isinstance(temperature, Tensor) else float(temperature)
    values = values.float().clamp_min(_LOGIT_FLOOR)
    lead = values.shape[:-1]
    if tail_codes is not None and tail_range is not None:
        tail = dequantize_tail(tail_codes, tail_range)  # (..., C - k)
        if tail_lse is not None and k < num_classes:
            shift = t * (tail_lse.float() - torch.logsumexp(tail / t, dim=-1))
            tail = tail + torch.nan_to_num(shift, nan=0.0, neginf=0.0)[..., None]
        dense = torch.empty(*lead, num_classes, dtype=torch.float32, device=values.device)
        dense.scatter_(-1, _tail_indices(indices, num_classes), tail.clamp_min(_LOGIT_FLOOR))
    elif tail_lse is None:
        raise ValueError("a tail stored as its mass needs that mass (tail_lse) at this temperature")
    else:
        fill = t * (tail_lse.float() - math.log(max(num_classes - k, 1)))
        fill = torch.nan_to_num(fill, neginf=_LOGIT_FLOOR).clamp_min(_LOGIT_FLOOR)
        dense = fill[..., None].expand(*lead, num_classes).clone()
    dense.scatter_(-1, indices.long(), values)
    if offset is not None:
        dense = dense + offset.float()[..., None]
    return dense


def topk_kl(logits: Tensor, k: int, temperature: float = 1.0, *, tail: TailKind = "mass") -> Tensor:
    """Per-row KL(p_T || q_T) between the teacher's softmax(z / T) and that of its top-k
    reconstruction for T, in nats, shape (B,): what the cache loses, fp16 rounding included.
    With `tail="mass"` the tail's mass is the one at T = 1, as a version-1 cache stores it."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    c = compress_topk(logits, k, tail=tail)
    lse = None if tail == "quantized" else c.tail_lse
    approx = reconstruct_logits(
        c.values.half(), c.indices, lse, logits.shape[1], temperature=1.0,
        tail_codes=c.tail_codes, tail_range=c.tail_range,
    )  # fmt: skip
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    log_q = F.log_softmax(approx / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)
