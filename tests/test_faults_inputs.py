"""Bad input through a recipe: every kind of broken image in one training set (converted, or
skipped and counted with names in the end report; `--strict-data` stops at the first), and a
config with every kind of mistake at once (one error listing all, before any work).

What other files already assert is not repeated here (see tests/FAULTS.md): each image kind on
its own (tests/test_data_images.py), CelebA/LFW/label-range annotation errors naming file and
line (tests/test_data_faces.py, tests/test_recipes_face_attributes.py,
tests/test_recipes_facenet.py, tests/test_recipes_imagenet.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from recipes.imagenet import main
from tests.conftest import ROOT, launch_env
from tests.datagen import BAD_IMAGE_REASONS, CONVERTED_IMAGES, make_bad_images, make_imagenet
from tests.scripts.fault_harness import WNID, recipe_args, single_thread
from tests.test_recipes_common import save_teacher


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 good training images plus one file of every bad kind (21 = 7 batches of 3)."""
    base = tmp_path_factory.mktemp("faults_inputs")
    root = base / "imagenet"
    make_imagenet(root, n_classes=3, per_class=4, val_per_class=2, size=32)
    bad = make_bad_images(base / "bad", size=24)
    for kind, src in bad.items():
        if kind != "good":
            suffix = ".JPEG" if src.suffix == ".jpg" else src.suffix
            shutil.copy(src, root / "train" / WNID / f"{WNID}_{kind}{suffix}")
    return {"root": root, "teacher": save_teacher(base / "teacher.safetensors", 3), "base": base}


def test_every_bad_image_kind_in_one_run(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "run"
    # one epoch of batches of 3 meets every file (replacements keep each batch full)
    args = [*recipe_args(data, out, steps=7), "--batch-size", "3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "skipped images:" in err and "rerun with --strict-data" in err
    metrics = json.loads((out / "metrics.json").read_text())
    reasons = {Path(f["path"]).stem: f["reason"] for f in metrics["skipped_images"]["files"]}
    expected = {f"{WNID}_{kind}": reason for kind, reason in BAD_IMAGE_REASONS.items()}
    assert reasons == expected  # truncated, empty, not an image, decompression bomb
    for stem in expected:
        assert stem in err  # named in the end report
    for kind in CONVERTED_IMAGES:  # grayscale, CMYK, RGBA, palette, 16-bit: converted to RGB
        assert f"{WNID}_{kind}" not in err and f"{WNID}_{kind}" not in reasons
    assert json.loads((out / "skipped.json").read_text())["files"]
    assert metrics["steps"] == 7


def test_strict_data_stops_at_the_first_bad_image(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    args = [*recipe_args(data, tmp_path / "run", steps=7), "--batch-size", "3", "--strict-data"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "--strict-data stops at the first unreadable image" in err
    named = [f"{WNID}_{kind}" for kind in BAD_IMAGE_REASONS]
    assert any(f"{n}" in err for n in named), err


def test_every_config_mistake_in_one_error_before_any_work(tmp_path: Path) -> None:
    """A real process; the data folder does not even exist: nothing is read before the config
    is whole."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("epochs: many\nbatch_sise: 4\ntemperature: 0\nlr: fast\n")
    out = tmp_path / "out"
    args = [
        "--config", str(bad_yaml),
        "--data-dir", str(tmp_path / "no_such_data"),
        "--output-dir", str(out),
        "--kd-weight", "1.5",
        "--alpha", "-1",
        "--resolution", "16",
        "--batch-size", "0",
        "--max-steps", "ten",
        "--tempreture", "2",
    ]  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "imagenet.py"), *args],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr
    assert err.count("error:") == 1  # one error ...
    for needle in (  # ... listing every problem
        "unknown key 'batch_sise'",
        "unknown option '--tempreture' (did you mean --temperature?)",
        "epochs: expected int, got 'many'",
        "lr: expected float, got 'fast'",
        "max_steps: expected",
        "temperature must be > 0",
        "kd_weight must be in [0, 1]",
        "alpha (width multiplier) must be in (0, 4]",
        "resolution must be >= 32",
        "batch_size must be >= 1",
    ):
        assert needle in err, f"{needle!r} missing from:\n{err}"
    assert "does not exist" not in err and not out.exists()  # no data read, nothing written
    assert took < 60
