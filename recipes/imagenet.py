"""ImageNet: distil a ResNet-50 (torchvision IMAGENET1K_V1, 76.13% top-1) into MobileNetV1 1.0-224.

    accelerate launch recipes/imagenet.py --config recipes/configs/imagenet_kd.yaml \\
        --data-dir /data/imagenet [--key value ...]

Data: `--data-dir` in torchvision's ImageNet layout (meta.bin + train/ and val/ wnid folders),
or plain train/ and val/ class folders; or `--dataset` for a Hugging Face source (a hub name, or
`imagefolder`/`webdataset` with `--data-dir`). Methods: kd (Hinton et al. 2015), dkd (Zhao et
al. 2022) and ce (the from-scratch baseline). Reports top-1/top-5 on the validation split.

Offline distillation (FKD-style, image folders only): `--cache-teacher DIR --crops K --topk k`
runs the teacher once over K random crops of every training image and exits (one process);
the same command with `--teacher-cache DIR` instead trains on exactly those crops without
loading the teacher (metrics.json then has no teacher metrics).
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


@dataclass
class ImageNetConfig(CacheableRecipeConfig):
    output_dir: str = "runs/imagenet"
    experiment: str = "imagenet"
    teacher: str | list[str] | None = "torchvision:resnet50 weights=IMAGENET1K_V1"
    method: str = "kd"
    temperature: float = 1.0
    kd_weight: float = 0.5
    num_classes: int | None = None  # default: the dataset's classes
    crop_pct: float = 0.875  # evaluation: resize to resolution / crop_pct, centre crop
    # the method's own settings, by its objective's argument names (README: the loss table)
    method_args: dict[str, Any] = field(default_factory=dict)  # e.g. {beta: 2.0} for dkd

    NAME: ClassVar[str] = "imagenet"

    def problems(self) -> list[str]:
        p = super().problems()
        if self.num_classes is not None and self.num_classes < 2:
            p.append(f"num_classes must be >= 2 or unset, got {self.num_classes}")
        if not 0 < self.crop_pct <= 1:
            p.append(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.method != "ce" and not self.teacher:
            p.append(f"method {self.method} needs a teacher (--teacher)")
        if self.method == "ce" and self.method_args:
            p.append(f"method ce takes label_smoothing, not method_args {self.method_args}")
        return p


def _torchvision_sets(cfg: ImageNetConfig) -> tuple[Any, Any, str]:
    """(train, val, description) from --data-dir: the ImageNet layout, else class folders."""
    from distill.data import DataLayoutError, image_folder, imagenet
    from distill.data.datasets import IMAGE_FOLDER_LAYOUT, IMAGENET_LAYOUT

    root = Path(cfg.data_dir or "").expanduser()
    layouts = f"{IMAGENET_LAYOUT}\nor plain class folders:\n  <root>/train/<class>/*.jpg\n  <root>/val/<class>/*.jpg"
    if not root.is_dir():
        raise DataLayoutError(root, "--data-dir does not exist", layouts)
    has_meta = (root / "meta.bin").is_file() or (root / "ILSVRC2012_devkit_t12.tar.gz").is_file()
    if has_meta:
        train = imagenet(root, "train")
        val = imagenet(root, "val")
        return train, val, "imagenet"
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise DataLayoutError(root, "no meta.bin and no train/ + val/ class folders", layouts)
    train = image_folder(root / "train")
    val = image_folder(root / "val")
    if val.classes != train.classes:
        raise DataLayoutError(
            root,
            f"val/ has classes {val.classes[:5]}... but train/ has {train.classes[:5]}...: both "
            "need the same class folders",
            IMAGE_FOLDER_LAYOUT,
        )
    return train, val, f"imagefolder:{root.name}"


def _hf_sets(cfg: ImageNetConfig, num_classes: int | None) -> tuple[Any, Any, str]:
    from distill.data import hf_image_dataset, hf_source

    def load(split: str, train: bool) -> Any:
        return hf_image_dataset(
            cfg.dataset or "",
            split=split,
            **hf_source(cfg.dataset or "", cfg.data_dir, split),
            streaming=cfg.streaming,
            shuffle_seed=cfg.seed if cfg.streaming and train else None,
            num_classes=num_classes,
            strict=cfg.strict_data,
        )

    return load(cfg.train_split, True), load(cfg.eval_split, False), str(cfg.dataset)


def _classes(cfg: ImageNetConfig, train_set: Any, name: str, teacher: Any) -> int:
    """The class count: --num-classes, else the dataset's, else the teacher's."""
    found = getattr(train_set, "num_classes", None)
    num_classes = cfg.num_classes or found or (teacher.num_outputs if teacher else None)
    if num_classes is None:
        raise RecipeError(
            f"cannot tell how many classes {name} has (its labels are not a ClassLabel): "
            "set --num-classes"
        )
    if found is not None and found != num_classes:
        raise RecipeError(f"--num-classes {num_classes} but {name} has {found} classes")
    if cfg.dataset and cfg.num_classes is None and cfg.data_dir:
        from distill.data.hf import validate_metadata_csvs

        # the class count came from the teacher: check the labels against it now
        validate_metadata_csvs(cfg.data_dir, num_classes=num_classes)
    if teacher is not None:
        check_outputs(teacher, num_classes, f"the dataset {name}")
    return int(num_classes)


def _objective(cfg: ImageNetConfig, student: Any, teacher: Any, num_samples: int | None) -> Any:
    """The --method objective from the one registry (distill.losses), with the shared settings
    mapped onto its arguments and --method-args passed as they are."""
    from distill.losses import create_objective

    common = {
        "temperature": cfg.temperature,
        "kd_weight": cfg.kd_weight,
        "label_smoothing": cfg.label_smoothing,
    }
    with user_errors(f"building the {cfg.method} objective (--method-args {cfg.method_args})"):
        if len(cfg.teacher_specs()) > 1 and cfg.ensemble == "losses" and cfg.method != "ce":
            from distill.losses import PerTeacher  # one loss per teacher, weighted

            one = create_objective(cfg.method, common=common, **cfg.method_args)
            return PerTeacher(one, teacher.weights)
        return create_objective(
            cfg.method,
            student=student,
            teacher=teacher,
            common=common,
            num_samples=num_samples,
            **cfg.method_args,
        )


def _gpu_loader(cfg: ImageNetConfig, ctx: Context, train_set: Any, device: Any) -> Any:
    """--gpu-pipeline: the workers read bytes, the batch decodes and crops itself on `device`,
    rendering the same student and teacher views as the PIL path."""
    from distill.data.encoded import EncodedImageFolder, encoded_loader
    from distill.data.gpu_pipeline import GpuBatchTransform
    from distill.data.loaders import limit, robust

    if cfg.dataset:
        raise RecipeError("--gpu-pipeline on reads image folders (--data-dir), not --dataset")
    transform = GpuBatchTransform.from_paired(
        train_set.transform, device=device, channels_last=cfg.channels_last
    )
    folder = EncodedImageFolder.from_samples(train_set.samples, list(train_set.classes))
    data = limit(robust(folder, strict=cfg.strict_data), cfg.limit_train)
    ctx.print(f"--gpu-pipeline: training images decoded and augmented in batches on {device}")
    return encoded_loader(
        data,
        transform,
        batch_size=ctx.per_process_batch,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.workers,
        seed=cfg.seed,
    )


def build(cfg: ImageNetConfig, ctx: Context) -> Built:
    from distill.data.transforms import paired_views
    from distill.step import describe_objective

    # 1. data (cheap layout checks before any weights are read)
    if cfg.dataset:
        with user_errors(f"loading --dataset {cfg.dataset}"):
            train_set, eval_set, dataset_name = _hf_sets(cfg, cfg.num_classes)
    else:
        train_set, eval_set, dataset_name = _torchvision_sets(cfg)
    # 2. teacher (not with --teacher-cache: the cache holds its answers), and the class count
    cached = cfg.teacher_cache is not None
    teacher = load_teacher(cfg) if cfg.method != "ce" and not cached else None
    num_classes = _classes(cfg, train_set, dataset_name, teacher)
    # 3. one crop per image, rendered at each model's own resolution; then the loaders
    train_set.transform = paired_views(teacher, cfg.resolution, train=True, crop_pct=cfg.crop_pct)
    eval_set.transform = paired_views(teacher, cfg.resolution, train=False, crop_pct=cfg.crop_pct)
    train_loader, eval_loader = ctx.loaders(train_set, eval_set)
    offline = _cache.offline(cfg, ctx, train_set, teacher, num_classes)
    if offline.loader is not None:
        train_loader = offline.loader
    elif offline.build is None and (device := _pipeline_device(cfg)) is not None:
        train_loader = _gpu_loader(cfg, ctx, train_set, device)
    # 4. student and objective
    student = build_student(cfg, num_classes)
    size = len(train_set) if hasattr(train_set, "__len__") else None  # streams: unknown
    objective = _objective(cfg, student, teacher, size)
    said = describe_objective(objective)  # its temperature and teacher weight, if it has them
    distilled = cfg.method != "ce"
    info = describe(
        cfg,
        role="distilled" if distilled else "scratch",
        method=cfg.method,
        dataset=dataset_name,
        teacher=teacher.name if teacher is not None else offline.teacher_name,
        temperature=said["temperature"] if distilled else None,
        kd_weight=said["kd_weight"],
    )
    return Built(
        student=student,
        teacher=teacher,
        objective=objective,
        train_loader=train_loader,
        eval_loader=eval_loader,
        info=info,
        task="logits",
        notes=offline.notes,
        cache=offline.cache,
        build_cache=offline.build,
    )


def _pipeline_device(cfg: ImageNetConfig) -> Any:
    """--gpu-pipeline: on -> CUDA (or an error); auto -> CUDA for image folders when there is
    one, else the PIL pipeline (which also pairs teacher views and skips bad files); off -> PIL."""
    import torch

    from distill.data.gpu_pipeline import pipeline_device

    if cfg.gpu_pipeline == "on":
        try:
            return pipeline_device("on")
        except RuntimeError:
            raise RecipeError(
                "--gpu-pipeline on needs a CUDA device, and torch sees none: use "
                "--gpu-pipeline auto (batched decoding when there is a GPU, else PIL) or off"
            ) from None
    if cfg.gpu_pipeline == "auto" and torch.cuda.is_available() and not cfg.dataset:
        return torch.device("cuda")
    return None


def main(argv: list[str] | None = None) -> int:
    return run_recipe(ImageNetConfig, build, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
