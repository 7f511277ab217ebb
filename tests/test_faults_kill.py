"""Kill at any step: a real `accelerate launch recipes/imagenet.py` run is SIGKILLed (the whole
process tree, as a pre-empted job is) at a step drawn from a seeded RNG, once while a checkpoint
is being written, and resumed with `--resume latest`; it must end bit-identical to an
uninterrupted run with the same seed (student weights, optimizer and scheduler state, progress
counters, logged losses, step counts). Table of outcomes: tests/FAULTS.md.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distill.checkpoint import find_latest, read_state
from tests.scripts.fault_harness import (
    STEPS,
    assert_same_outcome,
    ckpt,
    finish,
    make_data,
    mid_write_env,
    recipe_args,
    run_to_end,
    run_until,
    start,
)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_data(tmp_path_factory.mktemp("faults_kill"))


class References(dict[int, Path]):
    """Uninterrupted runs with the same seed, made on first use, one per process count."""

    def __init__(self, data: dict[str, Path]) -> None:
        super().__init__()
        self.data = data

    def __missing__(self, processes: int) -> Path:
        out = self.data["base"] / f"reference_{processes}p"
        run_to_end(out, recipe_args(self.data, out), processes=processes)
        self[processes] = out
        return out


@pytest.fixture(scope="module")
def reference(data: dict[str, Path]) -> References:
    return References(data)


def kill_mid_write_then_at_random_step(
    data: dict[str, Path], out: Path, seed: int, processes: int
) -> tuple[int, int]:
    """Kill 1 lands after checkpoint k1's files and manifest are written, before its rename;
    kill 2 the moment checkpoint k2 > k1 exists (during step k2 + 1). Returns (k1, k2)."""
    rng = random.Random(seed)
    k1 = rng.randint(2, STEPS - 2)
    k2 = rng.randint(k1 + 1, STEPS - 1)
    args = recipe_args(data, out)

    first = start(out, args, processes=processes, env=mid_write_env(k1))
    unfinished = ckpt(out, k1, tmp=True)
    run_until(first, lambda: (unfinished / "distill_state.json").exists())
    # the write was cut off: step k1 is not there, the one before it is whole and loadable
    assert unfinished.is_dir() and not ckpt(out, k1).exists()
    previous = find_latest(out / "checkpoints")
    assert previous == ckpt(out, k1 - 1)
    assert read_state(previous)["step"] == k1 - 1  # every file matches its checksum
    assert load_file(previous / "model.safetensors")

    second = start(out, [*args, "--resume", "latest"], processes=processes)
    run_until(second, lambda: ckpt(out, k2).is_dir())
    text = second.output()
    assert f"ignoring {unfinished}: a checkpoint write that was interrupted" in text
    assert f"resumed from {previous} at step {k1 - 1}" in text

    text = finish(start(out, [*args, "--resume", "latest"], processes=processes))
    resumed_at = int(text.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert resumed_at >= k2
    assert not list((out / "checkpoints").glob(".tmp-*"))  # leftovers go with the next save
    return k1, k2


def test_kill_mid_write_and_at_a_random_step_resumes_bit_identically(
    data: dict[str, Path], reference: References, tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    kill_mid_write_then_at_random_step(data, out, seed=8, processes=1)
    metrics = assert_same_outcome(reference[1], out)
    assert metrics["steps"] == STEPS and metrics["num_processes"] == 1


@pytest.mark.slow
def test_two_processes_killed_twice_resume_bit_identically(
    data: dict[str, Path], reference: References, tmp_path: Path
) -> None:
    out = tmp_path / "killed_ddp"
    kill_mid_write_then_at_random_step(data, out, seed=3, processes=2)
    metrics = assert_same_outcome(reference[2], out)
    assert metrics["steps"] == STEPS and metrics["num_processes"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2, 5])
def test_kill_at_random_steps_single_process(
    data: dict[str, Path], reference: References, tmp_path: Path, seed: int
) -> None:
    """Killed at a random step, then at another, then run to the end (every step of the run,
    the epoch boundaries at steps 3 and 6 included, is hit by some seed)."""
    rng = random.Random(seed)
    kills = sorted(rng.sample(range(1, STEPS), 2))
    out = tmp_path / "killed"
    args = recipe_args(data, out)
    for i, k in enumerate(kills):
        resume = ["--resume", "latest"] if i else []
        run_until(start(out, [*args, *resume]), lambda k=k: ckpt(out, k).is_dir())
    finish(start(out, [*args, "--resume", "latest"]))
    assert_same_outcome(reference[1], out)


@pytest.mark.slow
def test_two_processes_kill_at_a_random_step(
    data: dict[str, Path], reference: References, tmp_path: Path
) -> None:
    k = random.Random(11).randint(1, STEPS - 1)
    out = tmp_path / "killed_ddp"
    args = recipe_args(data, out)
    run_until(start(out, args, processes=2), lambda: ckpt(out, k).is_dir())
    finish(start(out, [*args, "--resume", "latest"], processes=2))
    assert_same_outcome(reference[2], out)


@pytest.mark.slow
def test_one_rank_of_two_killed_the_other_ends_and_resume_is_exact(
    data: dict[str, Path], reference: References, tmp_path: Path
) -> None:
    """SIGKILL of rank 1 alone (an OOM kill, a node losing one GPU): rank 0 does not wait for
    it forever; the launcher ends within a bounded time, and --resume latest then ends
    bit-identical to an uninterrupted run."""
    import signal
    import time

    import psutil

    out = tmp_path / "one_rank"
    args = recipe_args(data, out)
    run = start(out, args, processes=2)
    deadline = time.monotonic() + 240
    while not ckpt(out, 3).is_dir():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output()
        time.sleep(0.01)
    ranks = [
        p
        for p in psutil.Process(run.proc.pid).children(recursive=True)
        if p.environ().get("RANK") == "1" and "imagenet" in " ".join(p.cmdline())
    ]
    assert len(ranks) == 1, ranks
    ranks[0].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    run.proc.wait(timeout=180)  # torchrun stops rank 0 once it sees rank 1 gone
    assert run.proc.returncode != 0 and time.monotonic() - t0 < 180
    finish(start(out, [*args, "--resume", "latest"], processes=2))
    assert_same_outcome(reference[2], out)
