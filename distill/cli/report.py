"""`python -m distill report --entity E --project P [--group G] [--save]`: a W&B Report."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distill report",
        description=(
            "Build a W&B Report comparing the runs of a project: accuracy vs mult-adds and vs "
            "params (log x), parallel coordinates of alpha/resolution/T/kd_weight, learning "
            "curves by method (mean and std over seeds) and a runs table. Without --save it is "
            "only built and outlined (offline). --save publishes it: that needs network access "
            "and a W&B API key (`wandb login`, or WANDB_API_KEY in the environment)."
        ),
    )
    p.add_argument(
        "--entity",
        default=os.environ.get("WANDB_ENTITY"),
        help="W&B entity (default: $WANDB_ENTITY)",
    )
    p.add_argument(
        "--project",
        default=os.environ.get("WANDB_PROJECT"),
        help="W&B project (default: $WANDB_PROJECT)",
    )
    p.add_argument("--group", help="only runs of this W&B group (experiment)")
    p.add_argument("--title", help="report title (default: 'Distillation: <group or project>')")
    p.add_argument("--metric", default="top1", help="eval metric to plot (logged as eval/<metric>)")
    p.add_argument("--save", action="store_true", help="publish the report (network + API key)")
    p.add_argument("--draft", action="store_true", help="with --save: save as a draft")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        print(
            "error: the report needs wandb-workspaces: pip install 'mobiledistill[report]'",
            file=sys.stderr,
        )
        return 2
    from distill.report import build_report, describe

    try:
        report = build_report(
            args.entity or "",
            args.project or "",
            group=args.group,
            title=args.title,
            metric=args.metric,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(report))
    if not args.save:
        print("\nbuilt offline, not published: add --save (needs network and a W&B API key).")
        return 0
    try:
        report.save(draft=args.draft)
    except Exception as e:  # wandb's errors for no key / no network / no access vary by version
        print(
            f"error: could not save the report to W&B ({type(e).__name__}: {e}).\n"
            "Saving needs network access to the W&B server and an API key: run `wandb login` "
            "or set WANDB_API_KEY; check that --entity/--project exist and you can write there.",
            file=sys.stderr,
        )
        return 1
    print(f"saved: {report.url}")
    return 0
