"""The one home for writing files safely, hashing them and showing progress.

Every record this project writes (checkpoint manifests, metrics.json, the teacher cache's
shards and manifest, exported weights, report.html) goes through `atomic_write`: the bytes are
written to a temporary file in the same folder, flushed to disk, and renamed over the target, so
a reader sees the old file or the new one, never half of one. A failed write (a full disk)
removes the temporary file and leaves the old target as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TMP_PREFIX",
    "atomic_path",
    "atomic_write",
    "fsync_dir",
    "progress_bar",
    "sha256_bytes",
    "sha256_file",
    "write_json_atomic",
    "write_text_atomic",
]

TMP_PREFIX = ".tmp-"  # names that start with it are writes in progress: never read


def sha256_file(path: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes | str) -> str:
    """Hex SHA-256 of bytes (a str is UTF-8 encoded first)."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to `path`; once the block ends without an error the file
    written there is fsynced and renamed to `path`. On an error it is removed.

        with atomic_path(out / "model.safetensors") as tmp:
            save_file(tensors, str(tmp))
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{TMP_PREFIX}{target.name}.")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private: give it a file's usual mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any], *, mode: str = "wb"
) -> Path:
    """Call `write(file)` on a temporary file next to `path`, then rename it into place."""
    with atomic_path(path) as tmp, open(tmp, mode) as f:
        write(f)
        f.flush()
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(
    path: str | os.PathLike[str],
    data: Any,
    *,
    sort_keys: bool = True,
    allow_nan: bool = True,
) -> Path:
    """Write `data` as indented JSON to `path` atomically; values JSON cannot hold are written
    as their `str()`. `allow_nan=False` refuses NaN and infinities (strict JSON)."""
    text = json.dumps(data, indent=2, sort_keys=sort_keys, default=str, allow_nan=allow_nan)
    return write_text_atomic(path, text + "\n")


class _NoBar:
    """What `progress_bar` returns when it is off: the same calls, no output."""

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, *args: Any, **kwargs: Any) -> None: ...

    def close(self) -> None: ...


class _LineBar:
    """Progress as plain lines on stderr, about every 5% (and at least every 60 s): what a log
    file or a cluster job's output gets instead of a bar redrawn in place."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every = max(1, (total or 0) // 20)
        self.start = self.last = time.monotonic()
        self.first = initial
        self.postfix = ""

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if (self.n - self.first) % self.every == 0 or self.n == self.total or now - self.last > 60:
            self.last = now
            rate = (self.n - self.first) / max(now - self.start, 1e-9)
            of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
            eta = f", eta {(self.total - self.n) / rate:.0f} s" if self.total and rate > 0 else ""
            line = f"{self.desc}: {self.n}{of} {self.unit}s, {rate:.3g} {self.unit}/s{eta}"
            print(line + (f", {self.postfix}" if self.postfix else ""), file=sys.stderr)

    def set_postfix(self, values: Any = None, **kwargs: Any) -> None:
        items = {**dict(values or {}), **kwargs}
        self.postfix = ", ".join(f"{k} {v}" for k, v in items.items())

    def close(self) -> None: ...


def progress_bar(
    total: int | None, *, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True
) -> Any:
    """A tqdm bar on stderr (rate and ETA) on a terminal; plain periodic lines when stderr is
    not one (a log file, a cluster job); nothing when `enabled` is False."""
    if not enabled:
        return _NoBar()
    if not sys.stderr.isatty():
        return _LineBar(total, desc, unit, initial)
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr
    )
