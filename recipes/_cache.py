"""Offline distillation in the recipes: `--cache-teacher DIR` runs the teacher once over K crops
of every training image and exits; `--teacher-cache DIR` trains from those crops without loading
the teacher.

What is cached follows from the teacher's kind of output: class logits (ImageNet) as the top
`--topk` plus every other logit in 8 bits, so that the cached KD loss is the online one at any
`--temperature`; attribute logits (face attributes) and embeddings (FaceNet) whole, in float32
(`distill.data.cache`).

The cache itself (fingerprint, build, replay, the explanation of a mismatch) is
`distill.data.cache`; what is recipe-specific here is the cache's identity in the recipe's
terms: the teacher is named by its spec (training from the cache must not load it) and every
component is labelled with the flags that change it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.constants import TaskKind
from recipes._config import CacheableRecipeConfig, RecipeError, parse_teacher
from recipes._run import Context, user_errors

RECIPE_FILE = "recipe.json"  # provenance written next to the cache's manifest
LABELS = {
    "teacher": "teacher (--teacher spec and --teacher-options)",
    "dataset": "training images (file list, sizes and labels; --data-dir, --limit-train)",
    "transform": "training transform (--resolution, crop scale/ratio, flip)",
    "num_classes": "number of classes",
    "topk": "topk",
    "crops": "crops",
    "seed": "--seed",
}
HOW_TO_BUILD = "the same command with --cache-teacher DIR instead of --teacher-cache"


@dataclass
class Offline:
    """What the cache flags mean for one run: nothing, a cache to build, or one to train from."""

    loader: Any = None  # --teacher-cache: the training loader replaying the cached crops
    cache: Any = None  # the opened distill.data.teacher_cache.TeacherCache
    teacher_name: str | None = None  # the cached teacher's name, for the run's record
    notes: dict[str, Any] = field(default_factory=dict)  # run_info: the cache's path, digest
    build: Callable[[], None] | None = None  # --cache-teacher: what to run instead of training


def identity(cfg: CacheableRecipeConfig, dataset: Any, num_classes: int) -> dict[str, Any]:
    """What a recipe's cache depends on, in readable form. The teacher's view of each crop
    follows from its spec, so the transform part is the student's view and the crop
    distribution only."""
    said = [parse_teacher(raw, cfg.teacher_options) for raw in cfg.teacher_specs()]
    teacher: Any = [{"spec": spec, "options": options} for spec, options in said]
    if len(teacher) == 1:
        teacher = teacher[0]  # the shape of caches built before ensembles
    else:  # an ensemble: how it combines is part of what it answers
        teacher = {"members": teacher, "ensemble": cfg.ensemble, "weights": cfg.teacher_weights,
                   "temperature": cfg.temperature if cfg.ensemble == "probs" else None}  # fmt: skip
    transform = {k: v for k, v in dataset.transform_config().items() if k != "teacher"}
    return {
        "teacher": teacher,
        "dataset": dataset.data_signature(),
        "images": len(dataset),
        "transform": json.loads(json.dumps(transform, default=str)),
        "num_classes": num_classes,
    }


def replayable(cfg: CacheableRecipeConfig, train_set: Any) -> Any:
    """The training images and their paired train transform as a replayable dataset (what a
    cache is built over and replayed from), unreadable files replaced in build and replay."""
    from distill.data.skipping import SkipBadReplays
    from distill.data.teacher_cache import ReplayableImages

    n = cfg.limit_train
    samples = _samples(train_set)
    kept = samples[:n] if n is not None else samples
    # absolute paths: the fingerprint names files relative to the root, wherever the run starts
    absolute = [(os.path.abspath(p), y) for p, y in kept]
    root = os.path.abspath(Path(cfg.data_dir or ".").expanduser())
    images = ReplayableImages(absolute, train_set.transform, root=root)
    return SkipBadReplays(images, strict=cfg.strict_data)


def _samples(train_set: Any) -> list[tuple[str, Any]]:
    """(image path, target) of a training set: an image folder's samples, or CelebA's files
    with their 40 attribute labels (None when the set has no targets)."""
    from distill.data.faces import CelebAFaces

    if isinstance(train_set, CelebAFaces):
        attr = train_set.attr if train_set.target == "attr" else None
        files = [str(train_set.images_dir / f) for f in train_set.filenames]
        return [(p, None if attr is None else attr[i]) for i, p in enumerate(files)]
    if not hasattr(train_set, "samples"):
        raise RecipeError(
            f"the training set ({type(train_set).__name__}) has no file list to cache: "
            "--cache-teacher/--teacher-cache need image files (--data-dir)"
        )
    return list(train_set.samples)


def offline(
    cfg: CacheableRecipeConfig,
    ctx: Context,
    train_set: Any,
    teacher: Any,
    num_classes: int | None,
    *,
    kind: TaskKind = "logits",
) -> Offline:
    """`--cache-teacher` / `--teacher-cache` for a recipe's training set (or neither), for a
    teacher with `num_classes` outputs of `kind`. With `--teacher-cache` the count may be None:
    it is then read from the cache (an embedding's size is known from the teacher alone)."""
    if cfg.cache_teacher is None and cfg.teacher_cache is None:
        return Offline()
    dataset = replayable(cfg, train_set)
    if cfg.cache_teacher is not None:
        if num_classes is None:
            raise RecipeError(f"--cache-teacher: the {cfg.NAME} recipe did not size the teacher")
        n = num_classes
        return Offline(build=lambda: _build(cfg, ctx, teacher, dataset, n, kind))
    return _train_from(cfg, ctx, dataset, num_classes, kind)


def _train_from(
    cfg: CacheableRecipeConfig, ctx: Context, dataset: Any, n: int | None, kind: TaskKind
) -> Offline:
    from distill.data.cache.store import read_manifest
    from distill.data.loaders import make_loader
    from distill.data.teacher_cache import CachedDataset, open_checked

    assert cfg.teacher_cache is not None
    path = Path(cfg.teacher_cache).expanduser()
    with user_errors(f"--teacher-cache {path}"):
        if n is None:
            n = int(read_manifest(path, how_to_build=HOW_TO_BUILD)["num_classes"])
        cache = open_checked(
            path,
            identity(cfg, dataset, n),
            labels=LABELS,
            how_to_build=HOW_TO_BUILD,
            kind=kind,
            temperature=cfg.temperature,  # refused here, before training, if not served
        )
    ctx.print(f"--teacher-cache: {len(cache)} images x {cache.crops} cached crops")
    data = CachedDataset(dataset, cache, seed=cfg.seed, temperature=cfg.temperature)
    loader = make_loader(
        data, ctx.per_process_batch, train=True, workers=cfg.workers, seed=cfg.seed
    )
    meta = cache.manifest.get("teacher_meta") or {}
    specs = [parse_teacher(raw, {})[0] for raw in cfg.teacher_specs()]
    name = str(meta.get("name") or "+".join(s for s in specs if s) or "cached")
    notes = {
        "teacher_cache": {
            "path": str(cache.path),
            "digest": cache.fingerprint.digest,
            "crops": cache.crops,
            "topk": cache.topk,
            "kind": cache.kind,
            "tail": cache.tail,
        }
    }
    return Offline(loader=loader, cache=cache, teacher_name=name, notes=notes)


def _build(
    cfg: CacheableRecipeConfig,
    ctx: Context,
    teacher: Any,
    dataset: Any,
    num_classes: int,
    kind: TaskKind,
) -> None:
    """--cache-teacher DIR: the teacher's answers on K crops of every training image."""
    import torch

    from distill.data.teacher_cache import build_or_reuse, teacher_signature
    from distill.files import write_json_atomic

    if teacher is None:
        raise RecipeError(f"--cache-teacher: the {cfg.NAME} recipe built no teacher to cache")
    assert cfg.cache_teacher is not None
    out = Path(cfg.cache_teacher).expanduser()
    device = torch.device(ctx.accelerator.device)
    ident = identity(cfg, dataset, num_classes)
    with user_errors(f"building the teacher cache in {out}"):
        cache = build_or_reuse(
            teacher,
            dataset,
            out,
            identity=ident,
            labels=LABELS,
            crops=cfg.crops,
            topk=cfg.topk if kind == "logits" else None,  # other kinds are stored whole
            kind=kind,
            seed=cfg.seed,
            batch_size=ctx.per_process_eval_batch,
            device=device,
            num_workers=cfg.workers,
            progress=cfg.progress,
            # the teacher runs as it would online: under autocast when mixed precision is on
            autocast=device.type == "cuda" and cfg.mixed_precision != "no",
        )
    provenance = {
        "recipe": cfg.NAME,
        "identity": ident,
        # provenance only: training from the cache checks the spec, not the weights
        "teacher_weights_sha256": teacher_signature(teacher),
        "seed": cfg.seed,
    }
    write_json_atomic(out / RECIPE_FILE, provenance)
    if cache.skipped:  # the stand-ins are cached; training replays the same substitution
        print(cache.skipped.report(), file=sys.stderr)
        write_json_atomic(out / "skipped.json", cache.skipped.to_dict())
    what = (
        f"top-{cache.topk} of {cache.num_classes} classes"
        if kind == "logits"
        else f"{cache.num_classes} {kind} outputs"
    )
    ctx.print(
        f"cached {len(cache)} images x {cache.crops} crops, {what} in {cache.path} "
        f"({cache.nbytes() / 2**20:.1f} MiB, "
        f"fingerprint {cache.fingerprint.digest[:12]}); train from it with the same settings "
        f"and --teacher-cache {cache.path}"
    )
