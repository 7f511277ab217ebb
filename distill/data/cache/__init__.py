"""Cached teacher outputs for offline distillation (FKD / ReLabel style).

A per-index cache of teacher outputs is wrong under augmentation: the teacher's answer depends
on the crop. So, for every dataset index, the cache stores `crops` (K) augmentation draws: the
random parameters of each draw (crop box, flip, ...) and the teacher's answer on exactly
that crop. Training replays the stored parameters, so the student sees the same pixels the
teacher saw, and the teacher forward pass is skipped (Shen & Xing, "A Fast Knowledge
Distillation Framework for Visual Recognition", ECCV 2022; Yun et al., "Re-labeling ImageNet",
CVPR 2021).

- `topk`: what is kept of class logits (top-k, and the tail in 8 bits or as its mass per
  temperature), how they are reconstructed for a temperature, and what is exact;
- `layout`: what a cache keeps of each answer (`Storage`: the kind of teacher output, logits,
  multi-label logits or embeddings, the tail, the temperatures) and the arrays that follow;
- `fingerprint`: what a cache depends on, and the one explanation of why a cache does not fit;
- `replayable`: what a dataset must offer to be cached (`ReplayableDataset`), and two that do;
- `store`: the on-disk format and `TeacherCache`; `open_checked` for a training run;
- `build`: `build_cache`, and `build_or_reuse` (reuse, resume or refuse) for a recipe;
- `replay`: `CachedDataset`, what training reads, refusing a temperature the cache cannot serve.
"""

from __future__ import annotations

from distill.data.cache.build import build_cache, build_or_reuse
from distill.data.cache.fingerprint import (
    LABELS,
    CacheMismatchError,
    Fingerprint,
    Identity,
    array_signature,
    config_signature,
    default_identity,
    files_signature,
    teacher_identity,
    teacher_signature,
    weights_signature,
)
from distill.data.cache.layout import KINDS, CacheKind, Storage, array_layout
from distill.data.cache.replay import CachedDataset, densify_batch, iter_entries
from distill.data.cache.replayable import (
    Params,
    ParamValue,
    ReplayableDataset,
    ReplayableImages,
    ReplayableShifts,
    draw_generator,
)
from distill.data.cache.store import (
    FORMAT,
    HOW_TO_BUILD,
    MANIFEST,
    PROGRESS,
    VERSION,
    CacheCorruptError,
    CacheEntry,
    TeacherCache,
    open_checked,
)
from distill.data.cache.topk import (
    TAIL_KINDS,
    TailKind,
    TopK,
    compress_topk,
    dequantize_tail,
    quantize_tail,
    reconstruct_logits,
    tempered_tail_lse,
    topk_kl,
)

__all__ = [
    "FORMAT",
    "HOW_TO_BUILD",
    "KINDS",
    "LABELS",
    "MANIFEST",
    "PROGRESS",
    "TAIL_KINDS",
    "VERSION",
    "CacheCorruptError",
    "CacheEntry",
    "CacheKind",
    "CacheMismatchError",
    "CachedDataset",
    "Fingerprint",
    "Identity",
    "ParamValue",
    "Params",
    "ReplayableDataset",
    "ReplayableImages",
    "ReplayableShifts",
    "Storage",
    "TailKind",
    "TeacherCache",
    "TopK",
    "array_layout",
    "array_signature",
    "build_cache",
    "build_or_reuse",
    "compress_topk",
    "config_signature",
    "default_identity",
    "densify_batch",
    "dequantize_tail",
    "draw_generator",
    "files_signature",
    "iter_entries",
    "open_checked",
    "quantize_tail",
    "reconstruct_logits",
    "teacher_identity",
    "teacher_signature",
    "tempered_tail_lse",
    "topk_kl",
    "weights_signature",
]
