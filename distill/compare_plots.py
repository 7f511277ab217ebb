"""The plots of the comparison report: accuracy against mult-adds and against parameters (log
x), after Howard et al. 2017, Figure 11, and against measured CPU latency for exported runs.
One line per student, role, method and width across resolutions, seed spread as error bars,
the teacher as a star (or dashed lines), and the paper's ImageNet points as grey crosses where
the runs are comparable (cost axes only: the paper measured no latency on our CPU)."""

from __future__ import annotations

import io
from collections import defaultdict
from typing import TYPE_CHECKING, Any, NamedTuple

from distill.run_record import ROLES

if TYPE_CHECKING:
    from distill.compare import Cell, Section

__all__ = ["PAPER_COLOR", "ROLE_COLORS", "PaperPoint", "paper_points", "plot"]

ROLE_COLORS = {"teacher": "#6a3d9a", "scratch": "#e8710a", "distilled": "#1967d2"}
PAPER_COLOR = "#7f7f7f"
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h")


class PaperPoint(NamedTuple):
    alpha: float
    resolution: int
    top1: float
    mult_adds_m: float
    params_m: float


def paper_points() -> list[PaperPoint]:
    """The MobileNet grid's ImageNet top-1 (Howard et al. 2017, Tables 6, 7 and 9)."""
    from distill import paper

    points = {}
    for row in (*paper.TABLE6, *paper.TABLE7, *paper.TABLE9):
        if row.variant == "standard" and row.alpha and row.resolution and row.top1 is not None:
            points[(row.alpha, row.resolution)] = PaperPoint(
                row.alpha, row.resolution, row.top1, row.mult_adds_m, row.params_m
            )
    return list(points.values())


def _series(section: Section) -> dict[tuple, list[Cell]]:
    """Cells joined by one line: the same student, role, method and alpha across resolutions."""
    out: dict[tuple, list[Cell]] = defaultdict(list)
    for c in section.cells:
        f = c.first
        key = (f["role"], f["method"], f["student"], f["teacher"], f["alpha"])
        out[(*key, f["temperature"], f["kd_weight"])].append(c)
    return out


def _style(role: str, method: str, methods: list[str]) -> dict[str, Any]:
    marker = "*" if role == "teacher" else "o"
    if role == "distilled":
        marker = _MARKERS[methods.index(method) % len(_MARKERS)]
    return {"color": ROLE_COLORS.get(role, "#444444"), "marker": marker}


# x axes other than counts in millions: (scale, unit in the axis label)
_X_UNITS = {"_latency_ms": (1.0, "ms, ONNX Runtime fp32, batch 1, 1 thread, log scale")}


def plot(section: Section, x_field: str, x_label: str) -> bytes:
    """Metric against mult-adds or params (millions, log x), or latency (ms); one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(6.4, 4.4), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale, unit = _X_UNITS.get(x_field, (1e6, "millions, log scale"))
    methods = sorted({c.first["method"] for c in section.cells if c.first["role"] == "distilled"})
    for (role, method, _, _, alpha, *_), cells in _series(section).items():
        style = _style(role, method, methods)
        cells = [c for c in cells if c.mean_of(x_field)]  # unprofiled runs have no x
        if not cells:
            continue
        cells.sort(key=lambda c: (c.mean_of(x_field) or 0.0, c.first["resolution"] or 0))
        xs = [(c.mean_of(x_field) or 0.0) / scale for c in cells]
        ys = [c.mean for c in cells]
        errs = [c.std for c in cells]
        ax.errorbar(
            xs, ys, yerr=errs if any(errs) else None, **style, alpha=0.9, capsize=2,
            markersize=11 if role == "teacher" else 6, linewidth=1.2,
            linestyle="-" if len(cells) > 1 else "none",
        )  # fmt: skip
        if alpha is not None and role != "teacher":
            ax.annotate(
                f"α={alpha:g}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 3),
                fontsize=7, color=style["color"],
            )  # fmt: skip

    # on the latency axis, a role none of whose runs was exported is not drawn (the teacher's
    # score then shows as the dashed line below)
    present = {
        c.first["role"] for c in section.cells if x_field not in _X_UNITS or c.mean_of(x_field)
    }
    handles = []
    for role in (r for r in ROLES if r in present):
        for m in methods if role == "distilled" else [""]:
            label = f"distilled ({m})" if m else role
            handles.append(Line2D([], [], **_style(role, m, methods), label=label))
    if "teacher" not in present:  # only the students' records know the teacher's score
        for value in sorted(
            {v for c in section.cells if (v := section.teacher_for(c)) is not None}
        ):
            ax.axhline(value, color=ROLE_COLORS["teacher"], linestyle="--", linewidth=1)
            label = "teacher (runs' teacher_metrics)"
            if not any(h.get_label() == label for h in handles):
                handles.append(Line2D([], [], color=ROLE_COLORS["teacher"], ls="--", label=label))
    if section.paper_comparable and x_field in ("mult_adds", "params"):
        pts = paper_points()
        px = [(p.mult_adds_m if x_field == "mult_adds" else p.params_m) for p in pts]
        ax.scatter(px, [p.top1 for p in pts], marker="x", color=PAPER_COLOR, zorder=3)
        for p, x in zip(pts, px):
            ax.annotate(
                f"{p.alpha:g}-{p.resolution}", (x, p.top1), textcoords="offset points", xytext=(4, -8),
                fontsize=6, color=PAPER_COLOR,
            )  # fmt: skip
        label = "Howard et al. 2017, ImageNet"
        handles.append(Line2D([], [], color=PAPER_COLOR, marker="x", ls="none", label=label))
    ax.set_xscale("log")
    ax.set_xlabel(f"{x_label} ({unit})")
    better = "higher is better" if section.higher_is_better else "lower is better"
    ax.set_ylabel(f"{section.metric} ({better})")
    ax.set_title(f"{section.metric} vs {x_label} — {section.dataset}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
