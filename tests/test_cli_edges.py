"""The command-line edges a new user hits first: no command, an unknown teacher, torchvision's
name for the width multiplier."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from distill.__main__ import main
from tests.conftest import ROOT, launch_env


def test_no_command_is_an_error_that_lists_the_commands(capsys: Any) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "a command is required" in err and "profile" in err and "compare" in err
    assert main(["--help"]) == 0


@pytest.mark.parametrize("spec", ["nope:x", "torchvision:no_such_model"])
def test_teachers_where_an_unknown_name_is_a_clear_error(spec: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "teachers", "where", spec],
        cwd=ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.startswith("error: ") and "python -m teachers list" in r.stderr


def test_profile_maps_alpha_onto_torchvision_width_mult(capsys: Any) -> None:
    from distill.models import create_student

    half = create_student("torchvision:mobilenet_v2", alpha=0.5, num_classes=10)
    full = create_student("torchvision:mobilenet_v2", num_classes=10)
    count = sum(p.numel() for p in half.parameters())
    assert count < sum(p.numel() for p in full.parameters())
    assert (
        main(["profile", "torchvision:mobilenet_v2", "--alpha", "0.5", "--resolution", "64"]) == 0
    )
    assert "alpha=0.5" in capsys.readouterr().out
    with pytest.raises(ValueError, match="has no width multiplier"):
        create_student("torchvision:resnet18", alpha=0.5)


def test_profile_check_against_the_paper(capsys: Any) -> None:
    """`profile --check` (documented in the README) passes on the paper's point and fails on a
    model that is not it (a 10-class head has 0.5M fewer parameters)."""
    args = ["profile", "mobilenet_v1", "--alpha", "0.5", "--resolution", "160", "--check"]
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("ok: 76.5M mult-adds vs the paper's 76M")
    assert main([*args, "--num-classes", "10"]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main(["profile", "mobilenet_v1", "--alpha", "0.3", "--check"]) == 2
