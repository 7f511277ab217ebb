"""distill.serialization: safe loading, wrapper unwrapping, atomic safetensors, checksums."""

from __future__ import annotations

import argparse
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distill.serialization import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    file_sha256,
    load_checkpoint,
    load_state_dict,
    save_safetensors,
    unwrap_state_dict,
    verify_sha256,
)


def _sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _WritesFile:
    """Unpickling this would create `path`: the side effect that must never happen."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "pwned"))


class _RunsShell:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".pth.tar"])
def test_round_trip_formats(tmp_path: Path, suffix: str) -> None:
    sd = _sd()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_safetensors(sd, path)
    else:
        torch.save(sd, path)
    _same(load_state_dict(path), sd)


def test_legacy_torch_format(tmp_path: Path) -> None:
    """Files written before torch 1.6 (non-zip), like older released checkpoints."""
    sd = OrderedDict(_sd())
    torch.save(sd, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    _same(load_state_dict(tmp_path / "old.pt"), sd)


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "teacher.safetensors"
    with pytest.raises(FileNotFoundError, match=r"nope/teacher\.safetensors"):
        load_state_dict(missing)
    with pytest.raises(FileNotFoundError, match="directory"):
        load_state_dict(tmp_path)


@pytest.mark.parametrize("payload", [_WritesFile, _RunsShell])
@pytest.mark.parametrize("writer", ["torch_zip", "torch_legacy", "raw_pickle"])
def test_malicious_pickle_is_refused_and_never_runs(
    tmp_path: Path, payload: type, writer: str
) -> None:
    marker = tmp_path / "pwned.txt"
    evil = {"state_dict": {"w": torch.ones(2)}, "extra": payload(str(marker))}
    path = tmp_path / "teacher.pt"
    if writer == "torch_zip":
        torch.save(evil, path)
    elif writer == "torch_legacy":
        torch.save(evil, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(evil, fh, protocol=2)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "safetensors" in msg and "state_dict" in msg
    if writer == "torch_zip":  # statically scanned: the message names the culprit
        assert ("pathlib.Path" in msg) or ("system" in msg)
    assert not marker.exists(), "the pickle's payload ran"


def test_unknown_extension_is_sniffed(tmp_path: Path) -> None:
    sd = _sd()
    torch.save(sd, tmp_path / "weights.data")
    _same(load_state_dict(tmp_path / "weights.data"), sd)
    save_safetensors(sd, tmp_path / "weights.st")
    os.replace(tmp_path / "weights.st", tmp_path / "weights.blob")
    _same(load_state_dict(tmp_path / "weights.blob"), sd)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        load_state_dict(tmp_path / "notes.txt")


def test_unwrap_common_training_checkpoints() -> None:
    sd = _sd()
    ddp = {f"module.{k}": v for k, v in sd.items()}
    compiled = {f"_orig_mod.{k}": v for k, v in sd.items()}
    lightning = {
        "epoch": 3,
        "global_step": 120,
        "state_dict": {f"model.{k}": v for k, v in sd.items()},
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}],
        "hyper_parameters": {"lr": 0.1},
    }
    timm_train = {
        "epoch": 9,
        "arch": "resnet18",
        "state_dict": sd,
        "state_dict_ema": {f"module.{k}": v + 1 for k, v in sd.items()},
        "args": argparse.Namespace(lr=0.1),
    }
    _same(unwrap_state_dict(ddp), sd)
    _same(unwrap_state_dict(compiled), sd)
    _same(unwrap_state_dict({"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}), sd)
    _same(unwrap_state_dict(lightning), sd)
    _same(unwrap_state_dict(timm_train), sd)
    ema = unwrap_state_dict(timm_train, prefer_ema=True)
    _same(ema, {k: v + 1 for k, v in sd.items()})
    _same(unwrap_state_dict({"model_ema": sd}), sd)  # only an EMA copy: use it


def test_unwrap_uses_expected_keys_for_ambiguous_prefixes() -> None:
    sd = _sd()
    # A model whose own keys start with "model." must not be stripped when they match.
    own = {f"model.{k}": v for k, v in sd.items()}
    _same(unwrap_state_dict(own, expected_keys=own.keys()), own)
    # Without a model to match, a universal "model." prefix (Lightning) is stripped.
    _same(unwrap_state_dict(own), sd)
    # A partial DDP prefix is stripped only when a model says it helps.
    mixed = {("module." + k if i % 2 else k): v for i, (k, v) in enumerate(sd.items())}
    _same(unwrap_state_dict(mixed, expected_keys=sd.keys()), sd)


def test_prefix_selects_a_submodule() -> None:
    sd = _sd()
    both = {**{f"student.{k}": v for k, v in sd.items()}, "teacher.w": torch.zeros(1)}
    _same(unwrap_state_dict({"state_dict": both}, prefix="student."), sd)
    with pytest.raises(CheckpointFormatError, match=r"'student\.', 'teacher\.'"):
        unwrap_state_dict(both, prefix="ema.")


def test_training_checkpoint_files_load_with_weights_only(tmp_path: Path) -> None:
    sd = _sd()
    ckpt = {
        "state_dict": {f"module.{k}": v for k, v in sd.items()},
        "args": argparse.Namespace(model="resnet18", lr=0.1),  # timm train.py stores this
        "best_acc": np.float64(71.5),  # numpy scalars: common in training scripts
        "history": np.zeros(3),
        "extras": OrderedDict(note="ok"),
    }
    torch.save(ckpt, tmp_path / "last.pth.tar")
    _same(load_state_dict(tmp_path / "last.pth.tar"), sd)


def test_no_state_dict_inside_is_a_clear_error(tmp_path: Path) -> None:
    torch.save(
        {"epoch": 1, "lr": 0.1, "name": "x", "opt": {"a": 1}, "b": 2, "c": 3}, tmp_path / "c.pt"
    )
    with pytest.raises(CheckpointFormatError, match=r"c\.pt.*none holds a state_dict"):
        load_state_dict(tmp_path / "c.pt")
    torch.save([torch.ones(1)], tmp_path / "l.pt")
    with pytest.raises(CheckpointFormatError, match="list"):
        load_state_dict(tmp_path / "l.pt")


def test_pickled_module_is_refused(tmp_path: Path) -> None:
    torch.save(nn.Linear(2, 2), tmp_path / "model.pt")  # a whole module: needs its class
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint(tmp_path / "model.pt")


def test_save_safetensors_is_atomic_and_handles_shared_tensors(tmp_path: Path) -> None:
    lin = nn.Linear(4, 4)
    tied = {"a.weight": lin.weight, "b.weight": lin.weight, "t": torch.arange(6).view(2, 3).t()}
    target = tmp_path / "sub" / "m.safetensors"
    save_safetensors(tied, target, metadata={"arch": "x"})
    assert [p.name for p in target.parent.iterdir()] == ["m.safetensors"]  # no temp left
    back = load_state_dict(target)
    assert torch.equal(back["a.weight"], lin.weight.detach())
    assert torch.equal(back["t"], torch.arange(6).view(2, 3).t())
    # A failed write leaves the previous file intact and no temporary behind.
    with pytest.raises(TypeError, match="not a Tensor"):
        save_safetensors({"x": 3}, target)  # type: ignore[dict-item]
    assert torch.equal(load_state_dict(target)["a.weight"], lin.weight.detach())
    assert [p.name for p in target.parent.iterdir()] == ["m.safetensors"]


def test_checksums(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_safetensors(_sd(), path)
    digest = file_sha256(path)
    assert len(digest) == 64
    assert verify_sha256(path, digest[:10]) == digest
    load_state_dict(path, sha256=digest)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_state_dict(path, sha256="0" * 64)
    with pytest.raises(ValueError, match="at least 8 hex"):
        verify_sha256(path, "abc")


def test_map_location(tmp_path: Path) -> None:
    torch.save(_sd(), tmp_path / "w.pt")
    sd = load_state_dict(tmp_path / "w.pt", map_location="cpu")
    assert all(v.device.type == "cpu" for v in sd.values())
