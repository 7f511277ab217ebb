"""A run folder is never silently mixed or destroyed.

- `RunLock`: a run holds `<output_dir>/.lock` (host, pid, start time) for its whole life, taken
  with an exclusive create, so a second run into the same folder refuses and names the first. A
  lock left by a process that no longer exists on this host is stale: a run that resumes
  (what one does after a kill) clears it and says so; a new run is refused with the
  explanation, and `break_lock=True` (`--break-lock`) clears it. A lock from another host cannot
  be checked: only `--break-lock` clears it.
- `claim_fresh`: a run that does not resume refuses a folder that already holds a run
  (metrics.json or checkpoints), naming it and the two ways on: resume it, or `overwrite=True`
  (`--overwrite`), which moves the old run aside into `<output_dir>.replaced-<time>/` and never
  deletes it.
- `resume_changes`: what a resumed run would change of what the run is (method, temperature,
  loss weights, learning-rate schedule, data, student, teacher, ...), so the loop can refuse it
  unless asked, and record the changes it accepts.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_FILE",
    "RESUMABLE_KEYS",
    "RunFolderError",
    "RunLock",
    "check_resume",
    "claim_folder",
    "claim_fresh",
    "flatten",
    "kept_record",
    "on_main",
    "resume_changes",
]

LOCK_FILE = ".lock"

# Settings a resumed run may change without changing what the run is: where and how often it
# writes, how long it runs, how fast it loads, what it reports to.
RESUMABLE_KEYS = frozenset(
    {
        "output_dir", "resume", "save_every", "eval_every", "save_at_epoch_end",
        "eval_at_epoch_end", "log_every", "keep_checkpoints", "progress", "report_to",
        "project", "run_name", "experiment", "workers", "epochs", "max_steps", "eval_only",
        "limit_eval", "eval_batch_size", "export_student", "check_compatible", "compile",
        "channels_last", "strict_data", "gpu_pipeline", "overwrite", "break_lock",
        "allow_resume_changes", "tracker_init_kwargs", "lfw_dir",
        "num_outputs",  # the teacher's, read from its first batch when its metadata lacks it
    }
)  # fmt: skip


class RunFolderError(RuntimeError):
    """The output folder holds (or is used by) another run; the message says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


@dataclass
class RunLock:
    """`<output_dir>/.lock` held by this process; `release()` removes it."""

    path: Path

    @classmethod
    def acquire(
        cls, output_dir: str | Path, *, break_lock: bool = False, resuming: bool = False
    ) -> RunLock:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": _now()}
        for _attempt in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(path)
                if not _stale(holder) or not (break_lock or resuming):
                    raise RunFolderError(_held_message(folder, holder)) from None
                print(f"clearing the lock of a run that is no longer running: {holder}")
                path.unlink(missing_ok=True)  # a dead process's lock: resuming, or asked to
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            return cls(path)
        raise RunFolderError(f"could not take the lock {path}: another run took it just now")

    def release(self) -> None:
        holder = _read(self.path)
        if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stale(holder: Mapping[str, Any]) -> bool:
    """A lock is stale when its process is gone from this host (or the file is unreadable)."""
    if not holder:
        return True
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _alive(pid)


def _held_message(folder: Path, holder: Mapping[str, Any]) -> str:
    who = (
        f"the run started {holder.get('started', '?')} on host {holder.get('host', '?')} "
        f"(pid {holder.get('pid', '?')})"
    )
    if _stale(holder):
        return (
            f"output_dir {folder} is locked by {who}, which is no longer running (a run that was "
            "killed leaves its lock behind). Continue that run with --resume latest (which "
            f"clears it), or, if no other run uses this folder, pass --break-lock to clear "
            f"{folder / LOCK_FILE}"
        )
    return (
        f"output_dir {folder} is in use by {who}: two runs in one folder would overwrite each "
        "other's checkpoints and metrics. Wait for it to finish, or choose another --output-dir"
    )


def _describe(folder: Path) -> str:
    """'the run "distilled-kd-..." (finished, 300 steps)' for the message of claim_fresh."""
    record = _read(folder / "metrics.json")
    steps = sorted(p.name for p in (folder / "checkpoints").glob("step_*"))
    if record:
        return f'the finished run "{record.get("run_name", folder.name)}" ({record.get("steps")} steps)'
    last = steps[-1] if steps else "no checkpoint"
    return f"an unfinished run (latest checkpoint: {last})"


def claim_fresh(output_dir: str | Path, *, overwrite: bool) -> Path | None:
    """Make sure a run that does not resume starts in a folder holding no other run. With
    `overwrite`, an earlier run is moved aside (returned); otherwise it is an error."""
    folder = Path(output_dir)
    had = (folder / "metrics.json").exists() or any((folder / "checkpoints").glob("step_*"))
    if not had:
        return None
    what = _describe(folder)
    if not overwrite:
        raise RunFolderError(
            f"output_dir {folder} already holds {what}. Continue it with --resume latest "
            "(resume='latest'), or start over with --overwrite (overwrite=True), which moves the "
            f"old run aside into {folder.name}.replaced-<time>/ (nothing is deleted); or choose "
            "another --output-dir"
        )
    aside = folder.with_name(f"{folder.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir(parents=True, exist_ok=False)
    for entry in folder.iterdir():
        if entry.name != LOCK_FILE:
            shutil.move(str(entry), aside / entry.name)
    return aside


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"recipe": {"lr": 0.1}} -> {"recipe.lr": 0.1}."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def resume_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, list[Any]]:
    """{setting: [value in the checkpoint, value now]} for every setting that defines the run
    (everything but RESUMABLE_KEYS) and differs between the two logged configs."""
    old, new = flatten(saved), flatten(now)
    changed = {}
    for key in sorted(set(old) | set(new)):
        if key.rpartition(".")[2] in RESUMABLE_KEYS:
            continue
        a, b = old.get(key), new.get(key)
        if _jsonish(a) != _jsonish(b):
            changed[key] = [a, b]
    return changed


def _jsonish(v: Any) -> Any:
    """Compare as JSON would store it (tuples and lists alike)."""
    return json.loads(json.dumps(v, default=str))


def on_main(accelerator: Any, fn: Any) -> Any:
    """`fn()` on the main process only; when it raises, every process raises (the others with
    the main process's message), so no process waits forever for one that stopped."""
    error: BaseException | None = None
    result = None
    if accelerator.is_main_process:
        try:
            result = fn()
        except (RunFolderError, OSError, ValueError, RuntimeError) as e:
            error = e
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        box: list[Any] = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            error = RunFolderError(f"the main process stopped: {box[0]}")
    if error is not None:
        raise error
    return result


def claim_folder(
    output_dir: Path,
    config: Any,
    *,
    fresh: bool,
    trained: Any,
    exported: Any,
    say: Any = print,
) -> RunLock:
    """The run folder for a run (call it on the main process): its lock, and for a `fresh` run
    (one that does not resume) no other run in it (or that run moved aside with
    `config.overwrite`); room for the checkpoints."""
    from distill.guards import check_writable, preflight

    check_writable(output_dir)  # a clear error for a folder that cannot be written
    lock = RunLock.acquire(output_dir, break_lock=config.break_lock, resuming=not fresh)
    try:
        if fresh:
            aside = claim_fresh(output_dir, overwrite=config.overwrite)
            if aside is not None:
                say(f"--overwrite: the earlier run in {output_dir} was moved to {aside}")
        preflight(output_dir, trained, exported, config.keep_checkpoints)
    except BaseException:
        lock.release()
        raise
    return lock


def check_resume(
    saved: Mapping[str, Any], now: Mapping[str, Any], config: Any, say: Any = print
) -> dict[str, list[Any]]:
    """Refuse to resume with settings that change what the run is, unless
    `config.allow_resume_changes`; returns the accepted changes (to be recorded)."""
    changes = resume_changes(saved, now)
    if not changes:
        return {}
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    if not config.allow_resume_changes:
        raise RunFolderError(
            f"resuming {config.output_dir} with settings that change what the run is: {listed}. "
            "Resume with the settings it was started with, start a new --output-dir, or pass "
            "--allow-resume-changes (allow_resume_changes=True) to continue with them (the "
            "change is recorded in the run)"
        )
    say(f"resuming with changed settings (recorded in the run): {listed}")
    return changes


def kept_record(output_dir: Path, step: int, say: Any = print) -> dict[str, Any] | None:
    """The record of a finished run that was resumed (a requeued job) if it is whole, else
    None (its outputs were not written: evaluate and write them now)."""
    from distill.run_record import MetricsFileError, read_metrics_json

    try:
        record = read_metrics_json(Path(output_dir) / "metrics.json")
    except MetricsFileError:
        return None
    say(
        f"{output_dir} finished at step {step}: nothing to train; its record (metrics.json) is "
        "kept as it was"
    )
    return record
