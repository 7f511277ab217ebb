"""Disk faults: an unwritable output folder and too little free space are refused before any
training; a disk that fills up during a checkpoint write, or a crash while a checkpoint of the
same step is replaced, leaves the previous checkpoint complete and loadable.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distill import checkpoint as ckpt
from distill.checkpoint import CheckpointError, find_latest, read_state
from tests.conftest import ROOT, launch_env
from tests.scripts.fault_harness import make_data, recipe_args, single_thread
from tests.test_distiller import loader, make


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_data(tmp_path_factory.mktemp("faults_disk"))


def test_unwritable_output_dir_is_refused_before_training(
    data: dict[str, Path], tmp_path: Path
) -> None:
    """A real recipe process (exit code and stderr); the folder cannot be made because its
    parent is a regular file (running as root, permission bits would not stop a write)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = blocker / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "imagenet.py"), *recipe_args(data, out)],
        env=launch_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: cannot write to --output-dir {out}" in proc.stderr
    assert "choose a writable folder" in proc.stderr and "Traceback" not in proc.stderr
    assert "final metrics" not in proc.stdout


DiskUsage = namedtuple("DiskUsage", "total used free")


def test_too_little_free_space_is_refused_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = make(tmp_path / "run", max_steps=3, save_every=1)
    per = ckpt.estimate_bytes(d.step_module)
    weights = sum(p.numel() * p.element_size() for p in d.step_module.parameters())
    assert per >= 3 * weights  # weights + two optimizer moments
    # room for two checkpoints, but a run keeping 2 writes a third before pruning the oldest
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: DiskUsage(10**12, 0, 2 * per))
    with pytest.raises(CheckpointError) as err:
        d.fit(loader())
    msg = str(err.value)
    assert "not enough free disk space for this run" in msg and "3 new checkpoint(s)" in msg
    assert "lower keep_checkpoints" in msg
    assert d.progress.step == 0 and not (tmp_path / "run" / "checkpoints").exists()
    # with enough room the same run goes ahead
    monkeypatch.setattr(ckpt.shutil, "disk_usage", lambda p: DiskUsage(10**12, 0, 10**11))
    make(tmp_path / "run", max_steps=1).fit(loader())


def enospc_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """accelerate's save() of optimizer.bin, for checkpoint `step` only, writes half the file
    and then fails the way a full disk does."""
    import accelerate.checkpointing as ac

    real = ac.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        path = Path(f)
        if path.name == "optimizer.bin" and path.parent.name.endswith(f"step_{step:08d}"):
            path.write_bytes(b"\x80\x02half a pickle")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(obj, f, *args, **kwargs)

    monkeypatch.setattr(ac, "save", save)


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    enospc_at_step(monkeypatch, 3)
    with pytest.raises(CheckpointError) as err:
        make(out, max_steps=5, save_every=1).fit(loader())
    msg = str(err.value)
    root = out / "checkpoints"
    assert "could not write checkpoint 3: the disk is full" in msg
    assert f"the last good checkpoint is {root / 'step_00000002'}" in msg
    assert "--resume latest" in msg
    # no partial checkpoint anywhere; the previous one verifies and loads
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]
    assert read_state(root / "step_00000002")["step"] == 2
    assert load_file(root / "step_00000002" / "model.safetensors")
    torch.load(root / "step_00000002" / "optimizer.bin", weights_only=True)

    # space freed: resuming ends exactly where an uninterrupted run does
    monkeypatch.undo()
    resumed = make(out, max_steps=5, save_every=1, resume="latest")
    resumed.fit(loader())
    full = make(tmp_path / "full", max_steps=5, save_every=1)
    full.fit(loader())
    a, b = full.unwrapped_student.state_dict(), resumed.unwrapped_student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler sees it."""


def _prepared_accelerator() -> tuple[Any, nn.Module]:
    from accelerate import Accelerator

    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    acc = Accelerator(cpu=True)
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return acc, model


@pytest.mark.parametrize("crash", ["move_old_aside", "move_new_in", "delete_old"])
def test_crash_while_a_step_is_saved_again_leaves_a_whole_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, crash: str
) -> None:
    """The epoch-end save re-writes the checkpoint of the step just saved: the old folder is
    moved aside, never deleted in place, so a kill at any point leaves a whole checkpoint."""
    acc, _ = _prepared_accelerator()
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save_checkpoint(acc, root, step, {"step": step})
    calls = {"replace": 0}
    real_replace, real_rmtree = os.replace, ckpt.shutil.rmtree

    def replace(src: Any, dst: Any) -> None:
        if Path(src).is_dir():
            calls["replace"] += 1
            if (crash, calls["replace"]) in {("move_old_aside", 1), ("move_new_in", 2)}:
                raise Killed
        real_replace(src, dst)

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if crash == "delete_old" and ".tmp-old-" in str(path):
            raise Killed
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    with pytest.raises(Killed):
        ckpt.save_checkpoint(acc, root, 2, {"step": 2, "epoch": 1})
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="distill.checkpoint"):
        latest = find_latest(root)
    assert latest is not None and read_state(latest)["step"] in (1, 2)  # verified, loadable
    acc.load_state(str(latest))
    assert "a checkpoint write that was interrupted" in caplog.text
    ckpt.save_checkpoint(acc, root, 3, {"step": 3})  # the next save clears the leftovers
    assert sorted(p.name for p in root.iterdir()) == [latest.name, "step_00000003"]


def test_incomplete_checkpoint_folder_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A step_ folder without distill_state.json (copied half-way, a non-atomic file system)."""
    acc, _ = _prepared_accelerator()
    root = tmp_path / "checkpoints"
    good = ckpt.save_checkpoint(acc, root, 1, {"step": 1})
    broken = root / "step_00000002"
    shutil.copytree(good, broken)
    (broken / ckpt.STATE_FILE).unlink()
    with caplog.at_level(logging.WARNING, logger="distill.checkpoint"):
        assert find_latest(root) == good
    assert f"skipping incomplete checkpoint {broken} (no distill_state.json)" in caplog.text
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        read_state(broken)  # and naming it explicitly is refused
