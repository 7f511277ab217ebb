"""The data layer: safe decoding, paired student/teacher transforms, dataset adapters.

Light modules are imported here; the adapters that need torchvision's dataset classes or
Hugging Face `datasets` load on first use (`distill.data.CelebAFaces`, `distill.data.hf_image_dataset`).
"""

from __future__ import annotations

import importlib
from typing import Any

from distill.data.errors import AnnotationError, DataLayoutError
from distill.data.images import DEFAULT_MAX_PIXELS, BadImageError, load_image
from distill.data.skipping import (
    SkipBadSamples,
    SkipLog,
    SkipLogLoader,
    Skipped,
    collate_skipping,
    take_skipped,
)
from distill.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CropParams,
    PairedTransform,
    ViewSpec,
    build_transforms,
)

_LAZY = {
    "ImageSamples": "distill.data.datasets",
    "image_folder": "distill.data.datasets",
    "imagenet": "distill.data.datasets",
    "identity_folder": "distill.data.datasets",
    "check_num_classes": "distill.data.datasets",
    "CelebAFaces": "distill.data.faces",
    "LFWPairsDataset": "distill.data.faces",
    "HFImageDataset": "distill.data.hf",
    "HFIterableImageDataset": "distill.data.hf",
    "hf_image_dataset": "distill.data.hf",
    "hf_source": "distill.data.hf",
    "load_hf": "distill.data.hf",
    "DigitsDataset": "distill.data.digits",
    "load_digits_splits": "distill.data.digits",
}

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AnnotationError",
    "BadImageError",
    "CropParams",
    "DataLayoutError",
    "PairedTransform",
    "SkipBadSamples",
    "SkipLog",
    "SkipLogLoader",
    "Skipped",
    "ViewSpec",
    "build_transforms",
    "collate_skipping",
    "take_skipped",
    "load_image",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill.data' has no attribute {name!r}")
