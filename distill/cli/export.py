"""`python -m distill export RUN_DIR`: ship a trained student as checked deployable files.

python -m distill export runs/kd-a0.5-r160                         # ONNX (+ latency)
python -m distill export runs/kd-a0.5-r160 --int8 --max-int8-drop 0.5
python -m distill export runs/kd-a0.5-r160 --format onnx pt2 hf --out shipped/
python -m distill export runs/kd-a0.5-r160 --format hf --push-to-hub me/mobilenet-kd

Exit status: 0 exported and checked; 2 bad input or a failed check (the message names it);
3 exported, but INT8 costs more than --max-int8-drop (the files and export.json are kept).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.export.api import ExportOptions


def build_parser() -> argparse.ArgumentParser:
    from distill.export.api import FORMATS
    from distill.export.check import DEFAULT_ATOL
    from distill.export.data import DEFAULT_CALIBRATION
    from distill.export.int8 import DEFAULT_MAX_DROP

    p = argparse.ArgumentParser(
        prog="python -m distill export",
        description=(
            "Rebuild a run folder's student from metrics.json/config.json and "
            "student.safetensors, export it, check every file against eager PyTorch on real "
            "images (the digits unless --data-dir), measure CPU latency, and record it all in "
            "RUN_DIR/export.json."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder (metrics.json, ...)")
    p.add_argument(
        "--format", nargs="+", default=None, metavar="FMT",
        help=f"one or more of {', '.join(FORMATS)} (default: onnx)",
    )  # fmt: skip
    p.add_argument("--int8", action="store_true", help="also quantise the ONNX model to INT8")
    p.add_argument("--out", help="folder for the files (default: RUN_DIR/export)")
    p.add_argument("--overwrite", action="store_true", help="replace files an earlier export wrote")
    p.add_argument("--data-dir", help="image folder (DIR/train + DIR/val, or one folder)")
    p.add_argument(
        "--calibration-images", type=int, default=DEFAULT_CALIBRATION,
        help="training images that calibrate INT8 (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--max-int8-drop", type=float, default=DEFAULT_MAX_DROP,
        help="points of the metric INT8 may cost (default: %(default)s); more exits with 3",
    )  # fmt: skip
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help="allowed |Δ| vs PyTorch")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurement")
    p.add_argument("--latency-batch", type=int, default=32, help="the batch-N of the latency rows")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per latency setting")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per latency setting")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the hf folder (needs network)")
    p.add_argument("--student", help="create_student name, for runs that recorded none usable")
    p.add_argument("--json", action="store_true", help="print export.json's content")
    return p


def _options(args: argparse.Namespace) -> ExportOptions:
    from distill.export.api import ExportOptions
    from distill.export.latency import LatencySettings

    formats = [f for item in (args.format or []) for f in item.split(",") if f]
    if args.format is None:
        formats = [] if args.int8 else ["onnx"]
    return ExportOptions(
        formats=tuple(formats),
        int8=args.int8,
        out=args.out,
        overwrite=args.overwrite,
        atol=args.atol,
        max_int8_drop=args.max_int8_drop,
        calibration_images=args.calibration_images,
        latency=not args.no_latency,
        latency_settings=LatencySettings(
            batch_sizes=tuple(dict.fromkeys((1, args.latency_batch))),
            warmup=args.warmup,
            repeats=args.repeats,
        ),
        push_to_hub=args.push_to_hub,
        opset=args.opset,
    )


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from distill.export.api import export_run
    from distill.export.latency import format_latency_table
    from distill.export.record import ExportRecordError
    from distill.export.run import ExportError

    say = (lambda _m: None) if args.json else print
    try:
        options = _options(args)
        record = export_run(
            args.run_dir,
            options,
            data=args.data_dir,
            student=args.student,
            log=say,
        )
    except (ExportError, ExportRecordError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record, indent=2))
    elif record.get("latency"):
        lat = record["latency"]
        print(
            f"\nCPU latency on {lat['device']} (ms per batch; median and p90 of {lat['repeats']}):"
        )
        print(format_latency_table(lat["rows"]))
    int8 = record["formats"].get("int8")
    if int8 and int8["over_threshold"]:
        print(
            f"error: INT8 costs {int8['drop']:.2f} points of {int8['metric']}, more than "
            f"--max-int8-drop {int8['max_drop']:g} (files kept; see export.json)",
            file=sys.stderr,
        )
        return 3
    return 0
