"""`python -m distill report`: the W&B Report is built offline and has the intended panels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

wr = pytest.importorskip("wandb_workspaces.reports.v2")
from wandb_workspaces import expr  # noqa: E402

from distill.cli.report import main as report_main  # noqa: E402
from distill.report import HYPERPARAMETERS, build_report, runs_table_columns  # noqa: E402
from distill.tracking import ROLES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any W&B API or GraphQL call while building fails the test."""
    from wandb_workspaces.reports.v2 import interface

    def refuse(*args, **kwargs):
        raise AssertionError("building the report must not touch the W&B API")

    monkeypatch.setattr(interface, "_get_api", refuse)
    monkeypatch.setattr(interface, "execute_graphql", refuse)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def _leaves(filters: str) -> dict[str, object]:
    """{backend key name: value} of an AND-only filter string."""
    tree = expr.expr_to_filters(filters)
    leaves = tree.filters if tree.op == "AND" else [tree]
    assert all(f.op == "=" and f.key.section == "run" for f in leaves or [])
    return {f.key.name: f.value for f in leaves or []}


def _grids(report) -> list:
    return [b for b in report.blocks if isinstance(b, wr.PanelGrid)]


def test_report_blocks_panels_and_axes() -> None:
    report = build_report("my-team", "mobiledistill", group="digits-ab", title="KD on digits")
    assert (report.entity, report.project, report.title) == (
        "my-team",
        "mobiledistill",
        "KD on digits",
    )
    kinds = [type(b).__name__ for b in report.blocks]
    assert kinds == ["MarkdownBlock"] + ["H2", "PanelGrid"] * 5
    tradeoff, by_method, hyper, curves, runs = _grids(report)

    # Figure 11: metric vs mult-adds and vs params, log x, from the run summaries
    scatter = [p for p in tradeoff.panels if isinstance(p, wr.ScatterPlot)]
    axes = [(p.x, p.y, p.log_x) for p in scatter]
    assert (wr.SummaryMetric("mult_adds"), wr.SummaryMetric("eval/top1"), True) in axes
    assert (wr.SummaryMetric("params"), wr.SummaryMetric("eval/top1"), True) in axes
    assert (wr.SummaryMetric("mult_adds"), wr.SummaryMetric("gap_to_teacher/top1"), True) in axes
    spec = scatter[0]._to_model().model_dump(by_alias=True, exclude_none=True)["config"]
    assert (spec["xAxis"], spec["yAxis"]) == ("summary:mult_adds", "summary:eval/top1")
    assert spec["xAxisLogScale"] is True

    # by method: bars of the metric, the gap and training images/s, mean ± std over seeds,
    # over the distilled runs
    assert [p.metrics for p in by_method.panels] == [
        [wr.SummaryMetric("eval/top1")],
        [wr.SummaryMetric("gap_to_teacher/top1")],
        [wr.SummaryMetric("images_per_s")],
    ]
    for p in by_method.panels:
        assert isinstance(p, wr.BarPlot) and p.groupby == wr.Config("method")
        assert (p.groupby_aggfunc, p.groupby_rangefunc) == ("mean", "stddev")
        cfg = p._to_model().model_dump(by_alias=True, exclude_none=True)["config"]
        assert cfg["groupBy"] == "method.value"
    assert [r.name for r in by_method.runsets] == ["distilled"]

    # parallel coordinates: alpha, resolution, T, kd_weight -> metric
    (pc,) = hyper.panels
    assert isinstance(pc, wr.ParallelCoordinatesPlot)
    assert [c.metric for c in pc.columns] == [
        *(wr.Config(h) for h in HYPERPARAMETERS),
        wr.SummaryMetric("eval/top1"),
    ]
    accessors = [
        c["accessor"] for c in pc._to_model().model_dump(by_alias=True)["config"]["columns"]
    ]
    assert accessors == [
        "config:alpha.value",
        "config:resolution.value",
        "config:temperature.value",
        "config:kd_weight.value",
        "summary:eval/top1",
    ]

    # learning curves grouped by method, mean and stddev over seeds
    ys = []
    for p in curves.panels:
        assert isinstance(p, wr.LinePlot)
        assert p.groupby == wr.Config("method")
        assert (p.groupby_aggfunc, p.groupby_rangefunc) == ("mean", "stddev")
        cfg = p._to_model().model_dump(by_alias=True, exclude_none=True)["config"]
        assert cfg["groupBy"] == "method.value" and cfg["aggregate"] is True
        ys += p.y
    assert ys == ["eval/top1", "train/loss"]

    # runs table with the schema's columns
    (table,) = runs.runsets
    assert table.pinned_columns == ["run:displayName"]
    assert "summary:mult_adds" in table.visible_columns
    assert "config:alpha.value" in table.visible_columns
    assert table.column_order == runs_table_columns("top1")


def test_runsets_filter_on_group_and_role() -> None:
    report = build_report("my-team", "mobiledistill", group="digits-ab")
    tradeoff, by_method, *rest = _grids(report)
    assert _leaves(by_method.runsets[0].filters) == {"group": "digits-ab", "jobType": "distilled"}
    assert [rs.name for rs in tradeoff.runsets] == list(ROLES)
    for rs, role in zip(tradeoff.runsets, ROLES):
        assert (rs.entity, rs.project) == ("my-team", "mobiledistill")
        assert _leaves(rs.filters) == {"group": "digits-ab", "jobType": role}
    for grid in rest:
        for rs in grid.runsets:
            assert (rs.entity, rs.project) == ("my-team", "mobiledistill")
            assert _leaves(rs.filters) == {"group": "digits-ab"}
    # without --group: every run of the project, roles still separated
    everything = _grids(build_report("my-team", "mobiledistill", metric="map"))
    assert _leaves(everything[0].runsets[2].filters) == {"jobType": "distilled"}
    assert everything[2].runsets[0].filters == ""
    assert everything[0].panels[0].y == wr.SummaryMetric("eval/map")


def test_bad_arguments_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="--entity"):
        build_report("", "mobiledistill")
    with pytest.raises(ValueError, match="W&B allows 128"):
        build_report("e", "p", title="x" * 129)


def test_cli_outlines_the_report_offline(capsys) -> None:
    assert report_main(["--entity", "me", "--project", "p", "--group", "g1"]) == 0
    out = capsys.readouterr().out
    assert "ScatterPlot 'top1 vs mult-adds (log)'" in out
    assert "ParallelCoordinatesPlot" in out and "LinePlot" in out
    assert """Metric("Group") == 'g1' and Metric("JobType") == 'distilled'""" in out
    assert "not published: add --save" in out
    assert report_main(["--project", "p", "--entity", ""]) == 2


def test_cli_save_without_api_key_explains(tmp_path: Path) -> None:
    # A fresh process with no key anywhere and an unreachable server: --save must fail fast
    # with an explanation instead of hanging or printing a traceback.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(tmp_path),
        NETRC=str(tmp_path / ".netrc"),
        WANDB_CONFIG_DIR=str(tmp_path / "cfg"),
        WANDB_BASE_URL="http://127.0.0.1:9",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "distill", "report", "--entity", "me", "--project", "p", "--save"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "could not save the report" in proc.stderr and "WANDB_API_KEY" in proc.stderr
    assert "Traceback" not in proc.stderr
