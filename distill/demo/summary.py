"""Tables of the demo and benchmark: error over seeds, agreement, costs, KD's gain."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from distill.demo.train import STUDENT_NAME, TEACHER_NAME, RunResult

if TYPE_CHECKING:
    from distill.demo.study import StudyResult


@dataclass
class Row:
    """One table row: a model (teacher, or a student config in one role) over its seeds."""

    model: str
    role: str
    alpha: float | None
    resolution: int | None
    errors: list[float]
    agreements: list[float]
    mult_adds: int | None
    params: int | None
    images_per_s: float | None

    @property
    def seeds(self) -> int:
        return len(self.errors)

    @property
    def error_mean(self) -> float:
        return statistics.fmean(self.errors)

    @property
    def error_std(self) -> float:
        return statistics.stdev(self.errors) if len(self.errors) > 1 else 0.0


def rows(result: StudyResult) -> list[Row]:
    t = result.teacher
    out = [
        Row(
            TEACHER_NAME,
            "teacher",
            None,
            t.info.resolution,
            [t.error],
            [],
            t.record.get("mult_adds"),
            t.record.get("params"),
            t.infer_images_per_s,
        )
    ]
    groups: dict[tuple[float | None, int | None, str], list[RunResult]] = {}
    for r in result.students:
        groups.setdefault((r.info.alpha, r.info.resolution, r.info.role), []).append(r)
    for (alpha, res, role), rs in groups.items():
        out.append(
            Row(
                f"{STUDENT_NAME} a{alpha:g}",
                role,
                alpha,
                res,
                [r.error for r in rs],
                [r.agreement for r in rs if r.agreement is not None],
                rs[0].record.get("mult_adds"),
                rs[0].record.get("params"),
                rs[0].infer_images_per_s,
            )
        )
    return out


@dataclass
class Gain:
    alpha: float | None
    resolution: int | None
    scratch: float  # mean error, %
    distilled: float

    @property
    def points(self) -> float:
        """Error-rate points KD removes (positive: distilled is better)."""
        return self.scratch - self.distilled


def gains(table: Sequence[Row]) -> list[Gain]:
    by = {(r.alpha, r.resolution, r.role): r for r in table}
    return [
        Gain(a, res, by[(a, res, "scratch")].error_mean, r.error_mean)
        for (a, res, role), r in by.items()
        if role == "distilled" and (a, res, "scratch") in by
    ]


def format_count(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def format_table(table: Sequence[Row]) -> str:
    """A Markdown table: error mean ± std over seeds, agreement, costs, throughput."""
    head = (
        "| model | role | resolution | error % (mean ± std) | seeds | agrees with teacher % "
        "| mult-adds | params | inference images/s (batch 256) |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in table:
        agree = (
            f"{statistics.fmean(r.agreements):.1f}" if r.agreements else "-"
        )  # fmt: skip
        speed = "-" if r.images_per_s is None else f"{r.images_per_s:,.0f}"
        lines.append(
            f"| {r.model} | {r.role} | {r.resolution or '-'} | "
            f"{r.error_mean:.2f} ± {r.error_std:.2f} | {r.seeds} | {agree} | "
            f"{format_count(r.mult_adds)} | {format_count(r.params)} | {speed} |"
        )
    return "\n".join(lines)


def paired_wins(students: Sequence[RunResult]) -> tuple[int, int]:
    """(pairs where the distilled student beats the scratch one, pairs): a pair is the same
    alpha, resolution and seed, hence the same initial weights and batch order."""
    by = {(r.info.alpha, r.info.resolution, r.info.seed, r.info.role): r for r in students}
    pairs = [
        (by[(a, res, seed, "scratch")], r)
        for (a, res, seed, role), r in by.items()
        if role == "distilled" and (a, res, seed, "scratch") in by
    ]
    return sum(d.error < s.error for s, d in pairs), len(pairs)


def format_gains(table: Sequence[Row]) -> str:
    g = gains(table)
    if not g:
        return "no student was trained both ways"
    avg = statistics.fmean(x.points for x in g)
    wins = sum(x.points > 0 for x in g)
    return (
        f"average gain from KD: {avg:+.2f} error points over {len(g)} student "
        f"configurations (distilled better in {wins} of {len(g)}): scratch "
        f"{statistics.fmean(x.scratch for x in g):.2f}% -> distilled "
        f"{statistics.fmean(x.distilled for x in g):.2f}%"
    )


def summary_dict(result: StudyResult) -> dict[str, Any]:
    table = rows(result)
    cfg = asdict(result.config)
    return {
        "config": cfg,
        "wall_s": result.wall_s,
        "rows": [
            {**asdict(r), "error_mean": r.error_mean, "error_std": r.error_std} for r in table
        ],
        "gains": [{**asdict(g), "points": g.points} for g in gains(table)],
        "runs": [r.record.get("run_name") for r in [result.teacher, *result.students]],
    }
