"""Atomic, checksummed training checkpoints on top of `accelerate.save_state`.

Layout under `<output_dir>/checkpoints/`:

    step_00000120/              one complete checkpoint
        model.safetensors ...   accelerate's files (weights as safetensors, the rest loaded
                                with torch.load(weights_only=True) by accelerate)
        scheduler_distill.pt    our LR scheduler state (loaded with weights_only=True)
        distill_state.json      progress counters + a sha256 manifest of every file above
    .tmp-step_00000140/         a write in progress: never read

A checkpoint is written under a temporary name and renamed once complete, so a crash
mid-write leaves the previous one loadable. `distill_state.json` is written last; a folder
without it is incomplete and skipped. A complete folder whose files do not match the manifest
was altered after writing and is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

STATE_FILE = "distill_state.json"
SCHEDULER_FILE = "scheduler_distill.pt"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file and a rename."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    accelerator: Any,
    root: Path,
    step: int,
    state: dict[str, Any],
    scheduler: Any = None,
    keep: int = 2,
) -> Path:
    """Save accelerate's state plus `state` (progress counters) as checkpoint `step`.

    Called on every process (accelerate writes per-process RNG files); the main process
    finalises, renames and prunes. Returns the final folder.
    """
    root = Path(root)
    final, tmp = step_dir(root, step), root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
        manifest = {
            p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        write_json_atomic(tmp / STATE_FILE, {**state, "step": step, "manifest": manifest})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps everything)."""
    if keep <= 0:
        return
    complete = [p for p in list_checkpoints(root) if (p / STATE_FILE).exists()]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders (complete or not, temporary ones excluded), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(found, key=lambda p: p.name)


def read_state(path: Path, *, verify: bool = True) -> dict[str, Any]:
    """Progress counters of a complete checkpoint, after checking every file's checksum."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.exists():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {STATE_FILE}): it was interrupted while "
            "being written. Resume from an earlier one, or use --resume latest."
        )
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{state_file} is not valid JSON ({e}); the checkpoint is damaged"
        ) from e
    if verify:
        manifest = state.get("manifest", {})
        present = {p.name for p in path.iterdir() if p.is_file() and p.name != STATE_FILE}
        extra = sorted(present - set(manifest))
        if extra:
            raise CheckpointError(
                f"checkpoint {path} holds files it was not written with: {extra}. Refusing to "
                "load it; delete the folder or those files."
            )
        for name, info in manifest.items():
            f = path / name
            if not f.exists():
                raise CheckpointError(f"checkpoint {path} is missing {name}; refusing to load it")
            if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {f} does not match the checksum recorded when it was "
                    "written: it was altered or corrupted. Refusing to load it; resume from an "
                    "earlier checkpoint."
                )
    return state


def find_latest(root: Path) -> Path | None:
    """Newest complete checkpoint under `root`; incomplete ones are skipped with a warning."""
    for path in reversed(list_checkpoints(root)):
        if (path / STATE_FILE).exists():
            return path
        logger.warning("skipping incomplete checkpoint %s (no %s)", path, STATE_FILE)
    return None


def resolve_resume(resume: str | None, root: Path) -> Path | None:
    """`None` -> no resume; "latest" -> newest complete checkpoint (None if there is none);
    a path -> that checkpoint, which must exist."""
    if resume is None or resume == "":
        return None
    if resume == "latest":
        return find_latest(root)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(
            f"--resume {resume}: no such checkpoint folder. Give a folder like "
            f"{step_dir(root, 100)} or 'latest'."
        )
    return path


def load_checkpoint(accelerator: Any, path: Path, scheduler: Any = None) -> dict[str, Any]:
    """Verify and load checkpoint `path` into the prepared objects; returns its progress."""
    state = read_state(path)
    accelerator.load_state(str(path))
    # accelerate does not restore its own checkpoint counter; keep it right for later saves.
    accelerator.project_configuration.iteration = int(state.get("accelerate_iteration", 0))
    sched_file = Path(path) / SCHEDULER_FILE
    if scheduler is not None and sched_file.exists():
        scheduler.load_state_dict(torch.load(sched_file, weights_only=True))
    return state
