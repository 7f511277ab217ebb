"""Data plumbing shared by the recipes: bad-file skipping that survives worker processes and DDP,
loaders, and the batched (GPU) JPEG pipeline for image folders.

An unreadable image (truncated, empty, not an image, too large) is *skipped*: the sample is
replaced by the next readable one, so every batch keeps its size (DDP and the exact-resume
bookkeeping both rely on equal batches), and the file is recorded. Records are appended to
small files under `<output_dir>/skipped/` by whichever process decoded the image (a DataLoader
worker or the training process), then gathered over ranks at the end of the run and printed as a
report (and written to `skipped.json` and metrics.json). `--strict-data` raises instead.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from distill.data import BadImageError, SkipLog, Skipped

MAX_CONSECUTIVE_BAD = 64


class SkipRecorder:
    """Appends (path, reason) records to `<folder>/rank<r>-<pid>.jsonl`; picklable for workers."""

    def __init__(self, folder: str | Path, rank: int) -> None:
        self.folder = Path(folder)
        self.rank = rank

    def record(self, path: str, reason: str, detail: str = "") -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"path": path, "reason": reason, "detail": detail})
        with open(self.folder / f"rank{self.rank}-{os.getpid()}.jsonl", "a") as f:
            f.write(line + "\n")

    def read(self) -> SkipLog:
        """Every process's records (the folder is on the shared output dir, like checkpoints)."""
        log = SkipLog()
        for file in sorted(self.folder.glob("rank*-*.jsonl")):
            for line in file.read_text().splitlines():
                if line.strip():
                    rec = json.loads(line)
                    log.add(rec["path"], rec["reason"])
        return log

    def reset(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


class ReplaceBadSamples(Dataset[Any]):
    """A map-style dataset whose unreadable samples are replaced by the next readable one.

    Attributes of the wrapped dataset (`classes`, `num_classes`, `transform` ...) show through.
    """

    def __init__(self, dataset: Any, recorder: SkipRecorder, *, strict: bool = False) -> None:
        self.dataset = dataset
        self.recorder = recorder
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        n = len(self.dataset)
        first: BadImageError | None = None
        for k in range(min(n, MAX_CONSECUTIVE_BAD)):
            try:
                return self.dataset[(index + k) % n]
            except BadImageError as e:
                if self.strict:
                    raise
                self.recorder.record(e.path, e.reason, e.detail)
                first = first or e
        raise BadImageError(
            first.path if first else "?",
            first.reason if first else "unreadable",
            f"{min(n, MAX_CONSECUTIVE_BAD)} images in a row could not be read; check the dataset",
        )

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "recorder", "strict"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class DropSkippedStream(IterableDataset[Any]):
    """A streaming dataset's `Skipped` markers are recorded and dropped."""

    def __init__(self, dataset: Any, recorder: SkipRecorder) -> None:
        self.dataset = dataset
        self.recorder = recorder

    def __iter__(self) -> Iterator[Any]:
        for item in self.dataset:
            if isinstance(item, Skipped):
                self.recorder.record(item.path, item.reason, item.detail)
                continue
            yield item

    def set_epoch(self, epoch: int) -> None:
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "recorder"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def robust(dataset: Any, recorder: SkipRecorder, *, strict: bool) -> Any:
    if isinstance(dataset, IterableDataset):
        return DropSkippedStream(dataset, recorder)
    return ReplaceBadSamples(dataset, recorder, strict=strict)


def limit(dataset: Any, n: int | None) -> Any:
    """The first `n` samples (map-style datasets; streams are cut by max_steps instead)."""
    if n is None or isinstance(dataset, IterableDataset) or n >= len(dataset):
        return dataset
    sub = Subset(dataset, range(n))
    for attr in ("classes", "num_classes", "attr_names", "num_outputs"):
        if hasattr(dataset, attr):
            setattr(sub, attr, getattr(dataset, attr))
    return sub


def make_loader(
    dataset: Any,
    batch_size: int,
    *,
    train: bool,
    workers: int,
    seed: int,
    collate_fn: Any = None,
) -> DataLoader[Any]:
    """A plain DataLoader (accelerate shards it per process when the Distiller prepares it)."""
    iterable = isinstance(dataset, IterableDataset)
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and not iterable,
        drop_last=train and not iterable,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=torch.cuda.is_available() and collate_fn is None,
        persistent_workers=False,  # exact resume: workers must see the current epoch
        generator=g if train and not iterable else None,
    )


# ------------------------------------------------------------------- batched JPEG pipeline


class EncodedFolder(Dataset[dict[str, Any]]):
    """(bytes, label) items of an ImageFolder-layout `samples` list; empty or missing files are
    skipped like everywhere else (replaced by the next file and recorded).

    Each item carries a "crop_seed" drawn from torch's random state, which the Distiller seeds
    per (seed, epoch, index): the batch's crops then change per epoch and replay exactly on
    resume.
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str]) -> None:
        self.samples = samples
        self.classes = classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, target = self.samples[index]
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise BadImageError(
                path, "missing" if not Path(path).exists() else "unreadable", str(e)
            ) from None
        if not data:
            raise BadImageError(path, "empty", "0 bytes")
        return {
            "data": torch.frombuffer(bytearray(data), dtype=torch.uint8),
            "target": target,
            "index": index,
            "crop_seed": int(torch.randint(0, 2**62, ())),
        }


class EncodedBatch:
    """A batch of undecoded images that decodes itself when moved to a device.

    The DataLoader workers only read bytes (`EncodedCollate`); accelerate's prepared loader then
    calls `.to(device)` on every batch in the training process, which is where decoding and
    augmentation run: nvJPEG on CUDA, torchvision's CPU decoders otherwise. The batch becomes
    {"input": (B, 3, S, S) normalised, "target", "index"}.
    """

    def __init__(self, samples: list[dict[str, Any]], transform: Any) -> None:
        from distill.data.gpu_pipeline import collate_encoded

        b = collate_encoded(samples)
        self.data: list[torch.Tensor] = b["data"]
        self.target: torch.Tensor = b["target"]
        self.index: torch.Tensor = b["index"]
        self.crop_seeds = [int(s["crop_seed"]) for s in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def to(self, device: Any, non_blocking: bool = False) -> dict[str, Any]:
        self.transform.device = torch.device(device)
        try:
            x = self.transform(self.data, self.crop_seeds, 0)
        except ValueError as e:
            raise BadImageError(
                "a file in this batch",
                "unreadable",
                f"{e}; --gpu-pipeline off decodes with PIL, which skips and counts such files",
            ) from None
        return {
            "input": x,
            "target": self.target.to(device, non_blocking=non_blocking),
            "index": self.index.to(device, non_blocking=non_blocking),
        }


class EncodedCollate:
    """collate_fn of the batched pipeline (runs in the workers): bytes only."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, samples: list[dict[str, Any]]) -> EncodedBatch:
        return EncodedBatch(samples, self.transform)


def encoded_folder_loader(
    samples: list[tuple[str, int]],
    classes: list[str],
    transform: Any,
    recorder: SkipRecorder,
    *,
    strict: bool,
    batch_size: int,
    train: bool,
    workers: int,
    seed: int,
    limit_n: int | None,
) -> DataLoader[Any]:
    """A DataLoader for the batched pipeline; it relies on accelerate's device placement
    (`accelerator.prepare`, which the Distiller does) to decode each batch."""
    ds = EncodedFolder(samples, classes)
    wrapped = limit(robust(ds, recorder, strict=strict), limit_n)
    return make_loader(
        wrapped,
        batch_size,
        train=train,
        workers=workers,
        seed=seed,
        collate_fn=EncodedCollate(transform),
    )


# ------------------------------------------------------------------- student/teacher views


def views(
    teacher: Any,
    resolution: int,
    *,
    train: bool,
    crop_pct: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    model_mean: tuple[float, ...] | None = None,
    model_std: tuple[float, ...] | None = None,
) -> Any:
    """A `PairedTransform`: one crop per image, rendered for the student ("input", at
    `resolution` with ImageNet normalisation unless `model_mean/std` say otherwise) and, when
    the teacher wants something else, for the teacher ("teacher_input", at its own input size
    and normalisation)."""
    from distill.data import IMAGENET_MEAN, IMAGENET_STD, PairedTransform, ViewSpec
    from distill.data.transforms import INTERPOLATIONS

    student = ViewSpec(resolution, model_mean or IMAGENET_MEAN, model_std or IMAGENET_STD)
    teacher_view = None
    if teacher is not None and teacher.input_size is not None:
        interp = teacher.interpolation if teacher.interpolation in INTERPOLATIONS else "bilinear"
        teacher_view = ViewSpec(
            tuple(teacher.input_size),
            tuple(teacher.mean or student.mean),
            tuple(teacher.std or student.std),
            interp,
        )
        same = (teacher_view.size, teacher_view.mean, teacher_view.std, teacher_view.interpolation)
        if same == (student.size, student.mean, student.std, student.interpolation):
            teacher_view = None  # the Teacher converts the student's batch itself (a no-op)
    return PairedTransform(
        student, teacher_view, train=train, crop_pct=crop_pct, scale=scale, ratio=ratio
    )


def hf_source(dataset: str, data_dir: str | None, split: str) -> dict[str, Any]:
    """`hf_image_dataset` location arguments. WebDataset shards are passed as {split: files}:
    `datasets` files a plain list of shards under "train", whatever split is asked for."""
    if dataset == "webdataset" and data_dir:
        root = Path(data_dir).expanduser()
        shards = sorted(root.glob(f"{split}-*.tar")) or sorted(root.glob(f"{split}/*.tar"))
        if shards:
            return {"data_files": {split: [str(s) for s in shards]}}
    return {"data_dir": data_dir}
