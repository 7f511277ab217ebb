"""What a teacher cache depends on, and the one explanation of why a cache does not fit.

A cache's soft targets depend on six components: the teacher, the dataset, the transform, k
(topk), K (crops) and the class count. A `Fingerprint` holds one short value per component
(sha256 digests for the first three, ints for the others) and is compared field by field.

An *identity* is the readable form of the first four: a mapping from component name to a
JSON-able description, for example

    {"teacher": {"spec": "timm:resnet50", "options": {}}, "dataset": data_signature,
     "images": 1281167, "transform": {"student": {...}, "scale": [0.08, 1.0]}, "num_classes": 1000}

The fingerprint follows from it (`Fingerprint.from_identity`: a string description is the
component's digest itself, anything else is hashed with `config_signature`); k and K are the
build's arguments. Keys other than the four (such as "images", the item count) are stored but
not fingerprinted. The manifest stores the identity; when a cache does not fit, `check_fits`
raises a `CacheMismatchError` listing, for each differing component, every leaf of the stored
identity that changed (`key: cache X, now Y`), or the short digests when the cache stored no
identity (`cache X != now Y`), and says what to do. What is stored of each answer (the kind of
output, the tail, the temperatures: `distill.data.cache.layout.Storage`) is not part of the
fingerprint (so the digest of a cache is that of format version 1); the manifest holds it and
it is compared the same way, with the labels below.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.files import sha256_bytes

if TYPE_CHECKING:  # typing only: replayable.py imports the signatures from here
    from distill.data.cache.replayable import ReplayableDataset

__all__ = [
    "LABELS",
    "SOURCE_COMPONENTS",
    "CacheMismatchError",
    "Fingerprint",
    "Identity",
    "array_signature",
    "changes",
    "check_fits",
    "component_digest",
    "config_signature",
    "default_identity",
    "explain",
    "files_signature",
    "identity_digests",
    "jsonable",
    "teacher_identity",
    "teacher_signature",
    "weights_signature",
]

Identity = Mapping[str, Any]  # component name -> JSON-able description

# The components an identity describes; topk and crops are arguments of the build.
SOURCE_COMPONENTS = ("teacher", "dataset", "transform", "num_classes")

# How errors name each compared value; callers with their own flags pass their own labels.
LABELS = {
    "teacher": "the teacher's weights or input conversion",
    "dataset": "the dataset's file list (paths and sizes)",
    "transform": "the transform parameters",
    "topk": "topk (k)",
    "crops": "crops per image (K)",
    "num_classes": "the number of classes",
    "seed": "the seed of the crop draws",
    "kind": "what the teacher outputs (logits, multilabel or embedding)",
    "tail": "how the classes outside the top k are stored (tail)",
    "temperatures": "the temperatures whose tail mass is stored",
}


class CacheMismatchError(ValueError):
    """The cache on disk was built for something else than what training uses now."""


# --------------------------------------------------------------------------------- signatures


def weights_signature(model: nn.Module | Mapping[str, Tensor]) -> str:
    """sha256 over a state dict: every entry's name, dtype, shape and bytes, in key order.

    Names are taken without torch.compile's `_orig_mod.` and without a `model.` prefix shared
    by every key (a `Teacher` wrapping the model), so the bare and the wrapped model agree.
    """
    state = dict(model.state_dict() if isinstance(model, nn.Module) else model)
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}
    if state and all(k.startswith("model.") for k in state):
        state = {k.removeprefix("model."): v for k, v in state.items()}
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Through uint8 so that bf16 and other numpy-less dtypes hash too.
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# Teacher attributes that change its answer without being in its state dict.
_TEACHER_ATTRS = (
    "input_size", "mean", "std", "student_mean", "student_std", "interpolation", "output_kind",
)  # fmt: skip


def teacher_identity(teacher: nn.Module | Mapping[str, Tensor]) -> str | dict[str, Any]:
    """The teacher's description: its weights' digest and, for a `distill.teacher.Teacher`, its
    input conversion (resolution, normalisations), which the weights alone do not capture; for
    an ensemble (distill.ensemble.Teachers) also how it combines and each member's conversion."""
    weights = weights_signature(teacher)
    conversion = {a: getattr(teacher, a) for a in _TEACHER_ATTRS if hasattr(teacher, a)}
    members = getattr(teacher, "members", None)
    if members is not None and hasattr(teacher, "combine"):  # a distill.ensemble.Teachers
        conversion["ensemble"] = {
            "combine": teacher.combine,
            "temperature": getattr(teacher, "temperature", None),
            "weights": [float(w) for w in getattr(teacher, "weights", [])],
            "members": [
                {a: getattr(m, a) for a in _TEACHER_ATTRS if hasattr(m, a)} for m in members
            ],
        }
    return {"weights": weights, "conversion": conversion} if conversion else weights


def teacher_signature(teacher: nn.Module | Mapping[str, Tensor]) -> str:
    """The digest of `teacher_identity`: what the fingerprint stores for the teacher."""
    return component_digest(teacher_identity(teacher))


def files_signature(paths: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str]) -> str:
    """sha256 over (path relative to `root`, size in bytes) of each file, in dataset order.

    Relative paths, so a dataset moved to another disk keeps its cache; sizes, so a re-encoded
    or replaced file is noticed without reading every byte.
    """
    base = Path(root)
    h = hashlib.sha256()
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else base / p
        try:
            rel = full.relative_to(base).as_posix()
        except ValueError:  # outside the root: keep the path as given
            rel = Path(p).as_posix()
        h.update(f"{rel}|{full.stat().st_size}\n".encode())
    return h.hexdigest()


def array_signature(*arrays: np.ndarray | Tensor) -> str:
    """sha256 of in-memory data (e.g. the digits arrays) standing in for a file list."""
    h = hashlib.sha256()
    for a in arrays:
        arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def config_signature(config: Mapping[str, Any]) -> str:
    """sha256 of a JSON-able mapping, key order ignored (transform parameters)."""
    return sha256_bytes(json.dumps(config, sort_keys=True, default=str))


def component_digest(description: Any) -> str:
    """A component's fingerprint value: a string description is the digest itself (a data
    signature), anything else is hashed with `config_signature`."""
    return description if isinstance(description, str) else config_signature(description)


def jsonable(obj: Any) -> Any:
    """`obj` as plain JSON values (tuples become lists, unknown objects their str), or None."""
    try:
        return json.loads(json.dumps(obj, default=str))
    except (TypeError, ValueError):
        return None


# -------------------------------------------------------------------------------- fingerprint


def identity_digests(identity: Identity) -> dict[str, str | int]:
    """The fingerprint values of the components an identity describes (all four required)."""
    missing = [c for c in SOURCE_COMPONENTS if c not in identity]
    if missing:
        raise ValueError(
            f"the cache identity {sorted(identity)} does not describe {', '.join(missing)}: "
            f"give every one of {', '.join(SOURCE_COMPONENTS)}"
        )
    out: dict[str, str | int] = {c: component_digest(identity[c]) for c in SOURCE_COMPONENTS}
    out["num_classes"] = int(identity["num_classes"])
    return out


def default_identity(
    teacher: nn.Module | Mapping[str, Tensor], dataset: ReplayableDataset, num_classes: int
) -> dict[str, Any]:
    """The identity of a cache described by its teacher's weights (`teacher_identity`), the
    dataset's `data_signature()` and item count, and its `transform_config()`."""
    return {
        "teacher": teacher_identity(teacher),
        "dataset": dataset.data_signature(),
        "images": len(dataset),
        "transform": dict(dataset.transform_config()),
        "num_classes": num_classes,
    }


@dataclass(frozen=True)
class Fingerprint:
    """What a cache's soft targets depend on. Each field is compared separately on open."""

    teacher: str  # teacher_signature(teacher), or the digest of an identity's "teacher"
    dataset: str  # files_signature / array_signature of the data
    transform: str  # config_signature of the transform's parameters
    topk: int
    crops: int
    num_classes: int

    @property
    def digest(self) -> str:
        return config_signature(asdict(self))

    def differences(self, other: Fingerprint) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]

    @classmethod
    def from_identity(cls, identity: Identity, *, topk: int, crops: int) -> Fingerprint:
        d = identity_digests(identity)
        return cls(
            teacher=str(d["teacher"]),
            dataset=str(d["dataset"]),
            transform=str(d["transform"]),
            topk=topk,
            crops=crops,
            num_classes=int(d["num_classes"]),
        )

    @classmethod
    def create(
        cls,
        teacher: nn.Module | Mapping[str, Tensor],
        dataset: ReplayableDataset,
        *,
        topk: int,
        crops: int,
        num_classes: int,
    ) -> Fingerprint:
        """The fingerprint of `default_identity(teacher, dataset, num_classes)`."""
        identity = default_identity(teacher, dataset, num_classes)
        return cls.from_identity(identity, topk=topk, crops=crops)


# -------------------------------------------------------------------------------- explanation


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12]  # a sha256 digest
    if isinstance(value, Mapping):  # one side of a changed structure: too long to print
        return f"{{{len(value)} keys, digest {config_signature(value)[:12]}}}"
    return repr(value) if isinstance(value, str) else str(value)


def changes(old: Any, new: Any, key: str = "") -> list[str]:
    """'key: cache X, now Y' for every leaf that differs between two JSON-like values."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            out += changes(old.get(k), new.get(k), f"{key}.{k}" if key else str(k))
        return out
    if old == new:
        return []
    return [f"{key + ': ' if key else ''}cache {_show(old)}, now {_show(new)}"]


def _detail(
    name: str, found: Any, now: Any, stored: Mapping[str, Any], current: Mapping[str, Any]
) -> str:
    counts = name == "dataset" and "images" in stored and "images" in current
    if counts and stored["images"] != current["images"]:
        return f"cache {stored['images']} images, now {current['images']}"
    if name in stored and name in current:
        leaves = changes(stored[name], current[name])
        if leaves:
            return "; ".join(leaves)
    return f"cache {_show(found)} != now {_show(now)}"


def explain(
    found: Mapping[str, Any],
    now: Mapping[str, Any],
    *,
    stored: Identity | None = None,
    current: Identity | None = None,
    labels: Mapping[str, str] | None = None,
) -> list[str]:
    """One line per value of `now` that differs from `found` (the cache's): its label, then
    what changed, read from the identities when both describe it, else the two digests."""
    names = [n for n in now if found.get(n) != now[n]]
    old, new = jsonable(dict(stored or {})) or {}, jsonable(dict(current or {})) or {}
    words = {**LABELS, **(labels or {})}
    return [f"  - {words.get(n, n)}: {_detail(n, found.get(n), now[n], old, new)}" for n in names]


def check_fits(
    path: str | os.PathLike[str],
    found: Mapping[str, Any],
    now: Mapping[str, Any],
    *,
    stored: Identity | None = None,
    current: Identity | None = None,
    labels: Mapping[str, str] | None = None,
    advice: str,
) -> None:
    """Raise a `CacheMismatchError` naming every differing value, then `advice`, if the cache
    at `path` (fingerprint values `found`, identity `stored`) does not fit `now`/`current`."""
    lines = explain(found, now, stored=stored, current=current, labels=labels)
    if lines:
        names = ", ".join(n for n in now if found.get(n) != now[n])
        raise CacheMismatchError(
            f"teacher cache {path} was built for a different {names}:\n"
            + "\n".join(lines)
            + f"\n{advice}"
        )
