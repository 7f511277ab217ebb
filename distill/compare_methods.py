"""The per-method view of a comparison: for each student network, every method's score over
seeds, its gain over the scratch baseline and over plain KD, and its training speed.

One home for this table: `distill.compare` puts it in report.html (a section with two or more
distilled methods), and `benchmarks/methods.py` writes the same rows to RESULTS.md.
"""

from __future__ import annotations

import html
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill.compare import Cell, Section

BASELINE_METHOD = "kd"  # the method every other one is also compared with


@dataclass(frozen=True)
class MethodRow:
    """One method on one student network; deltas are signed so that > 0 is better."""

    student: str
    method: str
    role: str
    values: tuple[float, ...]
    vs_scratch: float | None
    vs_kd: float | None
    images_per_s: float | None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0


def _label(cell: Cell, section: Section) -> str:
    """The method's name, with T / kd_weight when several cells share that method."""
    f = cell.first
    same = [c for c in section.cells if c.first["method"] == f["method"]]
    if len({(c.first["temperature"], c.first["kd_weight"]) for c in same}) <= 1:
        return str(f["method"])
    extra = [f"T={f['temperature']:g}"] if f["temperature"] is not None else []
    extra += [f"w={f['kd_weight']:g}"] if f["kd_weight"] is not None else []
    return f"{f['method']} ({', '.join(extra)})" if extra else str(f["method"])


def _shape(r: dict[str, object]) -> tuple[object, ...]:
    """Which student network (the same one is trained from scratch and distilled)."""
    return (r["student"], r["alpha"], r["resolution"])


def _gain(section: Section, cell: Cell, other: Cell | None) -> float | None:
    """cell − other in the better direction (> 0: cell is better)."""
    if other is None or other is cell:
        return None
    d = cell.mean - other.mean
    return d if section.higher_is_better else -d


def method_rows(section: Section) -> list[MethodRow]:
    """Scratch then each distilled method, per student network (student, α, resolution),
    best first."""
    out: list[MethodRow] = []
    shapes = list(
        dict.fromkeys(_shape(c.first) for c in section.cells if c.first["role"] != "teacher")
    )
    for shape in shapes:
        cells = [c for c in section.cells if _shape(c.first) == shape]
        scratch = section.scratch_for(cells[0])
        kd = next((c for c in cells if c.first["method"] == BASELINE_METHOD), None)
        distilled = [c for c in cells if c.first["role"] == "distilled"]
        distilled.sort(key=lambda c: -c.mean if section.higher_is_better else c.mean)
        name = f"{shape[0]}" + (f" a{shape[1]:g}" if shape[1] is not None else "")
        name += f" @{shape[2]}" if shape[2] is not None else ""
        for c in ([scratch] if scratch is not None else []) + distilled:
            out.append(
                MethodRow(
                    student=name,
                    method=_label(c, section) if c is not scratch else "ce (scratch)",
                    role=str(c.first["role"]),
                    values=tuple(c.values()),
                    vs_scratch=_gain(section, c, scratch),
                    vs_kd=_gain(section, c, kd),
                    images_per_s=c.mean_of("images_per_s"),
                )
            )
    return out


def _signed(x: float | None) -> str:
    return "–" if x is None else f"{x:+.2f}"


def _speed(x: float | None) -> str:
    return "–" if x is None else f"{x:.0f}"


def markdown_table(rows: Sequence[MethodRow], metric: str, *, as_error: bool = False) -> str:
    """The rows as a Markdown table; `as_error` shows 100 − metric (top-1 → error %), with the
    gains unchanged (a gain is a gain either way)."""
    score = "error % (mean ± std)" if as_error else f"{metric} (mean ± std)"
    lines = [
        f"| student | method | {score} | seeds | gain over scratch | gain over KD | "
        "training img/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mean = 100.0 - r.mean if as_error else r.mean
        lines.append(
            f"| {r.student} | {r.method} | {mean:.2f} ± {r.std:.2f} | {len(r.values)} | "
            f"{_signed(r.vs_scratch)} | {_signed(r.vs_kd)} | {_speed(r.images_per_s)} |"
        )
    return "\n".join(lines)


def _td(x: float | None) -> str:
    if x is None:
        return "<td>–</td>"
    cls = "good" if x > 0 else "bad" if x < 0 else ""
    return f'<td><span class="{cls}">{x:+.2f}</span></td>'


def html_table(section: Section) -> str:
    """The per-method table of a section for report.html ('' with fewer than two distilled
    methods: the teacher/scratch/distilled tables already say it all)."""
    rows = method_rows(section)
    if len({r.method for r in rows if r.role == "distilled"}) < 2:
        return ""
    head = ["student", "method", f"{section.metric} mean ± std", "seeds", "gain over scratch",
            "gain over KD", "training img/s"]  # fmt: skip
    header = "".join(
        f'<th class="l">{h}</th>' if i < 2 else f"<th>{h}</th>" for i, h in enumerate(head)
    )
    body = []
    for r in rows:
        body.append(
            f'<tr class="{html.escape(r.role)}" data-method="{html.escape(r.method)}">'
            f'<td class="l">{html.escape(r.student)}</td><td class="l">{html.escape(r.method)}</td>'
            f"<td>{r.mean:.2f} ± {r.std:.2f}</td><td>{len(r.values)}</td>"
            f"{_td(r.vs_scratch)}{_td(r.vs_kd)}<td>{_speed(r.images_per_s)}</td></tr>"
        )
    note = (
        '<p class="note">Gains are signed so that &gt; 0 is better; "gain over KD" compares '
        "with the plain KD runs of the same student network.</p>"
    )
    return (
        f'<h3>By method</h3>{note}<div class="scroll"><table><tr>{header}</tr>'
        f"{''.join(body)}</table></div>"
    )
