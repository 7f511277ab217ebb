"""Cached teacher outputs for offline distillation (FKD / ReLabel style).

A per-index cache of teacher outputs is wrong under augmentation: the teacher's answer depends
on the crop. So, for every dataset index, the cache stores `crops` (K) augmentation draws: the
random parameters of each draw (crop box, flip, ...) and the teacher's top-k answer on exactly
that crop. Training replays the stored parameters, so the student sees the same pixels the
teacher saw, and the teacher forward pass is skipped (Shen & Xing, "A Fast Knowledge
Distillation Framework for Visual Recognition", ECCV 2022; Yun et al., "Re-labeling ImageNet",
CVPR 2021).

- `topk`: what is kept of each answer, how it is reconstructed, and what that loses;
- `fingerprint`: what a cache depends on, and the one explanation of why a cache does not fit;
- `replayable`: what a dataset must offer to be cached (`ReplayableDataset`), and two that do;
- `store`: the on-disk format and `TeacherCache`; `open_checked` for a training run;
- `build`: `build_cache`, and `build_or_reuse` (reuse, resume or refuse) for a recipe;
- `replay`: `CachedDataset`, what training reads.
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
from distill.data.cache.topk import TopK, compress_topk, reconstruct_logits, topk_kl

__all__ = [
    "FORMAT",
    "HOW_TO_BUILD",
    "LABELS",
    "MANIFEST",
    "PROGRESS",
    "VERSION",
    "CacheCorruptError",
    "CacheEntry",
    "CacheMismatchError",
    "CachedDataset",
    "Fingerprint",
    "Identity",
    "ParamValue",
    "Params",
    "ReplayableDataset",
    "ReplayableImages",
    "ReplayableShifts",
    "TeacherCache",
    "TopK",
    "array_signature",
    "build_cache",
    "build_or_reuse",
    "compress_topk",
    "config_signature",
    "default_identity",
    "densify_batch",
    "draw_generator",
    "files_signature",
    "iter_entries",
    "open_checked",
    "reconstruct_logits",
    "teacher_identity",
    "teacher_signature",
    "topk_kl",
    "weights_signature",
]
