"""RunInfo naming/config and the metrics.json schema (write, read, validation errors)."""

from __future__ import annotations

import json
import math

import pytest

from distill.tracking import (
    MetricsFileError,
    RunInfo,
    read_metrics_json,
    summary_fields,
    validate_metrics,
    write_metrics_json,
)


def _distilled(**kw: object) -> RunInfo:
    base: dict[str, object] = dict(
        experiment="imagenet-ab",
        role="distilled",
        method="kd",
        student="mobilenet_v1",
        dataset="imagenet-1k",
        teacher="resnet50",
        alpha=0.5,
        resolution=160,
        temperature=4.0,
        kd_weight=0.9,
        seed=0,
    )
    base.update(kw)
    return RunInfo(**base)  # type: ignore[arg-type]


def test_run_names_are_deterministic_and_readable() -> None:
    assert _distilled().run_name() == "distilled-kd-mobilenet_v1-a0.5-r160-T4-w0.9-s0"
    assert _distilled(alpha=1.0, seed=3).run_name() == (
        "distilled-kd-mobilenet_v1-a1-r160-T4-w0.9-s3"
    )
    scratch = RunInfo(
        experiment="e",
        role="scratch",
        method="ce",
        student="mobilenet_v1",
        dataset="digits",
        alpha=0.25,
        resolution=128,
        seed=1,
    )
    assert scratch.run_name() == "scratch-ce-mobilenet_v1-a0.25-r128-s1"
    teacher = RunInfo(
        experiment="e",
        role="teacher",
        method="ce",
        student="resnet18",
        dataset="digits",
        teacher="timm/resnet18.a1_in1k",
        resolution=224,
    )
    assert teacher.run_name() == "teacher-timm_resnet18.a1_in1k-r224-s0"


def test_wandb_kwargs_tags_and_config() -> None:
    info = _distilled()
    kw = info.wandb_init_kwargs()
    assert kw["group"] == "imagenet-ab" and kw["job_type"] == "distilled"
    assert kw["name"] == info.run_name()
    assert {"distilled", "kd", "student:mobilenet_v1", "teacher:resnet50", "alpha:0.5"} <= set(
        kw["tags"]
    )
    cfg = info.config({"lr": 0.1, "alpha": 0.5})
    assert cfg["lr"] == 0.1 and cfg["resolution"] == 160 and cfg["kd_weight"] == 0.9
    with pytest.raises(ValueError, match=r"conflicts with RunInfo\.alpha"):
        info.config({"alpha": 0.75})


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"role": "student"}, "role must be one of"),
        ({"teacher": None}, "needs teacher="),
        ({"alpha": 0.0}, "alpha"),
        ({"resolution": 160.0}, "resolution must be a positive int"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"experiment": ""}, "experiment must be a non-empty string"),
    ],
)
def test_runinfo_rejects_bad_fields(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _distilled(**kw)


def test_summary_fields_include_gap_to_teacher() -> None:
    s = summary_fields(
        {"top1": 61.0, "top5": 80.0},
        mult_adds=149_000_000,
        params=1_300_000,
        images_per_s=900.0,
        peak_mem_bytes=1 << 20,
        teacher_metrics={"top1": 76.0},
    )
    assert s["eval/top1"] == 61.0 and s["teacher/top1"] == 76.0
    assert s["gap_to_teacher/top1"] == pytest.approx(-15.0)
    assert s["mult_adds"] == 149_000_000 and s["peak_mem"] == 1 << 20


def test_metrics_json_round_trip_is_atomic(tmp_path) -> None:
    path = tmp_path / "run" / "metrics.json"
    written = write_metrics_json(
        path,
        _distilled(),
        metrics={"top1": 61.2, "top5": 83.0},
        mult_adds=149_000_000,
        params=1_300_000,
        teacher_metrics={"top1": 76.1},
        images_per_s=1234.5,
        peak_mem_bytes=None,
        steps=100,
        epochs=1.0,
        wall_s=12.5,
        device="cpu",
    )
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]  # no tmp file left
    read = read_metrics_json(path)
    assert read == written
    assert (
        read["schema"] == 1 and read["run_name"] == "distilled-kd-mobilenet_v1-a0.5-r160-T4-w0.9-s0"
    )
    assert read["role"] == "distilled" and read["primary_metric"] == "top1"
    assert read["higher_is_better"] is True and read["alpha"] == 0.5


def test_write_refuses_non_finite_metrics(tmp_path) -> None:
    with pytest.raises(MetricsFileError, match=r"metrics\.top1"):
        write_metrics_json(
            tmp_path / "m.json", _distilled(), metrics={"top1": math.nan}, mult_adds=1, params=1
        )
    assert not (tmp_path / "m.json").exists()


def _valid() -> dict:
    return {
        "schema": 1,
        "run_name": "r",
        "experiment": "e",
        "role": "scratch",
        "method": "ce",
        "dataset": "digits",
        "student": "mobilenet_v1",
        "seed": 0,
        "metrics": {"top1": 50.0},
        "mult_adds": 10,
        "params": 20,
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"schema": 2}, "schema"),
        ({"role": "pupil"}, "role"),
        ({"mult_adds": "many"}, "mult_adds"),
        ({"metrics": {}}, "metrics"),
        ({"metrics": {"top1": "high"}}, "metrics.top1"),
        ({"primary_metric": "map"}, "primary_metric"),
        ({"alpha": "wide"}, "alpha"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_malformed_metrics_name_file_and_field(tmp_path, change: dict, field: str) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**_valid(), **change}))
    with pytest.raises(MetricsFileError) as err:
        read_metrics_json(path)
    assert str(path) in str(err.value) and f"field {field!r}" in str(err.value)


def test_minimal_metrics_get_defaults_and_bad_json_is_reported(tmp_path) -> None:
    full = validate_metrics(_valid())
    assert full["teacher"] is None and full["primary_metric"] == "top1"
    assert full["images_per_s"] is None and full["higher_is_better"] is True
    path = tmp_path / "metrics.json"
    path.write_text("{not json")
    with pytest.raises(MetricsFileError, match="not valid JSON"):
        read_metrics_json(path)
