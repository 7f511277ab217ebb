"""FaceNet: distil FaceNet's 512-d face embeddings (Inception-ResNet-v1, VGGFace2 weights) into
a MobileNet 1.0-160, by minimising the squared difference of the two embeddings.

    accelerate launch recipes/facenet.py --config recipes/configs/facenet.yaml \\
        --data-dir /data/vggface2_aligned --lfw-dir /data/lfw

Training needs aligned face crops only, no identities: `--data-dir` holds identity folders
(VGGFace2 / CASIA-WebFace style) or any images below it (`--labels false`, the default). The
MobileNets paper (Howard et al. 2017, Table 14) trained its students this way, from FaceNet's
outputs alone. Evaluation is LFW verification (Huang et al. 2007): 10-fold accuracy and the true
accept rate at a false accept rate of 1e-4 (the paper's "1e-4 accuracy").
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes._config import RecipeConfig
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


@dataclass
class FaceNetConfig(RecipeConfig):
    output_dir: str = "runs/facenet"
    experiment: str = "facenet"
    teacher: str | None = "facenet:vggface2"
    method: str = "embedding"
    resolution: int = 160
    lfw_dir: str | None = None  # LFW pairs for evaluation (torchvision's LFWPairs layout)
    lfw_split: str = "10fold"  # "10fold" (pairs.txt), or "test"/"train" (pairsDevTest/Train.txt)
    labels: bool = False  # True: one folder per identity is required (labels are not used)
    embedding_dim: int = 512
    embedding_loss: EmbeddingLoss = "mse"  # squared difference, as in the paper
    normalize: bool = True  # compare L2-normalised embeddings (FaceNet's are normalised)
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])

    METHODS: ClassVar[tuple[str, ...]] = ("embedding",)
    NAME: ClassVar[str] = "facenet"

    def problems(self) -> list[str]:
        p = super().problems()
        if not self.lfw_dir:
            p.append("lfw_dir: set --lfw-dir (LFW pairs are the evaluation data)")
        if self.lfw_split not in ("10fold", "train", "test"):
            p.append(f"lfw_split must be 10fold, train or test, got {self.lfw_split!r}")
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
    # 2. the teacher, which must output embeddings
    teacher = load_teacher(cfg)
    if teacher.output_kind != "embedding":
        raise RecipeError(
            f"the teacher {teacher.name} outputs {teacher.output_kind}, but this recipe distils "
            "embeddings: use a face-embedding teacher (facenet:vggface2), or add output=embedding "
            "to a file: teacher whose head is the embedding layer"
        )
    # 3. one crop per face, rendered for the student and natively for the teacher
    tf: dict[str, Any] = {"crop_pct": 1.0, "ratio": (0.9, 1.1)}
    scale = (cfg.crop_scale[0], cfg.crop_scale[1])
    train_set.transform = paired_views(teacher, cfg.resolution, train=True, scale=scale, **tf)
    eval_set.transform = paired_views(teacher, cfg.resolution, train=False, **tf)
    # 4. student and objective
    student = build_student(cfg, cfg.embedding_dim)
    with user_errors("building the embedding objective"):
        objective = EmbeddingDistillLoss(
            cfg.embedding_dim,
            _embedding_dim(teacher, cfg.resolution),
            cfg.embedding_loss,
            normalize=cfg.normalize,
        )
    train_loader, eval_loader = ctx.loaders(train_set, eval_set)
    info = describe(
        cfg,
        role="distilled",
        method=cfg.method,
        student=cfg.student,
        dataset=dataset_name,
        teacher=teacher.name,
        alpha=cfg.alpha if ":" not in cfg.student else None,
        resolution=cfg.resolution,
    )
    return Built(
        student=student,
        teacher=teacher,
        objective=objective,
        train_loader=train_loader,
        eval_loader=eval_loader,
        info=info,
        task="embedding",
        notes={"eval_dataset": f"lfw:{cfg.lfw_split}", "embedding_dim": cfg.embedding_dim},
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
