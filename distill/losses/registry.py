"""The method registry: the names a command line or a config gives, and how an objective is built
from one.

    create_objective("kd", temperature=4.0, alpha=0.9)
    create_objective("at", student=student, teacher=teacher, logit_loss="ce")  # default layers
    create_objective("dkd", common={"temperature": 1.0, "kd_weight": 0.5}, beta=2.0)

`common` holds the settings every recipe shares (COMMON_SETTINGS: the temperature, the weight
of the teacher term, label smoothing); each objective class says which of its own arguments
they set (`Objective.common_args`: KD's `alpha` is the recipes' `kd_weight`, DKD has no such
weight), so one mapping serves every method and a method never receives a setting it does not
have. Explicit keyword arguments win over `common`. A `logit_loss` given by name ("ce", "kd",
...) is built the same way, from the same `common`; a method that takes one and is given none
gets "ce" (the feature methods' label term in mdistiller and RepDistiller). With a `student`, the class's `from_models`
fills in what it reads from the two networks (stage paths, channels, embedding sizes).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

from distill.losses.base import Objective

COMMON_SETTINGS: tuple[str, ...] = ("temperature", "kd_weight", "label_smoothing")

# Method names as they appear in recipes' --method and in metrics.json's "method"; filled by
# distill/losses/__init__.py (one place lists every method).
LOSSES: dict[str, type[Objective]] = {}


def register(name: str, cls: type[Objective]) -> None:
    """Add `cls` under `name` (once)."""
    if name in LOSSES and LOSSES[name] is not cls:
        raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name].__name__})")
    LOSSES[name] = cls


def methods_for(task: str) -> tuple[str, ...]:
    """The registered names whose objective trains a student for `task` (a TaskKind:
    "logits", "multilabel" or "embedding"), in registration order."""
    return tuple(name for name, cls in LOSSES.items() if task in cls.tasks)


def method_name(objective: nn.Module) -> str:
    """The registered name of an objective (its class name when it is not registered)."""
    for name, cls in LOSSES.items():
        if type(objective) is cls:
            return name
    return type(objective).__name__


def _lookup(name: str) -> type[Objective]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def _allowed(cls: type[Objective], with_models: bool) -> tuple[set[str], bool]:
    """The keyword names `cls` (and its from_models, when models are given) accept, and
    whether the constructor takes any keyword (**kwargs)."""
    params = inspect.signature(cls).parameters.values()
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in params)
    if with_models and cls.from_models.__func__ is not Objective.from_models.__func__:  # type: ignore[attr-defined]
        extra = inspect.signature(cls.from_models).parameters.values()
        names |= {p.name for p in extra if p.kind is p.KEYWORD_ONLY}
    return names - {"self", "student", "teacher"}, open_ended


def _common(cls: type[Objective], common: Mapping[str, Any] | None) -> dict[str, Any]:
    if not common:
        return {}
    unknown = set(common) - set(COMMON_SETTINGS)
    if unknown:
        raise ValueError(f"common settings {sorted(unknown)} unknown; use {COMMON_SETTINGS}")
    return {arg: common[key] for key, arg in cls.common_args.items() if key in common}


def create_objective(
    name: str,
    *,
    student: nn.Module | None = None,
    teacher: nn.Module | None = None,
    common: Mapping[str, Any] | None = None,
    num_samples: int | None = None,
    **kwargs: Any,
) -> Objective:
    """Build the objective registered as `name` (see the module docstring). `num_samples`, the
    training set's size, reaches a `from_models` that takes it (CRD's memory bank) unless
    `kwargs` set it."""
    cls = _lookup(name)
    args = {**_common(cls, common), **kwargs}
    allowed, open_ended = _allowed(cls, student is not None)
    unknown = sorted(set(args) - allowed)
    if unknown and not open_ended:
        where = f"{cls.__name__}{inspect.signature(cls)}"
        raise TypeError(
            f"{name} ({where}): unexpected argument(s) {unknown}; it takes {sorted(allowed)}"
        )
    if "logit_loss" in allowed and "logit_loss" not in args:
        args["logit_loss"] = "ce"  # the feature methods' label term (with common's smoothing)
    logit = args.get("logit_loss")
    if isinstance(logit, str):
        args["logit_loss"] = create_objective(logit, common=common)
    elif isinstance(logit, Mapping):
        spec = dict(logit)
        inner = spec.pop("method", None)
        if not isinstance(inner, str):
            raise ValueError(
                f"logit_loss {logit!r}: give a method name, or a mapping with 'method' and its "
                "arguments, e.g. {method: kd, temperature: 4}"
            )
        args["logit_loss"] = create_objective(inner, common=common, **spec)
    if student is not None:
        takes = inspect.signature(cls.from_models).parameters
        if num_samples is not None and "num_samples" in takes and "num_samples" not in args:
            args["num_samples"] = num_samples
        return cls.from_models(student, teacher, **args)
    takes_n = "num_samples" in inspect.signature(cls).parameters
    if num_samples is not None and takes_n and "num_samples" not in args:
        args["num_samples"] = num_samples
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as e:
        raise TypeError(f"{name} ({cls.__name__}{inspect.signature(cls)}): {e}") from None
    return cls(**args)
