"""Student and teacher transforms, each at its own resolution and normalisation.

`build_transforms` is the usual ImageNet pipeline for one model. `PairedTransform` serves
distillation: it draws ONE crop box and flip per image and renders that same region twice, at the
student's resolution/normalisation ("input") and at the teacher's ("teacher_input"). Crop
parameters are plain values (`CropParams`): `sample_params` draws them from a `torch.Generator`,
`apply` renders given ones, so a teacher-output cache can replay the exact crop later.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from distill.constants import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_CROP_PCT = 0.875  # eval: resize to R / 0.875, centre-crop R (the ImageNet convention)
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")

Size = int | tuple[int, int]


def _hw(size: Size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


@dataclass(frozen=True)
class ViewSpec:
    """How one model wants its input: resolution (square int or (H, W)), mean/std in 0..1 units."""

    resolution: Size
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        h, w = _hw(self.resolution)
        problems = []
        if h < 1 or w < 1:
            problems.append(f"resolution must be positive, got {self.resolution}")
        if len(self.mean) != 3 or len(self.std) != 3:
            problems.append(f"mean/std need 3 values each, got {self.mean} / {self.std}")
        if any(s <= 0 for s in self.std):
            problems.append(f"std must be > 0, got {self.std}")
        if self.interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation must be one of {INTERPOLATIONS}")
        if problems:
            raise ValueError("ViewSpec: " + "; ".join(problems))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @property
    def size(self) -> tuple[int, int]:
        return _hw(self.resolution)


@dataclass(frozen=True)
class CropParams:
    """A crop box in source-image pixels and a horizontal flip, applied crop-then-flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool = False

    def as_tensor(self) -> Tensor:
        """(5,) int64: top, left, height, width, flip; collates into (B, 5)."""
        return torch.tensor(
            [self.top, self.left, self.height, self.width, int(self.flip)], dtype=torch.int64
        )

    @classmethod
    def from_tensor(cls, t: Tensor | Sequence[int]) -> CropParams:
        v = [int(x) for x in (t.tolist() if isinstance(t, Tensor) else t)]
        if len(v) != 5:
            raise ValueError(f"crop params need 5 values (top, left, height, width, flip), got {v}")
        return cls(v[0], v[1], v[2], v[3], bool(v[4]))


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def sample_crop_params(
    width: int,
    height: int,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> CropParams:
    """A random-resized-crop box (Szegedy et al. 2015, "Going deeper with convolutions"):
    area fraction uniform in `scale`, aspect ratio log-uniform in `ratio`; up to 10 tries,
    then the largest centred box within `ratio`. The flip is always drawn, so every call
    consumes the generator the same way.
    """
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    box: tuple[int, int, int, int] | None = None
    for _ in range(10):
        target = area * _uniform(scale[0], scale[1], generator)
        aspect = math.exp(_uniform(log_lo, log_hi, generator))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            box = (top, left, h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = float(torch.rand((), generator=generator)) < flip_p
    return CropParams(*box, flip=flip)


def center_crop_params(
    width: int, height: int, *, crop_pct: float = DEFAULT_CROP_PCT, aspect: float = 1.0
) -> CropParams:
    """The region that resize(R / crop_pct) + centre-crop(R) keeps, in source pixels.

    `aspect` is the output's width / height (1 for square inputs).
    """
    if not (0 < crop_pct <= 1):
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    short = min(width, height)
    # resize maps the shorter side to R/crop_pct, so the kept R pixels are crop_pct of it
    if aspect >= 1:
        w = min(width, round(short * crop_pct * aspect))
        h = min(height, round(short * crop_pct))
    else:
        w = min(width, round(short * crop_pct))
        h = min(height, round(short * crop_pct / aspect))
    w, h = max(w, 1), max(h, 1)
    return CropParams((height - h) // 2, (width - w) // 2, h, w, False)


def _interp(name: str) -> Any:
    from torchvision.transforms import InterpolationMode

    return InterpolationMode(name)


def to_normalized_tensor(img: Image.Image, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """PIL RGB -> (3, H, W) float32, (x/255 - mean) / std."""
    from torchvision.transforms.v2 import functional as F

    x = F.pil_to_tensor(img).float().div_(255.0)
    return F.normalize(x, list(mean), list(std))


def apply_crop(img: Image.Image, params: CropParams, view: ViewSpec) -> Tensor:
    """Render `params` of `img` as `view` wants it: (3, H, W) float32, normalised."""
    from torchvision.transforms.v2 import functional as F

    out = F.resized_crop(
        img,
        params.top,
        params.left,
        params.height,
        params.width,
        list(view.size),
        interpolation=_interp(view.interpolation),
        antialias=True,
    )
    if params.flip:
        out = F.horizontal_flip(out)
    return to_normalized_tensor(out, view.mean, view.std)


def build_transforms(
    resolution: Size,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train: bool = False,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    crop_pct: float = DEFAULT_CROP_PCT,
    interpolation: str = "bilinear",
    hflip: bool = True,
) -> Callable[[Image.Image], Tensor]:
    """PIL RGB -> normalised (3, H, W) float32.

    train: RandomResizedCrop(resolution, scale, ratio) + horizontal flip;
    eval: resize the shorter side to int(R / crop_pct), centre-crop R.
    """
    from torchvision.transforms import v2

    view = ViewSpec(resolution, tuple(mean), tuple(std), interpolation)
    h, w = view.size
    interp = _interp(interpolation)
    steps: list[Any]
    if train:
        steps = [v2.RandomResizedCrop((h, w), scale=scale, ratio=ratio, interpolation=interp)]
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        if not (0 < crop_pct <= 1):
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        steps = [
            v2.Resize(int(max(h, w) / crop_pct), interpolation=interp, antialias=True),
            v2.CenterCrop((h, w)),
        ]
    steps += [
        v2.PILToTensor(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(view.mean), list(view.std)),
    ]
    return v2.Compose(steps)  # type: ignore[no-any-return]


class PairedTransform:
    """One crop, two renderings: {"input": student view, "teacher_input": teacher view}.

    train=True draws a random-resized crop and flip per call; train=False uses the centred
    `crop_pct` region (what resize + centre-crop keeps), so both views show the same pixels.
    With `seed` set, calls that pass `index` draw from a generator seeded by (seed, epoch, index):
    the crop of sample i in epoch e is then a pure function of those three numbers and can be
    recomputed anywhere (`params_for`). `return_params=True` adds "crop": (5,) int64.
    `teacher=None` gives the student view only.
    """

    def __init__(
        self,
        student: ViewSpec,
        teacher: ViewSpec | None = None,
        *,
        train: bool,
        scale: tuple[float, float] = DEFAULT_SCALE,
        ratio: tuple[float, float] = DEFAULT_RATIO,
        flip_p: float = 0.5,
        crop_pct: float = DEFAULT_CROP_PCT,
        seed: int | None = None,
        return_params: bool = False,
    ) -> None:
        if not (0 <= flip_p <= 1):
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.student = student
        self.teacher = teacher
        self.train = train
        self.scale = scale
        self.ratio = ratio
        self.flip_p = flip_p
        self.crop_pct = crop_pct
        self.seed = seed
        self.epoch = 0
        self.return_params = return_params

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def generator_for(self, index: int, epoch: int | None = None) -> torch.Generator:
        if self.seed is None:
            raise ValueError("PairedTransform(seed=None) has no per-sample generator; set seed")
        e = self.epoch if epoch is None else epoch
        # a fixed mixing of three integers into one 63-bit seed
        s = ((self.seed * 1_000_003 + e) * 1_000_003 + int(index)) % (2**63 - 1)
        return torch.Generator().manual_seed(s)

    def sample_params(
        self, image_size: tuple[int, int], generator: torch.Generator | None = None
    ) -> CropParams:
        """Crop params for an image of PIL size (width, height)."""
        width, height = image_size
        if self.train:
            return sample_crop_params(
                width,
                height,
                scale=self.scale,
                ratio=self.ratio,
                flip_p=self.flip_p,
                generator=generator,
            )
        h, w = self.student.size
        return center_crop_params(width, height, crop_pct=self.crop_pct, aspect=w / h)

    def params_for(
        self, image_size: tuple[int, int], index: int, epoch: int | None = None
    ) -> CropParams:
        """The params `__call__(img, index)` uses in `epoch` (requires `seed`)."""
        return self.sample_params(image_size, self.generator_for(index, epoch))

    def apply(self, img: Image.Image, params: CropParams) -> dict[str, Tensor]:
        out = {"input": apply_crop(img, params, self.student)}
        if self.teacher is not None:
            out["teacher_input"] = apply_crop(img, params, self.teacher)
        if self.return_params:
            out["crop"] = params.as_tensor()
        return out

    def __call__(self, img: Image.Image, index: int | None = None) -> dict[str, Tensor]:
        g = self.generator_for(index) if self.seed is not None and index is not None else None
        return self.apply(img, self.sample_params(img.size, g))


def run_transform(
    transform: Callable[..., Any] | None, img: Image.Image, index: int
) -> dict[str, Any]:
    """Apply a transform and return the sample dict ("input", maybe "teacher_input"/"crop").

    A `PairedTransform` also gets the sample index (for seeded crops); `None` gives the
    unnormalised (3, H, W) float tensor in 0..1.
    """
    if transform is None:
        from torchvision.transforms.v2 import functional as F

        return {"input": F.pil_to_tensor(img).float().div_(255.0)}
    out = transform(img, index) if isinstance(transform, PairedTransform) else transform(img)
    if isinstance(out, dict):
        if "input" not in out:
            raise KeyError(f"transform returned keys {sorted(out)}; it must return 'input'")
        return dict(out)
    return {"input": out}
