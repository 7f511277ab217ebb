"""Building a teacher cache: K augmentation draws per item, the teacher's answer on each.

What is stored of an answer depends on the teacher's `kind` of output and, for class logits,
on `tail` and `temperatures` (`distill.data.cache.topk`; `store.array_layout`): the top-k
logits with an 8-bit tail (the default, the teacher's loss at every temperature) or with the
tail's mass at each listed temperature; attribute logits and embeddings whole, in float32.

Draw d of item i uses `draw_generator(seed, i, d)`, so the cache does not depend on batch
size, workers or device. The draws run in flat order (i * K + d); a shard's arrays are written
as soon as its last draw arrives, and `progress.json` lists the finished shards with their
checksums, so an interrupted build resumes from its last complete shard. `manifest.json` is
written last: a folder without one holds no cache.
"""

from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.data.cache.fingerprint import (
    Fingerprint,
    Identity,
    default_identity,
    jsonable,
)
from distill.data.cache.layout import (
    RECONSTRUCTION,
    CacheKind,
    Storage,
    encode,
    stored_topk,
)
from distill.data.cache.replayable import ReplayableDataset, draw_generator
from distill.data.cache.shards import ShardWriter, resumable_shards
from distill.data.cache.store import (
    FORMAT,
    MANIFEST,
    PROGRESS,
    VERSION,
    TeacherCache,
    read_manifest,
)
from distill.data.cache.topk import TailKind
from distill.data.skipping import SKIPPED_KEY
from distill.files import progress_bar, write_json_atomic
from distill.types import to_device

__all__ = ["build_cache", "build_or_reuse"]

OVERWRITE_ADVICE = "Pass overwrite=True (--overwrite) to replace it, or choose another folder."
REUSE_ADVICE = "Choose another folder, or delete this one to rebuild it."


# ------------------------------------------------------------------------------ the teacher


def _takes_prepared(teacher: nn.Module) -> bool:
    try:
        return "prepared" in inspect.signature(teacher.forward).parameters
    except (TypeError, ValueError):
        return False


def _teacher_logits(teacher: nn.Module, x: Tensor, prepared: bool) -> Tensor:
    kwargs = {"prepared": True} if prepared and _takes_prepared(teacher) else {}
    out = teacher(x, **kwargs)
    out = getattr(out, "output", out)  # distill.types.Outputs or a plain tensor
    if not isinstance(out, Tensor) or out.ndim != 2:
        raise ValueError(
            "the teacher must return (B, C) logits (or Outputs with such an .output) to be "
            f"cached, got {type(out).__name__} {getattr(out, 'shape', '')}"
        )
    return out


@dataclass(frozen=True)
class _Probe:
    """What item 0's first draw tells: the parameter names (ints, floats) and the class count."""

    names_int: list[str]
    names_float: list[str]
    num_classes: int


def _probe(
    teacher: nn.Module, dataset: ReplayableDataset, seed: int, device: torch.device, amp: bool
) -> _Probe:
    params, item = dataset.draw(0, draw_generator(seed, 0, 0))
    names_int = [k for k, v in params.items() if isinstance(v, (bool, int, np.integer))]
    x = item.get("teacher_input", item["input"])
    # one sample as a batch of one; an ensemble's views are a tuple, one per member
    one = tuple(v[None] for v in x) if isinstance(x, (tuple, list)) else x[None]
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp),
    ):
        logits = _teacher_logits(teacher, to_device(one, device), "teacher_input" in item)
    return _Probe(names_int, [k for k in params if k not in names_int], logits.shape[1])


# -------------------------------------------------------------------------- what is cached


def _check_sizes(num_items: int, *, crops: int, batch_size: int, shard_size: int) -> None:
    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    if num_items == 0:
        raise ValueError("the dataset is empty: nothing to cache")


def _resolve(
    teacher: nn.Module,
    dataset: ReplayableDataset,
    num_classes: int,
    *,
    topk: int,
    crops: int,
    fingerprint: Fingerprint | None,
    identity: Identity | None,
) -> tuple[Fingerprint, Identity | None]:
    """The build's fingerprint and the identity to store (see `build_cache`)."""
    if identity is not None:
        fp = Fingerprint.from_identity(identity, topk=topk, crops=crops)
        if fingerprint is not None and fingerprint != fp:
            raise ValueError(
                "the fingerprint and the identity given to build_cache disagree on "
                f"{', '.join(fingerprint.differences(fp))}: pass the identity alone "
                "(the fingerprint follows from it)"
            )
    elif fingerprint is not None:
        fp = fingerprint
    else:
        identity = default_identity(teacher, dataset, num_classes)
        fp = Fingerprint.from_identity(identity, topk=topk, crops=crops)
    if (fp.topk, fp.crops, fp.num_classes) != (topk, crops, num_classes):
        raise ValueError(
            f"the fingerprint is for topk={fp.topk}, crops={fp.crops}, num_classes="
            f"{fp.num_classes}, but this build has topk={topk}, crops={crops} and a teacher "
            f"with {num_classes} classes: describe the cache this build writes"
        )
    return fp, identity


def _header(
    fp: Fingerprint,
    identity: Identity | None,
    probe: _Probe,
    storage: Storage,
    *,
    num_items: int,
    seed: int,
    shard_size: int,
) -> dict[str, Any]:
    """What progress.json and manifest.json share; a build resumes only under the same one."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": asdict(fp),
        "digest": fp.digest,
        "identity": None if identity is None else jsonable(dict(identity)),
        "num_items": num_items,
        "crops": fp.crops,
        "topk": fp.topk,
        "num_classes": fp.num_classes,
        **storage.record(),
        "seed": seed,
        "shard_size": shard_size,
        "param_names": {"int": probe.names_int, "float": probe.names_float},
        "index_dtype": "int16" if fp.num_classes <= np.iinfo(np.int16).max else "int32",
        "reconstruction": RECONSTRUCTION[storage.tail],
    }


def _reuse(
    out: Path,
    fp: Fingerprint,
    identity: Identity | None,
    storage: Storage,
    *,
    seed: int,
    num_items: int,
    labels: dict[str, str] | None,
    advice: str,
) -> TeacherCache:
    """The finished cache in `out` if it was built for `fp`, `storage` and `seed` (checksums
    verified); a CacheMismatchError naming what differs otherwise."""
    cache = TeacherCache(out, read_manifest(out))
    current = None if identity is None else {"images": num_items, **identity}
    now = {**asdict(fp), "seed": seed, **storage.record()}
    cache.check_fits(now, current=current, labels=labels, advice=advice)
    cache.verify()
    return cache


# ------------------------------------------------------------------------------- the draws


class _Draws(torch.utils.data.Dataset[dict[str, Any]]):
    """Flat view (index * K + draw) of a replayable dataset, for the build's DataLoader."""

    def __init__(
        self, dataset: ReplayableDataset, crops: int, seed: int, probe: _Probe, flat: list[int]
    ) -> None:
        self.dataset, self.crops, self.seed = dataset, crops, seed
        self.names_int, self.names_float, self.flat = probe.names_int, probe.names_float, flat

    def __len__(self) -> int:
        return len(self.flat)

    def __getitem__(self, i: int) -> dict[str, Any]:
        flat = self.flat[i]
        index, draw = divmod(flat, self.crops)
        params, item = self.dataset.draw(index, draw_generator(self.seed, index, draw))
        names = set(self.names_int) | set(self.names_float)
        if set(params) != names:
            raise ValueError(
                f"item {index} drew parameters {sorted(params)} but the first item drew "
                f"{sorted(names)}: every draw must return the same parameter names"
            )
        x = item.get("teacher_input")
        # unreadable files an item stood in for (SkipBadReplays), counted once per item
        skipped = item.get(SKIPPED_KEY, []) if draw == 0 else []
        return {
            "flat": flat,
            "skipped": json.dumps([list(s) for s in skipped]),  # a str: collates as a list
            "prepared": x is not None,
            "x": item["input"] if x is None else x,  # (C, H, W)
            "pi": torch.tensor([int(params[n]) for n in self.names_int], dtype=torch.int64),
            "pf": torch.tensor([float(params[n]) for n in self.names_float], dtype=torch.float32),
        }


def _run_teacher(
    teacher: nn.Module,
    loader: torch.utils.data.DataLoader[Any],
    writer: ShardWriter,
    *,
    device: torch.device,
    amp: bool,
    bar: Any,
) -> None:
    num_classes = writer.header["num_classes"]
    with torch.inference_mode():
        for batch in loader:
            x = to_device(batch["x"], device)  # (B, C, H, W), or one per ensemble member
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = _teacher_logits(teacher, x, bool(batch["prepared"][0]))  # (B, classes)
            if logits.shape[1] != num_classes:
                raise ValueError(
                    f"the teacher returned {num_classes} classes for item 0, then {logits.shape[1]}"
                )
            # stored from float32 outputs, whatever precision the teacher ran in
            arrays = encode(logits.float(), writer.header)
            arrays.update(params_int=batch["pi"].numpy(), params_float=batch["pf"].numpy())
            writer.add(batch["flat"].tolist(), arrays, [json.loads(x) for x in batch["skipped"]])
            bar.update(len(batch["flat"]))


def _write_manifest(
    out: Path,
    header: dict[str, Any],
    writer: ShardWriter,
    *,
    build: dict[str, Any],
    teacher: nn.Module,
) -> None:
    """The manifest, written last: from now on the folder holds a cache."""
    manifest = {
        **header,
        "shards": writer.shards(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build": build,
        "teacher_meta": jsonable(getattr(teacher, "meta", None)),
    }
    write_json_atomic(out / MANIFEST, manifest, sort_keys=False)
    (out / PROGRESS).unlink(missing_ok=True)


# ------------------------------------------------------------------------------ the builds


def _check_kind(teacher: nn.Module, kind: CacheKind) -> None:
    declared = getattr(teacher, "output_kind", None)
    if isinstance(declared, str) and declared != kind:
        raise ValueError(
            f"the teacher outputs {declared}, but the cache is built for kind={kind!r}: pass "
            f"kind={declared!r} (what is stored, and how the loss reads it, depend on it)"
        )


def _write(
    teacher: nn.Module,
    dataset: ReplayableDataset,
    writer: ShardWriter,
    probe: _Probe,
    *,
    batch_size: int,
    device: torch.device,
    num_workers: int,
    progress: bool,
    amp: bool,
) -> dict[str, Any]:
    """Run the teacher over the draws still to write; the build's record."""
    crops, seed = writer.crops, writer.header["seed"]
    flat = writer.todo()
    loader = torch.utils.data.DataLoader(
        _Draws(dataset, crops, seed, probe, flat),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    bar = progress_bar(
        len(flat), desc=f"caching teacher ({crops} crops)", unit="img", enabled=progress
    )
    t0 = time.perf_counter()
    try:
        _run_teacher(teacher, loader, writer, device=device, amp=amp, bar=bar)
    finally:
        bar.close()
    rate = len(flat) / max(time.perf_counter() - t0, 1e-9)
    return {"device": str(device), "batch_size": batch_size, "draws_per_s": round(rate, 1)}


def build_cache(
    teacher: nn.Module,
    dataset: ReplayableDataset,
    out_dir: str | os.PathLike[str],
    *,
    crops: int,
    topk: int | None = None,
    kind: CacheKind = "logits",
    tail: TailKind = "quantized",
    temperatures: Sequence[float] = (1.0,),
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    shard_size: int = 50_000,
    num_workers: int = 0,
    fingerprint: Fingerprint | None = None,
    identity: Identity | None = None,
    overwrite: bool = False,
    progress: bool = True,
    autocast: bool | None = None,
) -> TeacherCache:
    """Run `teacher` over `crops` augmentation draws of every item and write the cache.

    What is stored of each answer: for `kind="logits"` (class logits) the `topk` largest and
    the rest as `tail` says, "quantized" (8 bits each: the loss at every temperature) or
    "mass" (only their total mass at each of `temperatures`, to which 1 is always added: the
    loss at those temperatures only, its gradient approximate; see `distill.data.cache.topk`);
    for "multilabel" and "embedding" all N outputs in float32 (no topk). The cache is
    described by `identity` (stored in the manifest; its fingerprint follows by
    `Fingerprint.from_identity`), or by `fingerprint` alone (nothing readable stored), or, with
    neither, by `default_identity` (the teacher's weights, the data, the transform). If
    `out_dir` already holds a cache with the same fingerprint, storage and seed it is returned
    unchanged; a different one is a CacheMismatchError naming what differs, unless
    `overwrite`. An interrupted build resumes from its last complete shard when rerun with the
    same arguments. `autocast` (default: on for CUDA) runs the teacher under bf16 autocast.
    """
    _check_sizes(len(dataset), crops=crops, batch_size=batch_size, shard_size=shard_size)
    storage = Storage.create(kind, tail, temperatures)
    _check_kind(teacher, kind)
    out, dev = Path(out_dir), torch.device(device)
    amp = dev.type == "cuda" if autocast is None else autocast
    teacher = teacher.to(dev).eval()
    probe = _probe(teacher, dataset, seed, dev, amp)
    k = stored_topk(storage, topk, probe.num_classes)
    fp, identity = _resolve(
        teacher, dataset, probe.num_classes, topk=k, crops=crops, fingerprint=fingerprint,
        identity=identity,
    )  # fmt: skip
    n = len(dataset)
    header = _header(fp, identity, probe, storage, num_items=n, seed=seed, shard_size=shard_size)
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        if not overwrite:
            return _reuse(
                out, fp, identity, storage, seed=seed, num_items=n, labels=None,
                advice=OVERWRITE_ADVICE,
            )  # fmt: skip
        (out / MANIFEST).unlink()
    writer = ShardWriter(out, header, {} if overwrite else resumable_shards(out, header))
    build = _write(
        teacher, dataset, writer, probe, batch_size=batch_size, device=dev,
        num_workers=num_workers, progress=progress, amp=amp,
    )  # fmt: skip
    _write_manifest(out, header, writer, build=build, teacher=teacher)
    return TeacherCache.open(out, fp, verify=False)


def build_or_reuse(
    teacher: nn.Module,
    dataset: ReplayableDataset,
    out_dir: str | os.PathLike[str],
    *,
    identity: Identity,
    crops: int,
    topk: int | None = None,
    kind: CacheKind = "logits",
    tail: TailKind = "quantized",
    temperatures: Sequence[float] = (1.0,),
    seed: int = 0,
    labels: dict[str, str] | None = None,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    shard_size: int = 50_000,
    num_workers: int = 0,
    progress: bool = True,
    autocast: bool | None = None,
) -> TeacherCache:
    """The cache of `teacher` over `dataset` described by `identity`, in `out_dir`.

    A finished cache there with the same fingerprint (`Fingerprint.from_identity(identity,
    topk=topk, crops=crops)`), storage (`kind`, `tail`, `temperatures`, as in `build_cache`)
    and seed is reused, its checksums verified; an interrupted build is resumed; a cache built
    for anything else is refused before the teacher runs, naming each differing component
    (`labels` name them) with its cached and current values. Never overwrites. Raises
    CacheMismatchError (another cache is there), CacheCorruptError (the cache there fails its
    checksums) and ValueError (bad arguments, or an identity whose num_classes is not the
    teacher's).
    """
    out = Path(out_dir)
    storage = Storage.create(kind, tail, temperatures)
    k = stored_topk(storage, topk, int(identity["num_classes"]))
    fp = Fingerprint.from_identity(identity, topk=k, crops=crops)
    if (out / MANIFEST).is_file():  # finished: reused or refused, the teacher need not run
        return _reuse(
            out, fp, identity, storage, seed=seed, num_items=len(dataset), labels=labels,
            advice=REUSE_ADVICE,
        )  # fmt: skip
    return build_cache(
        teacher,
        dataset,
        out,
        crops=crops,
        topk=topk,
        kind=kind,
        tail=tail,
        temperatures=temperatures,
        batch_size=batch_size,
        device=device,
        seed=seed,
        shard_size=shard_size,
        num_workers=num_workers,
        identity=identity,
        progress=progress,
        autocast=autocast,
    )
