"""Reading a teacher cache from disk, and opening one that must fit the current run.

On disk: `manifest.json` (written last) and, per shard of `shard_size` items, one `.npy` file
per array of `ARRAYS`, read through `np.load(mmap_mode="r")` (never with pickles). Per (item,
draw): `values` (k,) float16, `indices` (k,) int16 (int32 when C > 32767), `tail_lse` and
`offset` float32 (see `distill.data.cache.topk`), and the draw's parameters, ints and floats,
named in the manifest. The manifest also holds the fingerprint, the readable identity the cache
was built for, the unreadable files each shard's items stood in for (both absent in caches
written before they were recorded) and every file's sha256.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.data.cache.fingerprint import (
    CacheMismatchError,
    Fingerprint,
    Identity,
    check_fits,
    identity_digests,
)
from distill.data.cache.replayable import ParamValue
from distill.data.cache.topk import reconstruct_logits
from distill.data.skipping import SkipLog
from distill.files import sha256_file

__all__ = [
    "ARRAYS",
    "FORMAT",
    "HOW_TO_BUILD",
    "MANIFEST",
    "PROGRESS",
    "VERSION",
    "CacheCorruptError",
    "CacheEntry",
    "TeacherCache",
    "open_checked",
    "read_manifest",
]

FORMAT = "distill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = ("values", "indices", "tail_lse", "offset", "params_int", "params_float")
HOW_TO_BUILD = "`python -m distill cache-teacher` (or distill.data.cache.build_or_reuse)"


class CacheCorruptError(ValueError):
    """A shard's bytes do not match the checksum the manifest recorded."""


@dataclass
class CacheEntry:
    params: dict[str, ParamValue]
    values: Tensor  # (k,) float16
    indices: Tensor  # (k,) int64
    tail_lse: Tensor  # () float32
    offset: Tensor  # () float32


def read_manifest(root: Path, *, how_to_build: str = HOW_TO_BUILD) -> dict[str, Any]:
    """The manifest of the cache at `root`; FileNotFoundError (saying how to build one) when
    there is none, CacheMismatchError when it is not a manifest this version reads."""
    mpath = root / MANIFEST
    if not mpath.is_file():
        hint = (
            " (a build was interrupted: rerun it to resume)" if (root / PROGRESS).exists() else ""
        )
        raise FileNotFoundError(
            f"no teacher cache there: {root} has no {MANIFEST}{hint}. Build it first: "
            f"{how_to_build}"
        )
    manifest: dict[str, Any] = json.loads(mpath.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CacheMismatchError(
            f"{mpath} is not a version-{VERSION} {FORMAT} manifest "
            f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
        )
    return manifest


class TeacherCache:
    """Read access to a cache written by `build_cache`. Use `TeacherCache.open(path, ...)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.fingerprint = Fingerprint(**manifest["fingerprint"])
        self.identity: dict[str, Any] | None = manifest.get("identity")
        self.num_items: int = manifest["num_items"]
        self.crops: int = manifest["crops"]
        self.topk: int = manifest["topk"]
        self.num_classes: int = manifest["num_classes"]
        self.seed: int = manifest["seed"]
        self.param_names_int: list[str] = manifest["param_names"]["int"]
        self.param_names_float: list[str] = manifest["param_names"]["float"]
        self.shard_size: int = manifest["shard_size"]
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        expected: Fingerprint | str | None = None,
        *,
        verify: bool = True,
    ) -> TeacherCache:
        """Open a cache; refuse it if `expected` (a Fingerprint, or only its digest) differs or
        (with `verify`) a shard was altered."""
        root = Path(path)
        cache = cls(root, read_manifest(root))
        if isinstance(expected, str) and expected != cache.fingerprint.digest:
            raise CacheMismatchError(
                f"teacher cache {root} has fingerprint {cache.fingerprint.digest[:12]}, expected "
                f"{expected[:12]}; pass a Fingerprint instead of a digest to learn which part "
                f"differs, or rebuild the cache with {HOW_TO_BUILD}"
            )
        if isinstance(expected, Fingerprint):
            cache.check_fits(
                asdict(expected),
                advice=f"Rebuild it for the current teacher/data/transform with {HOW_TO_BUILD}, "
                "or point to the matching cache.",
            )
        if verify:
            cache.verify()
        return cache

    def check_fits(
        self,
        now: Mapping[str, Any],
        *,
        current: Identity | None = None,
        labels: Mapping[str, str] | None = None,
        advice: str,
    ) -> None:
        """Raise a CacheMismatchError if any value of `now` (fingerprint fields, "seed") differs
        from the cache's, explained from `current` and the stored identity (`check_fits`)."""
        found = {**asdict(self.fingerprint), "seed": self.seed}
        stored = {"images": self.num_items, **(self.identity or {})}
        check_fits(
            self.path, found, now, stored=stored, current=current, labels=labels, advice=advice
        )

    def verify(self, *, how_to_build: str = HOW_TO_BUILD) -> None:
        """Recompute every shard file's sha256 and compare with the manifest."""
        for shard in self._shards:
            for entry in shard["files"].values():
                p = self.path / entry["file"]
                if not p.is_file():
                    raise CacheCorruptError(
                        f"teacher cache shard file {p} is missing; rebuild the cache: {how_to_build}"
                    )
                if sha256_file(p) != entry["sha256"]:
                    raise CacheCorruptError(
                        f"teacher cache shard file {p} does not match the checksum in {MANIFEST} "
                        f"(modified or truncated); rebuild the cache: {how_to_build}"
                    )

    @property
    def skipped(self) -> SkipLog:
        """The unreadable files the build replaced by the next readable one (`SkipBadReplays`),
        once per item; training replays the same stand-ins. Empty for older manifests."""
        log = SkipLog()
        for shard in self._shards:
            log.merge(SkipLog.from_dict(shard.get("skipped", {})))
        return log

    def __len__(self) -> int:
        return self.num_items

    def _shard(self, index: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= index < self.num_items:
            raise IndexError(f"index {index} out of range for a cache of {self.num_items} items")
        s = index // self.shard_size
        arrays = self._arrays.get(s)
        if arrays is None:
            files = self._shards[s]["files"]
            arrays = {
                name: np.load(self.path / entry["file"], mmap_mode="r")
                for name, entry in files.items()
            }
            self._arrays[s] = arrays
        return arrays, index - s * self.shard_size

    def _check_draw(self, draw: int) -> None:
        if not 0 <= draw < self.crops:
            raise IndexError(
                f"draw {draw} out of range: the cache holds {self.crops} crops per item"
            )

    def params(self, index: int, draw: int) -> dict[str, ParamValue]:
        self._check_draw(draw)
        arrays, row = self._shard(index)
        out: dict[str, ParamValue] = {}
        if self.param_names_int:
            ints = arrays["params_int"][row, draw]
            out.update({n: int(v) for n, v in zip(self.param_names_int, ints)})
        if self.param_names_float:
            floats = arrays["params_float"][row, draw]
            out.update({n: float(v) for n, v in zip(self.param_names_float, floats)})
        return out

    def entry(self, index: int, draw: int) -> CacheEntry:
        self._check_draw(draw)
        arrays, row = self._shard(index)
        return CacheEntry(
            params=self.params(index, draw),
            values=torch.from_numpy(np.array(arrays["values"][row, draw])),
            indices=torch.from_numpy(np.array(arrays["indices"][row, draw]).astype(np.int64)),
            tail_lse=torch.tensor(float(arrays["tail_lse"][row, draw])),
            offset=torch.tensor(float(arrays["offset"][row, draw])),
        )

    def logits(self, index: int, draw: int, *, raw: bool = False) -> Tensor:
        """Reconstructed dense (C,) float32 logits of one draw (relative to the row max unless
        `raw`, which adds the stored max back)."""
        e = self.entry(index, draw)
        return reconstruct_logits(
            e.values, e.indices, e.tail_lse, self.num_classes, e.offset if raw else None
        )

    def nbytes(self) -> int:
        return sum(
            (self.path / e["file"]).stat().st_size
            for s in self._shards
            for e in s["files"].values()
        )


def open_checked(
    path: str | os.PathLike[str],
    expected: Fingerprint | Identity,
    *,
    labels: Mapping[str, str] | None = None,
    how_to_build: str = HOW_TO_BUILD,
) -> TeacherCache:
    """Open the cache at `path` for a run that would cache `expected`, or say why it cannot.

    `expected` is a `Fingerprint` (every field compared) or an identity (the teacher, dataset,
    transform and class count it describes compared; k and K are whatever the cache holds, as
    training replays what is stored). `labels` name the components in errors, `how_to_build`
    says how to build a cache (both for callers with their own command-line flags).

    Raises FileNotFoundError (no manifest there), CacheMismatchError (the cache was built for
    something else: each differing component with its cached and current values) and
    CacheCorruptError (a shard file is missing or fails its checksum).
    """
    root = Path(path)
    cache = TeacherCache(root, read_manifest(root, how_to_build=how_to_build))
    now: Mapping[str, Any]
    current: Identity | None
    if isinstance(expected, Fingerprint):
        now, current = asdict(expected), None
    else:
        now, current = identity_digests(expected), expected
    cache.check_fits(
        now,
        current=current,
        labels=labels,
        advice="Use the settings the cache was built with, or build a cache for these settings "
        f"in another folder: {how_to_build}",
    )
    cache.verify(how_to_build=how_to_build)
    return cache
