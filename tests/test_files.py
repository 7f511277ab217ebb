"""distill.files, the one atomic writer: all or nothing, no leftovers, a file's usual mode."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from distill.files import atomic_path, write_json_atomic


def test_atomic_write_all_or_nothing_and_readable_by_others(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    write_json_atomic(target, {"a": 1})
    old = os.umask(0o022)
    os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o666 & ~old  # not mkstemp's private 0600
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a file")
        raise RuntimeError("the disk filled up")
    assert json.loads(target.read_text()) == {"a": 1}  # the old file is whole
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary left
