"""Loss library: pure functions on tensors plus thin `Objective` wrappers.

Every objective maps (student Outputs, teacher Outputs | None, target) to a dict with "loss"
and unweighted named parts. `create_objective(name, **kwargs)` builds one from a method name
given on a command line (distill.losses.registry).
"""

from __future__ import annotations

from distill.losses.base import Objective
from distill.losses.ce import CrossEntropy
from distill.losses.crd import (
    CRDEmbed,
    CRDLoss,
    memory_scores,
    momentum_update,
    nce_contrast_loss,
)
from distill.losses.ctkd import CurriculumTemperature, ctkd_lambda, reverse_gradient
from distill.losses.dkd import DKDLoss, dkd_loss, dkd_parts
from distill.losses.embedding import (
    EmbeddingDistillLoss,
    embedding_cosine_loss,
    embedding_mse_loss,
    rkd_angle_loss,
    rkd_distance_loss,
    rkd_loss,
)
from distill.losses.ensemble import PerTeacher
from distill.losses.factor import Paraphraser, Translator, factor_channels, reconstruction_loss
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
from distill.losses.mlkd import (
    MLKDLoss,
    batch_correlation_loss,
    class_correlation_loss,
    confidence_masks,
    mlkd_loss,
    mlkd_parts,
)
from distill.losses.multilabel import (
    MultiLabelBCE,
    MultiLabelKDLoss,
    multilabel_bce_loss,
    multilabel_kd_loss,
    multilabel_kd_parts,
    soft_multilabel_kd_loss,
)
from distill.losses.ofd import (
    OFDConnector,
    OFDLoss,
    bn_margin,
    gaussian_margin,
    ofd_loss,
    partial_l2,
)
from distill.losses.registry import (
    COMMON_SETTINGS,
    LOSSES,
    create_objective,
    method_name,
    methods_for,
    register,
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
from distill.losses.review import ABF, ReviewKDLoss, hcl_loss, review_maps

for _name, _cls in (
    ("ce", CrossEntropy),
    ("kd", KDLoss),
    ("dkd", DKDLoss),
    ("dist", DISTLoss),
    ("mlkd", MLKDLoss),
    ("multilabel_bce", MultiLabelBCE),
    ("multilabel_kd", MultiLabelKDLoss),
    ("embedding", EmbeddingDistillLoss),
    ("fitnet", FitNetLoss),
    ("at", ATLoss),
    ("sp", SPLoss),
    ("pkt", PKTLoss),
    ("cc", CCLoss),
    ("vid", VIDLoss),
    ("ft", FTLoss),
    ("crd", CRDLoss),
    ("reviewkd", ReviewKDLoss),
    ("ofd", OFDLoss),
):
    register(_name, _cls)


__all__ = [
    "ABF",
    "COMMON_SETTINGS",
    "LOSSES",
    "ATLoss",
    "CCLoss",
    "CRDEmbed",
    "CRDLoss",
    "CrossEntropy",
    "CurriculumTemperature",
    "DISTLoss",
    "DKDLoss",
    "EmbeddingDistillLoss",
    "FTLoss",
    "FitNetLoss",
    "HintAdapter",
    "KDLoss",
    "MLKDLoss",
    "MultiLabelBCE",
    "MultiLabelKDLoss",
    "OFDConnector",
    "OFDLoss",
    "Objective",
    "PKTLoss",
    "Paraphraser",
    "PerTeacher",
    "ReviewKDLoss",
    "SPLoss",
    "Translator",
    "VIDLoss",
    "VIDRegressor",
    "at_loss",
    "attention_map",
    "batch_correlation_loss",
    "bn_margin",
    "cc_loss",
    "class_correlation_loss",
    "confidence_masks",
    "create_objective",
    "ctkd_lambda",
    "dist_loss",
    "dist_parts",
    "dkd_loss",
    "dkd_parts",
    "embedding_cosine_loss",
    "embedding_mse_loss",
    "factor_channels",
    "ft_loss",
    "gaussian_margin",
    "hcl_loss",
    "hint_loss",
    "kd_loss",
    "kd_parts",
    "memory_scores",
    "method_name",
    "methods_for",
    "mlkd_loss",
    "mlkd_parts",
    "momentum_update",
    "multilabel_bce_loss",
    "multilabel_kd_loss",
    "multilabel_kd_parts",
    "nce_contrast_loss",
    "ofd_loss",
    "partial_l2",
    "pkt_loss",
    "rbf_correlation",
    "reconstruction_loss",
    "register",
    "resize_map",
    "reverse_gradient",
    "review_maps",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "rkd_loss",
    "soft_kd_loss",
    "soft_multilabel_kd_loss",
    "sp_loss",
    "standardize_logits",
    "vid_nll",
]
