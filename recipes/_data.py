"""Data plumbing shared by the recipes: bad-file skipping that survives worker processes and DDP,
loaders, the batched (GPU) JPEG pipeline for image folders, and the teacher cache of offline
distillation (`--cache-teacher` / `--teacher-cache`).

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
from recipes._config import CacheableRecipeConfig, parse_teacher

MAX_CONSECUTIVE_BAD = 64


def first_readable(fn: Any, index: int, n: int, recorder: SkipRecorder, strict: bool) -> Any:
    """`fn(index)`, or, when that image is unreadable, `fn` of the next readable index (each
    skip recorded); `strict` re-raises the first failure instead."""
    first: BadImageError | None = None
    for k in range(min(n, MAX_CONSECUTIVE_BAD)):
        try:
            return fn((index + k) % n)
        except BadImageError as e:
            if strict:
                raise
            recorder.record(e.path, e.reason, e.detail)
            first = first or e
    raise BadImageError(
        first.path if first else "?",
        first.reason if first else "unreadable",
        f"{min(n, MAX_CONSECUTIVE_BAD)} images in a row could not be read; check the dataset",
    )


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
        return first_readable(
            self.dataset.__getitem__, index, len(self.dataset), self.recorder, self.strict
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


# ------------------------------------------------------------------- offline distillation


class SkipUnreadable:
    """A `ReplayableDataset` (distill.data.teacher_cache) whose unreadable images are replaced
    by the next readable one, in `draw` and `replay` alike: while the files stay as they are
    (the cache fingerprint checks their sizes) the same substitute is drawn when the cache is
    built and replayed when training reads it, so its crop and its teacher answer still agree.
    """

    def __init__(self, dataset: Any, recorder: SkipRecorder, *, strict: bool = False) -> None:
        self.dataset = dataset
        self.recorder = recorder
        self.strict = strict

    def __len__(self) -> int:
        return len(self.dataset)

    def _readable(self, index: int, fn: Any) -> Any:
        return first_readable(fn, index, len(self.dataset), self.recorder, self.strict)

    def draw(self, index: int, generator: torch.Generator) -> Any:
        # an unreadable file fails before the generator is used: the substitute gets it fresh
        return self._readable(index, lambda i: self.dataset.draw(i, generator))

    def replay(self, index: int, params: Any) -> Any:
        return self._readable(index, lambda i: self.dataset.replay(i, params))

    def data_signature(self) -> str:
        return str(self.dataset.data_signature())

    def transform_config(self) -> Any:
        return self.dataset.transform_config()


def replayable_images(
    samples: list[tuple[str, int]],
    transform: Any,
    recorder: SkipRecorder,
    *,
    root: str | Path,
    strict: bool,
    limit_n: int | None,
) -> SkipUnreadable:
    """The training images and their paired train transform as a replayable dataset (what a
    teacher cache is built over and replayed from); `limit_n` keeps the first n samples."""
    from distill.data.teacher_cache import ReplayableImages

    # absolute paths: the fingerprint names files relative to `root`, wherever the run starts
    kept = samples[:limit_n] if limit_n is not None else samples
    absolute = [(os.path.abspath(p), y) for p, y in kept]
    images = ReplayableImages(absolute, transform, root=os.path.abspath(Path(root).expanduser()))
    return SkipUnreadable(images, recorder, strict=strict)


RECIPE_FILE = "recipe.json"  # written next to the cache's manifest: what it was built for
_COMPONENTS = {
    "teacher": "teacher (--teacher spec and --teacher-options)",
    "dataset": "training images (file list, sizes and labels; --data-dir, --limit-train)",
    "transform": "training transform (--resolution, crop scale/ratio, flip)",
    "num_classes": "number of classes",
    "topk": "topk",
    "crops": "crops",
}


def _identity(cfg: CacheableRecipeConfig, dataset: Any, num_classes: int) -> dict[str, Any]:
    """What a recipe's cache depends on, in readable form. The teacher is named by its spec
    (training from the cache must not load it); its view of each crop follows from the spec,
    so the transform part is the student's view and the crop distribution only."""
    spec, options = parse_teacher(cfg.teacher, cfg.teacher_options)
    transform = {k: v for k, v in dataset.transform_config().items() if k != "teacher"}
    return {
        "teacher": {"spec": spec, "options": options},
        "dataset": dataset.data_signature(),
        "images": len(dataset),
        "transform": json.loads(json.dumps(transform, default=str)),
        "num_classes": num_classes,
    }


def _fingerprint(identity: dict[str, Any], *, topk: int, crops: int) -> Any:
    from distill.data.teacher_cache import Fingerprint, config_signature

    return Fingerprint(
        teacher=config_signature(identity["teacher"]),
        dataset=identity["dataset"],
        transform=config_signature(identity["transform"]),
        topk=topk,
        crops=crops,
        num_classes=identity["num_classes"],
    )


def _changes(old: Any, new: Any, prefix: str = "") -> list[str]:
    """'key: cache X, now Y' for every leaf that differs between two JSON-like values."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += _changes(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    return [f"{prefix.rstrip('.') or 'value'}: cache {old!r}, now {new!r}"]


def _explain(path: Path, names: list[str], now: dict[str, Any], fp: Any, found: Any) -> str:
    """Which components of the cache differ from this run, with details from recipe.json."""
    built: dict[str, Any] = {}
    if (path / RECIPE_FILE).is_file():
        built = json.loads((path / RECIPE_FILE).read_text()).get("identity", {})
    lines = []
    for name in names:
        if name == "dataset":
            detail = [f"cache {built.get('images', '?')} images, now {now['images']}"]
        elif name in built:
            detail = _changes(built[name], now[name])
        else:
            detail = [f"cache {getattr(found, name)}, now {getattr(fp, name)}"]
        lines.append(f"  - {_COMPONENTS[name]}: {'; '.join(detail) or 'differs'}")
    return "\n".join(lines)


def build_recipe_cache(
    cfg: CacheableRecipeConfig,
    teacher: Any,
    dataset: Any,
    num_classes: int,
    *,
    device: Any,
    batch_size: int,
) -> Any:
    """`--cache-teacher DIR`: run `teacher` on `cfg.crops` crops of every training image and
    store its top-`cfg.topk` logits (distill.data.teacher_cache.build_cache); a finished cache
    for the same settings is reused, an interrupted one resumed."""
    from distill.checkpoint import write_json_atomic
    from distill.data.teacher_cache import MANIFEST, TeacherCache, build_cache, teacher_signature
    from recipes._run import RecipeError

    assert cfg.cache_teacher is not None
    out = Path(cfg.cache_teacher).expanduser()
    identity = _identity(cfg, dataset, num_classes)
    fp = _fingerprint(identity, topk=cfg.topk, crops=cfg.crops)
    if (out / MANIFEST).is_file():
        old = TeacherCache.open(out, verify=False)
        diff = old.fingerprint.differences(fp)
        if diff or old.manifest.get("seed") != cfg.seed:
            what = _explain(out, diff, identity, fp, old.fingerprint) if diff else "  - --seed"
            raise RecipeError(
                f"--cache-teacher {out} already holds a teacher cache built for other "
                f"settings:\n{what}\nChoose another folder, or delete this one to rebuild it"
            )
    device = torch.device(device)
    cache = build_cache(
        teacher,
        dataset,
        out,
        crops=cfg.crops,
        topk=cfg.topk,
        batch_size=batch_size,
        device=device,
        seed=cfg.seed,
        num_workers=cfg.workers,
        fingerprint=fp,
        progress=cfg.progress,
        # the teacher runs as it would online: under autocast when mixed precision is on
        autocast=device.type == "cuda" and cfg.mixed_precision != "no",
    )
    write_json_atomic(
        out / RECIPE_FILE,
        {
            "recipe": cfg.NAME,
            "identity": identity,
            # provenance only: training from the cache checks the spec, not the weights
            "teacher_weights_sha256": teacher_signature(teacher),
            "seed": cfg.seed,
        },
    )
    return cache


def open_recipe_cache(cfg: CacheableRecipeConfig, dataset: Any, num_classes: int) -> Any:
    """`--teacher-cache DIR`, checked against what this run would cache (teacher spec, training
    files, transform, classes) and against the shards' checksums; any mismatch is an error."""
    from distill.data.teacher_cache import MANIFEST, CacheCorruptError, TeacherCache
    from recipes._run import RecipeError

    assert cfg.teacher_cache is not None
    path = Path(cfg.teacher_cache).expanduser()
    if not (path / MANIFEST).is_file():
        raise RecipeError(
            f"--teacher-cache {path}: no teacher cache there ({MANIFEST} is missing). Build it "
            f"first: the same command with --cache-teacher {path} instead of --teacher-cache"
        )
    cache = TeacherCache.open(path, verify=False)
    identity = _identity(cfg, dataset, num_classes)
    fp = _fingerprint(identity, topk=cache.topk, crops=cache.crops)
    diff = cache.fingerprint.differences(fp)
    if diff:
        raise RecipeError(
            f"--teacher-cache {path} was built for a different "
            f"{', '.join(diff)}:\n{_explain(path, diff, identity, fp, cache.fingerprint)}\n"
            "Train with the settings the cache was built with, or build a cache for these "
            "settings (--cache-teacher NEW_DIR instead of --teacher-cache)"
        )
    try:
        cache.verify()
    except CacheCorruptError as e:
        raise RecipeError(f"--teacher-cache {path}: {e} with --cache-teacher") from None
    return cache


def cached_teacher_name(cfg: Any, cache: Any) -> str | None:
    """The teacher's name in metrics.json for a run trained from `cache` (None: no cache)."""
    if cache is None:
        return None
    meta = cache.manifest.get("teacher_meta") or {}
    return str(meta.get("name") or parse_teacher(cfg.teacher, {})[0] or "cached")


def cache_notes(cache: Any) -> dict[str, Any]:
    """run_info entries (config.json, metrics.json "info_teacher_cache") for a cached run."""
    if cache is None:
        return {}
    return {
        "teacher_cache": {
            "path": str(cache.path),
            "digest": cache.fingerprint.digest,
            "crops": cache.crops,
            "topk": cache.topk,
        }
    }
