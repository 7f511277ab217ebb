"""Students: the paper's MobileNetV1 (alpha, rho) and its variants, behind a name registry."""

# Importing a builder module registers its students: import every new student module here.
from distill.models.mobilenet import (
    MobileNetV1,
    mobilenet_v1,
    mobilenet_v1_fullconv,
    mobilenet_v1_shallow,
)
from distill.models.registry import (
    PREFIXES,
    build_student,
    create_student,
    get_student_builder,
    list_students,
    register_student,
)
from distill.models.stages import Stage, match_stages, penultimate, stage_map

__all__ = [
    "PREFIXES",
    "MobileNetV1",
    "Stage",
    "build_student",
    "create_student",
    "get_student_builder",
    "list_students",
    "match_stages",
    "mobilenet_v1",
    "mobilenet_v1_fullconv",
    "mobilenet_v1_shallow",
    "penultimate",
    "register_student",
    "stage_map",
]
