"""What a cache keeps of each teacher answer: the kind of output, the tail, the temperatures
(`Storage`), the arrays that follow (`array_layout`) and how a batch of answers becomes them
(`encode`). See `distill.data.cache.topk` for what each choice makes exact.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from distill.data.cache.topk import TAIL_KINDS, TailKind, compress_topk, tempered_tail_lse
from distill.types import TaskKind

__all__ = [
    "KINDS",
    "RECONSTRUCTION",
    "CacheKind",
    "Storage",
    "array_layout",
    "encode",
    "stored_topk",
]

CacheKind = TaskKind  # what the teacher outputs: class logits, attribute logits, embeddings
KINDS: tuple[CacheKind, ...] = ("logits", "multilabel", "embedding")


@dataclass(frozen=True)
class Storage:
    """What a build keeps of each answer (see the module docstring): the teacher's kind of
    output and, for class logits, the tail and the temperatures whose tail mass is stored."""

    kind: CacheKind = "logits"
    tail: TailKind | None = "quantized"
    temperatures: tuple[float, ...] | None = (1.0,)

    @classmethod
    def create(cls, kind: CacheKind, tail: TailKind, temperatures: Sequence[float]) -> Storage:
        """Checked; temperature 1 is always stored, the list sorted; dense kinds keep neither
        a tail nor temperatures (their outputs are stored whole)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if kind != "logits":
            return cls(kind, None, None)
        if tail not in TAIL_KINDS:
            raise ValueError(f"tail must be one of {', '.join(TAIL_KINDS)}, got {tail!r}")
        bad = [t for t in temperatures if not (math.isfinite(t) and t > 0)]
        if bad:
            raise ValueError(f"temperatures must be finite and > 0, got {bad}")
        return cls(kind, tail, tuple(sorted({1.0, *map(float, temperatures)})))

    def record(self) -> dict[str, Any]:
        """As the manifest holds it (and `TeacherCache.storage()` reads it back)."""
        temps = None if self.temperatures is None else list(self.temperatures)
        return {"kind": self.kind, "tail": self.tail, "temperatures": temps}


def stored_topk(storage: Storage, topk: int | None, num_classes: int) -> int:
    """k: the build's for class logits; all N outputs for the dense kinds."""
    if storage.kind != "logits":
        if topk not in (None, num_classes):
            raise ValueError(
                f"a {storage.kind} cache stores all {num_classes} outputs: drop topk={topk}"
            )
        return num_classes
    if topk is None:
        raise ValueError("a cache of class logits needs topk (the logits kept per draw)")
    if not 1 <= topk <= num_classes:
        raise ValueError(f"topk={topk} must be between 1 and the teacher's {num_classes} classes")
    return topk


RECONSTRUCTION = {
    "quantized": "top-k logits minus row max (fp16) + every other logit in 8 bits "
    "(distill.data.cache.reconstruct_logits)",
    "mass": "top-k logits minus row max (fp16) + logsumexp of the rest at each temperature; the "
    "rest share that mass uniformly (distill.data.cache.reconstruct_logits)",
    None: "the teacher's outputs, float32, as returned",
}


def array_layout(header: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Each array a cache with this manifest header stores: its per-draw shape and dtype."""
    names = header["param_names"]
    params = {
        "params_int": ((len(names["int"]),), np.int32),
        "params_float": ((len(names["float"]),), np.float32),
    }
    n, k = header["num_classes"], header["topk"]
    if header.get("kind", "logits") != "logits":
        return {"values": ((n,), np.float32), **params}
    layout: dict[str, tuple[tuple[int, ...], Any]] = {
        "values": ((k,), np.float16),
        "indices": ((k,), np.int16 if header["index_dtype"] == "int16" else np.int32),
        "tail_lse": ((len(header["temperatures"]),), np.float32),
        "offset": ((), np.float32),
    }
    if header["tail"] == "quantized":
        layout["tail_codes"] = ((n - k,), np.uint8)
        layout["tail_range"] = ((2,), np.float32)
    return {**layout, **params}


def encode(outputs: Tensor, header: dict[str, Any]) -> dict[str, np.ndarray]:
    """The stored arrays (name -> (B, ...)) of a batch of teacher outputs (B, N), float32."""
    if header["kind"] != "logits":
        return {"values": outputs.cpu().numpy()}
    c = compress_topk(outputs, header["topk"], tail=header["tail"])
    arrays = {
        "values": c.values.half().cpu().numpy(),
        "indices": c.indices.cpu().numpy().astype(header["index_dtype"]),
        "tail_lse": tempered_tail_lse(outputs, c.indices, header["temperatures"]).cpu().numpy(),
        "offset": c.offset.cpu().numpy(),
    }
    if c.tail_codes is not None and c.tail_range is not None:
        arrays["tail_codes"] = c.tail_codes.cpu().numpy()
        arrays["tail_range"] = c.tail_range.cpu().numpy()
    return arrays
