"""Every method on real data: MobileNetV1 students of a ResNet teacher on scikit-learn's digits.

    python benchmarks/methods.py                          # every logit-task method, 3 seeds
                                                          # (about an hour on 2 CPU cores)
    python benchmarks/methods.py --methods kd dist crd --seeds 0 1 --fractions 0.1

A torchvision ResNet-10 (BasicBlock ResNet with one block per stage, torchvision's
`ResNet(BasicBlock, [1, 1, 1, 1])`, 10 classes, 32 px: the 8x8 digits upsampled) is trained once on the
fixed, seeded, stratified training split (1,347 images; test: the other 450). Then the same
MobileNetV1 student (alpha 0.25, 32 px) is trained with every registered logit-task method
(`distill.losses.methods_for("logits")`: from scratch, KD, the logit methods and the feature
methods, whose layers come from the default stage maps of the two networks) for every seed, in
two settings: the demo's (`--fractions 0.1`: 10% of the labels) and full labels (1.0). Each
run is a real `distill.Distiller` run through `create_objective(name, student=, teacher=)`,
exactly as `recipes/imagenet.py --method NAME` builds it, with the shared settings T = 4 and a
teacher weight of 0.9 where a method has them, and the method's defaults (the papers'
hyper-parameters) otherwise; BENCH_ARGS lists the few that must change on 134 images.

The table (method, test error mean ± std over seeds, gain over scratch and over KD, training
images/s) is appended to benchmarks/RESULTS.md, and report.html (the compare report, with its
per-method view) is written to --report.
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
REPORT = ROOT / "benchmarks" / "methods" / "report.html"
TEACHER = "resnet10"
COMMON = {"temperature": 4.0, "kd_weight": 0.9, "label_smoothing": 0.0}


def bench_args(method: str, train_images: int) -> dict[str, Any]:
    """Settings that must differ from a method's defaults on this data, and why."""
    if method == "crd":  # the memory bank holds one row per training image
        return {"nce_k": min(4096, train_images - 1)}
    if method == "dkd":  # the paper's CIFAR values (T = 4 from COMMON)
        return {"beta": 8.0, "warmup_epochs": 20.0}
    if method == "dist":  # the paper's CIFAR values (T = 4 from COMMON)
        return {"beta": 2.0, "gamma": 2.0}
    return {}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 1.0])
    p.add_argument("--methods", nargs="+", help="default: every logit-task method")
    p.add_argument(
        "--args",
        nargs="+",
        default=[],
        metavar="METHOD=YAML",
        help="override a method's settings, e.g. dist='{temperature: 1, beta: 1, gamma: 1}'",
    )
    p.add_argument("--steps", type=int, default=240, help="optimizer steps per student")
    p.add_argument("--teacher-steps", type=int, default=420, help="20 epochs of 64")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--report", type=Path, default=REPORT)
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def train_teacher(out: Path, steps: int, log: Any) -> Any:
    """The ResNet-10 teacher on every training image, wrapped as a distill Teacher."""
    import torch

    from distill.demo import TrainSettings, digits_data, train_run
    from distill.teacher import Teacher
    from distill.tracking import RunInfo

    train, test = digits_data(32)
    info = RunInfo(
        experiment="digits-methods", role="teacher", method="ce", student=TEACHER,
        teacher=TEACHER, dataset="digits", resolution=32, seed=0,
    )  # fmt: skip
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock, ResNet

    net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    record = train_run(net, info, train, test, out / info.run_name(), TrainSettings(steps=steps))
    log(f"teacher {TEACHER}: error {100 - record['metrics']['top1']:.2f}%")
    return Teacher(net, input_size=32, name=TEACHER, source="benchmarks/methods.py"), record


def overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """--args METHOD=YAML ... as {method: {argument: value}}."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        method, sep, raw = item.partition("=")
        value = yaml.safe_load(raw) if sep else None
        if not isinstance(value, dict):
            raise SystemExit(f"error: --args {item!r}: give METHOD='{{key: value, ...}}'")
        out[method] = value
    return out


def train_student(
    method: str,
    seed: int,
    fraction: float,
    teacher: Any,
    out: Path,
    steps: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """One student run; returns its metrics.json record."""
    import torch

    from distill.demo import TrainSettings, digits_data, train_run
    from distill.losses import create_objective
    from distill.models import mobilenet_v1
    from distill.tracking import RunInfo

    train, test = digits_data(32, train_fraction=fraction)
    torch.manual_seed(seed)  # the same initial weights for every method of a seed
    model = mobilenet_v1(alpha=0.25, num_classes=10, resolution=32)
    scratch = method == "ce"
    objective = create_objective(
        method,
        student=model,
        teacher=None if scratch else teacher,
        common=COMMON,
        num_samples=len(train),
        **{**bench_args(method, len(train)), **extra},
    )
    info = RunInfo(
        experiment="digits-methods", role="scratch" if scratch else "distilled", method=method,
        student="mobilenet_v1", teacher=None if scratch else TEACHER, dataset="digits",
        alpha=0.25, resolution=32, seed=seed,
    )  # fmt: skip
    settings = TrainSettings(steps=steps)
    return train_run(
        model,
        info,
        train,
        test,
        out / info.run_name(),
        settings,
        teacher=None if scratch else teacher,
        objective=objective,
    )


def section_text(runs_dir: Path, fraction: float, train_images: int, teacher_err: float) -> str:
    from distill.compare import load_runs, sections
    from distill.compare_methods import markdown_table, method_rows

    (section,) = [s for s in sections(load_runs([runs_dir])) if s.metric == "top1"]
    rows = method_rows(section)
    head = (
        f"labelled training images: {train_images} ({fraction:.0%} of the split); teacher "
        f"({TEACHER}) error {teacher_err:.2f}%"
    )
    return head + "\n\n" + markdown_table(rows, "top1", as_error=True)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    from distill.compare import load_runs, write_report
    from distill.demo import device_name, digits_data
    from distill.losses import methods_for

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = args.methods or list(methods_for("logits"))
    unknown = sorted(set(methods) - set(methods_for("logits")))
    if unknown:
        print(f"error: unknown methods {unknown}; choose from {methods_for('logits')}")
        return 2
    methods = ["ce", *[m for m in methods if m != "ce"]]  # scratch is every gain's baseline
    given = overrides(args.args)
    start = time.perf_counter()
    tmp = None if args.out else tempfile.TemporaryDirectory(prefix="digits_methods_")
    out = Path(args.out or tmp.name)  # type: ignore[union-attr]
    teacher, t_record = train_teacher(out / "teacher", args.teacher_steps, print)
    teacher_err = 100 - t_record["metrics"]["top1"]
    sections_text = []
    for fraction in args.fractions:
        runs = out / f"fraction-{fraction:g}"
        for method in methods:
            for seed in args.seeds:
                extra = given.get(method, {})
                r = train_student(method, seed, fraction, teacher, runs, args.steps, extra)
                print(f"{fraction:g} {method} s{seed}: error {100 - r['metrics']['top1']:.2f}%")
        n_train = len(digits_data(32, train_fraction=fraction)[0])
        sections_text.append(section_text(runs, fraction, n_train, teacher_err))
        report = args.report.with_name(f"{args.report.stem}-{fraction:g}{args.report.suffix}")
        write_report(load_runs([runs, out / "teacher"]), report, title="methods on digits")
        print(f"wrote {report}")
    wall = time.perf_counter() - start
    title = (
        f"methods on digits: MobileNetV1 0.25 @32 px students of a ResNet-10 @32 px, "
        f"{len(methods)} methods, {len(args.seeds)} seeds {args.seeds}, {args.steps} steps of 64"
    )
    command = "python benchmarks/methods.py " + " ".join(argv or sys.argv[1:])
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n\n".join(
        [
            f"### {title}",
            f"{stamp} · {device_name()} · torch threads {torch.get_num_threads()} · "
            f"`{command.strip()}` · {wall:.0f} s wall; shared settings {COMMON}; "
            f"bench_args: dkd/dist at the papers' CIFAR values, crd nce_k = min(4096, N - 1); --args "
            f"{given or 'none'}",
            *sections_text,
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
