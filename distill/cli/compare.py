"""`python -m distill compare RUN_DIR... [-o report.html] [--title T]`: a local HTML report."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distill compare",
        description=(
            "Read each run's metrics.json (a RUN_DIR may hold many runs) and write a "
            "self-contained report.html: accuracy vs mult-adds/params plots, teacher vs "
            "scratch vs distilled per student, and every run's numbers. The plots are also "
            "written as PNGs next to the HTML."
        ),
    )
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="run folder, folder of runs, or metrics.json"
    )
    p.add_argument(
        "-o", "--output", default="report.html", help="HTML file to write (default: %(default)s)"
    )
    p.add_argument("--title", default="mobiledistill: runs compared", help="page title")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from distill.compare import load_runs, write_report
    from distill.tracking import MetricsFileError

    try:
        runs = load_runs(args.runs, say=lambda msg: print(f"note: {msg}", file=sys.stderr))
        out = write_report(runs, args.output, title=args.title)
    except (FileNotFoundError, MetricsFileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(runs)} runs; PNGs next to it)")
    return 0
