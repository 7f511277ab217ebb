"""Safe checkpoint files: load weights without running code hidden in them, save atomically.

Formats read by `load_state_dict`:

- ``.safetensors``: tensors only, nothing to execute (preferred);
- ``.pt`` / ``.pth`` / ``.pth.tar`` / ``.bin`` / ``.ckpt`` / ``.tar``: ``torch.load(weights_only=True)``
  only. A pickle that needs any global outside torch's weights-only allowlist (plus a few inert
  metadata types training scripts store next to the weights, see `INERT_GLOBALS`) is refused with
  `UnsafeCheckpointError`; there is deliberately no fallback to ``weights_only=False``.

Wrapped checkpoints (``{"state_dict": ...}``, ``{"model": ...}``, EMA copies, DDP's ``module.``,
``torch.compile``'s ``_orig_mod.``, Lightning's ``model.``) are unwrapped by `unwrap_state_dict`.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.files import atomic_path, sha256_file

__all__ = [
    "SAFETENSORS_SUFFIXES",
    "TORCH_SUFFIXES",
    "CheckpointFormatError",
    "UnsafeCheckpointError",
    "file_sha256",
    "load_checkpoint",
    "load_state_dict",
    "save_safetensors",
    "unsafe_message",
    "unwrap_state_dict",
    "verify_sha256",
]

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".bin", ".ckpt", ".tar")

# Keys under which training code nests the weights, in the order they are tried.
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network")
# Prefixes added by wrappers: DDP/DataParallel/ModelEmaV2, torch.compile, Lightning modules.
# Without a model to match, a prefix is stripped only when every key carries it.
_PREFIXES = ("module.", "_orig_mod.", "model.")
_OUTER_PREFIXES = ("module.", "_orig_mod.")


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A pickle checkpoint needs globals that could run code; it was not loaded."""


class CheckpointFormatError(ValueError):
    """A file loaded but holds no recognisable state_dict."""


def _inert_globals() -> list[Any]:
    """Classes training scripts pickle next to the weights and that execute nothing on load.

    timm's train script stores its ``argparse.Namespace``; many scripts store numpy scalars
    (best accuracy, epoch) or small arrays.
    """
    out: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch
        return out
    core = getattr(np, "_core", None) or np.core
    out += [core.multiarray._reconstruct, core.multiarray.scalar, np.ndarray, np.dtype]
    for code in "?bBhHiIlLqQefdgFDG":
        out.append(type(np.dtype(code)))
    return out


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes (FileNotFoundError naming the path if it is missing)."""
    return sha256_file(_existing(path))


def verify_sha256(path: str | os.PathLike[str], expected: str) -> str:
    """Raise ValueError unless the file's SHA-256 starts with `expected` (full or prefix).

    Returns the full digest. A prefix is accepted because checkpoint file names often carry
    only the first 8-10 hex digits (``resnet50-11ad3fa6.pth``).
    """
    expected = expected.strip().lower()
    if len(expected) < 8 or any(c not in "0123456789abcdef" for c in expected):
        raise ValueError(f"expected sha256 {expected!r} must be at least 8 hex digits")
    actual = file_sha256(path)
    if not actual.startswith(expected):
        raise ValueError(
            f"checksum mismatch for {path}: sha256 is {actual}, expected {expected}...; the file "
            "is corrupt, truncated or not the one you meant. Replace it with the original file "
            "(or pass the right checksum)."
        )
    return actual


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> Any:
    """Load a checkpoint file safely and return whatever object it holds (dict, tensors, ...).

    Raises FileNotFoundError (naming the path), `UnsafeCheckpointError` for pickles that would
    run code, and ValueError for unknown formats.
    """
    file = _existing(path)
    kind = _format_of(file)
    if kind == "safetensors":
        from safetensors.torch import load_file

        device = map_location if isinstance(map_location, str) else str(map_location or "cpu")
        return load_file(str(file), device=device)
    try:
        with torch.serialization.safe_globals(_inert_globals()):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(_unsafe_message(file, err)) from None


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    map_location: Any = "cpu",
    prefer_ema: bool = False,
    prefix: str | None = None,
    expected_keys: Iterable[str] | None = None,
    sha256: str | None = None,
) -> dict[str, Tensor]:
    """Load a file safely and return a flat ``{name: Tensor}`` state_dict.

    `prefix` selects and strips a sub-module (``"student."`` in a distillation checkpoint);
    `expected_keys` (a model's ``state_dict().keys()``) lets wrapper prefixes be stripped only
    when that improves the match; `sha256` (full or prefix) is checked before anything is read.
    """
    if sha256 is not None:
        verify_sha256(path, sha256)
    obj = load_checkpoint(path, map_location=map_location)
    try:
        return unwrap_state_dict(
            obj, prefer_ema=prefer_ema, prefix=prefix, expected_keys=expected_keys
        )
    except CheckpointFormatError as err:
        raise CheckpointFormatError(f"{path}: {err}") from None


def unwrap_state_dict(
    obj: Any,
    *,
    prefer_ema: bool = False,
    prefix: str | None = None,
    expected_keys: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """Find the flat state_dict inside a training checkpoint and strip wrapper prefixes.

    Handles ``{"state_dict": ...}`` (Lightning, timm train output), ``{"model": ...}``,
    ``{"state_dict_ema"/"model_ema": ...}`` (used when `prefer_ema`, or when it is the only
    one), DDP/DataParallel ``module.``, ``torch.compile``'s ``_orig_mod.`` and Lightning's
    ``model.`` (stripped when every key has it, or when that matches `expected_keys` better).
    """
    sd = _find_tensor_mapping(obj, prefer_ema=prefer_ema, path="checkpoint")
    if prefix is not None:
        # Wrappers go around the whole training module: peel them before picking `prefix`.
        while not any(k.startswith(prefix) for k in sd):
            outer = next((p for p in _OUTER_PREFIXES if all(k.startswith(p) for k in sd)), None)
            if outer is None:
                break
            sd = {k[len(outer) :]: v for k, v in sd.items()}
        picked = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not picked:
            firsts = sorted({k.split(".", 1)[0] + "." for k in sd})
            raise CheckpointFormatError(
                f"no key starts with prefix {prefix!r}; top-level names are {firsts[:20]}"
            )
        sd = picked
    expected = set(expected_keys) if expected_keys is not None else None
    return _strip_prefixes(sd, expected)


def save_safetensors(
    state_dict: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write tensors to a .safetensors file atomically (temporary file, fsync, rename).

    Tensors that share memory (tied weights) are copied so safetensors accepts them.
    """
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(value).__name__}, not a Tensor")
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
        elif ptr:
            seen.add(ptr)
        tensors[name] = t
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=dict(metadata) if metadata else None)
    return target


# --- helpers -----------------------------------------------------------------------------------


def _existing(path: str | os.PathLike[str]) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        where = "it is a directory" if file.is_dir() else "no such file"
        raise FileNotFoundError(f"checkpoint file {str(file)!r} not found ({where})")
    return file


def _format_of(file: Path) -> str:
    name = file.name.lower()
    if name.endswith(SAFETENSORS_SUFFIXES):
        return "safetensors"
    if name.endswith(TORCH_SUFFIXES):
        return "torch"
    with open(file, "rb") as fh:
        head = fh.read(16)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "torch"  # zip archive (torch.save) or a bare pickle
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # 8-byte little-endian header length, then JSON
    raise ValueError(
        f"{file}: unknown checkpoint format; use a .safetensors file (preferred) or a torch.save "
        f"file ending in one of {', '.join(TORCH_SUFFIXES)}"
    )


def unsafe_message(file: Path, err: Exception) -> str:
    """The refusal of a pickle `file` that `torch.load(weights_only=True)` would not load."""
    return _unsafe_message(file, err)


def _unsafe_message(file: Path, err: Exception) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # legacy (non-zip) pickles cannot be scanned statically
        names = []
    found = f" It references {', '.join(names)}." if names else ""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    why = next((line for line in lines if "Unpickler error" in line), lines[-1] if lines else "")
    return (
        f"refusing to load {file}: it is a pickle that needs objects outside the weights-only "
        f"allowlist, so loading it could run code.{found} ({why[:300]})\n"
        "Convert it to safetensors, or re-save a plain state_dict where you trust the file:\n"
        "    sd = torch.load(path, weights_only=False)   # only for a file you trust\n"
        "    torch.save(sd['state_dict'] if 'state_dict' in sd else sd.state_dict(), 'clean.pt')\n"
        "or: distill.serialization.save_safetensors(state_dict, 'model.safetensors')"
    )


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, Tensor) for v in obj.values())
    )


def _find_tensor_mapping(obj: Any, *, prefer_ema: bool, path: str) -> dict[str, Tensor]:
    if isinstance(obj, torch.nn.Module):  # only reachable for in-memory objects
        return dict(obj.state_dict())
    if _is_tensor_mapping(obj):
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(
            f"{path} is a {type(obj).__name__}, not a state_dict (a mapping of names to tensors)"
        )
    order: tuple[str, ...] = _EMA_KEYS + _WRAPPER_KEYS if prefer_ema else _WRAPPER_KEYS + _EMA_KEYS
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, Mapping | torch.nn.Module) and inner is not obj:
            try:
                return _find_tensor_mapping(inner, prefer_ema=prefer_ema, path=f"{path}[{key!r}]")
            except CheckpointFormatError:
                continue
    # A state_dict stored next to non-tensor entries (e.g. {"w": t, "epoch": 3}).
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if tensors and len(tensors) >= len(obj) - 4:
        return tensors
    keys = sorted(str(k) for k in obj)[:20]
    raise CheckpointFormatError(
        f"{path} has keys {keys} but none holds a state_dict; expected the weights under one of "
        f"{list(_WRAPPER_KEYS + _EMA_KEYS)} or at the top level (pass prefix=... for a sub-module)"
    )


def _strip_prefixes(sd: dict[str, Tensor], expected: set[str] | None) -> dict[str, Tensor]:
    def stripped(d: dict[str, Tensor], p: str) -> dict[str, Tensor]:
        return {k[len(p) :] if k.startswith(p) else k: v for k, v in d.items()}

    def score(d: Mapping[str, Tensor]) -> int:
        return len(expected & d.keys()) if expected is not None else 0

    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if not any(k.startswith(p) for k in sd):
                continue
            candidate = stripped(sd, p)
            if expected is not None:
                ok = score(candidate) > score(sd)  # partial prefixes too, if they help
            else:
                ok = all(k.startswith(p) for k in sd)
            if ok and len(candidate) == len(sd):
                sd, changed = candidate, True
    return sd
