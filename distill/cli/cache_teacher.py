"""`python -m distill cache-teacher`: run a teacher once over K crops of every image, store its
answers (class logits: the top-k plus the other classes in 8 bits, or their mass only).

python -m distill cache-teacher --teacher-arch torchvision:resnet50 \\
    --teacher-weights resnet50.safetensors --data-dir data/imagenet/train --out cache/r50 \\
    --crops 10 --topk 10 --resolution 224 --batch-size 256

`--tail quantized` (the default) keeps every other logit in 8 bits: the cached KD loss is the
online one at every temperature (about C bytes more per crop). `--tail mass --temperatures 1 4`
keeps only the other classes' total mass at those temperatures (4 bytes each): the loss is
exact there in value for a student that has not learnt the teacher's tail, not in gradient,
and training at any other temperature is refused (`distill.data.cache.topk`). `--kind
multilabel` or `embedding` stores a teacher's N outputs whole, in float32.

The teacher is an architecture name (a registered student, `timm:<model>` or
`torchvision:<model>`, built without downloading anything) plus a local weights file, loaded
safely (safetensors, or torch.load(weights_only=True)). Training then reads the cache with
`TeacherCache.open` + `CachedDataset` (see that module).

Recipes build their caches themselves, with their own teacher, data and train transform:
`accelerate launch recipes/imagenet.py --config ... --cache-teacher DIR --crops K --topk k`,
then train with `--teacher-cache DIR` (recipes/README.md).
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Any

import torch

from distill.constants import IMAGENET_MEAN, IMAGENET_STD
from distill.data.cache import ReplayableImages, build_cache

RECIPES_NOTE = """\
For the recipes, build the cache with the recipe itself, so that its teacher, training set and
transform are the ones cached (and checked when training):
  accelerate launch recipes/imagenet.py --config CONFIG --cache-teacher DIR --crops K --topk k
  accelerate launch recipes/imagenet.py --config CONFIG --teacher-cache DIR
This command is for a teacher given as an architecture + weights file outside the recipes."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distill cache-teacher",
        description="Store a teacher's top-k logits on K replayable crops per image.",
        epilog=RECIPES_NOTE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t = p.add_argument_group("teacher")
    t.add_argument("--teacher-arch", required=True, help="e.g. torchvision:resnet50, timm:resnet50")
    t.add_argument("--teacher-weights", required=True, help=".safetensors or .pt/.pth state dict")
    t.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="teacher outputs (default: read from the checkpoint's last layer)",
    )
    t.add_argument(
        "--teacher-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra builder keyword (Python literal value), e.g. --teacher-arg alpha=0.5",
    )
    t.add_argument("--teacher-resolution", type=int, default=224)
    t.add_argument("--teacher-mean", type=float, nargs=3, default=IMAGENET_MEAN)
    t.add_argument("--teacher-std", type=float, nargs=3, default=IMAGENET_STD)
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", required=True, help="the training images")
    d.add_argument(
        "--dataset",
        choices=["imagefolder"],
        default="imagefolder",
        help="layout of --data-dir: imagefolder = <class>/<image> (ImageNet's train/ too)",
    )
    d.add_argument("--resolution", type=int, default=224, help="the student's input size")
    d.add_argument("--mean", type=float, nargs=3, default=IMAGENET_MEAN, help="student mean")
    d.add_argument("--std", type=float, nargs=3, default=IMAGENET_STD, help="student std")
    d.add_argument("--scale", type=float, nargs=2, default=(0.08, 1.0), help="crop area range")
    d.add_argument("--ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="crop aspect range")
    d.add_argument("--flip-p", type=float, default=0.5)
    c = p.add_argument_group("cache")
    c.add_argument("--out", required=True, help="output folder (manifest.json + shards)")
    c.add_argument("--crops", type=int, default=10, help="augmentation draws per image (K)")
    c.add_argument("--topk", type=int, default=10, help="logits kept per draw (k)")
    c.add_argument(
        "--kind",
        choices=["logits", "multilabel", "embedding"],
        default="logits",
        help="what the teacher outputs; multilabel and embedding outputs are stored whole",
    )
    c.add_argument(
        "--tail",
        choices=["quantized", "mass"],
        default="quantized",
        help="the classes outside the top k: 8 bits each (every temperature), or their mass",
    )
    c.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="T",
        help="temperatures whose tail mass is stored (1 always is); with --tail mass, the only "
        "ones training may use",
    )
    c.add_argument("--batch-size", type=int, default=256)
    c.add_argument(
        "--workers",
        type=int,
        default=min(4, max(0, (os.cpu_count() or 1) - 1)),
        help="DataLoader workers decoding images (default: up to 4, one core left free)",
    )
    c.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu, ...")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--shard-size", type=int, default=50_000, help="images per shard")
    c.add_argument("--overwrite", action="store_true", help="replace a different cache in --out")
    c.add_argument("--no-progress", action="store_true")
    return p


def _builder_kwargs(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--teacher-arg expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word: keep it as a string
    return out


def _classes_in(state: dict[str, Any], path: Any) -> int:
    """The output count of a classifier checkpoint: the rows of its last 2-D weight."""
    weights = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise ValueError(
            f"{path}: no classifier layer to read the class count from; set --num-classes"
        )
    return int(weights[-1].shape[0])


def _shape_mismatches(state: dict[str, Any], model: dict[str, Any]) -> list[str]:
    return [
        f"{k}: file {tuple(v.shape)} vs model {tuple(model[k].shape)}"
        for k, v in state.items()
        if k in model and tuple(v.shape) != tuple(model[k].shape)
    ]


def build_teacher(args: argparse.Namespace) -> torch.nn.Module:
    from distill.models import create_student
    from distill.serialization import load_state_dict
    from distill.teacher import Teacher

    state = load_state_dict(args.teacher_weights)
    num_classes = args.num_classes or _classes_in(state, args.teacher_weights)
    kwargs = {"num_classes": num_classes, **_builder_kwargs(args.teacher_arg)}
    model = create_student(args.teacher_arch, **kwargs)
    state = load_state_dict(args.teacher_weights, expected_keys=model.state_dict().keys())
    shapes = _shape_mismatches(state, model.state_dict())
    if shapes:
        raise ValueError(
            f"{args.teacher_weights} does not fit {args.teacher_arch} with {num_classes} "
            f"classes: {len(shapes)} tensors differ in shape, e.g. {'; '.join(shapes[:3])}. "
            "Check --teacher-arch, --teacher-arg and --num-classes"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{args.teacher_weights} does not fit {args.teacher_arch}: missing "
            f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}; check --teacher-arch and "
            "--num-classes"
        )
    return Teacher(
        model,
        input_size=args.teacher_resolution,
        mean=args.teacher_mean,
        std=args.teacher_std,
        student_mean=args.mean,
        student_std=args.std,
        source=str(args.teacher_weights),
        name=args.teacher_arch,
        output=getattr(args, "kind", "logits"),
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from distill.data.transforms import PairedTransform, ViewSpec

    try:
        teacher = build_teacher(args)
        transform = PairedTransform(
            ViewSpec(args.resolution, tuple(args.mean), tuple(args.std)),
            ViewSpec(args.teacher_resolution, tuple(args.teacher_mean), tuple(args.teacher_std)),
            train=True,
            scale=tuple(args.scale),
            ratio=tuple(args.ratio),
            flip_p=args.flip_p,
        )
        # absolute: the cache names files relative to the folder, wherever it is run from
        dataset = ReplayableImages.from_folder(os.path.abspath(args.data_dir), transform)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        cache = _build(args, teacher, dataset, device)
    except ValueError as e:  # a different cache in --out, a teacher that does not fit ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = cache.manifest
    what = (
        f"top-{cache.topk} of {cache.num_classes} classes"
        if cache.kind == "logits"
        else f"{cache.num_classes} {cache.kind} outputs"
    )
    print(
        f"cached {len(cache)} images x {cache.crops} crops, {what}: "
        f"{cache.path} ({cache.nbytes() / 2**20:.1f} MiB, "
        f"fingerprint {cache.fingerprint.digest[:12]}, "
        f"{m.get('build', {}).get('draws_per_s', '?')} crops/s)"
    )
    return 0


def _build(args: argparse.Namespace, teacher: Any, dataset: Any, device: str) -> Any:
    return build_cache(
        teacher,
        dataset,
        args.out,
        crops=args.crops,
        topk=args.topk if args.kind == "logits" else None,
        kind=args.kind,
        tail=args.tail,
        temperatures=args.temperatures,
        batch_size=args.batch_size,
        device=device,
        seed=args.seed,
        shard_size=args.shard_size,
        num_workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
