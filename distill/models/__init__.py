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

__all__ = [
    "PREFIXES",
    "MobileNetV1",
    "build_student",
    "create_student",
    "get_student_builder",
    "list_students",
    "mobilenet_v1",
    "mobilenet_v1_fullconv",
    "mobilenet_v1_shallow",
    "register_student",
]
