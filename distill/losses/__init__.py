"""Loss library: pure functions on tensors plus thin `Objective` wrappers.

Every objective maps (student Outputs, teacher Outputs | None, target) to a dict with "loss"
and unweighted named parts. `create_objective(name, **kwargs)` builds one from a method name
given on a command line.
"""

from __future__ import annotations

import inspect
from typing import Any

from distill.losses.base import Objective
from distill.losses.ce import CrossEntropy
from distill.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from distill.losses.embedding import (
    EmbeddingDistillLoss,
    embedding_cosine_loss,
    embedding_mse_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
)
from distill.losses.feature import (
    ATLoss,
    FitNetLoss,
    HintAdapter,
    at_loss,
    attention_map,
    hint_loss,
    resize_map,
)
from distill.losses.feature_match import FTLoss, VIDLoss, VIDRegressor, ft_loss, vid_nll
from distill.losses.kd import KDLoss, kd_loss, kd_parts, soft_kd_loss, standardize_logits
from distill.losses.multilabel import (
    MultiLabelBCE,
    MultiLabelKDLoss,
    multilabel_bce_loss,
    multilabel_kd_loss,
    multilabel_kd_parts,
    soft_multilabel_kd_loss,
)
from distill.losses.relation import (
    CCLoss,
    DISTLoss,
    PKTLoss,
    SPLoss,
    cc_loss,
    dist_loss,
    dist_parts,
    pkt_loss,
    rbf_correlation,
    sp_loss,
)

# Method names as they appear in recipes' --method and in metrics.json's "method".
LOSSES: dict[str, type[Objective]] = {
    "ce": CrossEntropy,
    "kd": KDLoss,
    "dkd": DKDLoss,
    "multilabel_bce": MultiLabelBCE,
    "multilabel_kd": MultiLabelKDLoss,
    "embedding": EmbeddingDistillLoss,
    "fitnet": FitNetLoss,
    "at": ATLoss,
    "dist": DISTLoss,
    "sp": SPLoss,
    "pkt": PKTLoss,
    "cc": CCLoss,
    "vid": VIDLoss,
    "ft": FTLoss,
}


def create_objective(name: str, **kwargs: Any) -> Objective:
    """Build the objective registered as `name` with its constructor's keyword arguments."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    cls = LOSSES[name]
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"{name} ({cls.__name__}{inspect.signature(cls)}): {e}") from None
    return cls(**kwargs)


__all__ = [
    "LOSSES",
    "ATLoss",
    "CCLoss",
    "CrossEntropy",
    "DISTLoss",
    "DKDLoss",
    "EmbeddingDistillLoss",
    "FTLoss",
    "FitNetLoss",
    "HintAdapter",
    "KDLoss",
    "MultiLabelBCE",
    "MultiLabelKDLoss",
    "Objective",
    "PKTLoss",
    "SPLoss",
    "VIDLoss",
    "VIDRegressor",
    "at_loss",
    "attention_map",
    "cc_loss",
    "create_objective",
    "dist_loss",
    "dist_parts",
    "dkd_loss",
    "dkd_parts",
    "embedding_cosine_loss",
    "embedding_mse_loss",
    "ft_loss",
    "hint_loss",
    "kd_loss",
    "kd_parts",
    "multilabel_bce_loss",
    "multilabel_kd_loss",
    "multilabel_kd_parts",
    "pkt_loss",
    "rbf_correlation",
    "resize_map",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "soft_kd_loss",
    "soft_multilabel_kd_loss",
    "sp_loss",
    "standardize_logits",
    "vid_nll",
]
