"""Reading offline W&B runs back: the `.wandb` file a run writes with `WANDB_MODE=offline`.

Tests and the demo read the runs they logged with this (wandb 0.31 has no Python reader).
"""

from __future__ import annotations

import json
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["read_wandb_run"]

# wandb-core writes a `.wandb` transaction log in LevelDB's log format: a 7-byte file header
# (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of chunks, each with a 7-byte header
# (crc32 of type+data, length, type: FULL/FIRST/MIDDLE/LAST); a record is one protobuf
# `wandb_internal.Record`. wandb 0.31 no longer ships a Python reader (its datastore moved to Go),
# so this is a small reader of that documented format.
_HEADER = struct.Struct("<4sHB")
_CHUNK = struct.Struct("<IHB")
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B run file")
    ident, magic, version = _HEADER.unpack_from(data)
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B run file (header {data[:7]!r})")
    pos, pending = _HEADER.size, b""
    while pos + _CHUNK.size <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _CHUNK.size:  # block trailer padding
            pos += left
            continue
        crc, length, kind = _CHUNK.unpack_from(data, pos)
        start = pos + _CHUNK.size
        if kind == 0 and length == 0:  # zero padding: nothing more written yet
            break
        if start + length > len(data):  # the run is still writing: stop at the last whole record
            break
        chunk = data[start : start + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos} (checksum mismatch)")
        pos = start + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        else:
            raise ValueError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _find_run_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such W&B run file or run folder")
    found = sorted(path.glob("*.wandb")) or sorted(path.glob("*/*.wandb"))
    found = found or sorted(path.glob("wandb/*/*.wandb"))
    # wandb's latest-run is a link to one of the run folders: count each run file once
    found = sorted({f.resolve(): f for f in found if not f.parent.is_symlink()}.values()) or found
    if not found:
        raise FileNotFoundError(f"{path}: no .wandb run file inside (looked in */ and wandb/*/)")
    if len(found) > 1:
        names = ", ".join(str(f) for f in found[:5])
        raise ValueError(f"{path}: holds {len(found)} W&B runs ({names}); pass one run folder")
    return found[0]


def _item_path(item: Any) -> list[str]:
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set_path(target: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            nxt = target[key] = {}
        target = nxt
    target[keys[-1]] = value


def _del_path(target: dict[str, Any], keys: list[str]) -> None:
    for key in keys[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            return
        target = nxt
    target.pop(keys[-1], None)


def _history_value(item: Any) -> Any:
    """A HistoryItem's value: `value_json`, or the typed `value` oneof newer encoders use."""
    kind = item.WhichOneof("value")
    if kind is None:
        return json.loads(item.value_json) if item.value_json else None
    if kind == "none":
        return None
    if kind == "json":
        return json.loads(item.json)
    return getattr(item, kind)


def _apply(target: dict[str, Any], update: Any) -> None:
    """Apply a ConfigRecord/SummaryRecord (update + remove items) to a dict."""
    for item in update.update:
        _set_path(target, _item_path(item), json.loads(item.value_json))
    for item in update.remove:
        _del_path(target, _item_path(item))


def read_wandb_run(path: str | os.PathLike[str], *, wait_s: float = 0.0) -> dict[str, Any]:
    """Parse an offline W&B run (`.wandb` file, or the run folder holding one).

    Returns {"id", "project", "entity", "name", "group", "job_type", "tags", "config",
    "history": [row, ...], "summary", "exit_code"} with W&B's internal `_wandb` keys dropped.
    Values are decoded from their JSON; history rows keep `_step`/`_runtime`/`_timestamp`.

    wandb-core writes the file from its own process and may still be flushing it when
    `run.finish()` / `accelerator.end_training()` returns; `wait_s` > 0 re-reads until the
    run's exit record (its last) is there, for up to that many seconds. A run that is still
    going (or crashed) reads as far as it was written, with `exit_code` None.
    """
    run_file = _find_run_file(Path(path))
    deadline = time.monotonic() + wait_s
    while True:
        out = _parse_run_file(run_file)
        if out["exit_code"] is not None or time.monotonic() >= deadline:
            return out
        time.sleep(0.1)


def _parse_run_file(run_file: Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict[str, Any] = {
        "file": str(run_file),
        "id": None,
        "project": None,
        "entity": None,
        "name": None,
        "group": None,
        "job_type": None,
        "tags": [],
        "config": {},
        "history": [],
        "summary": {},
        "exit_code": None,
    }
    for raw in _wandb_records(run_file):
        record = pb.Record()  # type: ignore[attr-defined]  # version-switching shim module
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                id=run.run_id,
                project=run.project or None,
                entity=run.entity or None,
                name=run.display_name or None,
                group=run.run_group or None,
                job_type=run.job_type or None,
                tags=list(run.tags),
            )
            _apply(out["config"], run.config)
            _apply(out["summary"], run.summary)
        elif kind == "config":
            _apply(out["config"], record.config)
        elif kind == "summary":
            _apply(out["summary"], record.summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_path(row, _item_path(item), _history_value(item))
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    for section in ("config", "summary"):
        out[section].pop("_wandb", None)
    return out
