"""Proof that it distils: MobileNet students on scikit-learn's real digits, scratch vs KD.

    python benchmarks/digits_kd.py                      # ~3 min on 2 idle CPU cores
    python benchmarks/digits_kd.py --fractions 0.1 0.25 1.0 --seeds 0 1 2 3 4

A wide CNN teacher (digits_cnn, width 64, 16 px: 38M mult-adds, 1.1M parameters) is trained
once on the fixed, seeded, stratified training split (1,347 of the 1,797 images; test: the
other 450). Then the
same MobileNetV1 student (alpha 0.25, 32 px: the images are upsampled from 8x8) is trained
from the labels alone (cross-entropy) and with Hinton et al.'s KD loss (T=4, weight 0.9 on the
teacher term; 2015) for every seed, on a labelled subset of the training split (`--fractions`:
the share of the 1,347 images the students see; the teacher saw all of them) and for a fixed
number of optimizer steps. Everything runs through `distill.Distiller`, exactly as a user's
run would.

Reported per regime: test error (mean ± sample std over seeds), agreement with the teacher's
top-1 on the test set, mult-adds and parameters. Rows are appended to benchmarks/RESULTS.md
(--no-write to skip).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[0.1, 1.0],
        help="labelled share of the training split the students see (default: 0.1 1.0)",
    )
    p.add_argument("--alpha", type=float, default=0.25, help="student width multiplier")
    p.add_argument("--resolution", type=int, default=32, help="student input size (>= 32)")
    p.add_argument("--steps", type=int, default=240, help="optimizer steps per student")
    p.add_argument("--teacher-steps", type=int, default=420, help="20 epochs of 64")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def regime_table(fraction: float, train_images: int, rows: list, teacher_err: float) -> str:
    from distill.demo import format_count

    lines = [
        f"labelled training images: {train_images} ({fraction:.0%} of the split); teacher "
        f"error {teacher_err:.2f}%",
        "",
        "| student | role | error % (mean ± std) | seeds | agrees with teacher % (mean ± std) "
        "| mult-adds | params |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.role == "teacher":
            continue
        agree = r.agreements
        a_std = statistics.stdev(agree) if len(agree) > 1 else 0.0
        lines.append(
            f"| {r.model} @{r.resolution} | {r.role} | {r.error_mean:.2f} ± {r.error_std:.2f} "
            f"| {r.seeds} | {statistics.fmean(agree):.1f} ± {a_std:.1f} | "
            f"{format_count(r.mult_adds)} | {format_count(r.params)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from distill.demo import (
        DemoConfig,
        StudyResult,
        TrainSettings,
        device_name,
        format_gains,
        paired_wins,
        rows,
        train_students,
        train_teacher,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="digits_kd_")
    out = Path(args.out or tmp.name)  # type: ignore[union-attr]
    base = DemoConfig(
        out=str(out),
        alphas=(args.alpha,),
        resolutions=(args.resolution,),
        seeds=tuple(args.seeds),
        teacher_settings=TrainSettings(steps=args.teacher_steps),
        student_settings=TrainSettings(
            steps=args.steps,
            temperature=args.temperature,
            kd_weight=args.kd_weight,
        ),
        report_to="none",
        experiment="digits-kd-benchmark",
        measure_speed=False,
        write_report=False,
    )
    bad = base.problems()
    if bad:
        print("error: " + "; ".join(bad), file=sys.stderr)
        return 2
    log = print
    teacher = train_teacher(base, log)
    sections = []
    for fraction in args.fractions:
        cfg = replace(base, train_fraction=fraction, out=str(out / f"fraction-{fraction:g}"))
        students = train_students(cfg, teacher, log)
        table = rows(StudyResult(cfg, teacher, students, 0.0))
        n_train = int(students[0].record.get("info_train_images") or 0)
        won, pairs = paired_wins(students)
        per_seed = ", ".join(
            f"s{d.info.seed} {s.error:.2f} -> {d.error:.2f}"
            for s, d in zip(students[::2], students[1::2], strict=True)
        )
        sections.append(
            regime_table(fraction, n_train, table, teacher.error)
            + "\n\n"
            + format_gains(table)
            + f"; distilled better for the same seed in {won} of {pairs} pairs "
            + f"(error % scratch -> distilled: {per_seed})"
        )
    wall = time.perf_counter() - start
    t = teacher.record
    title = (
        f"digits KD: MobileNetV1 {args.alpha:g} @{args.resolution} px, scratch vs KD "
        f"(T={args.temperature:g}, weight {args.kd_weight:g}), {len(args.seeds)} seeds "
        f"{args.seeds}, {args.steps} steps of 64; teacher digits_cnn @16 px "
        f"({t['mult_adds'] / 1e6:.1f}M mult-adds, {t['params'] / 1e3:.0f}k params)"
    )
    env = (
        f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
        if "OMP_NUM_THREADS" in os.environ
        else ""
    )
    command = f"{env}python benchmarks/digits_kd.py " + " ".join(argv or sys.argv[1:])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n\n".join(
        [
            f"### {title}",
            f"{stamp} · {device_name()} · torch threads {torch.get_num_threads()} · "
            f"`{command.strip()}` · {wall:.0f} s wall",
            *sections,
        ]
    )
    print("\n" + text)
    if not args.no_write:
        old = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(old.rstrip("\n") + "\n\n" + text + "\n")
        print(f"\nappended to {args.results}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
