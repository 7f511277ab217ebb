"""Values every part of the project shares, defined once (this module imports nothing heavy,
so configs can be checked before torch is loaded)."""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TASK_KINDS", "TaskKind"]

# The normalisation of torchvision's and timm's ImageNet weights (0..1 pixel units).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# What a model outputs, which decides how it is evaluated (distill.evaluation has one
# evaluator per kind): class logits, per-attribute logits, or an embedding.
TaskKind = Literal["logits", "multilabel", "embedding"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
