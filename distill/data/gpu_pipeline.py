"""An input pipeline that decodes JPEGs and augments them on the accelerator, in batches.

PIL decodes and resizes about 200 ImageNet images/s per CPU core, far below what a GPU trains
a MobileNet at; nvJPEG (`torchvision.io.decode_jpeg(list, device="cuda")`) decodes thousands.
So the data loader only reads the encoded bytes and the batch is decoded, cropped, flipped and
normalised on the device:

    dataset = EncodedImageFolder(root)                      # (bytes, label) per image
    transform = GpuBatchTransform(224, device="auto")       # cuda if available, else cpu
    for batch in encoded_loader(dataset, transform, batch_size=256, shuffle=True):
        batch["input"]  # (B, 3, 224, 224) float32, normalised, on transform.device

Without CUDA the same code runs on the CPU: `encoded_loader` then does the decode + augment in
the DataLoader's worker processes (the `collate_fn`), so it parallelises like the PIL pipeline.
Recipes expose this as `--gpu-pipeline auto|on|off` (see `pipeline_device`).

The random-resized-crop parameters follow torchvision's `RandomResizedCrop` (scale, log-uniform
ratio, ten tries, then a centre crop), drawn for the whole batch from one generator seeded by
(seed, epoch, the batch's dataset indices): the same batch gets the same crops whichever worker
or device produces it. Evaluation mode resizes the shorter side to size / crop_pct and takes the
centre crop, as a single crop-and-resize.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from distill.constants import IMAGENET_MEAN, IMAGENET_STD

JPEG_EXTENSIONS = (".jpg", ".jpeg", ".JPG", ".JPEG")
IMAGE_EXTENSIONS = (*JPEG_EXTENSIONS, ".png", ".PNG")

PipelineFlag = Literal["auto", "on", "off"]


def pipeline_device(flag: PipelineFlag | str) -> torch.device | None:
    """What `--gpu-pipeline` means: the device the batch transform runs on, or None for the
    per-image PIL pipeline. "auto": cuda when available, else the same batched path on the
    CPU; "on": cuda, or an error if there is none; "off": None."""
    if flag == "off":
        return None
    if flag == "on":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--gpu-pipeline on needs a CUDA device, and torch sees none; use "
                "--gpu-pipeline auto (falls back to CPU decoding) or off (PIL)"
            )
        return torch.device("cuda")
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    raise ValueError(f"--gpu-pipeline must be auto, on or off, got {flag!r}")


# --------------------------------------------------------------------------------------------
# Datasets of encoded bytes
# --------------------------------------------------------------------------------------------


def read_bytes(path: str | os.PathLike[str]) -> Tensor:
    """A file's bytes as a 1-D uint8 tensor (what `decode_jpeg` reads)."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError(f"{path} is empty (0 bytes)")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class EncodedImageFolder(torch.utils.data.Dataset[dict[str, Any]]):
    """ImageFolder layout (root/<class>/<image>), items are undecoded bytes.

    Items: {"data": (N,) uint8, "target": int, "index": int}. Classes are the sorted folder
    names, as in torchvision's ImageFolder, so labels agree with it.
    """

    def __init__(self, root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS):
        from torchvision.datasets.folder import find_classes, make_dataset

        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.classes, self.class_to_idx = find_classes(str(self.root))
        self.samples: list[tuple[str, int]] = make_dataset(
            str(self.root), self.class_to_idx, extensions=tuple(extensions)
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, target = self.samples[index]
        return {"data": read_bytes(path), "target": target, "index": index}


def encoded_webdataset(
    urls: str | Sequence[str],
    *,
    image_keys: Sequence[str] = ("jpg", "jpeg"),
    label_key: str = "cls",
    shuffle: int = 0,
) -> Iterable[dict[str, Any]]:
    """A webdataset pipeline of {"data": uint8 bytes, "target": int, "index": running int}.

    Shards are tar files whose samples hold an image (`image_keys`, first present wins) and a
    class label (`label_key`, text). Webdataset yields samples, not indices, so the crop
    generator is seeded from a running sample counter instead of a dataset index.
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
            yield {**item, "index": n * nw + wid}


def collate_encoded(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Keep the variable-length byte tensors as a list; stack labels and indices."""
    return {
        "data": [s["data"] for s in samples],
        "target": torch.as_tensor([int(s["target"]) for s in samples], dtype=torch.int64),
        "index": torch.as_tensor([int(s.get("index", i)) for i, s in enumerate(samples)]),
    }


# --------------------------------------------------------------------------------------------
# The batch transform
# --------------------------------------------------------------------------------------------


def batch_generator(seed: int, epoch: int, index: Tensor | Sequence[int] | None) -> torch.Generator:
    """A CPU generator determined by (seed, epoch, the batch's indices)."""
    ids = [] if index is None else [int(i) for i in index]
    state = np.random.SeedSequence([seed, epoch, len(ids), *ids]).generate_state(2, np.uint32)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def sample_crops(
    sizes: Sequence[tuple[int, int]],
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
) -> Tensor:
    """RandomResizedCrop boxes + flips for images of `sizes` [(H, W)], as (B, 5) int64 rows
    (top, left, height, width, flip); torchvision's algorithm, vectorised over the batch."""
    b = len(sizes)
    hw = torch.tensor(sizes, dtype=torch.float64).reshape(b, 2)
    height, width = hw[:, 0:1], hw[:, 1:2]  # (B, 1)
    tries = 10
    u = torch.rand(b, tries, 4, generator=generator, dtype=torch.float64)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[..., 0])  # (B, 10)
    lr = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(lr[0] + (lr[1] - lr[0]) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, 10)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1))
    out = torch.empty(b, 5, dtype=torch.int64)
    flips = torch.rand(b, generator=generator) < hflip
    for n in range(b):
        hh, ww = int(height[n]), int(width[n])
        t = int(first[n])
        if t >= 0:
            ch, cw = int(h[n, t]), int(w[n, t])
            # Uniform offsets from the same uniform draws (u[..., 2:]), so one generator call
            # serves the whole batch.
            top = min(int(u[n, t, 2] * (hh - ch + 1)), hh - ch)
            left = min(int(u[n, t, 3] * (ww - cw + 1)), ww - cw)
        else:  # torchvision's fallback: centre crop at the nearest allowed ratio
            in_ratio = ww / hh
            if in_ratio < min(ratio):
                cw, ch = ww, round(ww / min(ratio))
            elif in_ratio > max(ratio):
                ch, cw = hh, round(hh * max(ratio))
            else:
                ch, cw = hh, ww
            top, left = (hh - ch) // 2, (ww - cw) // 2
        out[n] = torch.tensor([top, left, ch, cw, int(flips[n])])
    return out


def center_crops(sizes: Sequence[tuple[int, int]], crop_pct: float = 0.875) -> Tensor:
    """The box of "resize shorter side to S / crop_pct, centre-crop S", as (B, 5) rows."""
    rows = []
    for hh, ww in sizes:
        side = max(1, min(round(min(hh, ww) * crop_pct), hh, ww))
        rows.append([(hh - side) // 2, (ww - side) // 2, side, side, 0])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 5)


class GpuBatchTransform:
    """Decode a list of encoded images and return a normalised (B, 3, S, S) batch on `device`.

    `train=True`: random-resized-crop (`scale`, `ratio`) + horizontal flip (`hflip`);
    `train=False`: centre crop of `crop_pct`. Resizing is bilinear with antialiasing, on uint8
    when on the CPU (torchvision's fast path) and float on CUDA. `device="auto"` picks cuda when
    available, else cpu. JPEGs are decoded in one batched call (nvJPEG on CUDA); other formats
    and JPEGs the batched call rejects (e.g. CMYK) are decoded one by one on the CPU.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        *,
        train: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        device: str | torch.device = "auto",
        channels_last: bool = True,
        seed: int = 0,
    ) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        if min(self.size) < 1:
            raise ValueError(f"size must be positive, got {size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {crop_pct}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean/std must be 3 numbers (std > 0), got {mean}, {std}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.train, self.scale, self.ratio, self.hflip = train, scale, ratio, hflip
        self.crop_pct, self.channels_last, self.seed = crop_pct, channels_last, seed
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # 0..255 -> normalised in one multiply-add: (x / 255 - mean) / std.
        self._scale = torch.tensor([1 / (255 * s) for s in self.std]).view(1, 3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(1, 3, 1, 1)

    def config(self) -> dict[str, Any]:
        """The parameters that determine the output (for a teacher cache's fingerprint)."""
        return {
            "size": list(self.size),
            "train": self.train,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "hflip": self.hflip,
            "crop_pct": self.crop_pct,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def decode(self, data: Sequence[Tensor]) -> list[Tensor]:
        """Encoded images -> list of (3, H, W) uint8 tensors on `self.device`."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        rgb = ImageReadMode.RGB
        is_jpeg = [d.numel() > 2 and int(d[0]) == 0xFF and int(d[1]) == 0xD8 for d in data]
        out: list[Tensor | None] = [None] * len(data)
        jpegs = [i for i, j in enumerate(is_jpeg) if j]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its codecs in favour of torchcodec; they still work.
            warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities.*")
            if jpegs:
                try:
                    dec = decode_jpeg([data[i] for i in jpegs], mode=rgb, device=self.device)
                    for i, img in zip(jpegs, dec):
                        out[i] = img
                except RuntimeError:
                    pass  # one bad/unsupported file fails the whole call: go one by one
            for i, img in enumerate(out):
                if img is None:
                    try:
                        out[i] = decode_image(data[i], mode=rgb).to(self.device, non_blocking=True)
                    except RuntimeError as e:
                        raise ValueError(
                            f"image {i} of the batch cannot be decoded ({e}); run the dataset "
                            "through distill.data's image checks to find and skip bad files"
                        ) from None
        return [t for t in out if t is not None]

    def params(self, images: Sequence[Tensor], generator: torch.Generator) -> Tensor:
        """(B, 5) int64 rows (top, left, height, width, flip) for decoded `images`."""
        sizes = [(int(t.shape[-2]), int(t.shape[-1])) for t in images]
        if not self.train:
            return center_crops(sizes, self.crop_pct)
        return sample_crops(sizes, generator, scale=self.scale, ratio=self.ratio, hflip=self.hflip)

    def apply(self, images: Sequence[Tensor], params: Tensor) -> Tensor:
        """Crop, resize, flip and normalise decoded uint8 `images` with given `params`."""
        import torchvision.transforms.v2.functional as TF

        if len(images) != len(params):
            raise ValueError(f"{len(images)} images but {len(params)} parameter rows")
        rows = params.tolist()
        crops = []
        for img, (top, left, h, w, flip) in zip(images, rows):
            if img.device.type == "cpu":  # uint8 in, uint8 out: torchvision's SIMD path
                x = TF.resized_crop(img, top, left, h, w, list(self.size), antialias=True)
            else:  # crop first, so only the crop is converted to float
                x = TF.resize(
                    img[:, top : top + h, left : left + w].float(), list(self.size), antialias=True
                )
            crops.append(x.flip(-1) if flip else x)
        batch = torch.stack(crops).float()  # (B, 3, S, S) in 0..255
        if batch.device.type != "cpu":
            batch = batch.clamp_(0, 255).round_()  # match the uint8 CPU path's quantisation
        batch = batch * self._scale.to(batch.device) + self._shift.to(batch.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def __call__(
        self, data: Sequence[Tensor], index: Tensor | Sequence[int] | None = None, epoch: int = 0
    ) -> Tensor:
        images = self.decode(data)
        return self.apply(images, self.params(images, batch_generator(self.seed, epoch, index)))


class _DecodeInWorkers:
    """collate_fn for the CPU fallback: the workers decode and augment."""

    def __init__(self, transform: GpuBatchTransform) -> None:
        self.transform = transform
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __call__(self, samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        b = collate_encoded(samples)
        x = self.transform(b["data"], b["index"], int(self.epoch))
        return {"input": x, "target": b["target"], "index": b["index"]}


class EncodedLoader:
    """Iterates {"input": (B, 3, S, S) on the transform's device, "target", "index"} batches.

    On CUDA the workers only read bytes and the main process decodes on the GPU; on the CPU the
    workers decode (see the module docstring). Call `set_epoch(e)` to change the crops.
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset[Any],
        transform: GpuBatchTransform,
        *,
        batch_size: int,
        shuffle: bool = False,
        num_workers: int = 0,
        drop_last: bool = False,
        seed: int = 0,
        persistent_workers: bool = True,
    ) -> None:
        self.transform = transform
        self.epoch = 0
        on_cpu = transform.device.type == "cpu"
        self._collate: Callable[[Sequence[Mapping[str, Any]]], dict[str, Any]]
        self._collate = _DecodeInWorkers(transform) if on_cpu else collate_encoded
        g = torch.Generator()
        g.manual_seed(seed)
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and not iterable,
            num_workers=num_workers,
            collate_fn=self._collate,
            drop_last=drop_last,
            generator=g if shuffle and not iterable else None,
            persistent_workers=persistent_workers and num_workers > 0,
            prefetch_factor=4 if num_workers > 0 else None,
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if isinstance(self._collate, _DecodeInWorkers):
            self._collate.epoch.fill_(epoch)
        set_sampler_epoch = getattr(self.loader.sampler, "set_epoch", None)
        if set_sampler_epoch is not None:
            set_sampler_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            if "input" in batch:
                yield batch
                continue
            x = self.transform(batch["data"], batch["index"], self.epoch)
            yield {
                "input": x,
                "target": batch["target"].to(x.device, non_blocking=True),
                "index": batch["index"],
            }


def encoded_loader(
    dataset: torch.utils.data.Dataset[Any],
    transform: GpuBatchTransform,
    *,
    batch_size: int,
    shuffle: bool = False,
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
) -> EncodedLoader:
    """See `EncodedLoader`."""
    return EncodedLoader(
        dataset,
        transform,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        drop_last=drop_last,
        seed=seed,
    )
