"""Student and teacher views of one crop, each at its own resolution and normalisation.

This module is the one owner of what the teacher sees, on every code path and device:

- `sample_crop_params` is the one random-resized-crop sampler (torchvision's algorithm, draw for
  draw): a `CropParams` per image from a `torch.Generator`. Each sample's generator is seeded
  by a 62-bit crop seed (`draw_crop_seed`) taken from torch's default CPU generator, which the
  training loop seeds from (seed, epoch, index) around every `__getitem__`
  (`distill.seeding.SeededDataset`): a sample's crop then depends on those three numbers
  only, not on the batch it lands in or the worker that loads it.
- `render_view` is the one renderer: a decoded (3, H, W) uint8 image, a `CropParams` and a
  `ViewSpec` give the normalised (3, h, w) float32 view, on whatever device the image is on.
- `PairedTransform` draws ONE crop per image and renders it twice, for the student ("input")
  and natively for the teacher ("teacher_input"); `paired_views` builds it for a (teacher,
  student resolution) pair, and `distill.data.gpu_pipeline.GpuBatchTransform.from_paired`
  derives the batched (nvJPEG) pipeline from it, so both paths show the teacher the same crop.
  For an ensemble (`distill.ensemble.Teachers`) "teacher_input" is a tuple: one per member.

`build_transforms` is the usual single-model ImageNet pipeline (torchvision's own transforms).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from torch import Tensor

from distill.constants import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    from distill.ensemble import Teachers
    from distill.teacher import Teacher

DEFAULT_CROP_PCT = 0.875  # eval: resize to R / 0.875, centre-crop R (the ImageNet convention)
DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3 / 4, 4 / 3)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
CROP_SEED_BITS = 62

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

    def same_as(self, other: ViewSpec | None) -> bool:
        """Whether `other` renders identical tensors (resolutions 224 and (224, 224) agree)."""
        if other is None:
            return False
        mine = (self.size, self.mean, self.std, self.interpolation)
        return mine == (other.size, other.mean, other.std, other.interpolation)


TeacherViews = ViewSpec | tuple[ViewSpec, ...] | None  # none, one, one per ensemble member


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


def draw_crop_seed() -> int:
    """A 62-bit crop seed from torch's default CPU generator.

    Datasets call this in `__getitem__`, where the training loop has seeded that generator from
    (seed, epoch, index); the crop itself is then drawn from `crop_generator(seed)`.
    """
    return int(torch.randint(0, 2**CROP_SEED_BITS, ()))


def crop_generator(crop_seed: int) -> torch.Generator:
    """The generator a sample's crop is drawn from: a fresh CPU generator seeded by `crop_seed`."""
    return torch.Generator().manual_seed(int(crop_seed))


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> Tensor:
    return torch.empty(1).uniform_(lo, hi, generator=g)  # (1,) float32, as torchvision


def _randint(hi: int, g: torch.Generator | None) -> int:
    return int(torch.randint(0, hi, size=(1,), generator=g).item())


def sample_crop_params(
    width: int,
    height: int,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> CropParams:
    """A random-resized-crop box (Szegedy et al. 2015, "Going deeper with convolutions").

    torchvision's `RandomResizedCrop` draw for draw (the same generator gives the same box):
    area fraction uniform in `scale`, aspect ratio log-uniform in `ratio` (in float32, as
    torchvision), up to 10 tries, then the largest centred box within `ratio`. The flip is
    drawn last and always, so every call consumes the generator the same way.
    """
    _check_ranges(scale, ratio)
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    box: tuple[int, int, int, int] | None = None
    for _ in range(10):
        target = area * float(_uniform(scale[0], scale[1], generator).item())
        aspect = float(torch.exp(_uniform(float(log_ratio[0]), float(log_ratio[1]), generator)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(height - h + 1, generator)
            box = (top, _randint(width - w + 1, generator), h, w)
            break
    if box is None:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            h, w = height, round(height * max(ratio))
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    flip = float(torch.rand(1, generator=generator).item()) < flip_p
    return CropParams(*box, flip=flip)


def _check_ranges(scale: tuple[float, float], ratio: tuple[float, float]) -> None:
    if not (0 < scale[0] <= scale[1] <= 1):
        raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
    if not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")


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


def to_uint8_image(img: Image.Image | Tensor) -> Tensor:
    """A decoded image as the (3, H, W) uint8 tensor `render_view` reads.

    PIL images are converted to RGB with `distill.data.images.to_rgb` if they are not RGB yet
    (`load_image` already returns RGB); tensors must already be (3, H, W) uint8.
    """
    if isinstance(img, Tensor):
        if img.dtype != torch.uint8 or img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(
                f"expected a (3, H, W) uint8 image, got {tuple(img.shape)} {img.dtype}; decode "
                "with distill.data.load_image or torchvision.io.decode_image(mode=RGB)"
            )
        return img
    from torchvision.transforms.v2 import functional as F

    if img.mode != "RGB":
        from distill.data.images import to_rgb

        img = to_rgb(img)
    return F.pil_to_tensor(img)


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, elementwise (so a batch gives
    bit-for-bit the values of its images normalised one by one)."""
    from torchvision.transforms.v2 import functional as F

    return F.normalize(x.float().div_(255.0), list(mean), list(std))


def render_view(image: Image.Image | Tensor, params: CropParams, view: ViewSpec) -> Tensor:
    """Render `params` of a decoded image as `view` wants it: (3, h, w) float32, normalised.

    Crop, resize to `view.size` (antialiased, `view.interpolation`) on uint8, flip, normalise;
    on the device the image is on. On the CPU, torchvision resizes uint8 natively; on CUDA it
    resizes in float32 and rounds back to uint8, so a CUDA view can differ from the CPU one by
    rounding (one grey level here and there), never in box, size or normalisation.
    """
    from torchvision.transforms.v2 import functional as F

    x = F.resized_crop(
        to_uint8_image(image),
        params.top,
        params.left,
        params.height,
        params.width,
        list(view.size),
        interpolation=_interp(view.interpolation),
        antialias=True,
    )  # (3, h, w) uint8
    if params.flip:
        x = F.horizontal_flip(x)
    return normalize(x, view.mean, view.std)


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
    Calls draw a crop seed from torch's default generator (`draw_crop_seed`), which the
    training loop seeds per (seed, epoch, index). With `seed` set, calls that pass `index` use a
    generator seeded by (seed, epoch, index) instead (`params_for`), for loaders without that
    per-sample seeding. `return_params=True` adds "crop": (5,) int64. `teacher=None` gives the
    student view only; a tuple of views (an ensemble's, one per member) makes "teacher_input" a
    tuple of tensors in that order (views that render alike share one tensor).
    """

    def __init__(
        self,
        student: ViewSpec,
        teacher: TeacherViews = None,
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
        if not (0 < crop_pct <= 1):
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        _check_ranges(scale, ratio)
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
        return crop_generator(((self.seed * 1_000_003 + e) * 1_000_003 + int(index)) % (2**63 - 1))

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

    def crop_for(self, image_size: tuple[int, int], crop_seed: int) -> CropParams:
        """The crop of an image of PIL size (width, height) for a `draw_crop_seed` value."""
        if not self.train:
            return self.sample_params(image_size)
        return self.sample_params(image_size, crop_generator(crop_seed))

    def apply(self, img: Image.Image | Tensor, params: CropParams) -> dict[str, Any]:
        """Render `params` of a decoded image (PIL RGB, or (3, H, W) uint8 on any device)."""
        x = to_uint8_image(img)
        out: dict[str, Any] = {"input": render_view(x, params, self.student)}
        if isinstance(self.teacher, ViewSpec):
            out["teacher_input"] = render_view(x, params, self.teacher)
        elif self.teacher is not None:
            out["teacher_input"] = _render_members(x, params, self.teacher, self.student, out)
        if self.return_params:
            out["crop"] = params.as_tensor()
        return out

    def __call__(self, img: Image.Image | Tensor, index: int | None = None) -> dict[str, Any]:
        x = to_uint8_image(img)
        size = (int(x.shape[-1]), int(x.shape[-2]))  # PIL order: (width, height)
        if self.seed is not None and index is not None:
            params = self.params_for(size, index)
        else:
            params = self.crop_for(size, draw_crop_seed() if self.train else 0)
        return self.apply(x, params)


def paired_views(
    teacher: Teacher | Teachers | None,
    resolution: Size,
    *,
    train: bool,
    crop_pct: float = DEFAULT_CROP_PCT,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    model_mean: Sequence[float] | None = None,
    model_std: Sequence[float] | None = None,
) -> PairedTransform:
    """The paired transform of a (teacher, student resolution) pair: one crop per image,
    rendered for the student ("input", at `resolution`, ImageNet normalisation unless
    `model_mean`/`model_std` say otherwise) and, when the teacher wants other tensors, natively
    for the teacher ("teacher_input", at its `input_size`, `mean`/`std`, `interpolation`).

    For a `distill.ensemble.Teachers` whose members do not all take the student's tensors,
    "teacher_input" is a tuple of views, one per member at its own size and normalisation (a
    member without `input_size`: the student's size, in its normalisation, rendered rather than
    re-normalised: equal up to float rounding), which `Teachers(views, prepared=True)` reads.

    The batched pipeline derives from the result:
    `GpuBatchTransform.from_paired(paired_views(...), device=...)` renders the same views.
    """
    from distill.ensemble import Teachers  # lazy: `import distill.data` stays light

    student = ViewSpec(
        resolution, tuple(model_mean or IMAGENET_MEAN), tuple(model_std or IMAGENET_STD)
    )
    teacher_view: TeacherViews = None
    if isinstance(teacher, Teachers):
        views = tuple(_native_view(m, student) for m in teacher)
        if not all(v.same_as(student) for v in views):
            teacher_view = views  # else every member converts the student's batch (a no-op)
    elif teacher is not None and teacher.input_size is not None:
        teacher_view = _native_view(teacher, student)
        if teacher_view.same_as(student):
            teacher_view = None  # the Teacher converts the student's batch itself (a no-op)
    return PairedTransform(
        student, teacher_view, train=train, crop_pct=crop_pct, scale=scale, ratio=ratio
    )


def _native_view(teacher: Teacher, student: ViewSpec) -> ViewSpec:
    """The view `teacher` wants: its input size, mean, std (each else the student's) and its
    interpolation ("area", which a crop renderer has not, as antialiased bilinear: what it
    amounts to when shrinking)."""
    interp = teacher.interpolation if teacher.interpolation in INTERPOLATIONS else "bilinear"
    h, w = teacher.input_size if teacher.input_size is not None else student.size
    mean, std = tuple(teacher.mean or student.mean), tuple(teacher.std or student.std)
    return ViewSpec((int(h), int(w)), mean, std, interp)


def _render_members(
    x: Tensor, params: CropParams, views: tuple[ViewSpec, ...], student: ViewSpec, out: Any
) -> tuple[Tensor, ...]:
    """One view per ensemble member; one that renders like the student's (`out["input"]`) or an
    earlier member's reuses that tensor."""
    done: list[tuple[ViewSpec, Tensor]] = [(student, out["input"])]
    for view in views:
        if not any(v.same_as(view) for v, _ in done):
            done.append((view, render_view(x, params, view)))
    return tuple(next(t for v, t in done if v.same_as(view)) for view in views)


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
