"""Student registry: names that arrive from a command line or a config map to builder functions.

    @register_student("my_net")
    def my_net(*, num_classes: int = 1000, ...) -> nn.Module: ...

    create_student("my_net", num_classes=10)
    create_student("timm:resnet18", num_classes=10)            # timm.create_model, pretrained=False
    create_student("torchvision:mobilenet_v2", num_classes=10)  # torchvision get_model, weights=None

Builders register when their module is imported; `distill/models/__init__.py` imports them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = [
    "PREFIXES",
    "build_student",
    "create_student",
    "get_student_builder",
    "list_students",
    "register_student",
]

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])

PREFIXES: tuple[str, ...] = ("timm:", "torchvision:")
_STUDENTS: dict[str, Callable[..., nn.Module]] = {}


def register_student(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under `name`; a name can be registered once."""
    if not name or ":" in name or name != name.strip():
        raise ValueError(
            f"student name {name!r} must be non-empty, without spaces around it and without ':' "
            f"(reserved for the {', '.join(PREFIXES)} prefixes)"
        )

    def decorate(builder: Builder) -> Builder:
        if name in _STUDENTS:
            old = _STUDENTS[name]
            raise ValueError(
                f"a student named {name!r} is already registered by "
                f"{old.__module__}.{old.__qualname__}; register {builder.__qualname__} under "
                "another name"
            )
        _STUDENTS[name] = builder
        return builder

    return decorate


def list_students() -> list[str]:
    """The registered names (without the timm:/torchvision: prefixes, which reach any model)."""
    return sorted(_STUDENTS)


def get_student_builder(name: str) -> Callable[..., nn.Module]:
    """The builder registered as `name`; raises KeyError listing the known names."""
    try:
        return _STUDENTS[name]
    except KeyError:
        raise KeyError(
            f"unknown student {name!r}. Registered students: {', '.join(list_students())}; "
            "or use 'timm:<model>' / 'torchvision:<model>' for any timm or torchvision model."
        ) from None


def create_student(name: str, **kwargs: Any) -> nn.Module:
    """Build the student called `name` with the builder's keyword arguments."""
    if name.startswith("timm:"):
        return _create_timm(name.removeprefix("timm:"), kwargs)
    if name.startswith("torchvision:"):
        return _create_torchvision(name.removeprefix("torchvision:"), kwargs)
    builder = get_student_builder(name)
    try:
        inspect.signature(builder).bind(**kwargs)
    except TypeError as e:
        params = ", ".join(inspect.signature(builder).parameters)
        raise TypeError(f"student {name!r}: {e}. It accepts: {params}") from None
    return builder(**kwargs)


def _create_timm(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        import timm
    except ImportError as e:
        raise ImportError(
            f"'timm:{model_name}' needs timm: pip install 'mobiledistill[timm]'"
        ) from e
    kwargs.setdefault("pretrained", False)
    try:
        model: nn.Module = timm.create_model(model_name, **kwargs)
    except RuntimeError as e:
        if "Unknown model" not in str(e):
            raise
        raise ValueError(
            f"timm has no model {model_name!r}; list candidates with timm.list_models('*{model_name}*')"
        ) from e
    return model


def _create_torchvision(model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    import torchvision

    kwargs.setdefault("weights", None)
    if model_name not in torchvision.models.list_models():
        near = [m for m in torchvision.models.list_models() if model_name.split("_")[0] in m]
        raise ValueError(
            f"torchvision has no model {model_name!r}"
            + (f"; did you mean one of: {', '.join(near)}" if near else "")
            + " (all: torchvision.models.list_models())"
        )
    if "alpha" in kwargs:
        _width_multiplier(model_name, kwargs)
    model: nn.Module = torchvision.models.get_model(model_name, **kwargs)
    return model


# torchvision's name for the width multiplier of its mobile models (MNASNet calls it alpha)
_TORCHVISION_WIDTH = {"mobilenet_v2": "width_mult", "mobilenet_v3_large": "width_mult",
                      "mobilenet_v3_small": "width_mult", "mnasnet": "alpha"}  # fmt: skip


def _width_multiplier(model_name: str, kwargs: dict[str, Any]) -> None:
    """Map `alpha` (our name for the width multiplier) onto torchvision's name for it."""
    family = "mnasnet" if model_name.startswith("mnasnet") else model_name
    name = _TORCHVISION_WIDTH.get(family)
    if name is None:
        raise ValueError(
            f"torchvision:{model_name} has no width multiplier (alpha); the torchvision models "
            f"that have one: mobilenet_v2, mobilenet_v3_large/small (width_mult), mnasnet*"
        )
    kwargs[name] = kwargs.pop("alpha")


def build_student(
    name: str, *, num_classes: int, alpha: float | None = None, resolution: int | None = None
) -> nn.Module:
    """`create_student(name, num_classes=...)`, passing the width multiplier `alpha` and the
    input `resolution` to builders that take them (MobileNetV1 does); timm:/torchvision:
    models and builders without those arguments get neither."""
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if ":" not in name:
        params = inspect.signature(get_student_builder(name)).parameters
        if alpha is not None and "alpha" in params:
            kwargs["alpha"] = alpha
        if resolution is not None and "resolution" in params:
            kwargs["resolution"] = resolution
    return create_student(name, **kwargs)
