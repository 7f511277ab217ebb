"""torchvision classifiers as teachers: ``torchvision:resnet50``, ``weights="IMAGENET1K_V2"``.

Weights are read from torch.hub's cache, ``$TORCH_HOME/hub/checkpoints/<file>``, under the file
name of the weights' URL (``resnet50-11ad3fa6.pth``). Before torchvision reads the file it is
loaded here with ``torch.load(weights_only=True)`` (a pickle that would run code is refused) and,
by default, its SHA-256 is checked against the prefix in its name.
"""

from __future__ import annotations

import difflib
from typing import Any

from distill.serialization import load_state_dict
from distill.teacher import Teacher
from teachers._cache import torch_hub_checkpoints
from teachers._common import (
    TeacherMeta,
    check_kwargs,
    classifier_outputs,
    make_teacher,
    replace_classifier,
    resolve_output,
)
from teachers._download import cached_or_download, hash_prefix_of, url_basename
from teachers.registry import register_teacher

OPTIONS = ("weights", "num_classes", "output", "check_hash", "download")


def _model_names() -> list[str]:
    import torchvision
    from torchvision import models

    return list(models.list_models(module=torchvision.models))


def resolve_weights(name: str, weights: Any) -> Any:
    """A torchvision WeightsEnum member for `weights` ("DEFAULT", "IMAGENET1K_V2", full name,
    an enum member), or None."""
    from torchvision import models
    from torchvision.models import WeightsEnum

    names = _model_names()
    if name not in names:
        near = difflib.get_close_matches(name, names, n=8, cutoff=0.6)
        raise ValueError(
            f"torchvision has no classification model {name!r}"
            + (f"; similar: {', '.join(sorted(near)[:12])}" if near else "")
        )
    if weights is None or isinstance(weights, WeightsEnum):
        return weights
    enum = models.get_model_weights(name)
    key = str(weights).split(".")[-1]
    if key == "DEFAULT":
        return enum.DEFAULT
    try:
        return enum[key]
    except KeyError:
        raise ValueError(
            f"torchvision:{name} has no weights {weights!r}; choose one of "
            f"{', '.join(['DEFAULT', *(w.name for w in enum)])} or None"
        ) from None


def meta_from_weights(name: str, weights: Any) -> TeacherMeta:
    meta = TeacherMeta(name=f"torchvision:{name}", source="")
    if weights is None:
        return meta
    tf = weights.transforms()
    meta.input_size = int(tf.crop_size[0])
    meta.mean = tuple(float(v) for v in tf.mean)
    meta.std = tuple(float(v) for v in tf.std)
    meta.interpolation = str(getattr(tf.interpolation, "value", tf.interpolation))
    cats = weights.meta.get("categories")
    meta.label_names = list(cats) if cats else None
    meta.num_outputs = len(cats) if cats else None
    meta.name = f"torchvision:{name}.{weights.name}"
    return meta


def describe(name: str, weights: Any = "DEFAULT", **_: Any) -> dict[str, Any]:
    weights = resolve_weights(name, weights)
    if weights is None:
        return {"weights": None, "file": "(random init)", "cached": True}
    meta = meta_from_weights(name, weights)
    file = torch_hub_checkpoints() / url_basename(weights.url)
    return {
        **meta.describe(),
        "weights": weights.name,
        "file": str(file),
        "cached": file.is_file(),
        "url": weights.url,
    }


@register_teacher(
    "torchvision",
    summary="torchvision classification models with their published ImageNet weights",
    examples=(
        "torchvision:resnet50",
        "torchvision:resnet50 weights=IMAGENET1K_V2",
        "torchvision:efficientnet_b0",
        "torchvision:vit_b_16",
    ),
    options=OPTIONS,
    weights_location=lambda: f"{torch_hub_checkpoints()}/<file name of the weights' URL>",
    describe=describe,
)
def build_torchvision(
    name: str,
    *,
    weights: Any = "DEFAULT",
    num_classes: int | None = None,
    output: str | None = None,
    check_hash: bool = True,
    download: bool | None = None,
    **kwargs: Any,
) -> Teacher:
    """A torchvision classifier; `weights=None` gives a randomly initialised one."""
    from torchvision import models

    spec = f"torchvision:{name}"
    check_kwargs(spec, kwargs, OPTIONS)
    out = resolve_output(output, default="logits")
    w = resolve_weights(name, weights)
    if w is None:
        # Random weights, with the preprocessing its published weights use.
        meta = meta_from_weights(name, models.get_model_weights(name).DEFAULT)
        meta.name, meta.label_names = spec, None
        meta.source = "random init (weights=None)"
        model = models.get_model(name, weights=None, num_classes=num_classes or 1000)
    else:
        folder = torch_hub_checkpoints()
        path = cached_or_download(
            f"{spec} ({type(w).__name__}.{w.name})",
            url=w.url,
            folder=folder,
            download=download,
            hint="(torch.hub's cache: set TORCH_HOME to use another folder)",
        )
        expected = hash_prefix_of(path.name) if check_hash else None
        try:
            # The one read of the file: refuses code-running pickles and checks the hash.
            state = load_state_dict(path, sha256=expected)
        except ValueError as err:
            if expected and "checksum mismatch" in str(err):
                raise ValueError(f"{err}\n(pass check_hash=False to skip this check)") from None
            raise
        model = _build_with_state(models, name, w, state)
        meta = meta_from_weights(name, w)
        meta.source = str(path)
    meta.output = out
    meta.num_outputs = classifier_outputs(model)
    if num_classes is not None and num_classes != meta.num_outputs:
        replace_classifier(model, num_classes)
        meta.num_outputs = num_classes
        meta.source += f" (classifier replaced: {num_classes} outputs, re-initialised)"
    return make_teacher(model, meta, kwargs)


def _build_with_state(models: Any, name: str, weights: Any, state: dict[str, Any]) -> Any:
    """Run torchvision's own builder (it applies per-model fix-ups: DenseNet key renames,
    Inception's transform_input, ...) but hand it the state dict we already read safely, so
    torch.hub never unpickles the file a second time (its loader allows arbitrary objects)."""
    enum_cls = type(weights)
    original = enum_cls.get_state_dict

    def safe_get_state_dict(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self is weights:
            return dict(state)
        return original(self, *args, **kwargs)

    enum_cls.get_state_dict = safe_get_state_dict  # type: ignore[method-assign]
    try:
        return models.get_model(name, weights=weights, progress=False)
    finally:
        enum_cls.get_state_dict = original  # type: ignore[method-assign]
