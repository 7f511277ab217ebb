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
(the paper's metric) and mean accuracy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes._config import RecipeConfig
from recipes._run import Context, Parts, RecipeError, run_recipe, user_errors

NUM_ATTRIBUTES = 40


@dataclass
class FaceAttributesConfig(RecipeConfig):
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

    METHODS: ClassVar[tuple[str, ...]] = ("multilabel_kd", "multilabel_bce")
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
        return p


def _sets(cfg: FaceAttributesConfig, labels: bool) -> tuple[Any, Any, str]:
    """(train, eval, name); train has no targets when `labels` is False."""
    from distill.data import CelebAFaces, DataLayoutError, hf_image_dataset
    from distill.data.faces import CELEBA_LAYOUT
    from recipes._data import hf_source

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
    train = CelebAFaces(root, cfg.train_split, target="attr" if labels else None)
    val = CelebAFaces(root, cfg.eval_split, target="attr")
    if train.num_outputs != NUM_ATTRIBUTES:
        raise RecipeError(
            f"{root}: list_attr_celeba.txt names {train.num_outputs} attributes, expected "
            f"{NUM_ATTRIBUTES}"
        )
    return train, val, "celeba"


def build(cfg: FaceAttributesConfig, ctx: Context) -> Parts:
    from torch.utils.data import ConcatDataset

    from distill.data import identity_folder
    from distill.losses import MultiLabelBCE, MultiLabelKDLoss
    from recipes._data import limit, make_loader, robust, views
    from recipes._run import build_student, check_outputs, load_teacher

    teacher_stage = cfg.stage == "teacher"
    labels = teacher_stage or cfg.method == "multilabel_bce" or cfg.kd_weight < 1
    train_set, eval_set, dataset_name = _sets(cfg, labels)
    scale = (cfg.crop_scale[0], cfg.crop_scale[1])
    tf: dict[str, Any] = {"crop_pct": 1.0, "scale": scale, "ratio": (0.9, 1.1)}
    bce = MultiLabelBCE(missing_label=cfg.missing_label)
    if teacher_stage:
        # The model being trained is the teacher: a pretrained backbone with a fresh 40-way head.
        t = load_teacher(cfg, num_classes=NUM_ATTRIBUTES, output="multilabel")
        model = t.model.requires_grad_(True).train()
        mean, std = t.mean, t.std
        size = t.input_size[0] if t.input_size else cfg.resolution
        train_set.transform = views(None, size, train=True, model_mean=mean, model_std=std, **tf)
        eval_set.transform = views(None, size, train=False, model_mean=mean, model_std=std, **tf)
        student, teacher, objective = model, None, cast(Any, bce)
        role, student_name, alpha, resolution = "teacher", t.name, None, size
    else:
        teacher = None
        if cfg.method == "multilabel_kd":
            teacher = load_teacher(cfg, output="multilabel")
            check_outputs(teacher, NUM_ATTRIBUTES, dataset_name, "attributes")
        train_set.transform = views(teacher, cfg.resolution, train=True, **tf)
        eval_set.transform = views(teacher, cfg.resolution, train=False, **tf)
        if cfg.unlabeled_dir:
            extra = identity_folder(cfg.unlabeled_dir, labels=False)
            extra.transform = train_set.transform
            train_set = ConcatDataset([train_set, extra])
        student = build_student(
            cfg.student, alpha=cfg.alpha, resolution=cfg.resolution, num_outputs=NUM_ATTRIBUTES
        )
        with user_errors(f"building the {cfg.method} objective"):
            objective = (
                MultiLabelKDLoss(
                    temperature=cfg.temperature,
                    alpha=cfg.kd_weight,
                    missing_label=cfg.missing_label,
                )
                if teacher is not None
                else bce
            )
        role = "distilled" if teacher is not None else "scratch"
        student_name, resolution = cfg.student, cfg.resolution
        alpha = cfg.alpha if ":" not in cfg.student else None
    rec = ctx.recorder
    train_data = limit(robust(train_set, rec, strict=cfg.strict_data), cfg.limit_train)
    eval_data = limit(robust(eval_set, rec, strict=cfg.strict_data), cfg.limit_eval)
    return Parts(
        student=student,
        teacher=teacher,
        objective=objective,
        train_loader=make_loader(
            train_data, ctx.per_process_batch, train=True, workers=cfg.workers, seed=cfg.seed
        ),
        eval_loader=make_loader(
            eval_data, ctx.per_process_eval_batch, train=False, workers=cfg.workers, seed=cfg.seed
        ),
        task="multilabel",
        role=role,
        dataset_name=dataset_name,
        student_name=student_name,
        alpha=alpha,
        resolution=resolution,
        method="multilabel_bce" if teacher_stage else cfg.method,
        notes={"stage": cfg.stage},
    )


def main(argv: list[str] | None = None) -> int:
    return run_recipe(FaceAttributesConfig, build, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
