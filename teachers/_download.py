"""Fetch a single weight file into a cache folder, or explain how to put it there by hand."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

from teachers._cache import MissingWeightsError, is_offline

# torch.hub's convention: ``name-<sha256 prefix>.ext``.
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def url_basename(url: str) -> str:
    return os.path.basename(urlparse(url).path)


def hash_prefix_of(filename: str) -> str | None:
    """The SHA-256 prefix a torch.hub-style file name carries (``resnet18-f37072fd.pth``)."""
    m = _HASH_IN_NAME.search(filename)
    return m.group(1) if m else None


def cached_or_download(
    what: str,
    *,
    url: str,
    folder: Path,
    filename: str | None = None,
    download: bool | None = None,
    also_look_in: tuple[Path, ...] = (),
    hint: str = "",
) -> Path:
    """The path of the cached file, downloading it first when allowed.

    `download` None means "if the machine is not marked offline". Nothing is built before
    this returns, so a missing file never leaves a half-initialised teacher behind.
    """
    name = filename or url_basename(url)
    for place in (folder, *also_look_in):
        if (place / name).is_file():
            return place / name
    if download is None:
        download = not is_offline()
    if not download:
        raise MissingWeightsError(
            what,
            filenames=[name],
            folder=folder,
            url=url,
            reason="offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE/MOBILEDISTILL_OFFLINE is set"
            if is_offline()
            else "download=False",
            hint=hint,
        )
    from torch.hub import download_url_to_file

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    try:
        download_url_to_file(url, str(target), hash_prefix=hash_prefix_of(name), progress=True)
    except Exception as err:  # no network, proxy, 404, hash mismatch ...
        target.unlink(missing_ok=True)
        raise MissingWeightsError(
            what,
            filenames=[name],
            folder=folder,
            url=url,
            reason=f"download failed: {type(err).__name__}: {err}",
            hint=hint,
        ) from err
    return target
