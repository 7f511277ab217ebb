"""Untrusted files: a pickle whose `__reduce__` would write a marker file is placed wherever a
user-supplied or attacker-controlled file is read (a `file:` teacher, every pickle in a
checkpoint with its manifest rewritten to match, a teacher-cache shard with its manifest
rewritten, ImageNet's meta.bin). It is refused and the marker is never written. A last test
scans the source for loaders that could run code.

Tampering without a matching manifest is refused by checksum (tests/test_distiller.py,
tests/test_cache_teacher_cache.py); see tests/FAULTS.md.
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import STATE_FILE, find_latest
from recipes.imagenet import main
from tests.conftest import ROOT
from tests.scripts.fault_harness import make_data, recipe_args, single_thread


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    yield from single_thread()


class Payload:
    """Unpickling this writes `marker`: the side effect that must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (Path(self.marker), "the pickle ran"))


def evil_torch_file(path: Path, marker: Path, obj: Any = None) -> Path:
    """A torch.save file holding `obj` and the payload; checked to be live when unpickled."""
    torch.save({"payload": Payload(marker), "data": obj}, path)
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.exists(), "the payload must be live for the test to mean anything"
    marker.unlink()
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_data(tmp_path_factory.mktemp("faults_untrusted"))


def refused(args: list[str], capsys: Any, marker: Path) -> str:
    code = main(args)
    err = capsys.readouterr().err
    assert not marker.exists(), "the malicious pickle ran"
    assert code == 2 and "Traceback" not in err, err
    return err


def test_malicious_teacher_file_is_refused(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    marker = tmp_path / "pwned"
    evil = evil_torch_file(tmp_path / "teacher.pt", marker, load_file(data["teacher"]))
    args = recipe_args(data, tmp_path / "run", steps=1)
    args[args.index("--teacher") + 1] = f"file:{evil}"
    err = refused(args, capsys, marker)
    assert f"error: refusing to load {evil}: it is a pickle" in err
    assert "could run code" in err and not (tmp_path / "run" / "checkpoints").exists()


def test_malicious_imagenet_meta_bin_is_refused(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    root = tmp_path / "imagenet"
    shutil.copytree(data["root"], root)
    marker = tmp_path / "pwned"
    evil_torch_file(root / "meta.bin", marker)
    args = recipe_args({**data, "root": root}, tmp_path / "run", steps=1)
    err = refused(args, capsys, marker)
    assert "Weights only load failed" in err


@pytest.fixture(scope="module")
def trained(data: dict[str, Path]) -> Path:
    out = data["base"] / "trained"
    assert main(recipe_args(data, out, steps=2)) == 0
    return out


def plant(run: Path, name: str, marker: Path, *, in_manifest: bool) -> None:
    """Replace (or add) checkpoint file `name` with the payload; with `in_manifest` the
    manifest is rewritten to match, as an attacker who controls the folder would."""
    folder = find_latest(run / "checkpoints")
    assert folder is not None
    evil_torch_file(folder / name, marker)
    if in_manifest:
        state_file = folder / STATE_FILE
        state = json.loads(state_file.read_text())
        data = (folder / name).read_bytes()
        state["manifest"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        state_file.write_text(json.dumps(state))


@pytest.mark.parametrize(
    ("name", "in_manifest", "outcome"),
    [
        ("optimizer.bin", True, "refused"),  # accelerate: torch.load(weights_only=True)
        ("scheduler_distill.pt", True, "refused"),  # ours: torch.load(weights_only=True)
        ("optimizer.bin", False, "checksum"),
        ("custom_checkpoint_0.pkl", False, "extra"),  # accelerate would load it unsafely
        ("custom_checkpoint_0.pkl", True, "unexpected"),  # ... if anything were registered
        ("random_states_0.pkl", True, "ignored"),  # accelerate swallows the refusal
    ],
)
def test_malicious_checkpoint_files_never_run(
    data: dict[str, Path],
    trained: Path,
    tmp_path: Path,
    capsys: Any,
    name: str,
    in_manifest: bool,
    outcome: str,
) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "pwned"
    plant(run, name, marker, in_manifest=in_manifest)
    args = [*recipe_args(data, run, steps=3), "--resume", "latest"]
    if outcome == "ignored":
        # nothing reads the file with an unsafe loader: the run resumes, the payload stays inert
        assert main(args) == 0
        assert not marker.exists()
        assert "resumed from" in capsys.readouterr().out
        return
    err = refused(args, capsys, marker)
    expected = {
        "refused": "holds a pickle that needs more than tensors and plain values to load",
        "checksum": "does not match the checksum recorded when it was written",
        "extra": f"holds files it was not written with: ['{name}']",
        "unexpected": "does not fit this run: Number of custom checkpoints in folder",
    }[outcome]
    assert expected in err and "step_00000002" in err


def test_malicious_teacher_cache_shard_never_runs(tmp_path: Path) -> None:
    """A cache shard swapped for an object array (pickled payload), manifest rewritten to
    match: shards are memory-mapped with allow_pickle=False, so it is refused unread."""
    from distill.data.teacher_cache import TeacherCache, build_cache
    from tests.datagen import make_image_folder
    from tests.test_cache_teacher_cache import _dataset, _teacher

    root = tmp_path / "images"
    make_image_folder(root, classes=("a", "b"), per_class=2, size=(28, 24))
    cache = build_cache(
        _teacher(),
        _dataset(root),
        tmp_path / "cache",
        crops=2,
        topk=3,
        batch_size=4,
        progress=False,
    )
    marker = tmp_path / "pwned"
    shard = cache.path / cache.manifest["shards"][0]["files"]["values"]["file"]
    np.save(shard, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    manifest_file = cache.path / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    entry = manifest["shards"][0]["files"]["values"]
    entry["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    manifest_file.write_text(json.dumps(manifest))
    opened = TeacherCache.open(cache.path)  # the checksums now match ...
    with pytest.raises(ValueError, match=r"memory-mapped|allow_pickle"):
        opened.entry(0, 0)  # ... but nothing pickled is ever loaded
    assert not marker.exists()


UNSAFE = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("pickle", "Unpickler"),
    ("dill", "load"),
    ("dill", "loads"),
    ("joblib", "load"),
    ("yaml", "load"),
    ("yaml", "unsafe_load"),
    ("yaml", "full_load"),
}


def _call_name(node: ast.Call) -> tuple[str, str] | None:
    f = node.func
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f.value.id, f.attr
    return None


def test_no_loader_that_can_run_code_in_the_source() -> None:
    """Every torch.load passes weights_only=True, every np.load leaves allow_pickle off, and
    nothing calls pickle/dill/joblib loads or yaml.load: in distill/, teachers/ and recipes/."""
    problems = []
    files = [p for d in ("distill", "teachers", "recipes") for p in (ROOT / d).rglob("*.py")]
    assert len(files) > 20
    for file in files:
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{file.relative_to(ROOT)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if name in UNSAFE:
                problems.append(f"{where}: {'.'.join(name)}")
            if name == ("torch", "load"):
                v = kw.get("weights_only")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if name in {("np", "load"), ("numpy", "load")}:
                v = kw.get("allow_pickle")
                if v is not None and not (isinstance(v, ast.Constant) and v.value is False):
                    problems.append(f"{where}: np.load with allow_pickle")
            for k, v in kw.items():
                if k == "weights_only" and isinstance(v, ast.Constant) and v.value is False:
                    problems.append(f"{where}: weights_only=False")
    assert not problems, "\n".join(problems)


def test_hugging_face_folder_whose_only_weights_are_a_code_pickle(tmp_path: Path) -> None:
    """A save_pretrained folder with a malicious pytorch_model.bin and no safetensors: the same
    UnsafeCheckpointError and advice as the other loaders, and the payload never runs."""
    import teachers
    from distill.serialization import UnsafeCheckpointError
    from tests.test_teachers_hf import _tiny_model

    folder = tmp_path / "hf_model"
    model = _tiny_model(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    evil = evil_torch_file(folder / "pytorch_model.bin", marker, model.state_dict())
    with pytest.raises(UnsafeCheckpointError) as err:
        teachers.load(f"hf:{folder}")
    assert not marker.exists(), "the malicious pickle ran"
    assert f"refusing to load {evil}: it is a pickle" in str(err.value)
    assert "safetensors" in str(err.value)
