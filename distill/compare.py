"""A self-contained report.html comparing runs from their metrics.json files.

For people without W&B: the accuracy/cost trade-off (the MobileNet paper's Figure 11, accuracy
against mult-adds and against parameters on a log axis), teacher vs scratch vs distilled per
student with the spread over seeds, the paper's ImageNet figures where the runs are comparable,
and every run's raw numbers. Plots are matplotlib PNGs, embedded as data URIs and also written
next to the HTML. Runs that were shipped (`python -m distill export`, which writes export.json
beside metrics.json) also get accuracy against measured CPU latency (ONNX Runtime, batch 1,
one thread), beside accuracy against mult-adds.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

from distill.compare_methods import html_table
from distill.compare_plots import paper_points, plot
from distill.export.record import run_latency_ms
from distill.files import write_text_atomic
from distill.tracking import ROLES, MetricsFileError, read_metrics_json

_SLUG = re.compile(r"[^A-Za-z0-9_.-]+")


# ----------------------------------------------------------------------------- loading


def find_metrics_files(paths: Iterable[str | Path]) -> list[Path]:
    """metrics.json files under `paths` (files, run folders, or folders of many runs)."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            for f in sorted(path.glob("**/metrics.json")):
                found[f.resolve()] = None
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    if not found:
        where = ", ".join(str(p) for p in paths) or "(no paths given)"
        raise FileNotFoundError(
            f"no metrics.json found under {where}; pass run folders written by a recipe "
            "(each holds a metrics.json) or a folder that contains them."
        )
    return list(found)


def load_runs(paths: Iterable[str | Path], *, say: Any = None) -> list[dict[str, Any]]:
    """Validated metrics.json records; each gets `_source` (the file it came from) and
    `_latency_ms` (from an export.json beside it, else None). A run trained without an
    evaluation set has nothing to compare: it is left out, and `say` (default: a warning) says
    so; copies of one run (same configuration and seed) count once, the newest, with a word."""
    tell = say or (lambda msg: warnings.warn(msg, stacklevel=3))
    runs = []
    for f in find_metrics_files(paths):
        try:
            record = read_metrics_json(f)
        except MetricsFileError:
            if _without_metrics(f):
                tell(f"left out {f}: the run has no evaluation metrics (trained without one)")
                continue
            raise
        record["_source"] = str(f)
        record["_latency_ms"] = run_latency_ms(f.parent)  # from its export.json, if any
        runs.append(record)
    return _one_per_seed(runs, tell)


def _without_metrics(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("metrics") == {}


def _one_per_seed(runs: list[dict[str, Any]], tell: Any) -> list[dict[str, Any]]:
    """Copies of a run (a rerun moved aside, a folder copied) would count as extra seeds."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r.get("dataset"), r["primary_metric"], *_cell_key(r), r["seed"])].append(r)
    kept = []
    for copies in groups.values():
        copies.sort(key=lambda r: str(r.get("date") or ""))
        kept.append(copies[-1])
        if len(copies) > 1:
            names = ", ".join(r["_source"] for r in copies)
            tell(f"{len(copies)} runs of one configuration with seed {copies[-1]['seed']} "
                 f"({names}): counted once, the newest ({copies[-1]['_source']})")  # fmt: skip
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(kept, key=lambda r: order[id(r)])


# ----------------------------------------------------------------------------- aggregation


@dataclass
class Cell:
    """Runs that differ only by seed; statistics over seeds."""

    key: tuple
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def first(self) -> dict[str, Any]:
        return self.runs[0]

    def values(self) -> list[float]:
        return [r["metrics"][r["primary_metric"]] for r in self.runs]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values())

    @property
    def std(self) -> float:
        v = self.values()
        return statistics.stdev(v) if len(v) > 1 else 0.0

    def mean_of(self, name: str) -> float | None:
        v = [r[name] for r in self.runs if r.get(name) is not None]
        return statistics.fmean(v) if v else None

    def teacher_metric(self) -> float | None:
        metric = self.first["primary_metric"]
        v = [
            r["teacher_metrics"][metric]
            for r in self.runs
            if r.get("teacher_metrics") and metric in r["teacher_metrics"]
        ]
        return statistics.fmean(v) if v else None


# Runs equal on these fields are seeds of one configuration.
_CELL_FIELDS = ("role", "method", "student", "teacher", "alpha", "resolution", "temperature",
                "kd_weight")  # fmt: skip


def _cell_key(r: dict[str, Any]) -> tuple:
    return tuple(r[name] for name in _CELL_FIELDS)


def _shape(r: dict[str, Any]) -> tuple:
    """Which student network: the same one is trained from scratch and distilled."""
    return (r["student"], r["alpha"], r["resolution"])


def _role_rank(role: str) -> int:
    return ROLES.index(role) if role in ROLES else len(ROLES)


def _cells(runs: Sequence[dict[str, Any]]) -> list[Cell]:
    cells: dict[tuple, Cell] = {}
    for r in runs:
        cells.setdefault(_cell_key(r), Cell(_cell_key(r))).runs.append(r)
    for c in cells.values():
        c.runs.sort(key=lambda r: r["seed"])
    return sorted(
        cells.values(),
        key=lambda c: (
            c.first["student"], -(c.first["alpha"] or 0), -(c.first["resolution"] or 0),
            _role_rank(c.first["role"]), c.first["method"], c.first["temperature"] or 0,
            c.first["kd_weight"] or 0,
        ),
    )  # fmt: skip


@dataclass
class Section:
    """Runs on one dataset scored by one metric: the unit that can share a plot."""

    dataset: str
    metric: str
    higher_is_better: bool
    runs: list[dict[str, Any]]

    @cached_property
    def cells(self) -> list[Cell]:
        return _cells(self.runs)

    @property
    def paper_comparable(self) -> bool:
        return "imagenet" in self.dataset.lower() and self.metric == "top1"

    def teacher_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.first["role"] == "teacher"]

    def teacher_for(self, cell: Cell) -> float | None:
        """The teacher's metric for a cell: the run's own record, else a matching teacher run."""
        own = cell.teacher_metric()
        if own is not None:
            return own
        teachers = self.teacher_cells()
        name = cell.first["teacher"]
        named = [t for t in teachers if name and name in (t.first["teacher"], t.first["student"])]
        if named:
            return named[0].mean
        if len({(t.first["teacher"], t.first["student"]) for t in teachers}) == 1:
            return teachers[0].mean
        return None

    def scratch_for(self, cell: Cell) -> Cell | None:
        """The scratch baseline of the same student network, if it was run."""
        for c in self.cells:
            if c.first["role"] == "scratch" and _shape(c.first) == _shape(cell.first):
                return c
        return None

    def better(self, delta: float) -> bool:
        return delta > 0 if self.higher_is_better else delta < 0


def sections(runs: Sequence[dict[str, Any]]) -> list[Section]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["dataset"] or "unknown dataset", r["primary_metric"])].append(r)
    out = []
    for (dataset, metric), rs in sorted(groups.items()):
        hib = {r["higher_is_better"] for r in rs}
        if len(hib) > 1:
            files = ", ".join(r["_source"] for r in rs if not r["higher_is_better"])
            raise MetricsFileError(
                f"runs on {dataset!r} disagree on higher_is_better for {metric!r} ({files}); "
                "fix field 'higher_is_better' in those files."
            )
        out.append(Section(dataset, metric, hib.pop(), rs))
    return out


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#202124;
 background:#fff;max-width:1400px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:18px 0 6px}
.meta,.note{color:#5f6368;font-size:13px}.note{background:#f8f9fa;border-left:3px solid #bbb;
 padding:6px 10px;margin:8px 0}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots img{width:600px;max-width:100%;
 border:1px solid #e0e0e0}
table{border-collapse:collapse;font-size:12.5px;margin:6px 0 12px}
th,td{border:1px solid #dadce0;padding:3px 7px;text-align:right;white-space:nowrap}
th{background:#f1f3f4}td.l,th.l{text-align:left}
tr.teacher td{background:#f3eef8}tr.scratch td{background:#fdf3ea}
tr.distilled td{background:#eef3fc}
.good{color:#137333;font-weight:600}.bad{color:#c5221f}
.scroll{overflow-x:auto}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def _count(n: float | None) -> str:
    if n is None:
        return "–"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _delta(section: Section, d: float | None) -> str:
    if d is None:
        return "–"
    cls = "good" if section.better(d) else "bad"
    return f'<span class="{cls}">{d:+.2f}</span>'


def _slug(text: str) -> str:
    return _SLUG.sub("_", text).strip("_") or "x"


def _cell_table(section: Section, student: str) -> str:
    cells = [c for c in section.cells if c.first["student"] == student]
    names = {c.first["teacher"] for c in cells if c.first["teacher"]}
    all_teachers = section.teacher_cells()
    matched = [t for t in all_teachers if names & {t.first["teacher"], t.first["student"]}]
    teachers = matched or all_teachers
    cells = [c for c in cells if c.first["role"] != "teacher"]
    paper = {(p.alpha, p.resolution): p.top1 for p in paper_points()}
    paper = paper if section.paper_comparable else {}
    head = ["role", "method", "α", "resolution", "T", "kd_weight", f"{section.metric} mean ± std",
            "seeds", "Δ vs teacher", "Δ vs scratch", "mult-adds", "params", "training img/s"]  # fmt: skip
    if paper:
        head.append("paper top-1")
    rows = []
    for c in [*teachers, *cells]:
        f = c.first
        teacher = None if f["role"] == "teacher" else section.teacher_for(c)
        scratch = section.scratch_for(c) if f["role"] == "distilled" else None
        cols = [
            f'<td class="l">{_e(f["role"])}</td>',
            f'<td class="l">{_e(f["method"])}</td>',
            f"<td>{_e(_num(f['alpha'], 'g'))}</td>",
            f"<td>{_e(_num(f['resolution'], 'd'))}</td>",
            f"<td>{_e(_num(f['temperature'], 'g'))}</td>",
            f"<td>{_e(_num(f['kd_weight'], 'g'))}</td>",
            f"<td>{c.mean:.2f}{f' ± {c.std:.2f}' if len(c.runs) > 1 else ''}</td>",
            f"<td>{len(c.runs)} ({_e(','.join(str(r['seed']) for r in c.runs))})</td>",
            f"<td>{_delta(section, None if teacher is None else c.mean - teacher)}</td>",
            f"<td>{_delta(section, None if scratch is None else c.mean - scratch.mean)}</td>",
            f"<td>{_e(_count(c.mean_of('mult_adds')))}</td>",
            f"<td>{_e(_count(c.mean_of('params')))}</td>",
            f"<td>{_e(_num(c.mean_of('images_per_s'), '.0f'))}</td>",
        ]
        if paper:
            cols.append(f"<td>{_e(_num(paper.get((f['alpha'], f['resolution'])), '.1f'))}</td>")
        label = f"{f['role']} {f['method']} {student} a{_num(f['alpha'], 'g')} r{f['resolution']}"
        rows.append(f'<tr class="{_e(f["role"])}" data-cell="{_e(label)}">{"".join(cols)}</tr>')
    header = "".join(
        f'<th class="l">{_e(h)}</th>' if i < 2 else f"<th>{_e(h)}</th>" for i, h in enumerate(head)
    )
    return f'<div class="scroll"><table><tr>{header}</tr>{"".join(rows)}</table></div>'


def _verdict(section: Section) -> str:
    pairs = []
    for c in section.cells:
        if c.first["role"] == "distilled":
            s = section.scratch_for(c)
            if s is not None:
                pairs.append(c.mean - s.mean)
    if not pairs:
        return "No distilled run has a scratch run of the same student, α and resolution."
    wins = sum(section.better(d) for d in pairs)
    return (
        f"Distilled beats scratch in {wins} of {len(pairs)} student configurations "
        f"(mean Δ {statistics.fmean(pairs):+.2f} {_e(section.metric)}, "
        f"{'higher' if section.higher_is_better else 'lower'} is better)."
    )


def _metric_list(values: dict[str, float] | None) -> str:
    return "; ".join(f"{k}={v:.4g}" for k, v in (values or {}).items()) or "–"


# (header, value of a run) for the raw runs table.
_RAW_COLUMNS: tuple[tuple[str, Any], ...] = (
    ("run", lambda r: r["run_name"]),
    ("experiment", lambda r: r["experiment"] or "–"),
    ("role", lambda r: r["role"]),
    ("method", lambda r: r["method"]),
    ("dataset", lambda r: r["dataset"] or "–"),
    ("student", lambda r: r["student"]),
    ("teacher", lambda r: r["teacher"] or "–"),
    ("α", lambda r: _num(r["alpha"], "g")),
    ("res", lambda r: _num(r["resolution"], "d")),
    ("T", lambda r: _num(r["temperature"], "g")),
    ("kd_w", lambda r: _num(r["kd_weight"], "g")),
    ("seed", lambda r: r["seed"]),
    ("primary", lambda r: f"{r['primary_metric']}={r['metrics'][r['primary_metric']]:.2f}"),
    ("metrics", lambda r: _metric_list(r["metrics"])),
    ("teacher metrics", lambda r: _metric_list(r["teacher_metrics"])),
    ("mult-adds", lambda r: _count(r["mult_adds"])),
    ("params", lambda r: _count(r["params"])),
    ("training img/s", lambda r: _num(r["images_per_s"], ".0f")),
    ("peak mem", lambda r: _count(r["peak_mem_bytes"])),
    ("steps", lambda r: _num(r["steps"], "d")),
    ("epochs", lambda r: _num(r["epochs"], "g")),
    ("wall s", lambda r: _num(r["wall_s"], ".1f")),
    ("device", lambda r: r["device"] or "–"),
    ("date", lambda r: r["date"] or "–"),
)


def _raw_table(runs: Sequence[dict[str, Any]], base: Path) -> str:
    rows = []
    for r in sorted(runs, key=lambda r: (r["dataset"] or "", _role_rank(r["role"]), r["run_name"])):
        src = Path(r["_source"])
        shown = src.relative_to(base) if src.is_relative_to(base) else src
        tds = "".join(f'<td class="l">{_e(get(r))}</td>' for _, get in _RAW_COLUMNS)
        tds += f'<td class="l">{_e(shown)}</td>'
        rows.append(f'<tr class="{_e(r["role"])}" data-run="{_e(r["run_name"])}">{tds}</tr>')
    header = "".join(f'<th class="l">{_e(h)}</th>' for h, _ in _RAW_COLUMNS)
    header += '<th class="l">file</th>'
    return f'<div class="scroll"><table id="runs"><tr>{header}</tr>{"".join(rows)}</table></div>'


def _section_html(section: Section, index: int, out: Path) -> str:
    """One dataset/metric: verdict, the two trade-off plots (PNGs written next to `out`),
    the paper note and a teacher/scratch/distilled table per student."""
    sid = f"{_slug(section.dataset)}-{_slug(section.metric)}"
    parts = [
        f'<h2 id="s{index}">{_e(section.dataset)} · {_e(section.metric)}</h2>',
        f'<p class="verdict">{_verdict(section)}</p><div class="plots">',
    ]
    axes = [("mult_adds", "mult-adds"), ("params", "parameters")]
    if any(r.get("_latency_ms") for r in section.runs):
        axes.insert(1, ("_latency_ms", "CPU latency"))
    for x_field, label in axes:
        png = plot(section, x_field, label)
        name = f"{out.stem}-{sid}-{x_field.strip('_')}.png"
        (out.parent / name).write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        alt = f"{section.metric} vs {label} on {section.dataset}"
        parts.append(f'<img alt="{_e(alt)}" data-file="{_e(name)}" '
                     f'src="data:image/png;base64,{data}">')  # fmt: skip
    parts.append("</div>")
    unprofiled = [r["run_name"] for r in section.runs if not r["mult_adds"] or not r["params"]]
    if unprofiled:
        parts.append(
            f'<p class="note">Left off the plots (no mult_adds/params recorded): '
            f"{_e(', '.join(unprofiled))}.</p>"
        )
    if len(axes) == 3:
        shipped = sum(1 for r in section.runs if r.get("_latency_ms"))
        left = len(section.runs) - shipped
        parts.append(
            f'<p class="note">CPU latency: ONNX Runtime fp32, batch 1, one thread, median, from '
            f"the export.json of the {shipped} exported runs (`python -m distill export`); "
            f"{left} run{'' if left == 1 else 's'} without one left off that plot.</p>"
        )
    if section.paper_comparable:
        parts.append(
            '<p class="note">Grey crosses: MobileNet ImageNet top-1 from Howard et al. 2017 '
            "(Tables 6, 7 and 9): e.g. 1.0/0.75/0.5/0.25 MobileNet-224 = 70.6/68.4/63.7/50.6% "
            "at 569/325/149/41M mult-adds.</p>"
        )
    else:
        parts.append(
            '<p class="note">The paper\'s reference points (Howard et al. 2017, ImageNet '
            f"top-1) are not shown: these runs are on {_e(section.dataset)} scored by "
            f"{_e(section.metric)}, which is not comparable.</p>"
        )
    parts.append(html_table(section))  # by method, when two or more were distilled
    students = sorted({c.first["student"] for c in section.cells if c.first["role"] != "teacher"})
    for student in students or [""]:
        heading = "Teacher vs scratch vs distilled" + (f": {student}" if student else "")
        parts.append(f"<h3>{_e(heading)}</h3>{_cell_table(section, student)}")
    return "\n".join(parts)


def write_report(
    runs: Sequence[dict[str, Any]],
    output: str | Path = "report.html",
    *,
    title: str = "mobiledistill: runs compared",
) -> Path:
    """Write report.html (and its PNGs next to it); return the HTML path."""
    if not runs:
        raise ValueError("no runs to compare")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">{len(runs)} runs · generated {_e(now)} · trade-off plots after '
        "Howard et al. 2017, Figure 11 (accuracy vs mult-adds and vs parameters, log scale) · "
        "Δ in green when better, red when worse.</p>",
        *(_section_html(section, i, out) for i, section in enumerate(sections(runs))),
        "<h2>All runs</h2>",
        _raw_table(runs, out.parent.resolve()),
        "</body></html>",
    ]
    return write_text_atomic(out, "\n".join(parts))
