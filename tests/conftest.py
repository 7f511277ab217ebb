"""Shared test set-up: offline everything, few threads, small and deterministic."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)  # tiny models: more threads only add contention


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def launch_env(**extra: str) -> dict[str, str]:
    """Environment for subprocesses (accelerate launch): CPU only, offline, the repo importable."""
    env = dict(os.environ)
    env.update(
        {
            "ACCELERATE_USE_CPU": "1",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
            "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    env.update(extra)
    return env


def accelerate_cmd(script: str | Path, *args: str, processes: int = 1) -> list[str]:
    """`accelerate launch` for 1 CPU process, or N gloo ranks (`--multi_gpu` + ACCELERATE_USE_CPU)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0"]
    else:
        launcher += ["--cpu", "--num_processes", "1"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launcher, str(script), *args]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps a process-wide singleton; each test may choose its own precision."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
