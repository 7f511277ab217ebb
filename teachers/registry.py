"""Teacher registry: a spec string from a command line or config -> a `distill.Teacher`.

A spec is ``<prefix>:<name>``; each prefix has one decorated builder:

    @register_teacher("myzoo", summary="...", examples=("myzoo:big",), weights="...")
    def build_myzoo(name: str, **kwargs) -> Teacher: ...

    teachers.load("myzoo:big", num_classes=40)

Builders register when their module is imported; `teachers/__init__.py` imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from distill.teacher import Teacher

__all__ = ["TeacherSource", "list_teachers", "load", "parse_spec", "register_teacher"]

Builder = Callable[..., Teacher]


@dataclass(frozen=True)
class TeacherSource:
    """One registered spec prefix.

    `weights_location()` says where its weights are read from (resolved from the environment
    at call time); `describe(name, **options)` returns a name's metadata and weight file
    without loading any weights, or raises.
    """

    prefix: str
    builder: Builder
    summary: str
    examples: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    weights_location: Callable[[], str] = field(default=lambda: "")
    describe: Callable[..., dict[str, Any]] | None = None


_TEACHERS: dict[str, TeacherSource] = {}


def register_teacher(
    prefix: str,
    *,
    summary: str,
    examples: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    weights_location: Callable[[], str] | None = None,
    describe: Callable[..., dict[str, Any]] | None = None,
) -> Callable[[Builder], Builder]:
    """Decorator registering `builder(name, **kwargs) -> Teacher` for specs ``prefix:name``."""
    if not prefix or not prefix.isidentifier() or prefix != prefix.lower():
        raise ValueError(f"teacher prefix {prefix!r} must be a lower-case identifier")

    def decorate(builder: Builder) -> Builder:
        if prefix in _TEACHERS:
            old = _TEACHERS[prefix].builder
            raise ValueError(
                f"teacher prefix {prefix!r} is already registered by "
                f"{old.__module__}.{old.__qualname__}; register {builder.__qualname__} under "
                "another prefix"
            )
        _TEACHERS[prefix] = TeacherSource(
            prefix=prefix,
            builder=builder,
            summary=summary,
            examples=examples,
            options=options,
            weights_location=weights_location or (lambda: ""),
            describe=describe,
        )
        return builder

    return decorate


def list_teachers() -> list[TeacherSource]:
    """The registered prefixes, sorted by name."""
    return [_TEACHERS[p] for p in sorted(_TEACHERS)]


def parse_spec(spec: str) -> tuple[TeacherSource, str]:
    """Split ``prefix:name`` and find the prefix's builder."""
    if not isinstance(spec, str):
        raise TypeError(f"a teacher spec is a string like 'torchvision:resnet50', not {spec!r}")
    prefix, sep, name = spec.strip().partition(":")
    known = ", ".join(f"{p}:" for p in sorted(_TEACHERS))
    if not sep or not name:
        hint = ""
        if spec.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt")):
            hint = f" For a local file write 'file:{spec}' and pass arch=..."
        raise ValueError(
            f"teacher spec {spec!r} must look like '<prefix>:<name>' with a prefix among "
            f"{known} (e.g. 'torchvision:resnet50').{hint}"
        )
    source = _TEACHERS.get(prefix.lower())
    if source is None:
        raise ValueError(f"unknown teacher prefix {prefix!r} in {spec!r}; known prefixes: {known}")
    return source, name


def load(spec: str, **kwargs: Any) -> Teacher:
    """Build the teacher named by `spec`; see `python -m teachers list` for the options.

    Common keyword arguments: ``num_classes`` (replace and re-initialise the classifier),
    ``output`` ("logits", "multilabel", "embedding"), ``features`` ({name: module path} to
    capture), ``student_mean``/``student_std`` (the student's normalisation), and overrides
    for ``input_size``, ``mean``, ``std``, ``interpolation``, ``label_names``, ``name``.
    """
    source, name = parse_spec(spec)
    return source.builder(name, **kwargs)
