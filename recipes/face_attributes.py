"""Face attributes: CelebA's 40 binary attributes, in two stages.

    # 1. fine-tune a large teacher (ImageNet ResNet-50) with binary cross-entropy
    accelerate launch recipes/face_attributes.py --config recipes/configs/face_attributes_teacher.yaml \\
        --data-dir /data/celeba
    # 2. distil it into MobileNets: multi-label KD + BCE (or --kd-weight 1: teacher targets only)
    accelerate launch recipes/face_attributes.py --config recipes/configs/face_attributes.yaml \\
        --data-dir /data/celeba --alpha 0.5 --resolution 128

The MobileNets paper (Howard et al. 2017, Table 12) distilled a face-attribute classifier on a
large multi-attribute dataset; CelebA (Liu et al. 2015) is the public stand-in. With
`--kd-weight 1` the student learns from the teacher's outputs alone, so `--unlabeled-dir` can
add face images that have no annotations. Reports mean average precision over the attributes
(the paper's metric) and mean accuracy. `--missing-label -1` marks unannotated attributes (a 0
in list_attr_celeba.txt, or -1 in a --dataset label column): the loss and both metrics leave
them out.

Offline distillation (stage distill): `--cache-teacher DIR --crops K` stores the teacher's 40
attribute logits on K crops of every training face, whole and in float32 (so the cached loss is
the online one at any --temperature; --topk does not apply), and exits; the same command with
`--teacher-cache DIR` trains from them without loading the teacher.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import _cache
from recipes._config import CacheableRecipeConfig
from recipes._run import (
    Built,
    Context,
    RecipeError,
    build_student,
    check_outputs,
    describe,
    load_teacher,
    run_recipe,
    user_errors,
)

NUM_ATTRIBUTES = 40


@dataclass
class FaceAttributesConfig(CacheableRecipeConfig):
    stage: str = "distill"  # "teacher": fine-tune the teacher with BCE; "distill": train students
    output_dir: str = "runs/face_attributes"
    experiment: str = "face_attributes"
    teacher: str | None = (
        "file:runs/face_attributes/teacher/student.safetensors arch=torchvision:resnet50"
    )
    method: str = "multilabel_kd"
    temperature: float = 2.0
    kd_weight: float = 0.5
    eval_split: str = "valid"  # CelebA partitions: train, valid, test
    unlabeled_dir: str | None = None  # extra face images, used with kd_weight 1 (no labels)
    missing_label: float | None = None  # a target value that means "not annotated" (e.g. -1)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # aligned faces
    label_column: str = "attributes"  # --dataset sources: a column of 40 values in {0, 1}

    TASK: ClassVar[str] = "multilabel"
    NAME: ClassVar[str] = "face_attributes"

    def problems(self) -> list[str]:
        p = super().problems()
        if self.stage not in ("teacher", "distill"):
            p.append(f"stage must be teacher or distill, got {self.stage!r}")
        if (self.stage == "teacher" or self.method == "multilabel_kd") and not self.teacher:
            p.append("a teacher spec is needed (--teacher)")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            p.append(f"crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        if self.unlabeled_dir and (self.stage != "distill" or self.kd_weight != 1):
            p.append(
                "unlabeled_dir is for the distill stage with kd_weight 1 (teacher targets only)"
            )
        if self.missing_label is not None and 0 <= self.missing_label <= 1:
            p.append(f"missing_label must lie outside [0, 1], got {self.missing_label}")
        offline = self.cache_teacher is not None or self.teacher_cache is not None
        if offline and (self.stage != "distill" or self.method != "multilabel_kd"):
            p.append("--cache-teacher/--teacher-cache are for --stage distill with multilabel_kd")
        if offline and self.unlabeled_dir:
            p.append("--cache-teacher/--teacher-cache cache CelebA's images: drop unlabeled_dir")
        return p


def _sets(cfg: FaceAttributesConfig, labels: bool) -> tuple[Any, Any, str]:
    """(train, eval, name); train has no targets when `labels` is False."""
    from distill.data import CelebAFaces, DataLayoutError, hf_image_dataset, hf_source
    from distill.data.faces import CELEBA_LAYOUT

    if cfg.dataset:
        with user_errors(f"loading --dataset {cfg.dataset}"):
            train = hf_image_dataset(
                cfg.dataset,
                split=cfg.train_split,
                **hf_source(cfg.dataset, cfg.data_dir, cfg.train_split),
                streaming=cfg.streaming,
                label_column=cfg.label_column if labels else None,
                strict=cfg.strict_data,
            )
            val = hf_image_dataset(
                cfg.dataset,
                split=cfg.eval_split,
                **hf_source(cfg.dataset, cfg.data_dir, cfg.eval_split),
                label_column=cfg.label_column,
                strict=cfg.strict_data,
            )
        return train, val, str(cfg.dataset)
    root = Path(cfg.data_dir or "").expanduser()
    if not root.is_dir():
        raise DataLayoutError(root, "--data-dir does not exist", CELEBA_LAYOUT)
    # with --missing-label, a 0 in list_attr_celeba.txt is "not annotated": the targets hold
    # missing_label there, which the objective and the evaluator both leave out
    missing = cfg.missing_label
    train = CelebAFaces(
        root, cfg.train_split, target="attr" if labels else None, missing_label=missing
    )
    val = CelebAFaces(root, cfg.eval_split, target="attr", missing_label=missing)
    if train.num_outputs != NUM_ATTRIBUTES:
        raise RecipeError(
            f"{root}: list_attr_celeba.txt names {train.num_outputs} attributes, expected "
            f"{NUM_ATTRIBUTES}"
        )
    return train, val, "celeba"


# aligned faces: the whole image, a mild random crop, near-square
_FACE_CROP: dict[str, Any] = {"crop_pct": 1.0, "ratio": (0.9, 1.1)}


def _teacher_stage(cfg: FaceAttributesConfig, train_set: Any, eval_set: Any) -> tuple[Any, ...]:
    """The model being trained is the teacher: a pretrained backbone with a fresh 40-way head,
    at its own resolution and normalisation."""
    from distill.data.transforms import paired_views

    t = load_teacher(cfg, num_classes=NUM_ATTRIBUTES, output="multilabel")
    model = t.model.requires_grad_(True).train()
    size = t.input_size[0] if t.input_size else cfg.resolution
    default = FaceAttributesConfig.__dataclass_fields__["resolution"].default
    if cfg.resolution not in (default, size):
        raise RecipeError(
            f"--stage teacher trains the teacher at its own input size ({size} px, from the "
            f"teacher spec), not at --resolution {cfg.resolution}: to train it at "
            f"{cfg.resolution} px add input_size={cfg.resolution} to --teacher (students are "
            "then distilled at any --resolution)"
        )
    tf = {**_FACE_CROP, "scale": tuple(cfg.crop_scale), "model_mean": t.mean, "model_std": t.std}
    train_set.transform = paired_views(None, size, train=True, **tf)
    eval_set.transform = paired_views(None, size, train=False, **tf)
    return model, None, t.name, size


def _distill_stage(
    cfg: FaceAttributesConfig, train_set: Any, eval_set: Any, dataset_name: str
) -> tuple[Any, ...]:
    """A MobileNet student, and the teacher when the method distils from one."""
    from torch.utils.data import ConcatDataset

    from distill.data import identity_folder
    from distill.data.transforms import paired_views

    teacher = None
    if cfg.method == "multilabel_kd" and cfg.teacher_cache is None:  # cached: never loaded
        teacher = load_teacher(cfg, output="multilabel")
        check_outputs(teacher, NUM_ATTRIBUTES, dataset_name, "attributes")
    tf = {**_FACE_CROP, "scale": tuple(cfg.crop_scale)}
    train_set.transform = paired_views(teacher, cfg.resolution, train=True, **tf)
    eval_set.transform = paired_views(teacher, cfg.resolution, train=False, **tf)
    if cfg.unlabeled_dir:
        extra = identity_folder(cfg.unlabeled_dir, labels=False)
        extra.transform = train_set.transform
        train_set = ConcatDataset([train_set, extra])
    student = build_student(cfg, NUM_ATTRIBUTES)
    return student, teacher, train_set


def build(cfg: FaceAttributesConfig, ctx: Context) -> Built:
    from distill.losses import MultiLabelBCE, MultiLabelKDLoss

    teacher_stage = cfg.stage == "teacher"
    labels = teacher_stage or cfg.method == "multilabel_bce" or cfg.kd_weight < 1
    train_set, eval_set, dataset_name = _sets(cfg, labels)
    bce = MultiLabelBCE(missing_label=cfg.missing_label)
    objective: Any = bce
    if teacher_stage:
        student, teacher, model_name, resolution = _teacher_stage(cfg, train_set, eval_set)
        fields: dict[str, Any] = {"role": "teacher", "method": "multilabel_bce"}
        fields.update(student=model_name, resolution=resolution, alpha=None)
    else:
        student, teacher, train_set = _distill_stage(cfg, train_set, eval_set, dataset_name)
        distilled = cfg.method == "multilabel_kd"
        if distilled:
            with user_errors(f"building the {cfg.method} objective"):
                objective = MultiLabelKDLoss(
                    temperature=cfg.temperature,
                    alpha=cfg.kd_weight,
                    missing_label=cfg.missing_label,
                )
        fields = {
            "role": "distilled" if distilled else "scratch",
            "method": cfg.method,
            "teacher": teacher.name if teacher is not None else None,
            "temperature": cfg.temperature if distilled else None,
            "kd_weight": cfg.kd_weight if distilled else None,
        }
    train_loader, eval_loader = ctx.loaders(train_set, eval_set)
    # the 40 attribute logits are cached whole (float32): the cached loss is the online one
    offline = _cache.offline(cfg, ctx, train_set, teacher, NUM_ATTRIBUTES, kind="multilabel")
    if offline.loader is not None:
        train_loader, fields["teacher"] = offline.loader, offline.teacher_name
    return Built(
        student=student,
        teacher=teacher,
        objective=objective,
        train_loader=train_loader,
        eval_loader=eval_loader,
        info=describe(cfg, dataset=dataset_name, **fields),
        task="multilabel",
        notes={"stage": cfg.stage, **offline.notes},
        cache=offline.cache,
        build_cache=offline.build,
    )


def main(argv: list[str] | None = None) -> int:
    return run_recipe(FaceAttributesConfig, build, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
