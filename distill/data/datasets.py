"""Image-classification datasets on torchvision's parsers, yielding the dicts the Distiller reads.

Every dataset here yields {"input": (3, H, W), "target": ..., "index": int} plus whatever the
transform adds ("teacher_input", "crop"). torchvision does the parsing (folder walks, ImageNet's
meta.bin); decoding goes through `load_image`, so bad files raise `BadImageError` and can be
skipped and counted by `distill.data.skipping.SkipBadSamples`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from distill.data.errors import DataLayoutError
from distill.data.images import DEFAULT_MAX_PIXELS, image_files, load_image
from distill.data.transforms import run_transform

Transform = Callable[..., Any]

IMAGE_FOLDER_LAYOUT = """  <root>/<class_a>/xxx.jpg
  <root>/<class_a>/xxy.png
  <root>/<class_b>/123.jpg      (one sub-folder per class, sorted names give label 0, 1, ...)"""

IMAGENET_LAYOUT = """  <root>/meta.bin                      (written by torchvision.datasets.ImageNet from
                                        ILSVRC2012_devkit_t12.tar.gz; or put that archive here)
  <root>/train/n01440764/*.JPEG        (one folder per wnid)
  <root>/val/n01440764/*.JPEG          (val sorted into wnid folders; or put
                                        ILSVRC2012_img_val.tar here and torchvision sorts it)"""

IDENTITY_LAYOUT = """  <root>/<identity>/0001_01.jpg        (labels=True: one folder per identity)
  <root>/**/*.jpg                      (labels=False: any images, any depth)"""


class ImageSamples(Dataset[dict[str, Any]]):
    """Map-style dataset over (path, target) pairs; `target=None` means unlabelled.

    `classes` names the labels when there are any. `transform` maps a PIL RGB image to a
    tensor or to a dict with "input" (e.g. a `PairedTransform`); None gives 0..1 tensors.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, Any]],
        transform: Transform | None = None,
        *,
        classes: Sequence[str] | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.classes = list(classes) if classes is not None else None
        self.max_pixels = max_pixels

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes is not None else None

    @property
    def targets(self) -> list[Any]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, target = self.samples[index]
        img = load_image(path, max_pixels=self.max_pixels)
        out = run_transform(self.transform, img, index)
        if target is not None:
            out["target"] = target
        out["index"] = index
        return out


def check_num_classes(found: Sequence[str] | int, expected: int | None, what: str) -> None:
    """Raise if a dataset's class count differs from what the model/teacher was built for."""
    if expected is None:
        return
    n = found if isinstance(found, int) else len(found)
    if n != expected:
        names = "" if isinstance(found, int) else f" (first: {list(found)[:5]})"
        raise ValueError(
            f"{what} has {n} classes{names} but {expected} were expected: the teacher/student "
            "head must have as many outputs as the dataset has classes (pass --num-classes to "
            "match, or point --data-dir at the dataset the teacher was trained on)"
        )


def _require_dir(root: str | Path, layout: str, what: str) -> Path:
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataLayoutError(p, f"{what} directory does not exist", layout)
    return p


def image_folder(
    root: str | Path,
    transform: Transform | None = None,
    *,
    num_classes: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageSamples:
    """`torchvision.datasets.ImageFolder` layout: one sub-folder per class."""
    from torchvision.datasets import ImageFolder

    root = _require_dir(root, IMAGE_FOLDER_LAYOUT, "image folder")
    try:
        tv = ImageFolder(str(root), loader=load_image)
    except FileNotFoundError as e:
        raise DataLayoutError(root, str(e).rstrip("."), IMAGE_FOLDER_LAYOUT) from None
    check_num_classes(tv.classes, num_classes, str(root))
    return ImageSamples(tv.samples, transform, classes=tv.classes, max_pixels=max_pixels)


def imagenet(
    root: str | Path,
    split: str = "train",
    transform: Transform | None = None,
    *,
    num_classes: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageSamples:
    """ILSVRC-2012 through `torchvision.datasets.ImageNet` (meta.bin + train/val wnid folders).

    `classes` are the first human-readable name of each wnid; `.wnids` the folder names.
    """
    from torchvision.datasets import ImageNet
    from torchvision.datasets.imagenet import ARCHIVE_META, META_FILE

    if split not in ("train", "val"):
        raise ValueError(f"ImageNet split must be 'train' or 'val', got {split!r}")
    root = _require_dir(root, IMAGENET_LAYOUT, "ImageNet")
    if not (root / META_FILE).is_file() and not (root / ARCHIVE_META["devkit"][0]).is_file():
        raise DataLayoutError(
            root, f"neither {META_FILE} nor the devkit archive is there", IMAGENET_LAYOUT
        )
    if not (root / split).is_dir() and not (root / ARCHIVE_META[split][0]).is_file():
        raise DataLayoutError(
            root, f"no {split}/ folder (and no {ARCHIVE_META[split][0]})", IMAGENET_LAYOUT
        )
    try:
        tv = ImageNet(str(root), split=split, loader=load_image)
    except FileNotFoundError as e:
        raise DataLayoutError(root, str(e).rstrip("."), IMAGENET_LAYOUT) from None
    check_num_classes(tv.wnids, num_classes, f"ImageNet {split} at {root}")
    ds = ImageSamples(
        tv.samples, transform, classes=[names[0] for names in tv.classes], max_pixels=max_pixels
    )
    ds.wnids = list(tv.wnids)  # type: ignore[attr-defined]
    return ds


def identity_folder(
    root: str | Path,
    transform: Transform | None = None,
    *,
    labels: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageSamples:
    """Aligned face crops (VGGFace2/CASIA-WebFace style). labels=True: one folder per identity,
    target = identity index. labels=False: every image under root, no target (embedding
    distillation needs no labels)."""
    if labels:
        return image_folder(root, transform, max_pixels=max_pixels)
    root = _require_dir(root, IDENTITY_LAYOUT, "face image")
    paths = image_files(root)
    if not paths:
        raise DataLayoutError(root, "no image files found", IDENTITY_LAYOUT)
    return ImageSamples([(p, None) for p in paths], transform, max_pixels=max_pixels)
