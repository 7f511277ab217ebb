"""Robust image decoding: every readable image becomes 8-bit RGB, every unreadable one a typed error.

Conversions (what "converted where that is right" means here):

- grayscale (L, 1, I;16, I, F), palette (P), CMYK, YCbCr, LAB -> RGB;
- 16-bit and 32-bit single-channel images are scaled to 8 bits (PIL's own `convert("RGB")`
  clips them at 255, which turns most 16-bit photos white);
- images with transparency (RGBA, LA, PA, P with a transparent index) are composited on a solid
  background, white by default. Dropping the alpha channel instead would expose whatever colour
  the encoder left under fully transparent pixels (often black or garbage), so the image would
  not look like what a viewer shows;
- EXIF orientation is not applied, as in torchvision's `default_loader`, so that pre-computed
  annotations (boxes, landmarks) stay valid.

Refused with `BadImageError(path, reason)`: missing and zero-byte files, files that are not images,
truncated files, and images over `max_pixels` (decompression bombs). The size check runs on the
header, before any pixel is decoded.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

# PIL warns at MAX_IMAGE_PIXELS and refuses at twice that; we refuse at the warning level.
DEFAULT_MAX_PIXELS = 89_478_485

REASONS = (
    "missing",
    "empty",
    "not_an_image",
    "truncated",
    "too_large",
    "unsupported_mode",
    "unreadable",
)

ImageSource = str | os.PathLike[str] | bytes | IO[bytes]


class BadImageError(Exception):
    """An image that cannot be used: `reason` is one of `REASONS`, `path` names the file.

    The one-argument form `BadImageError(message)` exists because DataLoader workers re-raise
    exceptions in the main process by calling the type with the formatted message.
    """

    def __init__(self, path: str, reason: str = "", detail: str = "") -> None:
        self.path = str(path)
        self.reason = reason or "unreadable"
        self.detail = detail
        msg = f"{self.path}: {reason}" if reason else self.path
        super().__init__(f"{msg} ({detail})" if detail else msg)

    def __reduce__(self) -> tuple[type[BadImageError], tuple[str, str, str]]:
        return (type(self), (self.path, self.reason, self.detail))


def load_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    background: Sequence[int] = (255, 255, 255),
) -> Image.Image:
    """Decode `source` (a path, raw bytes or a binary file object) into an RGB PIL image.

    `name` is what error messages call the image (defaults to the path). `max_pixels=None`
    disables our size check (PIL's own limit of twice `Image.MAX_IMAGE_PIXELS` still applies).
    """
    label = name or _describe(source)
    fp: str | IO[bytes]
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise BadImageError(label, "empty", "0 bytes")
        fp = io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        fp = os.fspath(source)
        try:
            size = os.path.getsize(fp)
        except FileNotFoundError:
            raise BadImageError(label, "missing", "no such file") from None
        except OSError as e:
            raise BadImageError(label, "unreadable", str(e)) from None
        if size == 0:
            raise BadImageError(label, "empty", "0 bytes")
    else:
        fp = source

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise BadImageError(label, "too_large", str(e)) from None
    except UnidentifiedImageError:
        raise BadImageError(label, "not_an_image", "PIL cannot identify the format") from None
    except OSError as e:
        reason = "truncated" if "truncat" in str(e).lower() else "unreadable"
        raise BadImageError(label, reason, str(e)) from None

    with img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise BadImageError(
                label, "too_large", f"{w}x{h} = {w * h} pixels > max_pixels={max_pixels}"
            )
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            # PIL reports truncation as OSError("image file is truncated ...") and broken
            # streams as SyntaxError/ValueError depending on the codec.
            raise BadImageError(label, "truncated", str(e)) from None
        return to_rgb(img, background=background, name=label)


def to_rgb(
    img: Image.Image, *, background: Sequence[int] = (255, 255, 255), name: str = "<image>"
) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (see the module docstring)."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img), mode)).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*tuple(int(c) for c in background), 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise BadImageError(name, "unsupported_mode", f"mode {mode}: {e}") from None


def _to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    a = a.astype(np.float64)
    if mode.startswith("I;16"):
        top = 65535.0
    elif mode == "F":
        # float images: [0, 1] if they look normalised, else their own range
        top = 1.0 if a.max(initial=0.0) <= 1.0 else 255.0
    else:
        # 32-bit "I" is how some PNG/TIFF decoders hand over 16-bit data
        top = 65535.0 if a.max(initial=0.0) > 255 else 255.0
    return np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    return str(getattr(source, "name", "<stream>"))


def image_files(root: str | Path, extensions: Sequence[str] | None = None) -> list[str]:
    """All image files under `root` (recursively, sorted), by extension."""
    exts = tuple(e.lower() for e in (extensions or IMG_EXTENSIONS))
    out: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        out.extend(os.path.join(dirpath, f) for f in files if f.lower().endswith(exts))
    return sorted(out)


IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
