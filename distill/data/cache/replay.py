"""Training-time replay of a teacher cache: the stored crop, rebuilt, with the stored answer."""

from __future__ import annotations

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

    Items carry "teacher_logits": dense (C,) float32 logits reconstructed from the top-k
    (`output="dense"`; the Distiller then skips the teacher; relative to the row max, which no
    softmax-based loss can tell apart, or on the teacher's own scale with `raw=True` for losses
    that read logit values, e.g. MSE on logits), or (`output="topk"`) the compact
    "teacher_topk_values" (k,) fp16, "teacher_topk_indices" (k,) int64 and "teacher_tail_lse" ()
    to move fewer bytes to the device and densify there with `densify_batch`.
    """

    def __init__(
        self,
        dataset: ReplayableDataset,
        cache: TeacherCache,
        *,
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
        self.dataset = dataset
        self.cache = cache
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
        d = self.draw_for(index)
        e = self.cache.entry(index, d)
        item = dict(self.dataset.replay(index, e.params))
        item.pop("teacher_input", None)
        if self.output == "dense":
            item["teacher_logits"] = reconstruct_logits(
                e.values,
                e.indices,
                e.tail_lse,
                self.cache.num_classes,
                e.offset if self.raw else None,
            )
        else:
            item["teacher_topk_values"] = e.values
            item["teacher_topk_indices"] = e.indices
            item["teacher_tail_lse"] = e.tail_lse
        return item


def densify_batch(batch: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Turn a collated `output="topk"` batch into one with dense "teacher_logits" (B, C),
    on whatever device the batch is (call it after moving the batch to the GPU)."""
    out = {
        k: v
        for k, v in batch.items()
        if not k.startswith("teacher_topk_") and k != "teacher_tail_lse"
    }
    out["teacher_logits"] = reconstruct_logits(
        batch["teacher_topk_values"],
        batch["teacher_topk_indices"],
        batch["teacher_tail_lse"],
        num_classes,
    )
    return out


def iter_entries(cache: TeacherCache) -> Iterator[tuple[int, int, CacheEntry]]:
    """Every (index, draw, entry) of a cache, in order (for inspection and tests)."""
    for i in range(len(cache)):
        for d in range(cache.crops):
            yield i, d, cache.entry(i, d)
