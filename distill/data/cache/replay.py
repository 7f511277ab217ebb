"""Training-time replay of a teacher cache: the stored crop, rebuilt, with the stored answer."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Literal

import torch

from distill.data.cache.replayable import ReplayableDataset, draw_generator
from distill.data.cache.store import CacheEntry, TeacherCache
from distill.data.cache.topk import reconstruct_logits

__all__ = ["CachedDataset", "densify_batch", "iter_entries"]


class CachedDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """Replays cached draws: the student gets the exact crop the teacher saw, plus its answer.

    For epoch e, item i uses draw `e mod K` (`choice="cycle"`) or a draw chosen at random from
    (seed, e, i) (`choice="random"`). Call `set_epoch(e)` every epoch; the epoch lives in shared
    memory, so persistent DataLoader workers see it.

    `temperature` is the one the loss uses: a cache that cannot serve it is refused here,
    before training (`TeacherCache.check_serves`). Items carry "teacher_logits", the teacher's
    dense (C,) float32 output (`output="dense"`; the Distiller then skips the teacher): for
    class logits reconstructed for `temperature` (`TeacherCache.logits`), relative to the row
    max, which no softmax-based loss can tell apart, or on the teacher's own scale with
    `raw=True` for losses that read logit values (e.g. MSE on logits); attribute logits and
    embeddings exactly as stored. Or, for class logits, `output="topk"`: the compact
    "teacher_topk_values" (k,) fp16, "teacher_topk_indices" (k,) int64, "teacher_tail_lse" ()
    (the tail's mass at `temperature`, -inf if not stored), "teacher_temperature" () and, with
    an 8-bit tail, "teacher_tail_codes" (C - k,) uint8 and "teacher_tail_range" (2,), to move
    fewer bytes to the device and densify there with `densify_batch`.
    """

    def __init__(
        self,
        dataset: ReplayableDataset,
        cache: TeacherCache,
        *,
        temperature: float = 1.0,
        choice: Literal["cycle", "random"] = "cycle",
        output: Literal["dense", "topk"] = "dense",
        seed: int = 0,
        raw: bool = False,
    ) -> None:
        if len(dataset) != len(cache):
            raise ValueError(
                f"the dataset has {len(dataset)} items but the cache {cache.path} has "
                f"{len(cache)}; build the cache for this dataset"
            )
        if choice not in ("cycle", "random"):
            raise ValueError(f"choice must be 'cycle' or 'random', got {choice!r}")
        if output not in ("dense", "topk"):
            raise ValueError(f"output must be 'dense' or 'topk', got {output!r}")
        if output == "topk" and cache.kind != "logits":
            raise ValueError(
                f"output='topk' is for caches of class logits; {cache.path} holds whole "
                f"{cache.kind} outputs: use output='dense'"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        cache.check_serves(temperature)
        self.dataset = dataset
        self.cache = cache
        self.temperature = float(temperature)
        self.choice = choice
        self.output = output
        self.seed = seed
        self.raw = raw
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def draw_for(self, index: int) -> int:
        e = self.epoch
        if self.choice == "cycle":
            return e % self.cache.crops
        g = draw_generator(self.seed, index, e)
        return int(torch.randint(self.cache.crops, (), generator=g))

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        c = self.cache
        e = c.entry(index, self.draw_for(index))
        item = dict(self.dataset.replay(index, e.params))
        item.pop("teacher_input", None)
        if self.output == "dense":
            t = self.temperature
            item["teacher_logits"] = c.teacher_output(e, raw=self.raw, temperature=t)
            return item
        j = c.column(self.temperature)
        item["teacher_topk_values"] = e.values
        item["teacher_topk_indices"] = e.indices
        item["teacher_tail_lse"] = e.tail_lse[j] if j is not None else torch.tensor(-math.inf)
        item["teacher_temperature"] = torch.tensor(self.temperature)
        if e.tail_codes is not None and e.tail_range is not None:
            item["teacher_tail_codes"] = e.tail_codes
            item["teacher_tail_range"] = e.tail_range
        return item


_TOPK_KEYS = (
    "teacher_topk_values", "teacher_topk_indices", "teacher_tail_lse", "teacher_temperature",
    "teacher_tail_codes", "teacher_tail_range",
)  # fmt: skip


def densify_batch(batch: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Turn a collated `output="topk"` batch into one with dense "teacher_logits" (B, C),
    on whatever device the batch is (call it after moving the batch to the GPU). A batch
    without "teacher_temperature" (one built by hand from `compress_topk`) is for T = 1."""
    out = {k: v for k, v in batch.items() if k not in _TOPK_KEYS}
    temps = batch.get("teacher_temperature")  # (B,), one value: kept on the device, no sync
    t = 1.0 if temps is None else temps.reshape(-1)[0].float()
    # with 8-bit codes, a tail mass of -inf (not stored at this temperature) shifts nothing
    out["teacher_logits"] = reconstruct_logits(
        batch["teacher_topk_values"],
        batch["teacher_topk_indices"],
        batch["teacher_tail_lse"],
        num_classes,
        temperature=t,
        tail_codes=batch.get("teacher_tail_codes"),
        tail_range=batch.get("teacher_tail_range"),
    )
    return out


def iter_entries(cache: TeacherCache) -> Iterator[tuple[int, int, CacheEntry]]:
    """Every (index, draw, entry) of a cache, in order (for inspection and tests)."""
    for i in range(len(cache)):
        for d in range(cache.crops):
            yield i, d, cache.entry(i, d)
