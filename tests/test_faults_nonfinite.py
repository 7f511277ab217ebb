"""NaN/inf through a recipe: the run stops with the step, the loss part that went non-finite
and the last good checkpoint named (exit 2, no traceback), and never writes a checkpoint with
non-finite weights; `--on-nonfinite skip` drops such a batch and counts it in metrics.json.

Faults: a learning rate of 1e30 (the update overflows), a teacher checkpoint with a NaN in its
classifier (a corrupt download), and one loss part poisoned at one step by wrapping the
recipe's objective (tests/scripts/faulty_recipe.py: PoisonedObjective).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import recipes.imagenet as recipe
from distill.checkpoint import list_checkpoints, read_state
from recipes.imagenet import main
from tests.scripts.fault_harness import make_data, recipe_args, single_thread
from tests.scripts.faulty_recipe import poison_build


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_data(tmp_path_factory.mktemp("faults_nonfinite"))


def poison(monkeypatch: pytest.MonkeyPatch, step: int, part: str) -> None:
    """The recipe's objective, wrapped: part `part` is NaN at optimizer step `step`."""
    monkeypatch.setattr(recipe, "build", recipe.build)  # restored after the test
    poison_build(recipe, step, part)


def failing(args: list[str], capsys: Any) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def finite(folder: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


def test_exploding_learning_rate_names_step_parts_and_a_finite_checkpoint(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "run"
    err = failing([*recipe_args(data, out), "--lr", "1e30"], capsys)
    m = re.search(r"error: loss became non-finite at step (\d+) \(parts: ([^)]*)\)", err)
    assert m, err
    step = int(m.group(1))
    good = out / "checkpoints" / f"step_{step - 1:08d}"
    assert f"the last good checkpoint is {good}." in err and "Lower the learning rate" in err
    assert "loss" in m.group(2).split(", ")
    assert list_checkpoints(out / "checkpoints")[-1] == good  # nothing after it was saved
    assert read_state(good)["step"] == step - 1 and finite(good)


def test_nan_in_the_teacher_names_the_distillation_part(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    weights = load_file(data["teacher"])
    weights["classifier.bias"][1] = float("nan")
    broken = tmp_path / "teacher_nan.safetensors"
    save_file(weights, str(broken))
    args = recipe_args(data, tmp_path / "run")
    args[args.index("--teacher") + 1] = f"file:{broken}"
    err = failing(args, capsys)
    # the teacher term is NaN, the label term is not: only kd (and the total) are named
    assert "loss became non-finite at step 1 (parts: loss, kd);" in err
    assert "no checkpoint was written yet" in err


def test_poisoned_part_at_step_k_names_it_and_checkpoint_k_minus_1(
    data: dict[str, Path], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    poison(monkeypatch, 5, "ce")
    err = failing(recipe_args(data, out), capsys)
    good = out / "checkpoints" / "step_00000004"
    assert f"non-finite at step 5 (parts: loss, ce); the last good checkpoint is {good}." in err
    assert list_checkpoints(out / "checkpoints")[-1] == good and finite(good)


def test_skip_drops_the_batch_and_counts_it(
    data: dict[str, Path], tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    poison(monkeypatch, 3, "kd")
    assert main([*recipe_args(data, out), "--on-nonfinite", "skip"]) == 0
    assert "step 3: non-finite loss, batch skipped (1 so far)" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_nonfinite"] == 1 and metrics["steps"] == 8
    assert all(torch.isfinite(t).all() for t in load_file(out / "student.safetensors").values())
    assert read_state(list_checkpoints(out / "checkpoints")[-1])["skipped_nonfinite"] == 1


def test_weights_that_overflow_after_a_finite_loss_are_never_saved(tmp_path: Path) -> None:
    """The loss of step 2 is finite, but its update leaves an inf in the weights: the run
    stops before writing checkpoint 2, and checkpoint 1 stays the last good one."""
    from distill import NonFiniteLossError
    from tests.test_distiller import loader, make

    d = make(tmp_path, max_steps=4, save_every=1)
    calls = {"n": 0}

    def overflow(opt: torch.optim.Optimizer, *_: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].view(-1)[0] = float("inf")

    d.optimizer.register_step_post_hook(overflow)
    with pytest.raises(NonFiniteLossError) as err:
        d.fit(loader())
    good = tmp_path / "checkpoints" / "step_00000001"
    assert "the weights became non-finite at step 2" in str(err.value)
    assert f"the last good checkpoint is {good}" in str(err.value)
    assert list_checkpoints(tmp_path / "checkpoints") == [good] and finite(good)
