"""CPU latency of shipped students: student × runtime (ONNX Runtime fp32 / INT8, eager
PyTorch) × batch × threads, with `distill.export` (the same code `python -m distill export`
and `profile --latency` use).

Each student is built with random weights whose BatchNorm statistics are measured on digits
images (`calibrated`: a freshly initialised MobileNetV1's activations shrink towards denormal
floats, which neither checks an export nor times like a trained network), exported
to ONNX (checked against PyTorch on the digits at its size: max |Δ| in the table), quantised to
INT8 on 300 digits training images (QDQ, per-channel), and timed: warm-up, then `--repeats`
runs per setting, median and p90 in ms per batch. Rows are appended to benchmarks/RESULTS.md
(--no-write to skip).

    python benchmarks/latency.py                       # the default grid below
    python benchmarks/latency.py --students mobilenet_v1:0.25:128 timm:resnet18:224 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
DEFAULT_STUDENTS = (
    "mobilenet_v1:1.0:224",
    "mobilenet_v1:0.5:160",
    "mobilenet_v1:0.25:128",
    "timm:resnet18:224",
    "torchvision:mobilenet_v2:224",
)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--students", nargs="+", default=list(DEFAULT_STUDENTS),
        help="NAME:ALPHA:RESOLUTION, or timm:NAME:RESOLUTION / torchvision:NAME:RESOLUTION",
    )  # fmt: skip
    p.add_argument("--batch", type=int, default=8, help="the batch-N rows (besides batch 1)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def calibrated(model: Any, resolution: int, seed: int = 0) -> Any:
    """Random weights that behave like trained ones: BatchNorm statistics measured on 128
    digits images, classifier weights at 1/sqrt(fan_in), so the logits are O(1). Channels that
    random weights leave dead (running_var ~1e-10) are floored at 1e-2: they make float32 itself
    ill-conditioned (float32 vs float64 ~1e-4), which trained networks rarely are."""
    import torch
    from torch import nn

    from distill.data.digits import load_digits_splits

    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, m.in_features**-0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the batch below
    x = load_digits_splits(resolution, augment=False)[0].tensors()[0][:128]
    model.train()
    with torch.no_grad():
        model(x)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.clamp_(min=1e-2)
    return model.eval()


def measure(spec: str, args: argparse.Namespace, tmp: Path) -> tuple[str, float, dict[str, Any]]:
    """(label, ONNX max |Δ| vs PyTorch on the digits, latency section) of one student."""
    import torch

    from distill.data.digits import load_digits_splits
    from distill.export.check import compare_outputs, torch_outputs
    from distill.export.graph import export_onnx, onnx_session, run_onnx
    from distill.export.int8 import quantize_int8
    from distill.export.latency import LatencySettings, measure_latency
    from distill.models import build_student

    parts = spec.split(":")
    prefixed = parts[0] in ("timm", "torchvision")
    name = ":".join(parts[:2]) if prefixed else parts[0]
    alpha = None if prefixed else float(parts[1])
    res = parts[-1]
    torch.manual_seed(0)
    model = build_student(name, num_classes=10, alpha=alpha, resolution=int(res))
    model = calibrated(model, int(res))
    size = (3, int(res), int(res))
    onnx_path = tmp / f"{name.replace(':', '_')}-{alpha}-{res}.onnx"
    export_onnx(model, onnx_path, input_size=size, metadata={"producer": "benchmarks/latency.py"})
    train, test = load_digits_splits(int(res), augment=False)
    x = test.tensors()[0][:64]
    diff = compare_outputs(
        torch_outputs(model, x), run_onnx(onnx_session(onnx_path), x), runtime="ort"
    )
    int8 = None
    if not args.no_int8:
        int8 = onnx_path.with_suffix(".int8.onnx")
        quantize_int8(onnx_path, int8, train.tensors()[0][:300])
    settings = LatencySettings(
        batch_sizes=(1, args.batch), warmup=args.warmup, repeats=args.repeats
    )
    latency = measure_latency(model, size, onnx=onnx_path, int8=int8, settings=settings)
    label = name if alpha is None else f"{name} α={alpha:g}"
    return f"{label} @{res}", diff.max_abs_diff, latency


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    start = time.perf_counter()
    rows = []
    device = "cpu"
    with tempfile.TemporaryDirectory(prefix="latency-bench-") as tmp:
        for spec in args.students:
            label, diff, latency = measure(spec, args, Path(tmp))
            device = latency["device"]
            print(f"{label}: ONNX max |Δ| vs PyTorch {diff:.2g}", flush=True)
            for r in latency["rows"]:
                rows.append(
                    f"| {label} | {r['runtime']} | {r['precision']} | {r['batch_size']} | "
                    f"{r['threads']} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                    f"{r['images_per_s']:.0f} | {diff:.1g} |"
                )
    env = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
        if "OMP_NUM_THREADS" in os.environ
        else ""
    )
    command = f"{env}python benchmarks/latency.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join(
        [
            f"### latency, cpu, {stamp[:10]}: student × runtime × threads",
            "",
            f"{stamp} · {device} · `{command.strip()}` · {time.perf_counter() - start:.0f} s wall · "
            f"ms per batch, median and p90 of {args.repeats} after {args.warmup} warm-up runs; "
            "random weights; INT8 = ONNX Runtime QDQ, per-channel, calibrated on 300 digits images",
            "",
            "| student | runtime | precision | batch | threads | median ms | p90 ms | images/s "
            "| ONNX max abs diff |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print("\n" + text)
    if not args.no_write:  # append, never rewrite: other benchmarks may be writing too
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + text + "\n")
        print(f"\nappended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
