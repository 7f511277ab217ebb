"""What a dataset must offer to be cached and replayed, and the two datasets that offer it.

A per-index cache of teacher outputs is wrong under augmentation: the teacher's answer depends
on the crop. So the cache stores, for each of K draws per item, the draw's random parameters
(crop box, flip, shift, ...) next to the teacher's answer, and training replays the parameters:
the student sees the pixels the teacher saw.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from distill.data.cache.fingerprint import array_signature, config_signature, files_signature
from distill.data.images import load_image
from distill.data.transforms import CropParams

__all__ = [
    "ParamValue",
    "Params",
    "ReplayableDataset",
    "ReplayableImages",
    "ReplayableShifts",
    "draw_generator",
]

ParamValue = int | float
Params = Mapping[str, ParamValue]


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


def _view_config(view: Any) -> Any:
    """A ViewSpec as a dict; an ensemble's tuple of views as a list of them."""
    if view is None:
        return None
    if isinstance(view, (tuple, list)):
        return [_view_config(v) for v in view]
    return asdict(view)


def draw_generator(seed: int, index: int, draw: int) -> torch.Generator:
    """The generator of draw `draw` of item `index`: independent of batch order and workers."""
    state = np.random.SeedSequence([seed, index, draw]).generate_state(2, dtype=np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


class ReplayableImages(torch.utils.data.Dataset[dict[str, Any]]):
    """Image files + a `distill.data.transforms.PairedTransform` as a `ReplayableDataset`.

    Parameters are the crop box and flip of `CropParams` (top, left, height, width, flip);
    items are the transform's {"input", "teacher_input"} plus "target" (a class id, a tensor
    such as 40 attribute labels, or None for unlabelled images, which then have no "target").
    The data signature is the file list (paths relative to `root`, sizes) and the labels; the
    transform's is its views and ranges.
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

        # absolute: files are named relative to `root`, which a relative path would name twice
        folder = os.path.abspath(os.fspath(root))
        _, class_to_idx = find_classes(folder)
        return cls(make_dataset(folder, class_to_idx, IMG_EXTENSIONS), transform, root=folder)

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, index: int) -> Any:
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
        return params, self._item(self.transform.apply(img, p), index)

    def _item(self, views: dict[str, Any], index: int) -> dict[str, Any]:
        target = self.samples[index][1]
        return views if target is None else {**views, "target": target}

    def replay(self, index: int, params: Params) -> dict[str, Any]:
        p = CropParams(
            int(params["top"]),
            int(params["left"]),
            int(params["height"]),
            int(params["width"]),
            bool(params["flip"]),
        )
        return self._item(self.transform.apply(self._image(index), p), index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        raise TypeError("index a ReplayableImages through CachedDataset (or call draw/replay)")

    def data_signature(self) -> str:
        files = files_signature((p for p, _ in self.samples), self.root)
        labels = [y.tolist() if isinstance(y, Tensor) else y for _, y in self.samples]
        return config_signature({"files": files, "labels": labels})

    def transform_config(self) -> dict[str, Any]:
        t = self.transform
        views = {side: _view_config(getattr(t, side, None)) for side in ("student", "teacher")}
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
