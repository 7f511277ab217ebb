"""FaceNet: distil FaceNet's 512-d face embeddings (Inception-ResNet-v1, VGGFace2 weights) into
a MobileNet 1.0-160, by minimising the squared difference of the two embeddings.

    accelerate launch recipes/facenet.py --config recipes/configs/facenet.yaml \\
        --data-dir /data/vggface2_aligned --lfw-dir /data/lfw

Training needs aligned face crops only, no identities: `--data-dir` holds identity folders
(VGGFace2 / CASIA-WebFace style) or any images below it (`--labels false`, the default). The
MobileNets paper (Howard et al. 2017, Table 14) trained its students this way, from FaceNet's
outputs alone. Evaluation is LFW verification (Huang et al. 2007): 10-fold accuracy, FaceNet's
10-fold validation rate at FAR 1e-3 with the FAR it reached, and the strict pooled TAR at
FAR 1e-4, which LFW's 3,000 non-matching pairs can only resolve as "no false accept"
(recipes/README.md says what the paper's "1e-4 accuracy" was measured on).

LFW's funneled images are 250x250 with the face in the middle, while training sees aligned face
crops, so evaluation first keeps the central `--lfw-crop` fraction of each image (default
0.58: LFW cut each image around a Viola-Jones face box 250/2.2 = 114 px wide, and
davidsandberg/facenet's MTCNN crops of LFW add a 32 px margin to the face box: 146/250 ≈ 0.58).
`--lfw-crop 1` evaluates on the whole image.

Offline distillation: `--cache-teacher DIR --crops K` stores the teacher's embedding of K crops
of every training face, whole and in float32 (so the cached loss is the online one; --topk does
not apply), and exits; the same command with `--teacher-cache DIR` trains from them without
loading the teacher.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes import _cache
from recipes._config import CacheableRecipeConfig
from recipes._run import (
    Built,
    Context,
    RecipeError,
    build_student,
    describe,
    load_teacher,
    run_recipe,
    user_errors,
)

EmbeddingLoss = Literal["mse", "cosine", "rkd"]  # distill.losses.embedding.Kind

# central fraction of a 250x250 funneled LFW image kept for evaluation (module docstring)
LFW_FACE_CROP = 0.58


@dataclass
class FaceNetConfig(CacheableRecipeConfig):
    output_dir: str = "runs/facenet"
    experiment: str = "facenet"
    teacher: str | None = "facenet:vggface2"
    method: str = "embedding"
    resolution: int = 160
    lfw_dir: str | None = None  # LFW pairs for evaluation (torchvision's LFWPairs layout)
    lfw_split: str = "10fold"  # "10fold" (pairs.txt), or "test"/"train" (pairsDevTest/Train.txt)
    lfw_crop: float = LFW_FACE_CROP  # central fraction of each LFW image evaluated; 1: all of it
    labels: bool = False  # True: one folder per identity is required (labels are not used)
    embedding_dim: int = 512  # the student's embedding size (FaceNet: 512)
    embedding_loss: EmbeddingLoss = "mse"  # squared difference, as in the paper
    normalize: bool = True  # compare L2-normalised embeddings (FaceNet's are normalised)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # area range of crops

    TASK: ClassVar[str] = "embedding"
    NAME: ClassVar[str] = "facenet"

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.lfw_dir:
            p.append("lfw_dir: set --lfw-dir (LFW pairs are the evaluation data)")
        if self.lfw_split not in ("10fold", "train", "test"):
            p.append(f"lfw_split must be 10fold, train or test, got {self.lfw_split!r}")
        if not 0 < self.lfw_crop <= 1:
            p.append(f"lfw_crop must be in (0, 1], got {self.lfw_crop}")
        if self.embedding_dim < 1:
            p.append(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not self.teacher:
            p.append("a teacher spec is needed (--teacher)")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            p.append(f"crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}")
        return p


def _train_set(cfg: FaceNetConfig) -> tuple[Any, str]:
    """Aligned face crops (identity folders or any images), or a --dataset source."""
    from distill.data import hf_image_dataset, hf_source, identity_folder

    if not cfg.dataset:
        return identity_folder(cfg.data_dir or "", labels=cfg.labels), "faces:" + Path(
            cfg.data_dir or ""
        ).name
    with user_errors(f"loading --dataset {cfg.dataset}"):
        train = hf_image_dataset(
            cfg.dataset,
            split=cfg.train_split,
            **hf_source(cfg.dataset, cfg.data_dir, cfg.train_split),
            streaming=cfg.streaming,
            label_column=None,
            strict=cfg.strict_data,
        )
    return train, str(cfg.dataset)


def build(cfg: FaceNetConfig, ctx: Context) -> Built:
    from distill.data import LFWPairsDataset
    from distill.data.transforms import paired_views
    from distill.losses import EmbeddingDistillLoss

    # 1. data first: layout errors before any weights are read
    train_set, dataset_name = _train_set(cfg)
    eval_set = LFWPairsDataset(cfg.lfw_dir or "", split=cfg.lfw_split)
    # 2. the teacher, which must output embeddings (not with --teacher-cache: cached embeddings)
    teacher = load_teacher(cfg) if cfg.teacher_cache is None else None
    if teacher is not None and teacher.output_kind != "embedding":
        raise RecipeError(
            f"the teacher {teacher.name} outputs {teacher.output_kind}, but this recipe distils "
            "embeddings: use a face-embedding teacher (facenet:vggface2), or add output=embedding "
            "to a file: teacher whose head is the embedding layer"
        )
    # 3. one crop per face, rendered for the student and natively for the teacher
    # (training images are face crops already; LFW's face is the central lfw_crop of each image)
    scale = (cfg.crop_scale[0], cfg.crop_scale[1])
    train_set.transform = paired_views(
        teacher, cfg.resolution, train=True, crop_pct=1.0, scale=scale, ratio=(0.9, 1.1)
    )
    eval_set.transform = paired_views(teacher, cfg.resolution, train=False, crop_pct=cfg.lfw_crop)
    # the embeddings are cached whole (float32); a cached run reads their size from the cache
    dim = None if teacher is None else _embedding_dim(teacher, cfg.resolution)
    offline = _cache.offline(cfg, ctx, train_set, teacher, dim, kind="embedding")
    # 4. student and objective
    student = build_student(cfg, cfg.embedding_dim)
    with user_errors("building the embedding objective"):
        objective = EmbeddingDistillLoss(
            cfg.embedding_dim,
            dim if dim is not None else offline.cache.num_classes,
            cfg.embedding_loss,
            normalize=cfg.normalize,
        )
    train_loader, eval_loader = ctx.loaders(train_set, eval_set)
    if offline.loader is not None:
        train_loader = offline.loader
    info = describe(
        cfg,
        role="distilled",
        method=cfg.method,
        dataset=dataset_name,
        teacher=teacher.name if teacher is not None else offline.teacher_name,
    )
    return Built(
        student=student,
        teacher=teacher,
        objective=objective,
        train_loader=train_loader,
        eval_loader=eval_loader,
        info=info,
        task="embedding",
        notes={
            "eval_dataset": f"lfw:{cfg.lfw_split}",
            "embedding_dim": cfg.embedding_dim,
            **offline.notes,
        },
        cache=offline.cache,
        build_cache=offline.build,
    )


def _embedding_dim(teacher: Any, resolution: int) -> int:
    """The teacher's embedding size: from its metadata, else from one dry forward pass."""
    if teacher.num_outputs is not None:
        return int(teacher.num_outputs)
    import torch

    size = tuple(teacher.input_size or (resolution, resolution))
    with user_errors(f"running the teacher {teacher.name} on a {size} input"):
        out = teacher(torch.zeros(1, 3, *size), prepared=True).output
    if out.dim() != 2:
        raise RecipeError(
            f"the teacher {teacher.name} returns shape {tuple(out.shape)}, not (N, D) embeddings"
        )
    teacher.num_outputs = int(out.shape[1])
    return teacher.num_outputs


def main(argv: list[str] | None = None) -> int:
    return run_recipe(FaceNetConfig, build, argv, __doc__ or "")


if __name__ == "__main__":
    sys.exit(main())
