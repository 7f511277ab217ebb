"""`python -m distill table`: the 16-model alpha x resolution grid next to the paper's figures.

Each model is built on the meta device (no weights are allocated) and counted with
FlopCounterMode at batch 1, so the whole grid takes a second on a CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from distill.models import mobilenet_v1
from distill.paper import ALPHAS, ARXIV, RESOLUTIONS, ModelFigure, grid_figure
from distill.profiling import Profile, profile

MULT_ADDS_TOLERANCE = 0.01  # relative, as in the tests
PARAMS_TOLERANCE_M = 0.05  # absolute: the paper rounds parameters to 0.1M (0.01M in Table 9)


@dataclass(frozen=True)
class GridRow:
    alpha: float
    resolution: int
    ours: Profile
    paper: ModelFigure | None

    @property
    def name(self) -> str:
        return f"{self.alpha} MobileNet-{self.resolution}"  # "1.0", "0.75" as in the paper

    @property
    def mult_adds_dev(self) -> float | None:
        """Relative deviation of our mult-adds from the paper's (0.01 = 1%)."""
        return None if self.paper is None else self.ours.mult_adds_m / self.paper.mult_adds_m - 1

    @property
    def params_dev(self) -> float | None:
        return None if self.paper is None else self.ours.params_m / self.paper.params_m - 1

    @property
    def within_tolerance(self) -> bool:
        if self.paper is None or self.mult_adds_dev is None:
            return True
        return (
            abs(self.mult_adds_dev) <= MULT_ADDS_TOLERANCE
            and abs(self.ours.params_m - self.paper.params_m) <= PARAMS_TOLERANCE_M
        )


def grid_rows(num_classes: int = 1000) -> list[GridRow]:
    """Profile the 16 standard MobileNets of the paper's Figures 4/5 grid."""
    rows = []
    for alpha in ALPHAS:
        for resolution in RESOLUTIONS:
            with torch.device("meta"):
                model = mobilenet_v1(alpha=alpha, resolution=resolution, num_classes=num_classes)
            rows.append(
                GridRow(
                    alpha, resolution, profile(model, resolution), grid_figure(alpha, resolution)
                )
            )
    return rows


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.2f}%"


def format_table(rows: list[GridRow], num_classes: int = 1000, markdown: bool = False) -> str:
    header = (
        "model",
        "mult-adds (M)",
        "paper",
        "dev",
        "params (M)",
        "paper",
        "dev",
        "top-1 (paper)",
        "table",
    )
    body = []
    for r in rows:
        p = r.paper
        body.append(
            (
                r.name,
                f"{r.ours.mult_adds_m:.1f}",
                "-" if p is None else f"{p.mult_adds_m:g}",
                _pct(r.mult_adds_dev),
                f"{r.ours.params_m:.2f}",
                "-" if p is None else f"{p.params_m:g}",
                _pct(r.params_dev),
                "-" if p is None or p.top1 is None else f"{p.top1:g}%",
                "" if p is None else str(p.table),
            )
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
    else:
        widths = [max(len(row[i]) for row in (header, *body)) for i in range(len(header))]

        def fmt(row: tuple[str, ...]) -> str:
            cells = (
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            )
            return "  ".join(cells).rstrip()

        lines = [fmt(header), fmt(tuple("-" * w for w in widths)), *map(fmt, body)]
    notes = [
        "",
        f"Ours: distill.models.mobilenet_v1 with {num_classes} classes, counted by FlopCounterMode "
        "at batch 1 (mult-adds = FLOPs / 2).",
        f"Paper: Howard et al. 2017, MobileNets, arXiv:{ARXIV}, Tables 6, 7 and 9; dev = ours/paper - 1.",
        "The paper rounds parameters to 0.1M, so a few % params deviation (0.47M vs 0.5M) is",
        f"rounding; the tests allow {MULT_ADDS_TOLERANCE:.0%} on mult-adds and "
        f"{PARAMS_TOLERANCE_M}M on params.",
    ]
    return "\n".join(lines + notes)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distill table",
        description="Mult-adds and params of the 16 MobileNets (alpha x resolution) vs. the paper.",
    )
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument(
        "--check",
        action="store_true",
        help="exit with status 1 if a figure deviates beyond the tolerances",
    )
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    rows = grid_rows(args.num_classes)
    print(format_table(rows, args.num_classes, markdown=args.markdown))
    bad = [r.name for r in rows if not r.within_tolerance]
    if args.check and bad:
        print(f"\nbeyond tolerance: {', '.join(bad)}")
        return 1
    return 0
