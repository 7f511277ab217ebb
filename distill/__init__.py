"""mobiledistill: knowledge distillation into MobileNet students.

    from distill import Teacher, Distiller, KDLoss
    from distill.models import mobilenet_v1

Names are imported on first use, so `import distill` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Teacher": "distill.teacher",
    "Teachers": "distill.ensemble",
    "PerTeacher": "distill.losses.ensemble",
    "IMAGENET_MEAN": "distill.teacher",
    "IMAGENET_STD": "distill.teacher",
    "Distiller": "distill.distiller",
    "DistillerConfig": "distill.distiller",
    "NonFiniteLossError": "distill.distiller",
    "Outputs": "distill.types",
    "RunInfo": "distill.tracking",
    "Batch": "distill.types",
    "ConfigError": "distill.config",
    "profile": "distill.profiling",
    "Profile": "distill.profiling",
    "create_student": "distill.models",
    "mobilenet_v1": "distill.models",
}
_LOSS_EXPORTS = (
    "Objective",
    "KDLoss",
    "DKDLoss",
    "CrossEntropy",
    "MultiLabelKDLoss",
    "EmbeddingDistillLoss",
    "FitNetLoss",
    "ATLoss",
    "kd_loss",
    "dkd_loss",
    "multilabel_kd_loss",
)
_EXPORTS.update(dict.fromkeys(_LOSS_EXPORTS, "distill.losses"))

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'distill' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
