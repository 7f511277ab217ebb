"""Teachers from local checkpoint files: ``file:/path/model.safetensors`` with ``arch=...``.

``arch`` names the architecture the file was trained with: ``"torchvision:resnet50"``,
``"timm:resnet50.a1_in1k"``, ``"facenet"`` (Inception-ResNet-v1) or any registered student
(``"mobilenet_v1"``). The file is read safely (safetensors, or ``torch.load(weights_only=True)``)
and may be a training checkpoint: ``state_dict``/``model``/EMA wrappers and ``module.``,
``_orig_mod.``, ``model.`` prefixes are handled; ``prefix="student."`` picks one sub-module.
The number of classes is read from the file; ``num_classes`` different from it loads the
backbone and re-initialises the classifier.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from distill.serialization import file_sha256, load_state_dict, verify_sha256
from distill.teacher import Teacher
from teachers._common import (
    TeacherMeta,
    check_kwargs,
    classifier_outputs,
    find_classifier,
    load_strict,
    make_teacher,
    replace_classifier,
    resolve_output,
)
from teachers.facenet import INPUT_SIZE, MEAN, STD, configure_head
from teachers.inception_resnet_v1 import EMBEDDING_DIM, InceptionResnetV1
from teachers.registry import register_teacher

Describe = Callable[[nn.Module], TeacherMeta]
_FACENET_ARCHS = {"facenet", "inception_resnet_v1"}
OPTIONS = (
    "arch",
    "num_classes",
    "output",
    "prefix",
    "prefer_ema",
    "sha256",
    "model_kwargs",
)


def _architecture(arch: str, model_kwargs: dict[str, Any]) -> tuple[nn.Module, Describe]:
    """A randomly initialised model for `arch`, and how to read its teacher metadata."""
    if arch.startswith("torchvision:"):
        from torchvision import models

        from teachers.torchvision_zoo import meta_from_weights, resolve_weights

        tv_name = arch.removeprefix("torchvision:")
        default = resolve_weights(tv_name, "DEFAULT")
        tv_model: nn.Module = models.get_model(tv_name, weights=None, **model_kwargs)
        return tv_model, lambda _m: meta_from_weights(tv_name, default)
    if arch.startswith("timm:"):
        import timm

        from teachers.timm_zoo import check_arch, timm_meta

        timm_name = arch.removeprefix("timm:")
        check_arch(timm_name)
        timm_model: nn.Module = timm.create_model(timm_name, pretrained=False, **model_kwargs)
        return timm_model, lambda m: timm_meta(timm_name, m, "")
    if arch.split(":")[0] in _FACENET_ARCHS:

        def meta_facenet(_m: nn.Module) -> TeacherMeta:
            return TeacherMeta(
                name="facenet",
                source="",
                input_size=INPUT_SIZE,
                mean=MEAN,
                std=STD,
                output="embedding",
                num_outputs=EMBEDDING_DIM,
            )

        return InceptionResnetV1(**model_kwargs), meta_facenet
    from distill.models import create_student

    def meta_student(model: nn.Module) -> TeacherMeta:
        meta = TeacherMeta(name=arch, source="")
        cfg = getattr(model, "pretrained_cfg", None)
        if isinstance(cfg, dict):
            size = cfg.get("input_size")
            if size:
                meta.input_size = (int(size[-2]), int(size[-1]))
            meta.mean = tuple(cfg.get("mean", meta.mean))
            meta.std = tuple(cfg.get("std", meta.std))
        return meta

    return create_student(arch, **model_kwargs), meta_student


@register_teacher(
    "file",
    summary="a local .safetensors/.pt/.pth/.bin/.ckpt file; arch= names its architecture",
    examples=(
        "file:/ckpt/teacher.safetensors arch=torchvision:resnet50 num_classes=40",
        "file:/ckpt/last.ckpt arch=timm:convnext_tiny prefix=model.",
        "file:/ckpt/facenet.pt arch=facenet",
    ),
    options=OPTIONS,
    weights_location=lambda: "wherever the path points (safetensors preferred)",
)
def build_file(
    name: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    output: str | None = None,
    prefix: str | None = None,
    prefer_ema: bool = False,
    sha256: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Teacher:
    """A teacher from a local checkpoint file and an architecture name."""
    spec = f"file:{name}"
    check_kwargs(spec, kwargs, OPTIONS)
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint {str(path)!r} not found ({spec})")
    if not arch:
        raise ValueError(
            f"{spec}: pass arch= with the architecture the file was trained with, e.g. "
            "arch='torchvision:resnet50', arch='timm:resnet50.a1_in1k', arch='facenet' or a "
            "registered student name such as 'mobilenet_v1'"
        )
    digest = verify_sha256(path, sha256) if sha256 else file_sha256(path)
    model, describe = _architecture(arch, dict(model_kwargs or {}))
    state_dict = load_state_dict(
        path, prefer_ema=prefer_ema, prefix=prefix, expected_keys=model.state_dict().keys()
    )
    # Read the file's class count off its classifier, and give the model a head to match
    # (a fresh layer of that size, overwritten by the file's weights just below).
    head = "logits" if isinstance(model, InceptionResnetV1) else find_classifier(model)[0]
    weight = state_dict.get(f"{head}.weight")
    file_classes = int(weight.shape[0]) if weight is not None else None
    if isinstance(model, InceptionResnetV1):
        model.logits = nn.Linear(EMBEDDING_DIM, file_classes) if file_classes else None
    elif file_classes is not None and file_classes != classifier_outputs(model):
        replace_classifier(model, file_classes)
    load_strict(model, state_dict, what=str(path))

    meta = describe(model)
    meta.name = spec
    meta.source = f"{path} (sha256 {digest})"
    meta.output = resolve_output(output, default=meta.output if num_classes is None else "logits")
    if num_classes is not None and meta.output == "embedding":
        raise ValueError(
            "num_classes gives the model a classifier; use output='logits' or 'multilabel'"
        )
    if isinstance(model, InceptionResnetV1):
        configure_head(model, meta, num_classes)
    else:
        meta.num_outputs = (
            classifier_outputs(model) if meta.output != "embedding" else meta.num_outputs
        )
        if num_classes is not None and num_classes != meta.num_outputs:
            replace_classifier(model, num_classes)
            meta.num_outputs = num_classes
            meta.source += f" (classifier replaced: {num_classes} outputs, re-initialised)"
    return make_teacher(model, meta, kwargs)
