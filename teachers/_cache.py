"""Where each ecosystem keeps downloaded weights, read at call time from the environment.

- torchvision (and timm weights that only have a URL): ``$TORCH_HOME/hub/checkpoints/<file>``
  (``torch.hub.get_dir()``; ``$TORCH_HOME`` defaults to ``$XDG_CACHE_HOME/torch`` =
  ``~/.cache/torch``);
- FaceNet: ``$TORCH_HOME/checkpoints/<file>``, the folder facenet-pytorch 2.6.0 itself uses;
- timm and transformers on the Hugging Face Hub: the hub cache ``$HF_HUB_CACHE`` (default
  ``$HF_HOME/hub`` = ``~/.cache/huggingface/hub``), laid out as
  ``models--<org>--<name>/snapshots/<commit>/<file>`` plus ``refs/main`` holding the commit.

The machine is treated as offline when ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or
``MOBILEDISTILL_OFFLINE`` is set to 1: nothing is downloaded, and a missing file raises
`MissingWeightsError` naming the file, the folder to put it in and where it comes from.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

_TRUE = {"1", "true", "yes", "on", "y"}


class MissingWeightsError(FileNotFoundError):
    """A teacher's weight file is not cached and cannot be downloaded now."""

    def __init__(
        self,
        what: str,
        *,
        filenames: Sequence[str],
        folder: str | os.PathLike[str],
        url: str | None = None,
        reason: str = "",
        hint: str = "",
    ) -> None:
        self.filenames = list(filenames)
        self.folder = str(folder)
        self.url = url
        names = " or ".join(repr(f) for f in self.filenames)
        lines = [f"weights for {what} are not available: {names} is missing from {self.folder}"]
        if reason:
            lines.append(f"({reason})")
        if url:
            lines.append(f"Download it from {url}")
        lines.append(f"and put it at {os.path.join(self.folder, self.filenames[0])}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def is_offline() -> bool:
    """True when the user asked for no network access (see module docstring)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MOBILEDISTILL_OFFLINE")
    if any(os.environ.get(n, "").strip().lower() in _TRUE for n in names):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - optional dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)


def torch_home() -> Path:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(os.environ.get("TORCH_HOME", default)))


def torch_hub_checkpoints() -> Path:
    """``torch.hub.get_dir()/checkpoints``: where torchvision's weights are cached."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def facenet_checkpoints() -> Path:
    """``$TORCH_HOME/checkpoints``: where facenet-pytorch 2.6.0 caches its two .pt files."""
    return torch_home() / "checkpoints"


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(os.path.expanduser(env["HF_HUB_CACHE"]))
    if env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expanduser(env["HUGGINGFACE_HUB_CACHE"]))
    if env.get("HF_HOME"):
        return Path(os.path.expanduser(env["HF_HOME"])) / "hub"
    xdg = env.get("XDG_CACHE_HOME", "~/.cache")
    return Path(os.path.expanduser(xdg)) / "huggingface" / "hub"


def hf_repo_folder(repo_id: str) -> Path:
    return hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))


def hf_cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The cached copy of `filename` from model repo `repo_id`, or None (never downloads)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, filename, cache_dir=str(hf_hub_cache()), revision=revision
    )
    return Path(found) if isinstance(found, str) else None


def hf_snapshot_hint(repo_id: str) -> str:
    folder = hf_repo_folder(repo_id)
    return (
        f"The hub cache layout is {folder}/snapshots/<commit>/<file> with the commit hash in "
        f"{folder}/refs/main; on a machine with internet, "
        f"`huggingface-cli download {repo_id}` (with HF_HOME pointing at the same place) "
        "fills it, then copy the folder over."
    )
