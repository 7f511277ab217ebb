"""Atomic, checksummed training checkpoints on top of `accelerate.save_state`.

Layout under `<output_dir>/checkpoints/`:

    step_00000120/              one complete checkpoint
        model.safetensors ...   accelerate's files (weights as safetensors, the rest loaded
                                with torch.load(weights_only=True) by accelerate)
        scheduler_distill.pt    our LR scheduler state (loaded with weights_only=True)
        distill_state.json      progress counters + a sha256 manifest of every file above
    .tmp-step_00000140/         a write in progress: never read

A checkpoint is written under a temporary name and renamed once complete, so a crash
mid-write leaves the previous one loadable (`--resume latest` says which unfinished write it
ignores). `distill_state.json` is written last; a folder without it is incomplete and skipped.
A complete folder whose files do not match the manifest was altered after writing and is
refused, and so is one holding a pickle that would run code. A write that fails (disk full)
leaves no partial checkpoint behind and names the last good one.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from distill.files import TMP_PREFIX, fsync_dir, sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

STATE_FILE = "distill_state.json"
SCHEDULER_FILE = "scheduler_distill.pt"
PREFIX = "step_"


@dataclass
class Progress:
    """The loop's counters, persisted in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    images_seen: int = 0
    skipped_nonfinite: int = 0

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Progress:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


def progress_fields(p: Progress, epoch_len: int) -> dict[str, Any]:
    """The run record's fields of `p` (distill.run_record), epochs fractional."""
    return {
        "steps": p.step,
        "epochs": p.epoch + p.batch_in_epoch / max(1, epoch_len),
        "images_seen": p.images_seen,
        "skipped_nonfinite": p.skipped_nonfinite,
    }


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


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
    finalises, renames and prunes. Returns the final folder. A failed write (disk full, ...)
    removes the partial folder and raises `CheckpointError` naming the last good checkpoint.
    """
    root = Path(root)
    final, tmp = step_dir(root, step), root / f"{TMP_PREFIX}{PREFIX}{step:08d}"
    main = accelerator.is_main_process
    try:
        if main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if main:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            manifest = {
                p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                for p in sorted(tmp.iterdir())
                if p.is_file()
            }
            write_json_atomic(tmp / STATE_FILE, {**state, "step": step, "manifest": manifest})
            fsync_dir(tmp)
            _move_into_place(tmp, final)
            fsync_dir(root)
            prune(root, keep)
    except OSError as e:
        raise _write_failed(e, root, step, tmp if main else None) from e
    accelerator.wait_for_everyone()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`. An existing `final` (the same step saved again) is first moved
    aside, never deleted in place: a kill at any moment leaves either the old or the new
    checkpoint complete, or neither under a `step_` name (then the previous step is used)."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_failed(err: OSError, root: Path, step: int, tmp: Path | None) -> CheckpointError:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a partial checkpoint behind
    last = find_latest(root)
    good = f"the last good checkpoint is {last}" if last else "no checkpoint was written before"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f"the disk is full (no space left on the device holding {root})"
        fix = "Free some space (or lower keep_checkpoints, or choose another output_dir)"
    else:
        what = f"{err.strerror or err} ({err.filename or root})"
        fix = "Fix the output folder"
    return CheckpointError(
        f"could not write checkpoint {step}: {what}. Nothing partial was kept; {good}. {fix} "
        "and rerun with --resume latest."
    )


def estimate_bytes(module: torch.nn.Module) -> int:
    """Rough size of one checkpoint of `module`: its weights and buffers, room for up to two
    optimizer moments per weight (Adam), and 1 MiB for the small files."""
    tensors = [*module.parameters(), *module.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    return 3 * weights + (1 << 20)


def check_free_space(root: Path, per_checkpoint: int, keep: int, extra: int = 0) -> None:
    """Raise `CheckpointError` when the disk holding `root` cannot take the checkpoints a run
    will keep (the newest is written before the oldest is pruned) plus `extra` bytes."""
    root = Path(root)
    existing = sum(1 for p in list_checkpoints(root) if (p / STATE_FILE).exists())
    copies = max(1, max(keep, 1) + 1 - existing)
    needed = copies * per_checkpoint + extra
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise CheckpointError(
            f"not enough free disk space for this run: {_size(free)} free under {probe}, about "
            f"{_size(needed)} needed ({copies} new checkpoint(s) of ~{_size(per_checkpoint)}: "
            "the newest is written before the oldest is pruned, plus the exported student). "
            "Free some space, choose another output_dir, or lower keep_checkpoints."
        )


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps everything), and
    what interrupted writes left behind (called after a successful save)."""
    for stale in Path(root).glob(f"{TMP_PREFIX}*{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
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
    """Newest complete checkpoint under `root`; incomplete ones, and writes that were cut off
    before their rename, are skipped with a warning."""
    root = Path(root)
    if root.is_dir():
        for p in sorted(root.glob(f"{TMP_PREFIX}*{PREFIX}*")):
            if p.is_dir():
                logger.warning(
                    "ignoring %s: a checkpoint write that was interrupted before it completed",
                    p,
                )
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
    if not (path / STATE_FILE).exists():
        holder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = [p.name for p in list_checkpoints(holder) if (p / STATE_FILE).exists()]
        if found or holder != path:
            listed = ", ".join(found[-5:]) or "none yet"
            what = "a run folder" if holder != path else "a folder of checkpoints"
            raise CheckpointError(
                f"--resume {resume} is {what}, not a checkpoint; its complete checkpoints: "
                f"{listed}. Resume the newest with --output-dir {holder.parent} --resume latest, "
                f"or name one: --resume {holder / (found[-1] if found else 'step_XXXXXXXX')}"
            )
    return path


def resume(accelerator: Any, what: str | None, root: Path, scheduler: Any = None) -> Any:
    """Load the checkpoint `what` ("latest", a folder, or None) names into the prepared
    objects; its state (progress, history, ...), or None when there is nothing to resume."""
    path = resolve_resume(what, root)
    if path is None:
        if what == "latest":
            accelerator.print(f"no checkpoint under {root}: starting from scratch")
        return None
    try:
        state = load_checkpoint(accelerator, path, scheduler)
    except CheckpointError as e:
        if what != "latest":
            raise
        raise CheckpointError(f"{e} {_last_good_before(root, path)}") from None
    accelerator.print(f"resumed from {path} at step {state.get('step', 0)}")
    return state


def _last_good_before(root: Path, bad: Path) -> str:
    """Names the newest checkpoint older than `bad` that passes its checksums."""
    for path in reversed([p for p in list_checkpoints(root) if p.name < bad.name]):
        try:
            read_state(path)
        except CheckpointError:
            continue
        return f"The last good checkpoint is {path}: resume from it with --resume {path}."
    return "No earlier checkpoint passes its checksums: start the run again."


def load_checkpoint(accelerator: Any, path: Path, scheduler: Any = None) -> dict[str, Any]:
    """Verify and load checkpoint `path` into the prepared objects; returns its progress."""
    state = read_state(path)
    sched_file = Path(path) / SCHEDULER_FILE
    try:  # accelerate reads its pickles with weights_only=True, as we do
        accelerator.load_state(str(path))
        if scheduler is not None and sched_file.exists():
            scheduler.load_state_dict(torch.load(sched_file, weights_only=True))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds a pickle that needs more than tensors and plain values "
            f"to load (loading it could run code): refused, nothing in it was run. Only resume "
            f"from checkpoints you wrote. ({str(e).splitlines()[0]})"
        ) from None
    except RuntimeError as e:  # shapes of another model, files accelerate did not write ...
        if isinstance(e, torch.OutOfMemoryError):
            raise
        raise CheckpointError(
            f"checkpoint {path} does not fit this run: {e}. Resume with the settings it was "
            "written with, or start a new output_dir."
        ) from e
    # accelerate does not restore its own checkpoint counter; keep it right for later saves.
    accelerator.project_configuration.iteration = int(state.get("accelerate_iteration", 0))
    return state
