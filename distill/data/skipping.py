"""Skip-and-count for bad samples, across DataLoader worker processes: the one skipping
system of the project (the Distiller, the recipes and the teacher cache all use it).

A bad image raises `BadImageError` inside a dataset's `__getitem__`, usually in a DataLoader worker.
`SkipBadSamples` turns it into a `Skipped` marker, or into the next good sample with the skip
recorded (`replace=True`), or re-raises (`strict=True`). The collate function
`collate_skipping` drops the markers and carries the names in the batch under `"skipped"`: that
is how the record travels from the workers to the main process. There, `take_skipped` (or the
`SkipLogLoader` wrapper) moves it into a `SkipLog`, which prints a report by reason at the end
and can be gathered across distributed ranks. The Distiller does this for every batch, keeps
the log in its checkpoints, and writes it to `skipped.json` and metrics.json's `skipped_images`.

`SkipBadReplays` does the same for a replayable dataset (the teacher cache's `draw`/`replay`):
while the files stay as they are, the stand-in drawn when the cache is built is the one
replayed when training reads it, so a crop and its cached teacher answer still agree.

    ds = SkipBadSamples(dataset, strict=args.strict_data)
    loader = DataLoader(ds, batch_size=..., collate_fn=collate_skipping, num_workers=...)
    log = SkipLog()
    for batch in SkipLogLoader(loader, log): ...
    print(log.all_gather().report())
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torch.utils.data import default_collate as _default_collate

from distill.data.images import BadImageError

SKIPPED_KEY = "skipped"
MAX_CONSECUTIVE_BAD = 64  # replace mode: more unreadable files in a row than this is an error


@dataclass(frozen=True)
class Skipped:
    """Stands in for a sample that could not be loaded."""

    path: str
    reason: str
    detail: str = ""

    @classmethod
    def from_error(cls, e: BadImageError) -> Skipped:
        return cls(e.path, e.reason, e.detail)


class SkipBadSamples(Dataset[Any]):
    """Wrap a map-style dataset so that a `BadImageError` does not end the run.

    strict=True: re-raise (`--strict-data`).
    replace=False (drop): return a `Skipped` marker; `collate_skipping` drops it, so that
        batch is smaller (right for evaluation: nothing is counted twice).
    replace=True: return the next good sample (index + 1, + 2, ... up to `max_tries`) with the
        skip recorded in it, so every batch keeps its size. Use it for training under several
        processes, where an empty batch on one rank would stall the others.

    Attribute access falls through to the wrapped dataset (`classes`, `num_classes`, ...).
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        *,
        strict: bool = False,
        replace: bool = False,
        max_tries: int = MAX_CONSECUTIVE_BAD,
    ) -> None:
        self.dataset = dataset
        self.strict = strict
        self.replace = replace
        self.max_tries = max_tries

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if not self.replace:
            try:
                return self.dataset[index]
            except BadImageError as e:
                if self.strict:
                    raise
                return Skipped.from_error(e)
        return first_readable(
            self.dataset.__getitem__, index, len(self), strict=self.strict, max_tries=self.max_tries
        )

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "strict", "replace", "max_tries"):  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def first_readable(
    fn: Callable[[int], Any],
    index: int,
    n: int,
    *,
    strict: bool = False,
    max_tries: int = MAX_CONSECUTIVE_BAD,
) -> Any:
    """`fn(index)`, or, when that image is unreadable, `fn` of the next readable index (index
    + 1, + 2, ... modulo `n`), with the skipped files recorded under "skipped" in the returned
    dict (a non-dict sample has nowhere to carry them). `strict` re-raises the first failure;
    more than `max_tries` unreadable files in a row raise `BadImageError` (a broken dataset,
    not a few bad files)."""
    skipped: list[Skipped] = []
    for k in range(min(n, max_tries)):
        try:
            sample = fn((index + k) % n)
        except BadImageError as e:
            if strict:
                raise
            skipped.append(Skipped.from_error(e))
            continue
        if skipped and isinstance(sample, Mapping):
            sample = dict(sample)
            sample[SKIPPED_KEY] = [
                *sample.get(SKIPPED_KEY, []),
                *((s.path, s.reason) for s in skipped),
            ]
        return sample
    first = skipped[0] if skipped else Skipped("?", "unreadable")
    raise BadImageError(
        first.path,
        first.reason,
        f"{len(skipped)} images in a row could not be read; check the dataset",
    )


class SkipBadReplays:
    """A replayable dataset (`draw(index, generator)`, `replay(index, params)`, see
    distill.data.teacher_cache) whose unreadable items are replaced by the next readable one,
    in `draw` and `replay` alike, with the skip recorded in the item.

    An unreadable file fails before the generator is used, so the stand-in draws from a fresh
    generator: the cache build and its replay pick the same stand-in and the same crop.
    """

    def __init__(self, dataset: Any, *, strict: bool = False) -> None:
        self.dataset = dataset
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset)

    def draw(self, index: int, generator: Any) -> Any:
        def one(i: int) -> Any:
            params, item = self.dataset.draw(i, generator)
            return {"params": params, "item": item}

        out = first_readable(one, index, len(self), strict=self.strict)
        item = dict(out["item"])
        if SKIPPED_KEY in out:
            item[SKIPPED_KEY] = out[SKIPPED_KEY]
        return out["params"], item

    def replay(self, index: int, params: Any) -> Any:
        return first_readable(
            lambda i: self.dataset.replay(i, params), index, len(self), strict=self.strict
        )

    def data_signature(self) -> str:
        return str(self.dataset.data_signature())

    def transform_config(self) -> Any:
        return self.dataset.transform_config()

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "strict"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def collate_skipping(samples: Sequence[Any]) -> dict[str, Any]:
    """`default_collate` over the good samples; `batch["skipped"]` lists (path, reason) of the rest.

    Samples are dicts (tuples are read as (input, target)). A batch whose samples were all bad
    holds only "skipped"; `SkipLogLoader` drops it.
    """
    kept = []
    skipped: list[tuple[str, str]] = []
    for s in samples:
        if isinstance(s, Skipped):
            skipped.append((s.path, s.reason))
        elif isinstance(s, Mapping) and SKIPPED_KEY in s:
            # a replacement sample carrying the skips it stands in for
            skipped.extend(tuple(x) for x in s[SKIPPED_KEY])  # type: ignore[misc]
            kept.append({k: v for k, v in s.items() if k != SKIPPED_KEY})
        else:
            kept.append(s)
    batch: dict[str, Any] = {}
    if kept:
        collated = _default_collate(kept)
        if isinstance(collated, Mapping):
            batch.update(collated)
        elif isinstance(collated, (list, tuple)):
            batch["input"] = collated[0]
            if len(collated) > 1:
                batch["target"] = collated[1]
        else:
            batch["input"] = collated
    batch[SKIPPED_KEY] = skipped
    return batch


class SkipLog:
    """Counts of skipped files, by (path, reason)."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def add(self, path: str, reason: str, n: int = 1) -> None:
        self.counts[(str(path), str(reason))] += n

    def update(self, skipped: Iterable[Sequence[str]]) -> None:
        for path, reason in skipped:
            self.add(path, reason)

    def merge(self, other: SkipLog) -> SkipLog:
        self.counts.update(other.counts)
        return self

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __len__(self) -> int:
        return self.total

    def __bool__(self) -> bool:
        return bool(self.counts)

    def by_reason(self) -> dict[str, list[str]]:
        """reason -> sorted unique file names."""
        out: dict[str, set[str]] = {}
        for path, reason in self.counts:
            out.setdefault(reason, set()).add(path)
        return {r: sorted(p) for r, p in sorted(out.items())}

    def to_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "files": [
                {"path": p, "reason": r, "count": n} for (p, r), n in sorted(self.counts.items())
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SkipLog:
        log = cls()
        for f in d.get("files", []):
            log.add(f["path"], f["reason"], int(f["count"]))
        return log

    def write_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def report(self, max_files: int = 20) -> str:
        """A human-readable summary: counts by reason, then up to `max_files` names each."""
        if not self.counts:
            return "skipped images: none"
        reasons = self.by_reason()
        per_reason = Counter[str]()
        for (_p, r), n in self.counts.items():
            per_reason[r] += n
        lines = [
            f"skipped images: {self.total} skip(s) of {len(self.counts)} file(s) "
            "(rerun with --strict-data to stop at the first one)"
        ]
        for reason, paths in reasons.items():
            lines.append(f"  {reason}: {per_reason[reason]} skip(s), {len(paths)} file(s)")
            lines.extend(f"    {p}" for p in paths[:max_files])
            if len(paths) > max_files:
                lines.append(f"    ... and {len(paths) - max_files} more")
        return "\n".join(lines)

    def all_gather(self) -> SkipLog:
        """The union of every rank's log under torch.distributed (this log when not distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.to_dict())
        out = SkipLog()
        for d in gathered:
            out.merge(SkipLog.from_dict(d))
        return out


def take_skipped(batch: Any, log: SkipLog, *, key: str = SKIPPED_KEY) -> tuple[Any, bool]:
    """Move a batch's skip record into `log`. Returns (the batch without it, whether nothing
    is left). In a training loop: `batch, empty = take_skipped(raw, log)`; `if empty: continue`.
    """
    if not (isinstance(batch, Mapping) and key in batch):
        return batch, False
    log.update(batch[key])
    rest = {k: v for k, v in batch.items() if k != key}
    return rest, not rest


class SkipLogLoader:
    """Iterate a loader built with `collate_skipping`: record skips in `log`, drop empty batches.

    Other attributes (`dataset`, `sampler`, `set_epoch`, ...) fall through to the wrapped loader,
    so it can wrap the loader that `accelerator.prepare` returns.
    """

    def __init__(self, loader: Iterable[Any], log: SkipLog, *, key: str = SKIPPED_KEY) -> None:
        self.loader = loader
        self.log = log
        self.key = key

    def __iter__(self) -> Iterator[Any]:
        for raw in self.loader:
            batch, empty = take_skipped(raw, self.log, key=self.key)
            if not empty:
                yield batch

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "log", "key"):
            raise AttributeError(name)
        return getattr(self.loader, name)
