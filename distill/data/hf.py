"""Hugging Face `datasets` sources mapped onto the same dicts and transforms as the rest.

Sources: a local `imagefolder` (with metadata.csv), local WebDataset .tar shards, or any dataset
name `datasets.load_dataset` knows (from the local cache when offline:
`HF_DATASETS_OFFLINE=1`). `streaming=True` gives an iterable dataset for ImageNet scale, split
per process with `datasets.distributed.split_dataset_by_node`; DataLoader workers then split
the process's shards among themselves (that is `datasets`' own behaviour).

Images are decoded by `load_image` (the image column is cast to `Image(decode=False)`), so bad
files behave as everywhere else. Map-style datasets raise `BadImageError` (wrap them in
`SkipBadSamples`); iterable ones yield `Skipped` markers themselves (strict: raise), since an
exception would end the stream. Both need `collate_skipping`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image as PILImage
from torch.utils.data import Dataset, IterableDataset

from distill.data.datasets import Transform
from distill.data.errors import AnnotationError, DataLayoutError, check_label_range
from distill.data.images import DEFAULT_MAX_PIXELS, BadImageError, load_image, to_rgb
from distill.data.skipping import Skipped
from distill.data.transforms import run_transform

HF_LAYOUT = """  imagefolder:  <dir>/<split>/metadata.csv (file_name,label,...) + the images it lists,
                or <dir>/<split>/<class>/*.jpg (labels from folder names)
  webdataset:   <dir>/<split>-00000.tar ... each holding NNN.jpg + NNN.cls (or NNN.json)
  hub name:     e.g. "user/dataset"; offline it must already be in the datasets cache"""

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp", "pixel_values")
LABEL_COLUMNS = ("label", "labels", "cls", "target", "fine_label")


# --------------------------------------------------------------------------------- loading


def load_hf(
    source: str | Path,
    *,
    split: str = "train",
    data_dir: str | Path | None = None,
    data_files: Any = None,
    streaming: bool = False,
    cache_dir: str | Path | None = None,
    num_classes: int | None = None,
    label_column: str | None = "label",
    **kwargs: Any,
) -> Any:
    """`datasets.load_dataset` for `source` = "imagefolder" | "webdataset" | a local directory
    (format detected) | a dataset name. Returns a `datasets.Dataset` (or `IterableDataset`).

    Local imagefolders have their metadata.csv files checked first (files exist, labels within
    `num_classes`), with errors naming the csv and line.
    """
    import datasets

    source = str(source)
    kind = source
    if source not in ("imagefolder", "webdataset") and Path(source).expanduser().is_dir():
        kind = _detect_local_format(Path(source).expanduser())
        if kind != "local":  # a local repo (parquet/arrow files) loads by its path, like a name
            data_dir = Path(source).expanduser()
    if kind == "imagefolder":
        if data_dir is None and data_files is None:
            raise ValueError("imagefolder needs data_dir (--data-dir) or data_files")
        if data_dir is not None:
            data_dir = _require_dir(data_dir)
            validate_metadata_csvs(data_dir, num_classes=num_classes, label_column=label_column)
        args: dict[str, Any] = {
            "data_dir": str(data_dir) if data_dir else None,
            "data_files": data_files,
        }
        kwargs = {**{k: v for k, v in args.items() if v is not None}, **kwargs}
        name = "imagefolder"
    elif kind == "webdataset":
        if data_files is None:
            if data_dir is None:
                raise ValueError("webdataset needs data_files (shard paths) or data_dir")
            data_files = _webdataset_files(_require_dir(data_dir), split)
        kwargs = {"data_files": data_files, **kwargs}
        name = "webdataset"
    else:
        name = source
        if data_dir is not None:
            kwargs["data_dir"] = str(data_dir)
        if data_files is not None:
            kwargs["data_files"] = data_files
    try:
        return datasets.load_dataset(
            name,
            split=split,
            streaming=streaming,
            cache_dir=str(cache_dir) if cache_dir else None,
            **kwargs,
        )
    except ValueError as e:
        if "split" in str(e).lower():
            raise ValueError(f"{source}: split {split!r} not found ({e})") from None
        raise
    except (ConnectionError, FileNotFoundError) as e:
        raise DataLayoutError(
            source,
            f"datasets could not load it ({type(e).__name__}: {e}); offline, a hub dataset "
            "must already be in the cache (HF_DATASETS_OFFLINE=1, same cache_dir)",
            HF_LAYOUT,
        ) from None


def _require_dir(d: str | Path) -> Path:
    p = Path(d).expanduser()
    if not p.is_dir():
        raise DataLayoutError(p, "directory does not exist", HF_LAYOUT)
    return p


def _detect_local_format(d: Path) -> str:
    if any(d.glob("*.tar")) or any(d.glob("*/*.tar")):
        return "webdataset"
    if any(d.glob("**/metadata.csv")) or any(d.glob("**/metadata.jsonl")):
        return "imagefolder"
    if any(d.glob("**/*.parquet")) or any(d.glob("**/*.arrow")):
        return "local"
    if any(p.is_dir() for p in d.iterdir()):
        return "imagefolder"
    raise DataLayoutError(d, "not a recognised dataset folder", HF_LAYOUT)


def _webdataset_files(d: Path, split: str) -> list[str]:
    shards = sorted(d.glob(f"{split}-*.tar")) or sorted(d.glob(f"{split}/*.tar"))
    if not shards:
        shards = sorted(d.glob("*.tar"))
    if not shards:
        raise DataLayoutError(d, f"no .tar shards for split {split!r}", HF_LAYOUT)
    return [str(s) for s in shards]


def validate_metadata_csvs(
    data_dir: str | Path, *, num_classes: int | None = None, label_column: str | None = "label"
) -> None:
    """Check every metadata.csv under `data_dir`: a file_name column, files that exist, and
    integer labels in 0..num_classes-1 (when `num_classes` is given)."""
    for meta in sorted(Path(data_dir).glob("**/metadata.csv")):
        with open(meta, newline="") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            if "file_name" not in fields:
                raise AnnotationError(meta, 1, f"header {fields} has no 'file_name' column")
            for row in reader:
                line = reader.line_num
                fn = row.get("file_name") or ""
                if not fn or not (meta.parent / fn).is_file():
                    raise AnnotationError(
                        meta, line, f"file_name {fn!r} does not exist under {meta.parent}"
                    )
                if num_classes is not None and label_column and label_column in row:
                    raw = (row[label_column] or "").strip()
                    try:
                        label = int(raw)
                    except ValueError:
                        raise AnnotationError(
                            meta, line, f"{label_column} {raw!r} is not an integer"
                        ) from None
                    check_label_range(label, num_classes, meta, line)


# --------------------------------------------------------------------------------- columns


def _features(ds: Any) -> Mapping[str, Any]:
    return getattr(ds, "features", None) or {}


def _find_image_column(ds: Any, image_column: str | None) -> str:
    import datasets

    feats = _features(ds)
    if image_column:
        if feats and image_column not in feats:
            raise KeyError(f"image column {image_column!r} not in dataset columns {list(feats)}")
        return image_column
    for name, f in feats.items():
        if isinstance(f, datasets.Image):
            return str(name)
    for name in IMAGE_COLUMNS:
        if name in feats:
            return name
    raise KeyError(f"no image column found among {list(feats)}; pass image_column=")


def _find_label_column(ds: Any, label_column: str | None) -> str | None:
    if label_column != "auto":
        return label_column
    feats = _features(ds)
    for name in LABEL_COLUMNS:
        if name in feats:
            return name
    return None


def _get(row: Mapping[str, Any], dotted: str) -> Any:
    """row["a"]["b"] for "a.b" (e.g. "json.label" in WebDataset samples)."""
    v: Any = row
    for part in dotted.split("."):
        v = v[part] if isinstance(v, Mapping) else None
        if v is None:
            return None
    return v


def _class_names(ds: Any, label_column: str | None) -> list[str] | None:
    import datasets

    f = _features(ds).get(label_column.split(".")[0]) if label_column else None
    return list(f.names) if isinstance(f, datasets.ClassLabel) else None


def _decode(value: Any, name: str, max_pixels: int | None) -> PILImage.Image:
    if isinstance(value, PILImage.Image):
        return to_rgb(value, name=name)
    if isinstance(value, Mapping):
        if value.get("bytes"):
            return load_image(value["bytes"], name=name, max_pixels=max_pixels)
        if value.get("path"):
            return load_image(value["path"], max_pixels=max_pixels)
        raise BadImageError(name, "empty", "image cell has neither bytes nor path")
    if isinstance(value, (bytes, bytearray)):
        return load_image(bytes(value), name=name, max_pixels=max_pixels)
    if isinstance(value, (str, os.PathLike)):
        return load_image(value, max_pixels=max_pixels)
    raise BadImageError(name, "not_an_image", f"image cell of type {type(value).__name__}")


def _to_target(v: Any) -> Any:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, (list, tuple)):
        return torch.tensor(v, dtype=torch.float32)  # multi-label vectors
    if isinstance(v, torch.Tensor):
        return v
    raise TypeError(f"cannot use a label of type {type(v).__name__} as a target")


def _sample_name(row: Mapping[str, Any], image_column: str, fallback: str) -> str:
    cell = row.get(image_column)
    url, key = row.get("__url__"), row.get("__key__")
    if url and key:
        return f"{url}:{key}"
    if isinstance(cell, Mapping) and cell.get("path"):
        return str(cell["path"])
    return fallback


def _cast_no_decode(ds: Any, image_column: str) -> Any:
    import datasets

    feats = _features(ds)
    if isinstance(feats.get(image_column), datasets.Image):
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


# --------------------------------------------------------------------------------- datasets


class HFImageDataset(Dataset[dict[str, Any]]):
    """A map-style `datasets.Dataset` as {"input", ["teacher_input"], ["target"], "index"}.

    `label_column="auto"` picks the first of LABEL_COLUMNS present, None means unlabelled; a
    dotted name reads inside dict columns ("json.label"). With `num_classes`, every label is
    checked up front.
    """

    def __init__(
        self,
        ds: Any,
        transform: Transform | None = None,
        *,
        image_column: str | None = None,
        label_column: str | None = "auto",
        num_classes: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        name: str = "dataset",
    ) -> None:
        self.image_column = _find_image_column(ds, image_column)
        self.label_column = _find_label_column(ds, label_column)
        self.classes = _class_names(ds, self.label_column)
        self.ds = _cast_no_decode(ds, self.image_column)
        self.transform = transform
        self.max_pixels = max_pixels
        self.name = name
        if num_classes is not None and self.label_column:
            self._check_labels(num_classes)

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    def _check_labels(self, num_classes: int) -> None:
        col = self.label_column
        assert col is not None
        top = col.split(".")[0]
        values = self.ds[top]
        for i, v in enumerate(values):
            lab = _get({top: v}, col)
            if isinstance(lab, int) and not (0 <= lab < num_classes):
                where = _sample_name(self.ds[i], self.image_column, f"{self.name} row {i}")
                check_label_range(lab, num_classes, where, None)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.ds[index]
        name = _sample_name(row, self.image_column, f"{self.name}[{index}]")
        img = _decode(row[self.image_column], name, self.max_pixels)
        out = run_transform(self.transform, img, index)
        if self.label_column:
            out["target"] = _to_target(_get(row, self.label_column))
        out["index"] = index
        return out


class HFIterableImageDataset(IterableDataset[Any]):
    """A streaming `datasets.IterableDataset` as the same dicts, sharded per process.

    With `world_size > 1` the stream is split with `split_dataset_by_node(ds, rank,
    world_size)` (by shards when their number divides world_size, else by examples). Shuffle
    (with a fixed seed) before splitting. Bad images yield `Skipped` markers (strict: raise).
    """

    def __init__(
        self,
        ds: Any,
        transform: Transform | None = None,
        *,
        image_column: str | None = None,
        label_column: str | None = "auto",
        num_classes: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        strict: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        name: str = "stream",
    ) -> None:
        # True once this process holds only its own part: a loader over it must not be
        # sharded again (e.g. by `accelerator.prepare`, which would drop or duplicate data)
        self.sharded_by_node = world_size > 1
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node

            if not (0 <= rank < world_size):
                raise ValueError(f"rank {rank} outside 0..{world_size - 1}")
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        self.image_column = _find_image_column(ds, image_column)
        self.label_column = _find_label_column(ds, label_column)
        self.classes = _class_names(ds, self.label_column)
        self.ds = _cast_no_decode(ds, self.image_column)
        self.transform = transform
        self.num_classes = num_classes
        self.strict = strict
        self.max_pixels = max_pixels
        self.name = name

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards/buffer per epoch (for a stream shuffled with a seed)."""
        self.ds.set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        for n, row in enumerate(self.ds):
            name = _sample_name(row, self.image_column, f"{self.name} sample {n}")
            try:
                img = _decode(row[self.image_column], name, self.max_pixels)
            except BadImageError as e:
                if self.strict:
                    raise
                yield Skipped.from_error(e)
                continue
            out = run_transform(self.transform, img, n)
            if self.label_column:
                label = _get(row, self.label_column)
                if self.num_classes is not None and isinstance(label, int):
                    check_label_range(label, self.num_classes, name, None)
                out["target"] = _to_target(label)
            yield out


def hf_image_dataset(
    source: str | Path,
    transform: Transform | None = None,
    *,
    split: str = "train",
    data_dir: str | Path | None = None,
    data_files: Any = None,
    streaming: bool = False,
    rank: int = 0,
    world_size: int = 1,
    shuffle_seed: int | None = None,
    shuffle_buffer: int = 1000,
    image_column: str | None = None,
    label_column: str | None = "auto",
    num_classes: int | None = None,
    cache_dir: str | Path | None = None,
    strict: bool = False,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> HFImageDataset | HFIterableImageDataset:
    """Load `source` with `load_hf` and wrap it; streaming -> `HFIterableImageDataset`.

    Map-style datasets are not split by rank here: the distributed sampler does that.
    """
    csv_label = None if label_column in (None, "auto") else label_column
    ds = load_hf(
        source,
        split=split,
        data_dir=data_dir,
        data_files=data_files,
        streaming=streaming,
        cache_dir=cache_dir,
        num_classes=num_classes,
        label_column=csv_label or "label",
    )
    if streaming:
        if shuffle_seed is not None:
            ds = ds.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer)
        return HFIterableImageDataset(
            ds,
            transform,
            image_column=image_column,
            label_column=label_column,
            num_classes=num_classes,
            rank=rank,
            world_size=world_size,
            strict=strict,
            max_pixels=max_pixels,
            name=str(source),
        )
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    return HFImageDataset(
        ds,
        transform,
        image_column=image_column,
        label_column=label_column,
        num_classes=num_classes,
        max_pixels=max_pixels,
        name=str(source),
    )


__all__: Sequence[str] = (
    "HFImageDataset",
    "HFIterableImageDataset",
    "hf_image_dataset",
    "hf_source",
    "load_hf",
    "validate_metadata_csvs",
)


def hf_source(dataset: str, data_dir: str | None, split: str) -> dict[str, Any]:
    """`hf_image_dataset` location arguments for a `--dataset` name and `--data-dir`. WebDataset
    shards are passed as {split: files}: `datasets` files a plain list of shards under "train",
    whatever split is asked for."""
    if dataset == "webdataset" and data_dir:
        root = Path(data_dir).expanduser()
        shards = sorted(root.glob(f"{split}-*.tar")) or sorted(root.glob(f"{split}/*.tar"))
        if shards:
            return {"data_files": {split: [str(s) for s in shards]}}
    return {"data_dir": data_dir}
