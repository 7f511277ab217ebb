"""`python -m distill demo [--out demo_out] [--quick]`: the embedded digits demo (`make demo`).

Trains a teacher on scikit-learn's digits, MobileNet students at several widths and
resolutions from scratch and distilled, prints the comparison table, and writes every run's
folder, report.html and offline W&B runs under --out. No download, no GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distill demo",
        description=(
            "Teacher, scratch and distilled MobileNet students on scikit-learn's digits "
            "(CPU, a few minutes). Writes OUT/runs/*/metrics.json, OUT/report.html, "
            "OUT/summary.md and offline W&B runs in OUT/wandb (sync them with `wandb sync`)."
        ),
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="one student, one seed, a few steps: checks the pipeline in seconds",
    )
    p.add_argument("--alphas", type=float, nargs="+", help="width multipliers (default 0.5 0.25)")
    p.add_argument("--resolutions", type=int, nargs="+", help="input sizes, >= 32 (default 40 32)")
    p.add_argument("--seeds", type=int, nargs="+", help="student seeds (default 0 1)")
    p.add_argument(
        "--train-fraction",
        type=float,
        help="labelled share of the training split the students see (default 0.1: 134 images)",
    )
    p.add_argument("--steps", type=int, help="optimizer steps per student (default 200)")
    p.add_argument("--temperature", type=float, help="KD temperature (default 4)")
    p.add_argument("--kd-weight", type=float, help="weight of the KD term, 0..1 (default 0.9)")
    p.add_argument("--no-wandb", action="store_true", help="do not log W&B runs")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from dataclasses import replace

    if not args.no_wandb:
        # offline unless the user asked for something else: the demo never needs the network
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from distill.demo import (
        DemoConfig,
        format_gains,
        format_table,
        paired_wins,
        rows,
        run_study,
    )

    cfg = DemoConfig.quick(args.out) if args.quick else DemoConfig(out=args.out)
    over: dict[str, Any] = {}
    for name in ("alphas", "resolutions", "seeds"):
        if getattr(args, name):
            over[name] = tuple(getattr(args, name))
    if args.train_fraction is not None:
        over["train_fraction"] = args.train_fraction
    st = cfg.student_settings
    if args.steps is not None:
        st = replace(st, steps=args.steps)
    if args.temperature is not None:
        st = replace(st, temperature=args.temperature)
    if args.kd_weight is not None:
        st = replace(st, kd_weight=args.kd_weight)
    cfg = replace(cfg, student_settings=st, report_to="none" if args.no_wandb else "wandb", **over)
    bad = cfg.problems()
    if bad:
        print("error: " + "; ".join(bad), file=sys.stderr)
        return 2
    try:
        result = run_study(cfg)
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    table = rows(result)
    text = "\n".join(
        [
            f"digits demo: teacher on {cfg.teacher_resolution} px, students on "
            f"{cfg.train_fraction:.0%} of the training split, seeds {list(cfg.seeds)} "
            "(± is the std over seeds); error on the 450 test images; images/s is batch-256 "
            "inference on this CPU",
            "",
            format_table(table),
            "",
            format_gains(table),
            "distilled better than scratch from the same seed (same initial weights and "
            "batches) in {} of {} pairs".format(*paired_wins(result.students)),
            f"wall time {result.wall_s:.0f} s"
            + (" (--quick: too few steps for the numbers to mean anything)" if args.quick else ""),
        ]
    )
    print("\n" + text)
    from pathlib import Path

    out = Path(cfg.out)
    (out / "summary.md").write_text(text + "\n")
    print(f"\nwrote {out / 'runs'}/*/metrics.json, {out / 'report.html'}, {out / 'summary.md'}")
    if cfg.report_to == "wandb":
        print(
            f"W&B runs in {out / 'wandb'}: `wandb sync {out / 'wandb'}/offline-run-*` uploads them"
        )
    return 0
