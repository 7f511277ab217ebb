"""A W&B Report comparing distillation runs, built in code with `wandb-workspaces`.

The report reads the schema `distill.tracking` logs: config `alpha`, `resolution`,
`temperature`, `kd_weight`, `method`, ...; summary `mult_adds`, `params`, `eval/<metric>`,
`teacher/<metric>`, `gap_to_teacher/<metric>`; history `train/loss`, `eval/<metric>`; W&B group =
experiment, job type = role. Its panels:

- accuracy vs mult-adds and vs parameters, log x (Howard et al. 2017, Figure 11), one run set
  per role (teacher / scratch / distilled);
- parallel coordinates: alpha, resolution, temperature, kd_weight -> metric;
- by method: the metric, the gap to the teacher and training images/s of each method (bars,
  mean ± std over seeds, distilled runs only);
- learning curves grouped by method, mean and standard deviation over seeds;
- the runs table.

Building is offline: `Report`, `PanelGrid`, `Runset` and panels are plain objects until
`report.save()`, which needs network access and a W&B API key (`wandb login` or
`WANDB_API_KEY`). Two things in wandb-workspaces would reach the network earlier, and are
avoided here: `Report(entity=...)` left out defaults to the API's default entity, and a
`Runset`'s project id is looked up when the report is serialised (inside `save()`).
"""

from __future__ import annotations

from typing import Any

from distill.tracking import (
    EVAL_PREFIX,
    GAP_PREFIX,
    ROLES,
    SUMMARY_IMAGES_PER_S,
    SUMMARY_MULT_ADDS,
    SUMMARY_PARAMS,
    SUMMARY_PEAK_MEM,
    TEACHER_PREFIX,
    TRAIN_PREFIX,
)

HYPERPARAMETERS = ("alpha", "resolution", "temperature", "kd_weight")
CITATION = (
    "Howard et al., *MobileNets: Efficient Convolutional Neural Networks for Mobile Vision "
    "Applications*, arXiv:1704.04861, 2017"
)
MAX_TITLE = 128  # wandb-workspaces' limit


def _filters(group: str | None, role: str | None = None) -> list[Any]:
    from wandb_workspaces import expr

    out = []
    if group:
        out.append(expr.Metric("Group") == group)
    if role:
        out.append(expr.Metric("JobType") == role)
    return out


def _runset(entity: str, project: str, name: str, group: str | None, role: str | None = None):
    import wandb_workspaces.reports.v2 as wr

    return wr.Runset(entity=entity, project=project, name=name, filters=_filters(group, role))


def runs_table_columns(metric: str = "top1") -> list[str]:
    """Runs-table columns, in wandb-workspaces' `section:name` accessor format."""
    config = ["role", "method", "student", "teacher", "dataset", *HYPERPARAMETERS, "seed"]
    summary = [
        EVAL_PREFIX + metric,
        TEACHER_PREFIX + metric,
        GAP_PREFIX + metric,
        SUMMARY_MULT_ADDS,
        SUMMARY_PARAMS,
        SUMMARY_IMAGES_PER_S,
        SUMMARY_PEAK_MEM,
    ]
    return (
        ["run:displayName"]
        + [f"config:{c}.value" for c in config]
        + [f"summary:{s}" for s in summary]
    )


def _scatter(wr: Any, title: str, x: str, y: str, at: tuple[int, int]) -> Any:
    return wr.ScatterPlot(
        title=title,
        x=wr.SummaryMetric(x),
        y=wr.SummaryMetric(y),
        log_x=True,
        layout=wr.Layout(x=at[0], y=at[1], w=12, h=8),
    )


def _tradeoff_panels(wr: Any, entity: str, project: str, group: str | None, metric: str) -> Any:
    """Accuracy and gap to teacher against mult-adds and parameters (log x), one run set a role."""
    y = EVAL_PREFIX + metric
    return wr.PanelGrid(
        runsets=[_runset(entity, project, role, group, role) for role in ROLES],
        panels=[
            _scatter(wr, f"{metric} vs mult-adds (log)", SUMMARY_MULT_ADDS, y, (0, 0)),
            _scatter(wr, f"{metric} vs parameters (log)", SUMMARY_PARAMS, y, (12, 0)),
            _scatter(
                wr,
                f"gap to teacher ({metric}) vs mult-adds (log)",
                SUMMARY_MULT_ADDS,
                GAP_PREFIX + metric,
                (0, 8),
            ),
        ],
    )


def _hyper_panels(wr: Any, entity: str, project: str, group: str | None, metric: str) -> Any:
    """Parallel coordinates: width, resolution, temperature, KD weight -> the metric."""
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(h)) for h in HYPERPARAMETERS]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(EVAL_PREFIX + metric)))
    return wr.PanelGrid(
        runsets=[_runset(entity, project, "all runs", group)],
        panels=[
            wr.ParallelCoordinatesPlot(
                title=f"alpha, resolution, T, kd_weight -> {metric}",
                columns=columns,
                layout=wr.Layout(x=0, y=0, w=24, h=9),
            )
        ],
    )


def _bars(wr: Any, title: str, y: str, at: tuple[int, int]) -> Any:
    return wr.BarPlot(
        title=title,
        metrics=[wr.SummaryMetric(y)],
        groupby=wr.Config("method"),
        groupby_aggfunc="mean",
        groupby_rangefunc="stddev",
        layout=wr.Layout(x=at[0], y=at[1], w=8, h=8),
    )


def _method_panels(wr: Any, entity: str, project: str, group: str | None, metric: str) -> Any:
    """One bar per method (distilled runs): the metric, the gap to the teacher, training
    images/s, each the mean ± std over seeds."""
    return wr.PanelGrid(
        runsets=[_runset(entity, project, "distilled", group, "distilled")],
        panels=[
            _bars(wr, f"{metric} by method (mean ± std)", EVAL_PREFIX + metric, (0, 0)),
            _bars(wr, f"gap to teacher ({metric}) by method", GAP_PREFIX + metric, (8, 0)),
            _bars(wr, "training images/s by method", SUMMARY_IMAGES_PER_S, (16, 0)),
        ],
    )


def _curve(wr: Any, title: str, y: str, x: int, log_y: bool = False) -> Any:
    return wr.LinePlot(
        title=title,
        x="Step",
        y=[y],
        groupby=wr.Config("method"),
        groupby_aggfunc="mean",
        groupby_rangefunc="stddev",
        log_y=log_y,
        layout=wr.Layout(x=x, y=0, w=12, h=8),
    )


def _curve_panels(wr: Any, entity: str, project: str, group: str | None, metric: str) -> Any:
    """Learning curves grouped by method, mean ± std over seeds."""
    return wr.PanelGrid(
        runsets=[_runset(entity, project, "all runs", group)],
        panels=[
            _curve(wr, f"eval {metric} by method (mean ± std over seeds)", EVAL_PREFIX + metric, 0),
            _curve(
                wr,
                "training loss by method (mean ± std over seeds)",
                TRAIN_PREFIX + "loss",
                12,
                log_y=True,
            ),
        ],
    )


def _runs_table(wr: Any, entity: str, project: str, group: str | None, metric: str) -> Any:
    columns = runs_table_columns(metric)
    table_set = wr.Runset(
        entity=entity,
        project=project,
        name="runs",
        filters=_filters(group),
        pinned_columns=columns[:1],
        visible_columns=columns[1:],
        column_order=columns,
    )
    return wr.PanelGrid(runsets=[table_set], panels=[])


def build_report(
    entity: str,
    project: str,
    *,
    group: str | None = None,
    title: str | None = None,
    metric: str = "top1",
    description: str | None = None,
):
    """A `wandb_workspaces.reports.v2.Report` for `entity/project` (optionally one W&B group).

    Nothing is sent: call `.save()` on the result to publish it (needs network + API key).
    """
    import wandb_workspaces.reports.v2 as wr

    if not entity or not project:
        raise ValueError(
            "a W&B report needs --entity and --project (the entity is not looked up, so "
            "building stays offline); set WANDB_ENTITY or pass --entity."
        )
    title = title or f"Distillation: {group or project}"
    if len(title) > MAX_TITLE:
        raise ValueError(f"report title is {len(title)} characters; W&B allows {MAX_TITLE}.")
    scope = f"group `{group}`" if group else "all runs"
    intro = (
        f"Runs of `{entity}/{project}` ({scope}). Which student, at what width (alpha) and "
        f"input resolution, trained how, is worth its `{metric}`? Accuracy against mult-adds and "
        f"parameters follows Figure 11 of {CITATION}. Roles are W&B job types: "
        "teacher, scratch (the student trained on labels alone), distilled."
    )
    where = (wr, entity, project, group, metric)
    return wr.Report(
        entity=entity,
        project=project,
        title=title,
        description=description or f"{metric}: teacher vs scratch vs distilled, by cost",
        width="fluid",
        blocks=[
            wr.MarkdownBlock(text=intro),
            wr.H2(text="Accuracy vs cost"),
            _tradeoff_panels(*where),
            wr.H2(text="By method"),
            _method_panels(*where),
            wr.H2(text="Hyper-parameters"),
            _hyper_panels(*where),
            wr.H2(text="Learning curves"),
            _curve_panels(*where),
            wr.H2(text="Runs"),
            _runs_table(*where),
        ],
    )


def describe(report: Any) -> str:
    """A plain-text outline of a built report (blocks, panels, axes, run-set filters)."""
    lines = [f"report {report.title!r} for {report.entity}/{report.project}"]
    for block in report.blocks:
        kind = type(block).__name__
        if kind == "PanelGrid":
            for rs in block.runsets:
                lines.append(
                    f"  runset {rs.name!r}: {rs.entity}/{rs.project} [{rs.filters or 'all'}]"
                )
            for p in block.panels:
                axes = {k: getattr(p, k, None) for k in ("x", "y", "log_x", "groupby")}
                axes["columns"] = [c.metric for c in getattr(p, "columns", [])] or None
                shown = ", ".join(f"{k}={v}" for k, v in axes.items() if v not in (None, []))
                lines.append(f"    {type(p).__name__} {getattr(p, 'title', '')!r} {shown}")
        else:
            text = getattr(block, "text", "")
            lines.append(f"  {kind}: {str(text)[:70]}")
    return "\n".join(lines)
