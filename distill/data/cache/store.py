"""Reading a teacher cache from disk, and opening one that must fit the current run.

On disk: `manifest.json` (written last) and, per shard of `shard_size` items, one `.npy` file
per stored array (`array_layout`), read through `np.load(mmap_mode="r")` (never with pickles).
Per (item, draw), for a cache of class logits (`kind="logits"`, see `distill.data.cache.topk`):
`values` (k,) float16, `indices` (k,) int16 (int32 when C > 32767), `offset` () float32,
`tail_lse` (len(temperatures),) float32, the tail's mass at each temperature of the manifest's
`temperatures`, and with `tail="quantized"` `tail_codes` (C - k,) uint8 and `tail_range` (2,)
float32. For multi-label attribute logits and embeddings (`kind="multilabel"`/`"embedding"`),
where top-k does not apply: `values` (N,) float32, the teacher's N outputs exactly as it
returned them in float32 (bit-identical; a bf16-autocast teacher's rounding is its own). Then
the draw's parameters, ints and floats, named in the manifest. The manifest also holds the
fingerprint, the readable identity the cache was built for, the unreadable files each shard's
items stood in for (both absent in caches written before they were recorded) and every file's
sha256.

Format version 1 (still read) knew class logits only, stored `tail_lse` () at T = 1 and no tail
codes: it serves temperature 1 alone (`TeacherCache.check_serves`).
"""

from __future__ import annotations

import json
import math
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
from distill.data.cache.layout import KINDS, CacheKind, array_layout
from distill.data.cache.replayable import ParamValue
from distill.data.cache.topk import TailKind, reconstruct_logits
from distill.data.skipping import SkipLog
from distill.files import sha256_file

__all__ = [
    "ARRAYS",
    "FORMAT",
    "HOW_TO_BUILD",
    "KINDS",
    "MANIFEST",
    "PROGRESS",
    "VERSION",
    "CacheCorruptError",
    "CacheEntry",
    "CacheKind",
    "TeacherCache",
    "array_layout",
    "open_checked",
    "read_manifest",
]

FORMAT = "distill-teacher-cache"
VERSION = 2
READABLE = (1, VERSION)
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
ARRAYS = (  # every array a shard may hold; `array_layout` says which a cache has
    "values", "indices", "tail_lse", "offset", "tail_codes", "tail_range", "params_int",
    "params_float",
)  # fmt: skip
HOW_TO_BUILD = "`python -m distill cache-teacher` (or distill.data.cache.build_or_reuse)"


class CacheCorruptError(ValueError):
    """A shard's bytes do not match the checksum the manifest recorded."""


@dataclass
class CacheEntry:
    """One stored answer. Dense kinds: `values` are the N outputs (float32), `indices`
    arange(N), `tail_lse` empty, `offset` 0."""

    params: dict[str, ParamValue]
    values: Tensor  # (k,) float16 top-k logits minus the max; dense kinds (N,) float32
    indices: Tensor  # (k,) int64
    tail_lse: Tensor  # (len(temperatures),) float32
    offset: Tensor  # () float32
    tail_codes: Tensor | None = None  # (C - k,) uint8 (tail="quantized")
    tail_range: Tensor | None = None  # (2,) float32


def _words(values: tuple[float, ...], conjunction: str) -> str:
    """(1.0, 2.0, 4.0) -> '1, 2 and 4' (or 'or')."""
    names = [f"{v:g}" for v in values]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


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
    if manifest.get("format") != FORMAT or manifest.get("version") not in READABLE:
        raise CacheMismatchError(
            f"{mpath} is not a {FORMAT} manifest of a version this code reads "
            f"({', '.join(map(str, READABLE))}): format={manifest.get('format')!r}, "
            f"version={manifest.get('version')!r}. Rebuild the cache: {how_to_build}"
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
        self.version: int = manifest["version"]
        # version 1: class logits, the tail's mass at T = 1 only
        self.kind: CacheKind = manifest.get("kind", "logits")
        self.tail: TailKind | None = manifest.get("tail", "mass")
        self.temperatures: tuple[float, ...] = tuple(manifest.get("temperatures") or (1.0,))
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
        found = {**asdict(self.fingerprint), "seed": self.seed, **self.storage()}
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

    def storage(self) -> dict[str, Any]:
        """What was stored of each answer: the kind, the tail and the temperatures of its mass
        (compared like the fingerprint when a build would reuse this cache)."""
        temps = list(self.temperatures) if self.kind == "logits" else None
        return {"kind": self.kind, "tail": self.tail, "temperatures": temps}

    def serves(self, temperature: float) -> bool:
        """Whether the loss at `temperature` is the teacher's (see `distill.data.cache.topk`):
        dense kinds and 8-bit tails at every temperature, a tail stored as its mass only at the
        temperatures whose mass it holds."""
        if self.kind != "logits" or self.tail == "quantized" or self.topk == self.num_classes:
            return True
        return any(math.isclose(temperature, t, rel_tol=1e-6) for t in self.temperatures)

    def check_serves(self, temperature: float, *, how_to_build: str = HOW_TO_BUILD) -> None:
        """Raise a CacheMismatchError, naming the temperatures this cache serves and how to
        rebuild it, unless it `serves(temperature)`."""
        if self.serves(temperature):
            return
        served, either = _words(self.temperatures, "and"), _words(self.temperatures, "or")
        many = "s" if len(self.temperatures) > 1 else ""
        rest = self.num_classes - self.topk
        what = (
            f"it is a format-version-1 cache, which keeps the top-{self.topk} logits and, of "
            f"the other {rest} classes, only their total mass at temperature 1"
            if self.version == 1
            else f"it keeps the top-{self.topk} logits and, of the other {rest} classes, only "
            f"their total mass at temperature{many} {served}"
        )
        raise CacheMismatchError(
            f"teacher cache {self.path} serves temperature{many} {served} only, but training "
            f"uses temperature {temperature:g}: {what}, which does not give their mass at "
            f"{temperature:g} (the soft loss and its gradient would be off by tens of percent). "
            f"Train at temperature {either}, or rebuild the cache: {how_to_build}. Built with "
            "an 8-bit tail (tail='quantized', the default since format version 2) a cache "
            "serves every temperature; one that stores the tail's mass only serves the "
            "temperatures it was built for."
        )

    def column(self, temperature: float) -> int | None:
        """The column of `tail_lse` holding the tail's mass at `temperature`, if stored."""
        for j, t in enumerate(self.temperatures):
            if math.isclose(temperature, t, rel_tol=1e-6):
                return j
        return None

    def entry(self, index: int, draw: int) -> CacheEntry:
        self._check_draw(draw)
        arrays, row = self._shard(index)

        def read(name: str) -> Tensor:
            return torch.from_numpy(np.array(arrays[name][row, draw]))

        params = self.params(index, draw)
        if self.kind != "logits":
            n = self.num_classes
            zero = torch.zeros(())
            return CacheEntry(params, read("values"), torch.arange(n), torch.empty(0), zero)
        quantized = self.tail == "quantized"
        return CacheEntry(
            params=params,
            values=read("values"),
            indices=read("indices").long(),
            tail_lse=read("tail_lse").float().reshape(-1),  # version 1: () at T = 1
            offset=read("offset").float(),
            tail_codes=read("tail_codes") if quantized else None,
            tail_range=read("tail_range") if quantized else None,
        )

    def logits(
        self, index: int, draw: int, *, raw: bool = False, temperature: float = 1.0
    ) -> Tensor:
        """The dense (C,) float32 teacher output of one draw for a loss at `temperature`
        (`teacher_output` of its `entry`)."""
        return self.teacher_output(self.entry(index, draw), raw=raw, temperature=temperature)

    def teacher_output(
        self, e: CacheEntry, *, raw: bool = False, temperature: float = 1.0
    ) -> Tensor:
        """The dense float32 teacher output of entry `e` for a loss at `temperature`.

        Class logits are reconstructed (`reconstruct_logits`), relative to the row max unless
        `raw`, which adds the stored max back; attribute logits and embeddings are returned as
        stored, exactly. Raises CacheMismatchError if the cache does not serve `temperature`.
        """
        self.check_serves(temperature)
        if self.kind != "logits":
            return e.values
        j = self.column(temperature)
        return reconstruct_logits(
            e.values,
            e.indices,
            None if j is None else e.tail_lse[j],
            self.num_classes,
            e.offset if raw else None,
            temperature=temperature,
            tail_codes=e.tail_codes,
            tail_range=e.tail_range,
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
    kind: CacheKind = "logits",
    temperature: float = 1.0,
) -> TeacherCache:
    """Open the cache at `path` for a run that would cache `expected` and train at
    `temperature` on the teacher's `kind` of output, or say why it cannot.

    `expected` is a `Fingerprint` (every field compared) or an identity (the teacher, dataset,
    transform and class count it describes compared; k and K are whatever the cache holds, as
    training replays what is stored). `labels` name the components in errors, `how_to_build`
    says how to build a cache (both for callers with their own command-line flags).

    Raises FileNotFoundError (no manifest there), CacheMismatchError (the cache was built for
    something else: each differing component with its cached and current values; or it does
    not serve `temperature`, see `TeacherCache.check_serves`) and CacheCorruptError (a shard
    file is missing or fails its checksum).
    """
    root = Path(path)
    cache = TeacherCache(root, read_manifest(root, how_to_build=how_to_build))
    now: Mapping[str, Any]
    current: Identity | None
    if isinstance(expected, Fingerprint):
        now, current = asdict(expected), None
    else:
        now, current = identity_digests(expected), expected
    now = {**now, "kind": kind}
    cache.check_fits(
        now,
        current=current,
        labels=labels,
        advice="Use the settings the cache was built with, or build a cache for these settings "
        f"in another folder: {how_to_build}",
    )
    cache.check_serves(temperature, how_to_build=how_to_build)
    cache.verify(how_to_build=how_to_build)
    return cache
