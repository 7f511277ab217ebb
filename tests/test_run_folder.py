"""A run folder is never silently mixed or destroyed (distill.run_folder): reruns into a finished
folder, two runs at once, a requeued finished run, resuming with other settings, and `--resume`
at a run folder or past a damaged checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import DataLoader

from distill.checkpoint import CheckpointError, list_checkpoints
from distill.run_folder import LOCK_FILE, RunFolderError, RunLock
from tests.conftest import ROOT, accelerate_cmd, launch_env
from tests.test_distiller import NoisyImages, make
from tests.test_recipes_common import TINY_TEACHER_OPTIONS, save_teacher, tiny_args


def loader() -> DataLoader:
    return DataLoader(NoisyImages(), batch_size=8, shuffle=True)


def evals() -> DataLoader:
    return DataLoader(NoisyImages(16), batch_size=8)


def test_rerun_into_a_finished_folder_is_refused_and_overwrite_moves_it_aside(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    make(out, max_steps=4, save_every=2).fit(loader(), evals())
    first = (out / "metrics.json").read_text()
    first_ckpts = [p.name for p in list_checkpoints(out / "checkpoints")]
    with pytest.raises(RunFolderError) as err:
        make(out, max_steps=2).fit(loader(), evals())
    text = str(err.value)
    assert f'already holds the finished run "{out.name}" (4 steps)' in text
    assert "--resume latest" in text and "--overwrite" in text
    assert (out / "metrics.json").read_text() == first  # nothing of the old run was touched
    assert not (out / LOCK_FILE).exists()  # the refused run let go of the lock

    make(out, max_steps=2, overwrite=True).fit(loader(), evals())
    (aside,) = tmp_path.glob("run.replaced-*")
    assert (aside / "metrics.json").read_text() == first  # moved, never deleted
    assert [p.name for p in list_checkpoints(aside / "checkpoints")] == first_ckpts
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000002"]


def test_a_second_run_in_a_locked_folder_is_refused_and_a_stale_lock_explained(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    held = RunLock.acquire(out)  # this process is alive: the lock is held
    with pytest.raises(
        RunFolderError, match=rf"is in use by the run started .* \(pid {os.getpid()}\)"
    ):
        make(out, max_steps=1).fit(loader())
    held.release()
    # a lock left by a process that is gone
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_FILE).write_text(
        json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "then"})
    )
    with pytest.raises(RunFolderError, match=r"no longer running.*--resume latest.*--break-lock"):
        make(out, max_steps=1).fit(loader())
    make(out, max_steps=1, break_lock=True).fit(loader())
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1
    (out / LOCK_FILE).write_text(
        json.dumps({"host": os.uname().nodename, "pid": dead.pid, "started": "then"})
    )
    make(out, max_steps=2, resume="latest").fit(loader())  # resuming clears a dead run's lock
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2


def test_two_recipe_processes_into_one_folder(tmp_path: Path) -> None:
    """Real processes: the second refuses and names the first; after the first is killed its
    lock is stale: a new run is refused, --resume latest clears it and continues the run."""
    from tests.datagen import make_imagenet

    root = tmp_path / "imnet"
    make_imagenet(root, n_classes=2, per_class=4, val_per_class=1, size=32)
    teacher = save_teacher(tmp_path / "t.safetensors", 2)
    out = tmp_path / "run"
    args = [
        "--data-dir", str(root), "--teacher", f"file:{teacher}",
        "--teacher-options", TINY_TEACHER_OPTIONS, *tiny_args(out, steps=400), "--save-every", "1",
    ]  # fmt: skip
    cmd = accelerate_cmd(ROOT / "recipes" / "imagenet.py", *args)
    first = subprocess.Popen(cmd, env=launch_env(), cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
            time.sleep(0.1)
        second = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True)
        assert second.returncode != 0, second.stderr  # accelerate launch exits 1 for its 2
        assert (
            "error: output_dir" in second.stderr and "is in use by the run started" in second.stderr
        )
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    stale = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True)
    assert stale.returncode != 0 and "no longer running" in stale.stderr, stale.stderr
    args[args.index("400")] = str(len(list_checkpoints(out / "checkpoints")) + 1)
    cmd = accelerate_cmd(ROOT / "recipes" / "imagenet.py", *args, "--resume", "latest")
    resumed = subprocess.run(cmd, env=launch_env(), cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and (out / "metrics.json").exists()


def test_a_requeued_finished_run_keeps_its_record(tmp_path: Path) -> None:
    out = tmp_path / "run"
    make(out, max_steps=4, save_every=2).fit(loader(), evals())
    before = (out / "metrics.json").read_text()
    record = json.loads(before)
    assert record["mult_adds"] and record["params"] and record["images_per_s"] > 0
    again = make(out, max_steps=4, resume="latest")
    assert again.fit(loader(), evals()) == record["metrics"]
    assert (out / "metrics.json").read_text() == before  # kept as it was, not rewritten


def test_resume_with_settings_that_change_the_run_is_refused_then_recorded(
    tmp_path: Path, capsys: Any
) -> None:
    from recipes.imagenet import main
    from tests.datagen import make_imagenet

    root = tmp_path / "imnet"
    make_imagenet(root, n_classes=2, per_class=4, val_per_class=1, size=32)
    teacher = save_teacher(tmp_path / "t.safetensors", 2)
    out = tmp_path / "run"
    base = [
        "--data-dir", str(root), "--teacher", f"file:{teacher}",
        "--teacher-options", TINY_TEACHER_OPTIONS, "--lr", "0.1", "--temperature", "2",
    ]  # fmt: skip
    assert main([*base, *tiny_args(out, steps=2)]) == 0
    changed = [*base, *tiny_args(out, steps=3), "--resume", "latest", "--lr", "0.5"]
    changed[changed.index("--temperature") + 1] = "8"
    capsys.readouterr()
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "settings that change what the run is" in err and "--allow-resume-changes" in err
    assert "recipe.lr: 0.1 -> 0.5" in err and "recipe.temperature: 2.0 -> 8.0" in err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2  # untouched
    assert main([*changed, "--allow-resume-changes"]) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["steps"] == 3 and record["temperature"] == 8.0
    (entry,) = record["info_resume_changes"]
    assert entry["step"] == 2 and entry["changes"]["recipe.lr"] == [0.1, 0.5]


def test_resume_at_a_run_folder_and_past_a_damaged_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    make(out, max_steps=4, save_every=2, keep_checkpoints=3).fit(loader(), evals())
    with pytest.raises(CheckpointError) as err:
        make(tmp_path / "other", max_steps=6, resume=str(out)).fit(loader(), evals())
    text = str(err.value)
    assert "is a run folder, not a checkpoint" in text
    assert "step_00000002, step_00000004" in text and "--resume latest" in text
    # the newest checkpoint is damaged: the error names the last good one
    weights = out / "checkpoints" / "step_00000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError) as err:
        make(out, max_steps=6, resume="latest").fit(loader(), evals())
    good = out / "checkpoints" / "step_00000002"
    assert f"The last good checkpoint is {good}: resume from it with --resume {good}" in str(
        err.value
    )


def test_disk_full_while_the_outputs_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training ends, then the disk fills up while student.safetensors is written: the error
    names the last good checkpoint, nothing is half-written, and a rerun with resume finishes."""
    import errno

    from distill import outputs

    out = tmp_path / "run"
    real = outputs.export_student

    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "export_student", full)
    with pytest.raises(CheckpointError) as err:
        make(out, max_steps=4, save_every=2).fit(loader(), evals())
    text = str(err.value)
    assert "the disk is full" in text and "--resume latest" in text
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000004'}" in text
    assert not (out / "metrics.json").exists() and not (out / "student.safetensors").exists()
    monkeypatch.setattr(outputs, "export_student", real)
    with pytest.raises(RunFolderError, match=r"an unfinished run .*step_00000004"):
        make(out, max_steps=4).fit(loader(), evals())  # without resume: refused, not mixed
    metrics = make(out, max_steps=4, resume="latest").fit(loader(), evals())
    record = json.loads((out / "metrics.json").read_text())
    assert record["steps"] == 4 and record["metrics"] == metrics
    assert (out / "student.safetensors").exists()
