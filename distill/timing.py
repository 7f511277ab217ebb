"""What a run costs in time and memory, measured the same way everywhere.

`Throughput` times training steps only: the first optimizer step (compilation, cuDNN autotune,
worker start-up) is left out, and so is the time spent evaluating and writing checkpoints,
which is reported on its own (`eval_s`, `checkpoint_s`). Without that, a one-second evaluation
per epoch of a small run made its images/s 17x lower than the training really ran.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["Throughput", "device_name", "peak_memory"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Training images per second, excluding the warm-up step and paused intervals."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.begin = time.perf_counter()
        self.start: float | None = None  # end of the first (warm-up) step
        self.first_images = 0
        self.first_s = 0.0
        self.images = 0  # images of the timed steps
        self.paused = 0.0  # paused seconds since `start`
        self.totals = {"eval": 0.0, "checkpoint": 0.0}

    def step_done(self, images: int) -> None:
        """Count one optimizer step of `images` images (all processes together)."""
        if self.start is None:
            _sync(self.device)
            self.start = time.perf_counter()
            self.first_images = images
            self.first_s = self.start - self.begin - self.totals["eval"] - self.totals["checkpoint"]
            self.paused = 0.0
            return
        self.images += images

    @contextmanager
    def pause(self, what: str) -> Iterator[None]:
        """Time `what` ("eval" or "checkpoint") on its own, outside the training rate."""
        _sync(self.device)
        t = time.perf_counter()
        try:
            yield
        finally:
            _sync(self.device)
            dt = time.perf_counter() - t
            self.totals[what] = self.totals.get(what, 0.0) + dt
            self.paused += dt

    def train_seconds(self) -> float:
        """Seconds of timed training (after the warm-up step, pauses excluded)."""
        if self.start is None:
            return 0.0
        _sync(self.device)
        return max(time.perf_counter() - self.start - self.paused, 0.0)

    def images_per_s(self, seconds: float | None = None) -> float:
        """The training rate over `seconds` of timed training (default: so far); a run of one
        step can only report that step, warm-up and all."""
        seconds = self.train_seconds() if seconds is None else seconds
        if self.images and seconds > 0:
            return self.images / seconds
        return self.first_images / self.first_s if self.first_s > 0 else 0.0

    def record_fields(self) -> dict[str, float]:
        """The run record's timing fields (distill.run_record)."""
        seconds = self.train_seconds()  # once, so that images_per_s * train_s is the images
        return {
            "images_per_s": self.images_per_s(seconds),
            "wall_s": time.perf_counter() - self.begin,
            "train_s": seconds,
            "eval_s": self.totals["eval"],
            "checkpoint_s": self.totals["checkpoint"],
        }


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, kind): CUDA's max allocated on a GPU, the process's max RSS on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_max_rss"


def device_name(device: Any = "cpu") -> str:
    """ "NVIDIA H200", or the CPU as "cpu (<model name>, N cores)" (/proc/cpuinfo's model
    name where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu ({name}, {os.cpu_count()} cores)"
