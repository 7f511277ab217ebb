"""Cached teacher outputs for offline distillation (FKD / ReLabel style).

A per-index cache of teacher outputs is wrong under augmentation: the teacher's answer depends on
the crop. So, for every dataset index, we store `crops` (K) augmentation draws: the random
parameters of each draw (crop box, flip, ...) and the teacher's top-k answer on exactly that
crop. Training replays the stored parameters, so the student sees the same pixels the teacher
saw, and the teacher forward pass is skipped (Shen & Xing, "A Fast Knowledge Distillation
Framework for Visual Recognition", ECCV 2022; Yun et al., "Re-labeling ImageNet", CVPR 2021).

What is stored per (index, draw), with z the teacher's logits (C,) and m = max(z):
- `values`   (k,) float16: the top-k logits minus m (so the top-1 is 0 and fp16 spends its
  precision near the classes that carry the mass);
- `indices`  (k,) int16 (int32 when C > 32767): their class ids;
- `tail_lse` float32: logsumexp of the C - k other logits, minus m (-inf when k == C);
- `offset`   float32: m itself, so raw logits can be recovered (softmax never needs it);
- the draw's parameters: integers (crop box i, j, h, w, flip, ...) and floats, named in the
  manifest.

Reconstruction (`reconstruct_logits`): the C - k tail classes share the tail's exp-mass equally,
each getting the logit `tail_lse - log(C - k)`. At temperature T = 1 this is exact for the top-k
probabilities and for the total tail mass; only how the tail mass splits among tail classes is
lost. For T != 1 the loss computes softmax(z / T) of the reconstructed logits; the tail's
tempered mass is then over-estimated for T > 1 (power-mean inequality: a uniform tail has the
largest tempered mass for a given T = 1 mass). `benchmarks/cache_fidelity.py` measures the KL
between the full and the reconstructed distributions for k = 1, 5, 10, 20 at T = 1 and T = 4;
k == C reconstructs exactly.

On disk: `manifest.json` (written last) and per shard one `.npy` file per array, read through
`np.load(mmap_mode="r")`. The manifest holds a fingerprint: sha256 of the teacher's weights, of
the dataset's file list (paths and sizes), of the transform parameters, plus k, K and the class
count; `TeacherCache.open(path, expected)` refuses a cache whose fingerprint differs and says
which part differs, and refuses shards whose sha256 does not match the manifest.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "distill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
_ARRAYS = ("values", "indices", "tail_lse", "offset", "params_int", "params_float")
# A finite floor for reconstructed logits (relative to the row max): exp() of it is 0 in fp32,
# and, unlike -inf, it keeps kl_div(log_target=True) free of 0 * inf = nan.
_LOGIT_FLOOR = -1.0e4

ParamValue = int | float
Params = Mapping[str, ParamValue]


# --------------------------------------------------------------------------------------------
# Top-k compression and reconstruction (pure tensor functions)
# --------------------------------------------------------------------------------------------


@dataclass
class TopK:
    """A compressed teacher answer for a batch. Shapes: values/indices (B, k), others (B,)."""

    values: Tensor  # top-k logits minus the row max
    indices: Tensor  # class ids, int64
    tail_lse: Tensor  # logsumexp of the other logits minus the row max; -inf when k == C
    offset: Tensor  # the row max of the logits


def compress_topk(logits: Tensor, k: int) -> TopK:
    """Keep the k largest logits of each row of `logits` (B, C) and the log of the rest's mass."""
    if logits.ndim != 2:
        raise ValueError(f"expected logits of shape (B, C), got {tuple(logits.shape)}")
    num_classes = logits.shape[1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"topk={k} must be between 1 and the number of classes ({num_classes})")
    z = logits.detach().float()
    offset = z.amax(dim=1)  # (B,)
    z = z - offset[:, None]
    values, indices = z.topk(k, dim=1)  # sorted, largest first
    if k == num_classes:
        tail = torch.full_like(offset, -math.inf)
    else:
        rest = z.scatter(1, indices, -math.inf)
        tail = torch.logsumexp(rest, dim=1)
    return TopK(values=values, indices=indices, tail_lse=tail, offset=offset)


def reconstruct_logits(
    values: Tensor,
    indices: Tensor,
    tail_lse: Tensor,
    num_classes: int,
    offset: Tensor | None = None,
) -> Tensor:
    """Dense (B, C) float32 logits whose softmax approximates the teacher's (see module doc).

    The top-k classes get their stored logits; every other class gets `tail_lse - log(C - k)`,
    so the tail's total exp-mass matches the teacher's exactly at T = 1. Without `offset` the
    logits are relative to the row max, which no softmax at any temperature can tell apart.
    Works on any leading shape: values/indices (..., k), tail_lse/offset (...).
    """
    k = values.shape[-1]
    if k > num_classes:
        raise ValueError(f"{k} stored classes but num_classes={num_classes}")
    values = values.float()
    lead = values.shape[:-1]
    if k == num_classes:
        fill = torch.full(lead, _LOGIT_FLOOR, dtype=torch.float32, device=values.device)
    else:
        fill = tail_lse.float() - math.log(num_classes - k)
        fill = torch.nan_to_num(fill, neginf=_LOGIT_FLOOR).clamp_min(_LOGIT_FLOOR)
    dense = fill[..., None].expand(*lead, num_classes).clone()
    dense.scatter_(-1, indices.long(), values)
    if offset is not None:
        dense = dense + offset.float()[..., None]
    return dense


def topk_kl(logits: Tensor, k: int, temperature: float = 1.0) -> Tensor:
    """Per-row KL(p_T || q_T) between the teacher's softmax(z / T) and that of its top-k
    reconstruction, in nats, shape (B,). Measures what the cache loses (fp16 rounding included)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    c = compress_topk(logits, k)
    approx = reconstruct_logits(c.values.half(), c.indices, c.tail_lse, logits.shape[1])
    log_p = F.log_softmax(logits.float() / temperature, dim=1)
    log_q = F.log_softmax(approx / temperature, dim=1)
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(dim=1)


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def weights_signature(model: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 over a state dict: every entry's name, dtype, shape and bytes, in key order.

    Names are taken without torch.compile's `_orig_mod.` and without a `model.` prefix shared
    by every key (a `Teacher` wrapping the model), so the bare and the wrapped model agree.
    """
    state = dict(model.state_dict() if isinstance(model, nn.Module) else model)
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Through uint8 so that bf16 and other numpy-less dtypes hash too.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Teacher attributes that change its answer without being in its state dict.
_TEACHER_ATTRS = (
    "input_size", "mean", "std", "student_mean", "student_std", "interpolation", "output_kind",
)  # fmt: skip


def teacher_signature(teacher: nn.Module | Mapping[str, Tensor]) -> str:
    """`weights_signature`, plus the input conversion of a `distill.teacher.Teacher` (its
    resolution and normalisations), which the weights alone do not capture."""
    weights = weights_signature(teacher)
    conversion = {a: getattr(teacher, a) for a in _TEACHER_ATTRS if hasattr(teacher, a)}
    if not conversion:
        return weights
    return config_signature({"weights": weights, "conversion": conversion})


def files_signature(paths: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str]) -> str:
    """sha256 over (path relative to `root`, size in bytes) of each file, in dataset order.

    Relative paths, so a dataset moved to another disk keeps its cache; sizes, so a re-encoded
    or replaced file is noticed without reading every byte.
    """
    base = Path(root)
    h = hashlib.sha256()
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else base / p
        try:
            rel = full.relative_to(base).as_posix()
        except ValueError:  # outside the root: keep the path as given
            rel = Path(p).as_posix()
        h.update(f"{rel}|{full.stat().st_size}\n".encode())
    return h.hexdigest()


def array_signature(*arrays: np.ndarray | Tensor) -> str:
    """sha256 of in-memory data (e.g. the digits arrays) standing in for a file list."""
    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def config_signature(config: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able mapping, key order ignored (transform parameters)."""
    return _sha(json.dumps(config, sort_keys=True, default=str))


@dataclass(frozen=True)
class Fingerprint:
    """What a cache's soft targets depend on. Each field is compared separately on open."""

    teacher: str  # teacher_signature(teacher)
    dataset: str  # files_signature / array_signature of the data
    transform: str  # config_signature of the transform's parameters
    topk: int
    crops: int
    num_classes: int

    @property
    def digest(self) -> str:
        return config_signature(asdict(self))

    def differences(self, other: Fingerprint) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def create(
        cls,
        teacher: nn.Module | Mapping[str, Tensor],
        dataset: ReplayableDataset,
        *,
        topk: int,
        crops: int,
        num_classes: int,
    ) -> Fingerprint:
        return cls(
            teacher=teacher_signature(teacher),
            dataset=dataset.data_signature(),
            transform=config_signature(dataset.transform_config()),
            topk=topk,
            crops=crops,
            num_classes=num_classes,
        )


_WHAT = {
    "teacher": "the teacher's weights or input conversion",
    "dataset": "the dataset's file list (paths and sizes)",
    "transform": "the transform parameters",
    "topk": "topk (k)",
    "crops": "crops per image (K)",
    "num_classes": "the number of classes",
}


class CacheMismatchError(ValueError):
    """The cache on disk was built for something else than what training uses now."""


class CacheCorruptError(ValueError):
    """A shard's bytes do not match the checksum the manifest recorded."""


def _check_fingerprint(path: Path, found: Fingerprint, expected: Fingerprint | str) -> None:
    if isinstance(expected, str):
        if expected != found.digest:
            raise CacheMismatchError(
                f"teacher cache {path} has fingerprint {found.digest[:12]}, expected "
                f"{expected[:12]}; pass a Fingerprint instead of a digest to learn which part "
                "differs, or rebuild the cache with `python -m distill cache-teacher`"
            )
        return
    diff = found.differences(expected)
    if diff:
        parts = "; ".join(
            f"{_WHAT[name]}: cache {_short(getattr(found, name))} != now "
            f"{_short(getattr(expected, name))}"
            for name in diff
        )
        raise CacheMismatchError(
            f"teacher cache {path} is stale: it was built with different {', '.join(diff)} "
            f"({parts}). Rebuild it with `python -m distill cache-teacher` (or build_cache) "
            "for the current teacher/data/transform, or point to the matching cache."
        )


def _short(v: object) -> str:
    return v[:12] if isinstance(v, str) else str(v)


# --------------------------------------------------------------------------------------------
# What a dataset must offer to be cached and replayed
# --------------------------------------------------------------------------------------------


@runtime_checkable
class ReplayableDataset(Protocol):
    """A dataset whose random augmentation can be drawn once and replayed exactly.

    `draw` samples the augmentation parameters of one view of item `index` from `generator`
    and returns them with the item: a dict with "input" (student tensor), "target" and,
    optionally, "teacher_input" (the same crop at the teacher's resolution/normalisation).
    `replay` rebuilds the item from given parameters; for the same parameters it must return
    bit-identical tensors. Parameter values are ints (crop box, flip) or floats, and the same
    names are returned by every draw.
    """

    def __len__(self) -> int: ...

    def draw(
        self, index: int, generator: torch.Generator
    ) -> tuple[dict[str, ParamValue], dict[str, Any]]: ...

    def replay(self, index: int, params: Params) -> dict[str, Any]: ...

    def data_signature(self) -> str: ...

    def transform_config(self) -> Mapping[str, Any]: ...


def draw_generator(seed: int, index: int, draw: int) -> torch.Generator:
    """The generator of draw `draw` of item `index`: independent of batch order and workers."""
    state = np.random.SeedSequence([seed, index, draw]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


class ReplayableImages(torch.utils.data.Dataset[dict[str, Any]]):
    """Image files + a `distill.data.transforms.PairedTransform` as a `ReplayableDataset`.

    Parameters are the crop box and flip of `CropParams` (top, left, height, width, flip);
    items are the transform's {"input", "teacher_input"} plus "target". The data signature is
    the file list (paths relative to `root`, sizes); the transform's is its views and ranges.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Any,
        *,
        root: str | os.PathLike[str],
    ) -> None:
        if not getattr(transform, "train", True):
            raise ValueError(
                "caching K crops needs a random transform: pass PairedTransform(train=True); "
                "an eval transform gives the same crop every time (cache it with crops=1)"
            )
        self.samples = list(samples)
        self.transform = transform
        self.root = Path(root)

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str], transform: Any) -> ReplayableImages:
        """root/<class>/<image> with classes sorted by name, as torchvision's ImageFolder."""
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        _, class_to_idx = find_classes(os.fspath(root))
        return cls(
            make_dataset(os.fspath(root), class_to_idx, IMG_EXTENSIONS), transform, root=root
        )

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Any:
        from distill.data.images import load_image

        return load_image(self.samples[index][0])

    def draw(
        self, index: int, generator: torch.Generator
    ) -> tuple[dict[str, ParamValue], dict[str, Any]]:
        img = self._image(index)
        p = self.transform.sample_params(img.size, generator)
        params: dict[str, ParamValue] = {
            "top": p.top,
            "left": p.left,
            "height": p.height,
            "width": p.width,
            "flip": int(p.flip),
        }
        return params, {**self.transform.apply(img, p), "target": self.samples[index][1]}

    def replay(self, index: int, params: Params) -> dict[str, Any]:
        from distill.data.transforms import CropParams

        p = CropParams(
            int(params["top"]),
            int(params["left"]),
            int(params["height"]),
            int(params["width"]),
            bool(params["flip"]),
        )
        return {**self.transform.apply(self._image(index), p), "target": self.samples[index][1]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise TypeError("index a ReplayableImages through CachedDataset (or call draw/replay)")

    def data_signature(self) -> str:
        files = files_signature((p for p, _ in self.samples), self.root)
        return config_signature({"files": files, "labels": [y for _, y in self.samples]})

    def transform_config(self) -> dict[str, Any]:
        t = self.transform
        views = {
            side: None if getattr(t, side, None) is None else asdict(getattr(t, side))
            for side in ("student", "teacher")
        }
        return {
            "type": type(t).__name__,
            **views,
            "scale": list(t.scale),
            "ratio": list(t.ratio),
            "flip_p": t.flip_p,
        }


class ReplayableShifts(torch.utils.data.Dataset[dict[str, Any]]):
    """In-memory images (N, C, H, W) with a random shift of up to `max_shift` pixels (padding
    with `background`, (C, 1, 1)) as a `ReplayableDataset`; parameters "dy", "dx" in
    [0, 2 * max_shift]. `ReplayableShifts.from_dataset` wraps distill.data.digits' datasets.
    """

    def __init__(
        self, images: Tensor, targets: Tensor, *, max_shift: int, background: Tensor | None = None
    ) -> None:
        if images.ndim != 4 or len(images) != len(targets):
            raise ValueError(
                f"images must be (N, C, H, W) with N == len(targets), got {tuple(images.shape)} "
                f"and {tuple(targets.shape)}"
            )
        if max_shift < 0:
            raise ValueError(f"max_shift must be >= 0, got {max_shift}")
        self.images, self.targets, self.max_shift = images, targets, max_shift
        c = images.shape[1]
        self.background = torch.zeros(c, 1, 1) if background is None else background.view(c, 1, 1)

    @classmethod
    def from_dataset(cls, dataset: Any) -> ReplayableShifts:
        """From a dataset with .images, .targets, .max_shift, .background (DigitsDataset)."""
        return cls(
            dataset.images,
            dataset.targets,
            max_shift=dataset.max_shift,
            background=getattr(dataset, "background", None),
        )

    def __len__(self) -> int:
        return len(self.targets)

    def draw(
        self, index: int, generator: torch.Generator
    ) -> tuple[dict[str, ParamValue], dict[str, Any]]:
        dy, dx = (
            int(v) for v in torch.randint(0, 2 * self.max_shift + 1, (2,), generator=generator)
        )
        params: dict[str, ParamValue] = {"dy": dy, "dx": dx}
        return params, self.replay(index, params)

    def replay(self, index: int, params: Params) -> dict[str, Any]:
        x = self.images[index]  # (C, H, W)
        c, h, w = x.shape
        s = self.max_shift
        padded = self.background.expand(c, h + 2 * s, w + 2 * s).clone()
        padded[:, s : s + h, s : s + w] = x
        dy, dx = int(params["dy"]), int(params["dx"])
        return {"input": padded[:, dy : dy + h, dx : dx + w], "target": self.targets[index]}

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise TypeError("index a ReplayableShifts through CachedDataset (or call draw/replay)")

    def data_signature(self) -> str:
        return array_signature(self.images, self.targets)

    def transform_config(self) -> dict[str, Any]:
        return {
            "type": "shift",
            "max_shift": self.max_shift,
            "background": self.background.flatten().tolist(),
        }


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass
class CacheEntry:
    params: dict[str, ParamValue]
    values: Tensor  # (k,) float16
    indices: Tensor  # (k,) int64
    tail_lse: Tensor  # () float32
    offset: Tensor  # () float32


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


class TeacherCache:
    """Read access to a cache written by `build_cache`. Use `TeacherCache.open(path, ...)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.fingerprint = Fingerprint(**manifest["fingerprint"])
        self.num_items: int = manifest["num_items"]
        self.crops: int = manifest["crops"]
        self.topk: int = manifest["topk"]
        self.num_classes: int = manifest["num_classes"]
        self.param_names_int: list[str] = manifest["param_names"]["int"]
        self.param_names_float: list[str] = manifest["param_names"]["float"]
        self.shard_size: int = manifest["shard_size"]
        self._shards: list[dict[str, Any]] = manifest["shards"]
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        expected: Fingerprint | str | None = None,
        *,
        verify: bool = True,
    ) -> TeacherCache:
        """Open a cache; refuse it if `expected` differs or (with `verify`) a shard was altered."""
        root = Path(path)
        mpath = root / MANIFEST
        if not mpath.is_file():
            hint = (
                " (a build was interrupted: rerun it to resume)"
                if (root / PROGRESS).exists()
                else ""
            )
            raise FileNotFoundError(
                f"no teacher cache at {root}: {MANIFEST} is missing{hint}; build one with "
                "`python -m distill cache-teacher` or distill.data.teacher_cache.build_cache"
            )
        manifest = json.loads(mpath.read_text())
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise CacheMismatchError(
                f"{mpath} is not a version-{VERSION} {FORMAT} manifest "
                f"(format={manifest.get('format')!r}, version={manifest.get('version')!r})"
            )
        cache = cls(root, manifest)
        if expected is not None:
            _check_fingerprint(root, cache.fingerprint, expected)
        if verify:
            cache.verify()
        return cache

    def verify(self) -> None:
        """Recompute every shard file's sha256 and compare with the manifest."""
        for shard in self._shards:
            for entry in shard["files"].values():
                p = self.path / entry["file"]
                if not p.is_file():
                    raise CacheCorruptError(
                        f"teacher cache shard file {p} is missing; rebuild the cache"
                    )
                if _file_sha256(p) != entry["sha256"]:
                    raise CacheCorruptError(
                        f"teacher cache shard file {p} does not match the checksum in {MANIFEST} "
                        "(modified or truncated); rebuild the cache"
                    )

    def __len__(self) -> int:
        return self.num_items

    def _shard(self, index: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= index < self.num_items:
            raise IndexError(f"index {index} out of range for a cache of {self.num_items} items")
        s = index // self.shard_size
        arrays = self._arrays.get(s)
        if arrays is None:
            files = self._shards[s]["files"]
            arrays = {
                name: np.load(self.path / entry["file"], mmap_mode="r")
                for name, entry in files.items()
            }
            self._arrays[s] = arrays
        return arrays, index - s * self.shard_size

    def _check_draw(self, draw: int) -> None:
        if not 0 <= draw < self.crops:
            raise IndexError(
                f"draw {draw} out of range: the cache holds {self.crops} crops per item"
            )

    def params(self, index: int, draw: int) -> dict[str, ParamValue]:
        self._check_draw(draw)
        arrays, row = self._shard(index)
        out: dict[str, ParamValue] = {}
        if self.param_names_int:
            ints = arrays["params_int"][row, draw]
            out.update({n: int(v) for n, v in zip(self.param_names_int, ints)})
        if self.param_names_float:
            floats = arrays["params_float"][row, draw]
            out.update({n: float(v) for n, v in zip(self.param_names_float, floats)})
        return out

    def entry(self, index: int, draw: int) -> CacheEntry:
        self._check_draw(draw)
        arrays, row = self._shard(index)
        return CacheEntry(
            params=self.params(index, draw),
            values=torch.from_numpy(np.array(arrays["values"][row, draw])),
            indices=torch.from_numpy(np.array(arrays["indices"][row, draw]).astype(np.int64)),
            tail_lse=torch.tensor(float(arrays["tail_lse"][row, draw])),
            offset=torch.tensor(float(arrays["offset"][row, draw])),
        )

    def logits(self, index: int, draw: int, *, raw: bool = False) -> Tensor:
        """Reconstructed dense (C,) float32 logits of one draw (relative to the row max unless
        `raw`, which adds the stored max back)."""
        e = self.entry(index, draw)
        return reconstruct_logits(
            e.values, e.indices, e.tail_lse, self.num_classes, e.offset if raw else None
        )

    def nbytes(self) -> int:
        return sum(
            (self.path / e["file"]).stat().st_size
            for s in self._shards
            for e in s["files"].values()
        )


# --------------------------------------------------------------------------------------------
# Training-time replay
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


class _Draws(torch.utils.data.Dataset[dict[str, Any]]):
    """Flat view (index * K + draw) of a replayable dataset, for the build's DataLoader."""

    def __init__(
        self,
        dataset: ReplayableDataset,
        crops: int,
        seed: int,
        names_int: Sequence[str],
        names_float: Sequence[str],
        flat: Sequence[int],
    ) -> None:
        self.dataset, self.crops, self.seed = dataset, crops, seed
        self.names_int, self.names_float, self.flat = list(names_int), list(names_float), flat

    def __len__(self) -> int:
        return len(self.flat)

    def __getitem__(self, i: int) -> dict[str, Any]:
        flat = self.flat[i]
        index, draw = divmod(flat, self.crops)
        params, item = self.dataset.draw(index, draw_generator(self.seed, index, draw))
        missing = set(self.names_int) | set(self.names_float)
        if set(params) != missing:
            raise ValueError(
                f"item {index} drew parameters {sorted(params)} but the first item drew "
                f"{sorted(missing)}: every draw must return the same parameter names"
            )
        x = item.get("teacher_input")
        return {
            "flat": flat,
            "prepared": x is not None,
            "x": item["input"] if x is None else x,
            "pi": torch.tensor([int(params[n]) for n in self.names_int], dtype=torch.int64),
            "pf": torch.tensor([float(params[n]) for n in self.names_float], dtype=torch.float32),
        }


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


def _takes_prepared(teacher: nn.Module) -> bool:
    import inspect

    try:
        return "prepared" in inspect.signature(teacher.forward).parameters
    except (TypeError, ValueError):
        return False


def _save_npy(path: Path, array: np.ndarray) -> str:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)
    return _file_sha256(path)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False))
    os.replace(tmp, path)


def build_cache(
    teacher: nn.Module,
    dataset: ReplayableDataset,
    out_dir: str | os.PathLike[str],
    *,
    crops: int,
    topk: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    seed: int = 0,
    shard_size: int = 50_000,
    num_workers: int = 0,
    fingerprint: Fingerprint | None = None,
    overwrite: bool = False,
    progress: bool = True,
    autocast: bool | None = None,
) -> TeacherCache:
    """Run `teacher` over `crops` augmentation draws of every item and write the cache.

    Draw d of item i uses `draw_generator(seed, i, d)`, so the cache does not depend on batch
    size, workers or device. Shards are written as they fill; an interrupted build resumes
    from its last complete shard when rerun with the same arguments. If `out_dir` already holds
    a cache with the same fingerprint it is returned unchanged; a different one is an error
    unless `overwrite`. `autocast` (default: on for CUDA) runs the teacher under bf16 autocast;
    the logits are stored from float32.
    """
    if crops < 1:
        raise ValueError(f"crops must be >= 1, got {crops}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size}, {shard_size}")
    n = len(dataset)
    if n == 0:
        raise ValueError("the dataset is empty: nothing to cache")
    out = Path(out_dir)
    device = torch.device(device)
    use_autocast = device.type == "cuda" if autocast is None else autocast
    teacher = teacher.to(device).eval()

    # Probe item 0 once: parameter names/types and the class count.
    params0, item0 = dataset.draw(0, draw_generator(seed, 0, 0))
    names_int = [k for k, v in params0.items() if isinstance(v, (bool, int, np.integer))]
    names_float = [k for k in params0 if k not in names_int]
    x0 = item0.get("teacher_input", item0["input"])
    with torch.inference_mode(), _maybe_autocast(device, use_autocast):
        num_classes = _teacher_logits(teacher, x0[None].to(device), "teacher_input" in item0).shape[
            1
        ]
    if not 1 <= topk <= num_classes:
        raise ValueError(f"topk={topk} must be between 1 and the teacher's {num_classes} classes")
    fp = fingerprint or Fingerprint.create(
        teacher, dataset, topk=topk, crops=crops, num_classes=num_classes
    )

    header = {
        "format": FORMAT,
        "version": VERSION,
        "fingerprint": asdict(fp),
        "digest": fp.digest,
        "num_items": n,
        "crops": crops,
        "topk": topk,
        "num_classes": num_classes,
        "seed": seed,
        "shard_size": shard_size,
        "param_names": {"int": names_int, "float": names_float},
        "index_dtype": "int16" if num_classes <= np.iinfo(np.int16).max else "int32",
        "reconstruction": "top-k logits minus row max (fp16) + logsumexp of the rest; the rest "
        "share that mass uniformly (distill.data.teacher_cache.reconstruct_logits)",
    }
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        old = json.loads((out / MANIFEST).read_text())
        same = old.get("digest") == fp.digest and old.get("seed") == seed
        if same and not overwrite:
            return TeacherCache.open(out, fp)
        if not overwrite:
            old_fp = Fingerprint(**old["fingerprint"])
            raise CacheMismatchError(
                f"{out} already holds a teacher cache built with different "
                f"{', '.join(old_fp.differences(fp)) or 'seed'}; pass overwrite=True "
                "(--overwrite) to replace it, or choose another output folder"
            )
        (out / MANIFEST).unlink()

    # Resume: shards whose files still match the checksums in progress.json are kept.
    done: dict[int, dict[str, Any]] = {}
    ppath = out / PROGRESS
    if ppath.exists() and not overwrite:
        prog = json.loads(ppath.read_text())
        if {k: prog.get(k) for k in header} == header:
            for s in prog["shards"]:
                if all(
                    (out / e["file"]).is_file() and _file_sha256(out / e["file"]) == e["sha256"]
                    for e in s["files"].values()
                ):
                    done[s["index"]] = s
    num_shards = math.ceil(n / shard_size)
    todo = [s for s in range(num_shards) if s not in done]
    flat = [
        f for s in todo for f in range(s * shard_size * crops, min((s + 1) * shard_size, n) * crops)
    ]
    loader = torch.utils.data.DataLoader(
        _Draws(dataset, crops, seed, names_int, names_float, flat),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    idx_dtype = np.int16 if header["index_dtype"] == "int16" else np.int32

    def new_buffers(s: int) -> dict[str, np.ndarray]:
        rows = min((s + 1) * shard_size, n) - s * shard_size
        return {
            "values": np.zeros((rows, crops, topk), np.float16),
            "indices": np.zeros((rows, crops, topk), idx_dtype),
            "tail_lse": np.zeros((rows, crops), np.float32),
            "offset": np.zeros((rows, crops), np.float32),
            "params_int": np.zeros((rows, crops, len(names_int)), np.int32),
            "params_float": np.zeros((rows, crops, len(names_float)), np.float32),
        }

    def flush(s: int, buf: dict[str, np.ndarray]) -> None:
        files = {}
        for name in _ARRAYS:
            fname = f"shard_{s:05d}.{name}.npy"
            files[name] = {
                "file": fname,
                "sha256": _save_npy(out / fname, buf[name]),
                "shape": list(buf[name].shape),
                "dtype": str(buf[name].dtype),
            }
        done[s] = {
            "index": s,
            "start": s * shard_size,
            "stop": s * shard_size + len(buf["values"]),
            "files": files,
        }
        _write_json(ppath, {**header, "shards": [done[k] for k in sorted(done)]})

    bar = _progress(total=len(flat), enabled=progress, desc=f"caching teacher ({crops} crops)")
    buffers: dict[int, dict[str, np.ndarray]] = {}
    written = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            x = batch["x"].to(device, non_blocking=True)
            prepared = bool(batch["prepared"][0])
            with _maybe_autocast(device, use_autocast):
                logits = _teacher_logits(teacher, x, prepared)
            if logits.shape[1] != num_classes:
                raise ValueError(
                    f"the teacher returned {logits.shape[1]} classes, then {num_classes}"
                )
            c = compress_topk(logits.float(), topk)
            vals = c.values.half().cpu().numpy()
            inds = c.indices.cpu().numpy().astype(idx_dtype)
            tails = c.tail_lse.cpu().numpy()
            offs = c.offset.cpu().numpy()
            for j, f in enumerate(batch["flat"].tolist()):
                index, d = divmod(f, crops)
                s, row = divmod(index, shard_size)
                buf = buffers.get(s)
                if buf is None:
                    buf = buffers[s] = new_buffers(s)
                buf["values"][row, d] = vals[j]
                buf["indices"][row, d] = inds[j]
                buf["tail_lse"][row, d] = tails[j]
                buf["offset"][row, d] = offs[j]
                buf["params_int"][row, d] = batch["pi"][j].numpy()
                buf["params_float"][row, d] = batch["pf"][j].numpy()
                # Flat order is sequential: a shard is complete once its last draw arrives.
                if f == min((s + 1) * shard_size, n) * crops - 1:
                    flush(s, buffers.pop(s))
            written += len(batch["flat"])
            bar.update(len(batch["flat"]))
    bar.close()
    if buffers:
        raise RuntimeError(f"shards {sorted(buffers)} were not completed; rerun to resume")
    rate = written / max(time.perf_counter() - t0, 1e-9)
    manifest = {
        **header,
        "shards": [done[k] for k in sorted(done)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build": {"device": str(device), "batch_size": batch_size, "draws_per_s": round(rate, 1)},
        "teacher_meta": _jsonable(getattr(teacher, "meta", None)),
    }
    _write_json(out / MANIFEST, manifest)
    ppath.unlink(missing_ok=True)
    return TeacherCache.open(out, fp, verify=False)


def _jsonable(obj: Any) -> Any:
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return None


def _maybe_autocast(device: torch.device, enabled: bool) -> Any:
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _NoBar:
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    # tqdm's default bar shows rate and ETA: "[elapsed<remaining, it/s]".
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def iter_entries(cache: TeacherCache) -> Iterator[tuple[int, int, CacheEntry]]:
    """Every (index, draw, entry) of a cache, in order (for inspection and tests)."""
    for i in range(len(cache)):
        for d in range(cache.crops):
            yield i, d, cache.entry(i, d)
