"""Shared pieces of the fault suite (tests/test_faults_*.py, table in tests/FAULTS.md).

Runs `recipes/imagenet.py` on a generated ImageNet as a real `accelerate launch` process tree,
kills the whole tree with SIGKILL when a condition on its output folder holds (a checkpoint
appeared, a write is half done), and compares two runs' outcomes bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from distill.checkpoint import STATE_FILE, find_latest
from tests.conftest import ROOT, accelerate_cmd, launch_env
from tests.datagen import make_bad_images, make_imagenet
from tests.scripts.faulty_recipe import PAUSE_ENV
from tests.test_recipes_common import TINY_TEACHER_OPTIONS, save_teacher, tiny_args

WNID = "n01440764"
STEPS = 8  # 13 training images (one truncated), batches of 4: 3 steps an epoch, ~2.7 epochs


def make_data(base: Path) -> dict[str, Path]:
    """A 3-class ImageNet (meta.bin + wnid folders) with one truncated JPEG, and a tiny teacher."""
    root = base / "imagenet"
    make_imagenet(root, n_classes=3, per_class=4, val_per_class=2, size=32)
    bad = make_bad_images(base / "bad", size=24)
    shutil.copy(bad["truncated"], root / "train" / WNID / f"{WNID}_truncated.JPEG")
    return {"root": root, "teacher": save_teacher(base / "teacher.safetensors", 3), "base": base}


def recipe_args(data: Mapping[str, Path], out: Path, steps: int = STEPS) -> list[str]:
    """Tiny settings, a checkpoint after every step (keep 2), the step LR schedule."""
    return [
        "--data-dir",
        str(data["root"]),
        "--teacher",
        f"file:{data['teacher']}",
        "--teacher-options",
        TINY_TEACHER_OPTIONS,
        *tiny_args(out, steps=steps),
        "--save-every",
        "1",
        "--lr-steps",
        "2",  # the LR drops at epoch 2: a resumed scheduler must know where it is
    ]


def single_thread() -> Iterator[None]:
    """Body of the suite's autouse fixtures: in-process runs use one torch thread, like the
    launched ones (OMP_NUM_THREADS=1). Two OpenMP threads on a busy machine spin at every
    barrier and made these runs ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- processes


@dataclass
class Launched:
    """A recipe process tree and the file its stdout+stderr go to."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(
    out: Path, args: list[str], *, processes: int = 1, env: Mapping[str, str] | None = None
) -> Launched:
    """Launch the recipe in a session of its own; its output goes to <out>.<n>.log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.{len(list(out.parent.glob(f'{out.name}.*.log')))}.log"
    # the recipe, run through the script that injects the faults named in `env`
    script = ROOT / "tests" / "scripts" / "faulty_recipe.py"
    cmd = accelerate_cmd(script, *args, processes=processes)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            env=launch_env(**(env or {})),
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Launched(proc, log)


def kill_tree(run: Launched) -> None:
    """SIGKILL the launcher, its process group and every descendant: torchrun starts the
    ranks in sessions of their own, so the process group alone would miss them (a pre-empted
    cluster job loses all of its processes at once)."""
    import psutil

    proc = run.proc
    try:
        parent = psutil.Process(proc.pid)
        tree = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    gone = (psutil.NoSuchProcess, ProcessLookupError)
    for p in tree:  # freeze first, so nobody starts a child after the listing
        with contextlib.suppress(*gone):
            p.suspend()
    for p in list(tree):
        with contextlib.suppress(*gone):
            tree += [c for c in p.children(recursive=True) if c not in tree]
    with contextlib.suppress(*gone):
        os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        with contextlib.suppress(*gone):
            p.kill()
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"


def run_until(run: Launched, condition: Callable[[], bool], timeout: float = 240) -> None:
    """Poll `condition` every 5 ms and kill the whole tree the moment it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if run.proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {run.proc.returncode}) before the kill point:\n"
                + run.output()
            )
        if time.monotonic() > deadline:
            kill_tree(run)
            raise AssertionError(f"no kill point within {timeout} s:\n{run.output()}")
        time.sleep(0.005)
    kill_tree(run)
    assert run.proc.returncode == -signal.SIGKILL, run.proc.returncode


def finish(run: Launched, timeout: float = 300) -> str:
    """Wait for a clean exit; returns the output."""
    try:
        run.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(run)
        raise
    text = run.output()
    assert run.proc.returncode == 0, f"exit {run.proc.returncode}\n{text}"
    return text


def run_to_end(out: Path, args: list[str], *, processes: int = 1) -> str:
    return finish(start(out, args, processes=processes))


def mid_write_env(step: int) -> dict[str, str]:
    """Pause the main process for a minute once checkpoint `step` is written, before its rename."""
    return {PAUSE_ENV: f"60@{step}"}


def ckpt(out: Path, step: int, *, tmp: bool = False) -> Path:
    return out / "checkpoints" / f"{'.tmp-' if tmp else ''}step_{step:08d}"


# ----------------------------------------------------------------------------- comparisons


def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _logged(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The checkpoint's log history without wall-clock throughput."""
    return [{k: v for k, v in row.items() if "images_per_s" not in k} for row in state["history"]]


def assert_same_outcome(reference: Path, run_dir: Path) -> dict[str, Any]:
    """Bit-identical student weights, final checkpoint (weights, optimizer, scheduler,
    progress counters, logged losses/LR/eval rows) and step counts. Returns metrics.json."""
    _same(
        load_file(reference / "student.safetensors"),
        load_file(run_dir / "student.safetensors"),
        "student.safetensors",
    )
    ref_ckpt, ckpt_ = find_latest(reference / "checkpoints"), find_latest(run_dir / "checkpoints")
    assert ref_ckpt is not None and ckpt_ is not None
    assert ckpt_.name == ref_ckpt.name, (ckpt_, ref_ckpt)  # the step of the last checkpoint
    _same(
        load_file(ref_ckpt / "model.safetensors"),
        load_file(ckpt_ / "model.safetensors"),
        "model.safetensors",
    )
    for name in ("optimizer.bin", "scheduler_distill.pt"):
        _same(
            torch.load(ref_ckpt / name, weights_only=True),
            torch.load(ckpt_ / name, weights_only=True),
            name,
        )
    sa = json.loads((ref_ckpt / STATE_FILE).read_text())
    sb = json.loads((ckpt_ / STATE_FILE).read_text())
    for key in ("step", "epoch", "batch_in_epoch", "images_seen", "skipped_nonfinite"):
        assert sa[key] == sb[key], key
    _same(_logged(sa), _logged(sb), "history")
    ma = json.loads((reference / "metrics.json").read_text())
    mb = json.loads((run_dir / "metrics.json").read_text())
    for key in ("steps", "epochs", "images_seen", "metrics", "teacher_metrics", "mult_adds"):
        assert ma[key] == mb[key], key
    return mb
