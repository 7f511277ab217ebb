"""Images/s from JPEG files on disk to an augmented, normalised batch on the device.

    python benchmarks/input_pipeline.py --device cpu  --images 256 --workers 2
    python benchmarks/input_pipeline.py --device cuda --images 4096 --workers 16

Writes --images JPEGs of --size (default 500x375, ImageNet's typical size, quality 90) into a
temporary ImageFolder (or reads --data-dir), then times full passes of:

- pil       torchvision ImageFolder + RandomResizedCrop/flip/normalise in DataLoader workers
            (PIL decode), batches moved to the device: what peers do;
- batched   distill.data.encoded + gpu_pipeline: workers read bytes, the batch is decoded and
            augmented by `GpuBatchTransform` when moved to the device (nvJPEG on CUDA; on the
            CPU the workers decode, with the PIL path's decoder and renderer).

--teacher-resolution R also renders each crop natively for an R px teacher ("teacher_input"),
on both pipelines, as distillation does.

Median images/s over --repeats passes after one warm-up pass; rows go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def write_jpegs(
    root: Path, n: int, size: tuple[int, int], classes: int = 10, procs: int = 1
) -> None:
    """Photo-like JPEGs (smooth gradients + noise, so they compress like photos, not noise)."""
    for i in range(classes):
        (root / f"class{i:03d}").mkdir(parents=True, exist_ok=True)
    jobs = [(root, i, size, classes) for i in range(n)]
    if procs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(procs) as pool:
            pool.starmap(_write_one, jobs, chunksize=64)
    else:
        for job in jobs:
            _write_one(*job)


def _write_one(root: Path, i: int, size: tuple[int, int], classes: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, 3)
    slope = rng.uniform(-0.3, 0.3, (3, 2))
    img = np.stack([base[k] + slope[k, 0] * xx + slope[k, 1] * yy for k in range(3)], -1)
    img += rng.normal(0, 12, (h, w, 3))
    out = root / f"class{i % classes:03d}" / f"{i:06d}.jpg"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(out, quality=90)


def time_pass(loader: Any, device: str, to_device: bool) -> tuple[float, int]:
    n = 0
    t0 = time.perf_counter()
    for batch in loader:
        if isinstance(batch, (list, tuple)):  # torchvision ImageFolder: (input, target)
            batch = {"input": batch[0]}
        elif not isinstance(batch, dict):  # an EncodedBatch: decoded when moved to the device
            batch = batch.to(device, non_blocking=True)
        if to_device:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        n += batch["input"].shape[0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0), n


def paired(args: argparse.Namespace) -> Any:
    """The distillation views: the student at --resolution, a teacher at --teacher-resolution."""
    from distill.data.transforms import PairedTransform, ViewSpec

    teacher = ViewSpec(args.teacher_resolution) if args.teacher_resolution else None
    return PairedTransform(ViewSpec(args.resolution), teacher, train=True)


def pil_loader(root: Path, args: argparse.Namespace) -> Any:
    from torchvision.datasets import ImageFolder

    from distill.data.transforms import build_transforms

    if args.teacher_resolution:
        from distill.data.datasets import image_folder

        ds: Any = image_folder(root, paired(args))
    else:
        ds = ImageFolder(str(root), transform=build_transforms(args.resolution, train=True))
    return torch.utils.data.DataLoader(
        ds,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        pin_memory=args.device.startswith("cuda"),
        persistent_workers=args.workers > 0,
        prefetch_factor=4 if args.workers > 0 else None,
    )


def batched_loader(root: Path, args: argparse.Namespace) -> Any:
    from distill.data.encoded import EncodedImageFolder, encoded_loader
    from distill.data.gpu_pipeline import GpuBatchTransform

    transform = GpuBatchTransform.from_paired(paired(args), device=args.device)
    return encoded_loader(
        EncodedImageFolder(root),
        transform,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        decode_in_workers=transform.device.type == "cpu",
        persistent_workers=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument(
        "--data-dir", type=Path, help="an existing ImageFolder instead of generated JPEGs"
    )
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--teacher-resolution", type=int, help="also render a teacher view this big")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["pil", "batched"], choices=["pil", "batched"])
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--json", type=Path, help="also write {pipeline: images/s} here")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    command = "python benchmarks/input_pipeline.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or Path(tmp)
        if args.data_dir is None:
            t0 = time.perf_counter()
            write_jpegs(root, args.images, tuple(args.size), procs=max(1, args.workers))
            print(
                f"wrote {args.images} JPEGs of {args.size[0]}x{args.size[1]} in {time.perf_counter() - t0:.1f}s"
            )
        rows = []
        for method in args.methods:
            loader = pil_loader(root, args) if method == "pil" else batched_loader(root, args)
            time_pass(loader, args.device, method == "pil")  # warm-up: workers, nvJPEG, page cache
            rates = [
                time_pass(loader, args.device, method == "pil")[0] for _ in range(args.repeats)
            ]
            print(f"{method}: {', '.join(f'{r:.0f}' for r in rates)} images/s", flush=True)
            rows.append((method, statistics.median(rates)))

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    ref = rows[0][1]
    text = (
        f"\n\n### input pipeline, {args.device}, {date}\n\n"
        "| date | device | job | pipeline | images/s | × first | command |\n|---|---|---|---|---|---|---|\n"
    )
    teacher = f" + teacher {args.teacher_resolution}" if args.teacher_resolution else ""
    job = (
        f"{args.images} JPEGs {args.size[0]}x{args.size[1]} → RandomResizedCrop {args.resolution}"
        f"{teacher}, B={args.batch_size}, {args.workers} workers"
    )
    for method, rate in rows:
        text += f"| {date} | {device} | {job} | {method} | {rate:.0f} | {rate / ref:.2f} | `{command}` |\n"
    print(text)
    if args.json:
        import json

        args.json.write_text(json.dumps({"job": job, "images_per_s": dict(rows)}, indent=1))
    if not args.no_write:
        base = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(base.rstrip("\n") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
