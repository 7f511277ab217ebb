"""Decode and augment a batch of encoded images on the accelerator: student and teacher views.

PIL decodes and resizes about 200 ImageNet images/s per CPU core, far below what a GPU trains
a MobileNet at; nvJPEG (`torchvision.io.decode_jpeg(list, device="cuda")`) decodes thousands.
So the data loader only reads the encoded bytes (`distill.data.encoded`) and the batch is
decoded, cropped, flipped and normalised on the device:

    paired = paired_views(teacher, 128, train=True)               # the PIL path's transform
    transform = GpuBatchTransform.from_paired(paired, device="auto")
    loader = encoded_loader(EncodedImageFolder(root), transform, batch_size=256, shuffle=True)
    for batch in loader:                # workers read bytes; accelerate calls batch.to(device)
        views = batch.to(transform.device)
        views["input"]          # (B, 3, 128, 128) float32, the student's view
        views["teacher_input"]  # (B, 3, 224, 224): the same crops, natively at 224 px

What the teacher sees has one owner, `distill.data.transforms`: each image's crop is drawn by
its one sampler from the sample's crop seed, and rendered by its one renderer (`render_view`),
per view. Without CUDA the images are decoded by `distill.data.load_image` (PIL), as on the
per-image PIL path, so the CPU fallback hands the student and the teacher bit-identical
tensors to `PairedTransform`'s. On CUDA, nvJPEG decodes and the resize runs in float32 (then
rounds to uint8): pixels may differ from the CPU's by rounding, while the crop box, sizes,
interpolation and normalisation are the same. Recipes expose this as `--gpu-pipeline
auto|on|off` (see `pipeline_device`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from distill.constants import IMAGENET_MEAN, IMAGENET_STD
from distill.data.images import BadImageError, load_image
from distill.data.transforms import (
    DEFAULT_CROP_PCT,
    DEFAULT_RATIO,
    DEFAULT_SCALE,
    CropParams,
    PairedTransform,
    TeacherViews,
    ViewSpec,
    to_uint8_image,
)

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


def _is_jpeg(data: Tensor) -> bool:
    return data.numel() > 2 and int(data[0]) == 0xFF and int(data[1]) == 0xD8


def _decode_on_cpu(data: Tensor, name: str) -> Tensor:
    """(3, H, W) uint8 by `load_image`: the PIL path's decoder (CMYK, 16-bit, alpha handled)."""
    return to_uint8_image(load_image(data.numpy().tobytes(), name=name))


class GpuBatchTransform:
    """Encoded images + their crop seeds -> {"input": (B, 3, h, w), "teacher_input"?} on a device.

    The student's view is `size` with `mean`/`std`/`interpolation`; `teacher` (a `ViewSpec`)
    adds "teacher_input", the same crop boxes rendered natively at the teacher's resolution,
    normalisation and interpolation, unless it renders exactly like the student's view; a
    tuple of views (an ensemble's, from `paired_views(teachers, ...)`) makes it a tuple of
    batches, one per member.
    `train=True`: random-resized-crop (`scale`, `ratio`) + horizontal flip (`hflip`), one per
    image from its crop seed; `train=False`: centre crop of `crop_pct`. Crops and rendering are
    those of the equivalent `PairedTransform` (`self.views`); `from_paired` builds one from it.
    `device="auto"` picks cuda when available, else cpu.
    """

    def __init__(
        self,
        size: int | tuple[int, int] = 224,
        *,
        teacher: TeacherViews = None,
        train: bool = True,
        scale: tuple[float, float] = DEFAULT_SCALE,
        ratio: tuple[float, float] = DEFAULT_RATIO,
        hflip: float = 0.5,
        crop_pct: float = DEFAULT_CROP_PCT,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        device: str | torch.device = "auto",
        channels_last: bool = True,
    ) -> None:
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        student = ViewSpec(size, tuple(mean), tuple(std), interpolation)
        self.views = PairedTransform(
            student,
            None if isinstance(teacher, ViewSpec) and student.same_as(teacher) else teacher,
            train=train,
            scale=scale,
            ratio=ratio,
            flip_p=hflip,
            crop_pct=crop_pct,
        )
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.channels_last = channels_last

    @classmethod
    def from_paired(
        cls,
        views: PairedTransform,
        *,
        device: str | torch.device = "auto",
        channels_last: bool = True,
    ) -> GpuBatchTransform:
        """The batched pipeline of a `PairedTransform` (e.g. `paired_views`): the same views,
        crop distribution and eval crop."""
        s = views.student
        return cls(
            s.resolution,
            teacher=views.teacher,
            train=views.train,
            scale=views.scale,
            ratio=views.ratio,
            hflip=views.flip_p,
            crop_pct=views.crop_pct,
            mean=s.mean,
            std=s.std,
            interpolation=s.interpolation,
            device=device,
            channels_last=channels_last,
        )

    @property
    def size(self) -> tuple[int, int]:
        return self.views.student.size

    @property
    def teacher(self) -> TeacherViews:
        return self.views.teacher

    @property
    def train(self) -> bool:
        return self.views.train

    def config(self) -> dict[str, Any]:
        """The parameters that determine the output (for a teacher cache's fingerprint)."""
        from dataclasses import asdict

        v = self.views
        teacher: Any = None
        if isinstance(v.teacher, ViewSpec):
            teacher = asdict(v.teacher)
        elif v.teacher is not None:  # an ensemble's, one per member
            teacher = [asdict(t) for t in v.teacher]
        return {
            "student": asdict(v.student),
            "teacher": teacher,
            "train": v.train,
            "scale": list(v.scale),
            "ratio": list(v.ratio),
            "hflip": v.flip_p,
            "crop_pct": v.crop_pct,
        }

    def decode(
        self,
        data: Sequence[Tensor],
        *,
        device: str | torch.device | None = None,
        names: Sequence[str] | None = None,
    ) -> list[Tensor]:
        """Encoded images -> (3, H, W) uint8 tensors on `device` (default `self.device`).

        On the CPU every image goes through `load_image`. On CUDA the JPEGs are decoded in one
        nvJPEG call; other formats, and JPEGs that call rejects, go through `load_image` too.
        An undecodable image raises `BadImageError` naming it (`names`, else its position).
        """
        dev = torch.device(device) if device is not None else self.device
        label = (
            list(names)
            if names is not None
            else [f"image {i} of the batch" for i in range(len(data))]
        )
        out: list[Tensor | None] = [None] * len(data)
        jpegs = [i for i, d in enumerate(data) if _is_jpeg(d)] if dev.type == "cuda" else []
        if jpegs:
            from torchvision.io import ImageReadMode, decode_jpeg

            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its codecs in favour of torchcodec; they still work
                warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities.*")
                try:
                    dec = decode_jpeg([data[i] for i in jpegs], mode=ImageReadMode.RGB, device=dev)
                    for i, img in zip(jpegs, dec):
                        out[i] = img
                except RuntimeError:
                    pass  # one bad/unsupported file fails the whole call: go one by one
        for i, img in enumerate(out):
            if img is None:
                try:
                    out[i] = _decode_on_cpu(data[i], label[i]).to(dev, non_blocking=True)
                except BadImageError as e:
                    raise BadImageError(
                        e.path,
                        e.reason,
                        f"{e.detail}; --gpu-pipeline off decodes with PIL per image, which "
                        "skips and counts such files",
                    ) from None
        return [t for t in out if t is not None]

    def params(
        self, images: Sequence[Tensor], crop_seeds: Sequence[int] | Tensor
    ) -> list[CropParams]:
        """The crop of each decoded image (3, H, W), from its crop seed (see `draw_crop_seed`)."""
        seeds = [int(s) for s in crop_seeds]
        if len(seeds) != len(images):
            raise ValueError(f"{len(images)} images but {len(seeds)} crop seeds")
        return [
            self.views.crop_for((int(img.shape[-1]), int(img.shape[-2])), s)
            for img, s in zip(images, seeds)
        ]

    def apply(self, images: Sequence[Tensor], params: Sequence[CropParams]) -> dict[str, Any]:
        """Render each view of decoded uint8 `images` with given crops: {"input": (B, 3, h, w),
        "teacher_input"?: (B, 3, H_t, W_t), or a tuple of those for an ensemble}, normalised
        float32, on the images' device."""
        if len(images) != len(params) or not images:
            raise ValueError(f"{len(images)} images and {len(params)} crops: need as many, >= 1")
        rendered = [self.views.apply(img, p) for img, p in zip(images, params)]
        out: dict[str, Any] = {}
        for key, first in rendered[0].items():
            if isinstance(first, tuple):  # an ensemble's views: one batch per member
                out[key] = tuple(
                    self._stack([r[key][m] for r in rendered]) for m in range(len(first))
                )
            else:
                out[key] = self._stack([r[key] for r in rendered])
        return out

    def _stack(self, views: list[Tensor]) -> Tensor:
        batch = torch.stack(views)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return batch

    def __call__(
        self,
        data: Sequence[Tensor],
        crop_seeds: Sequence[int] | Tensor,
        *,
        device: str | torch.device | None = None,
        names: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Decode, crop and render a batch on `device` (default `self.device`)."""
        images = self.decode(data, device=device, names=names)
        return self.apply(images, self.params(images, crop_seeds))
