"""Writing a cache's shards: one `.npy` file per array, each written atomically and recorded
with its sha256 (and the unreadable files its items stood in for) in `progress.json` as soon as
the shard is complete, so that an interrupted build keeps what it finished (`resumable_shards`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.cache.layout import array_layout
from distill.data.cache.store import PROGRESS
from distill.data.skipping import SkipLog
from distill.files import atomic_write, sha256_file, write_json_atomic

__all__ = ["ShardWriter", "resumable_shards", "save_npy"]


def save_npy(path: Path, array: np.ndarray) -> str:
    atomic_write(path, lambda f: np.save(f, array))
    return sha256_file(path)


class ShardWriter:
    """Collects the draws of each shard in memory and writes the shard once it is complete,
    recording it in progress.json (`done` holds the shards a previous build finished)."""

    def __init__(self, out: Path, header: dict[str, Any], done: dict[int, dict[str, Any]]) -> None:
        self.out, self.header, self.done = out, header, done
        self.n, self.crops = header["num_items"], header["crops"]
        self.shard_size = header["shard_size"]
        self.layout = array_layout(header)  # name -> (per-draw shape, dtype)
        self.buffers: dict[int, dict[str, np.ndarray]] = {}
        self.skips: dict[int, SkipLog] = {}

    def _stop(self, s: int) -> int:
        return min((s + 1) * self.shard_size, self.n)

    def todo(self) -> list[int]:
        """The flat draw numbers of the shards still to write, in order."""
        shards = [s for s in range(math.ceil(self.n / self.shard_size)) if s not in self.done]
        return [
            f
            for s in shards
            for f in range(s * self.shard_size * self.crops, self._stop(s) * self.crops)
        ]

    def _buffer(self, s: int) -> dict[str, np.ndarray]:
        if s not in self.buffers:
            rows = self._stop(s) - s * self.shard_size
            self.buffers[s] = {
                name: np.zeros((rows, self.crops, *shape), dtype)
                for name, (shape, dtype) in self.layout.items()
            }
        return self.buffers[s]

    def add(self, flat: list[int], arrays: dict[str, np.ndarray], skipped: list[list[Any]]) -> None:
        """Place a batch of draws: numbers `flat`, their arrays (name -> (B, ...), every array
        of `array_layout`: the answers and the parameters), and the (path, reason) of the
        unreadable files each draw's item stood in for."""
        if set(arrays) != set(self.layout):
            raise ValueError(f"expected arrays {sorted(self.layout)}, got {sorted(arrays)}")
        for j, f in enumerate(flat):
            index, d = divmod(f, self.crops)
            s, row = divmod(index, self.shard_size)
            buf = self._buffer(s)
            self.skips.setdefault(s, SkipLog()).update(skipped[j])
            for name in self.layout:
                buf[name][row, d] = arrays[name][j]
            # Flat order is sequential: a shard is complete once its last draw arrives.
            if f == self._stop(s) * self.crops - 1:
                self._flush(s, self.buffers.pop(s))

    def _flush(self, s: int, buf: dict[str, np.ndarray]) -> None:
        files = {}
        for name in self.layout:
            fname = f"shard_{s:05d}.{name}.npy"
            sha = save_npy(self.out / fname, buf[name])
            files[name] = {
                "file": fname,
                "sha256": sha,
                "shape": list(buf[name].shape),
                "dtype": str(buf[name].dtype),
            }
        start = s * self.shard_size
        skipped = self.skips.pop(s, SkipLog()).to_dict()
        self.done[s] = {
            "index": s,
            "start": start,
            "stop": self._stop(s),
            "files": files,
            "skipped": skipped,
        }
        done = [self.done[k] for k in sorted(self.done)]
        write_json_atomic(self.out / PROGRESS, {**self.header, "shards": done}, sort_keys=False)

    def shards(self) -> list[dict[str, Any]]:
        """Every shard's record, once all are written."""
        if self.buffers:
            raise RuntimeError(f"shards {sorted(self.buffers)} were not completed; rerun to resume")
        return [self.done[k] for k in sorted(self.done)]


def resumable_shards(out: Path, header: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """The shards an interrupted build with the same header finished, files still intact."""
    ppath = out / PROGRESS
    if not ppath.exists():
        return {}
    prog = json.loads(ppath.read_text())
    if {k: prog.get(k) for k in header} != header:
        return {}
    return {
        s["index"]: s
        for s in prog["shards"]
        if all(
            (out / e["file"]).is_file() and sha256_file(out / e["file"]) == e["sha256"]
            for e in s["files"].values()
        )
    }
