"""Datasets of undecoded images, and the batch that decodes itself on the device.

The DataLoader workers only read bytes: items are {"data": (N,) uint8, "target", "index",
"path", "crop_seed"}. `EncodedCollate` turns a list of them into an `EncodedBatch`, which is
decoded and augmented by a `distill.data.gpu_pipeline.GpuBatchTransform` when it is moved to a
device: accelerate's prepared loader calls `batch.to(device)` on every batch in the training
process, so on CUDA the decoding runs in nvJPEG there. `batch.to(device)` returns the dict the
Distiller reads: {"input", "teacher_input" (when the transform has a teacher view), "target",
"index"}.

    dataset = EncodedImageFolder(root)              # or .from_samples(samples, classes)
    loader = encoded_loader(dataset, transform, batch_size=256, shuffle=True, num_workers=8)

Each item's "crop_seed" is drawn in `__getitem__` from torch's default CPU generator
(`distill.data.transforms.draw_crop_seed`), which the training loop seeds from (seed, epoch,
index) around each `__getitem__` (`distill.seeding.SeededDataset`): a sample's crop is a
function of those three numbers only, exactly as on the per-image PIL path, whatever the batch
or the worker. Missing, unreadable and empty files raise `distill.data.BadImageError` in
`__getitem__`, so the skip wrappers replace and count them; `Skipped` markers of
`distill.data.SkipBadSamples` are dropped by the collate and reported under "skipped".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from distill.data.images import BadImageError
from distill.data.skipping import SKIPPED_KEY, Skipped
from distill.data.transforms import draw_crop_seed

if TYPE_CHECKING:
    from distill.data.gpu_pipeline import GpuBatchTransform

JPEG_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".JPEG")
IMAGE_EXTENSIONS = (*JPEG_EXTENSIONS, ".png", ".PNG")


def read_bytes(path: str | os.PathLike[str]) -> Tensor:
    """A file's bytes as a 1-D uint8 tensor (what `decode_jpeg` reads); `BadImageError` for a
    missing, unreadable or empty file."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BadImageError(str(path), "missing", "no such file") from None
    except OSError as e:
        raise BadImageError(str(path), "unreadable", str(e)) from None
    if not data:
        raise BadImageError(str(path), "empty", "0 bytes")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class EncodedImageFolder(torch.utils.data.Dataset[dict[str, Any]]):
    """ImageFolder layout (root/<class>/<image>), items are undecoded bytes plus a crop seed.

    Items: {"data": (N,) uint8, "target": int, "index": int, "path": str, "crop_seed": int}.
    Classes are the sorted folder names, as in torchvision's ImageFolder, so labels agree with
    it; `from_samples` takes an existing (path, label) list instead (e.g. an ImageFolder's).
    """

    def __init__(
        self, root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS
    ) -> None:
        from torchvision.datasets.folder import find_classes, make_dataset

        self.root: Path | None = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes, self.class_to_idx = find_classes(str(self.root))
        self.samples: list[tuple[str, int]] = make_dataset(
            str(self.root), self.class_to_idx, extensions=tuple(extensions)
        )

    @classmethod
    def from_samples(
        cls, samples: Sequence[tuple[str, int]], classes: Sequence[str]
    ) -> EncodedImageFolder:
        """Items of a given (path, label) list; `classes` names the labels."""
        self = cls.__new__(cls)  # no folder walk
        self.root = None
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(str(p), int(y)) for p, y in samples]
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, target = self.samples[index]
        data = read_bytes(path)  # before the draw: a skipped file leaves the generator as is
        return {
            "data": data,
            "target": target,
            "index": index,
            "path": path,
            "crop_seed": draw_crop_seed(),
        }


def encoded_webdataset(
    urls: str | Sequence[str],
    *,
    image_keys: Sequence[str] = ("jpg", "jpeg"),
    label_key: str = "cls",
    shuffle: int = 0,
) -> Iterable[dict[str, Any]]:
    """A webdataset pipeline of {"data", "target", "index": running int, "path": key,
    "crop_seed"}.

    Shards are tar files whose samples hold an image (`image_keys`, first present wins) and a
    class label (`label_key`, text). A stream has no dataset index to seed by, so crop seeds
    come from each worker's own torch generator (deterministic for a given worker count).
    """
    import webdataset as wds

    keys = tuple(image_keys)

    def to_item(sample: Mapping[str, Any]) -> dict[str, Any]:
        key = next((k for k in keys if k in sample), None)
        if key is None:
            raise KeyError(
                f"webdataset sample {sample.get('__key__')!r} has none of the image keys {keys}; "
                f"it has {sorted(k for k in sample if not k.startswith('__'))}"
            )
        label = sample[label_key]
        label = int(label.decode() if isinstance(label, (bytes, bytearray)) else label)
        return {
            "data": torch.frombuffer(bytearray(sample[key]), dtype=torch.uint8),
            "target": label,
            "path": str(sample.get("__key__", "?")),
        }

    pipeline = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
    if shuffle:
        pipeline = pipeline.shuffle(shuffle)
    return _Counted(pipeline.map(to_item))


class _Counted(torch.utils.data.IterableDataset[dict[str, Any]]):
    def __init__(self, source: Iterable[dict[str, Any]]) -> None:
        self.source = source

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for n, item in enumerate(self.source):
            yield {**item, "index": n * nw + wid, "crop_seed": draw_crop_seed()}


def collate_encoded(samples: Sequence[Any]) -> dict[str, Any]:
    """Keep the variable-length byte tensors as a list; stack labels, indices, crop seeds.

    `Skipped` markers are dropped and, with the skips a replacement sample carries, listed
    under "skipped" as (path, reason).
    """
    kept: list[Mapping[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    for s in samples:
        if isinstance(s, Skipped):
            skipped.append((s.path, s.reason))
            continue
        skipped.extend((str(p), str(r)) for p, r in s.get(SKIPPED_KEY, ()))
        kept.append(s)
    if any("crop_seed" not in s for s in kept):
        raise KeyError("encoded items need a 'crop_seed' (see distill.data.encoded)")
    return {
        "data": [s["data"] for s in kept],
        "target": torch.as_tensor([int(s["target"]) for s in kept], dtype=torch.int64),
        "index": torch.as_tensor([int(s["index"]) for s in kept], dtype=torch.int64),
        "crop_seed": torch.as_tensor([int(s["crop_seed"]) for s in kept], dtype=torch.int64),
        "path": [str(s.get("path", f"index {s['index']}")) for s in kept],
        SKIPPED_KEY: skipped,
    }


class EncodedBatch:
    """A batch of undecoded images that decodes itself when moved to a device.

    `to(device)` decodes and renders it with `transform` on `device` (nvJPEG on CUDA, PIL via
    `load_image` on the CPU) and returns {"input", "teacher_input"?, "target", "index"} there,
    plus "skipped" when skip wrappers dropped or replaced files of this batch.
    """

    def __init__(self, samples: Sequence[Any], transform: GpuBatchTransform) -> None:
        b = collate_encoded(samples)
        self.data: list[Tensor] = b["data"]
        self.target: Tensor = b["target"]
        self.index: Tensor = b["index"]
        self.crop_seeds: Tensor = b["crop_seed"]
        self.paths: list[str] = b["path"]
        self.skipped: list[tuple[str, str]] = b[SKIPPED_KEY]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def to(self, device: str | torch.device, non_blocking: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.data:
            out = dict(self.transform(self.data, self.crop_seeds, device=device, names=self.paths))
            out["target"] = self.target.to(device, non_blocking=non_blocking)
            out["index"] = self.index.to(device, non_blocking=non_blocking)
        if self.skipped or not self.data:
            out[SKIPPED_KEY] = list(self.skipped)
        return out


class EncodedCollate:
    """The `collate_fn` of the encoded pipeline: bytes only (an `EncodedBatch`).

    `decode_in_workers=True` decodes and renders in the DataLoader workers instead (the batch
    then arrives as the dict `EncodedBatch.to` returns, on `transform.device`): the fast choice
    for CPU-only training, where the workers are the parallelism.
    """

    def __init__(self, transform: GpuBatchTransform, *, decode_in_workers: bool = False) -> None:
        self.transform = transform
        self.decode_in_workers = decode_in_workers

    def __call__(self, samples: Sequence[Any]) -> EncodedBatch | dict[str, Any]:
        batch = EncodedBatch(samples, self.transform)
        return batch.to(self.transform.device) if self.decode_in_workers else batch


def encoded_loader(
    dataset: torch.utils.data.Dataset[Any],
    transform: GpuBatchTransform,
    *,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
    decode_in_workers: bool = False,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader[Any]:
    """A plain DataLoader of `EncodedBatch`es (see `EncodedCollate` for `decode_in_workers`).

    It is a plain DataLoader so that the Distiller seeds it per sample and accelerate places
    (that is, decodes) its batches. `seed` fixes the shuffling order. Keep
    `persistent_workers=False` when exact resume matters: workers must see the current epoch.
    """
    g = torch.Generator()
    g.manual_seed(seed)
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and not iterable,
        num_workers=num_workers,
        collate_fn=EncodedCollate(transform, decode_in_workers=decode_in_workers),
        drop_last=drop_last,
        generator=g if shuffle and not iterable else None,
        persistent_workers=persistent_workers and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
