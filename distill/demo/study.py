"""The demo's study: a teacher, then every student from scratch and distilled."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from distill.demo.data import digits_data
from distill.demo.train import (
    DATASET,
    EXPERIMENT,
    STUDENT_NAME,
    TEACHER_NAME,
    RunResult,
    TrainSettings,
    agreement,
    digits_cnn,
    measure_inference,
    train_run,
)
from distill.tracking import RunInfo


@dataclass
class DemoConfig:
    """A teacher, then each student (alpha x resolution x seed) from scratch and distilled."""

    out: str = "demo_out"
    alphas: tuple[float, ...] = (0.5, 0.25)
    resolutions: tuple[int, ...] = (40, 32)
    seeds: tuple[int, ...] = (0, 1)
    train_fraction: float = 0.1  # labelled share of the 1,347 training images the students see
    split_seed: int = 0
    teacher_width: int = 64
    teacher_resolution: int = 16
    teacher_settings: TrainSettings = field(default_factory=lambda: TrainSettings(steps=300))
    student_settings: TrainSettings = field(default_factory=lambda: TrainSettings(steps=200))
    report_to: Literal["none", "wandb"] = "wandb"
    experiment: str = EXPERIMENT
    project: str = "mobiledistill-demo"
    measure_speed: bool = True
    export: bool = True  # ship the best distilled student: ONNX + INT8, latency (export extra)
    latency_repeats: int = 20  # timed runs per latency setting of the export step
    write_report: bool = True

    @classmethod
    def quick(cls, out: str = "demo_out", **overrides: Any) -> DemoConfig:
        """One student, one seed, a few dozen steps: a smoke test of the whole pipeline."""
        base = cls(
            out=out,
            alphas=(0.25,),
            resolutions=(32,),
            seeds=(0,),
            teacher_width=16,
            teacher_settings=TrainSettings(steps=30),
            student_settings=TrainSettings(steps=20),
            experiment=f"{EXPERIMENT}-quick",
            latency_repeats=5,
        )
        return replace(base, **overrides)

    def problems(self) -> list[str]:
        p = []
        if not self.alphas or any(not a > 0 for a in self.alphas):
            p.append(f"alphas must be a non-empty list of numbers > 0, got {self.alphas}")
        if not self.resolutions or any(r < 32 for r in self.resolutions):
            p.append(
                f"resolutions must be >= 32 (MobileNetV1 downsamples by 32), got {self.resolutions}"
            )
        if not self.seeds:
            p.append("give at least one seed")
        if not 0 < self.train_fraction <= 1:
            p.append(f"train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.export and self.latency_repeats < 2:
            p.append(f"latency_repeats must be >= 2, got {self.latency_repeats}")
        if self.teacher_resolution < 8:
            p.append(f"teacher_resolution must be >= 8, got {self.teacher_resolution}")
        p += [f"teacher: {x}" for x in self.teacher_settings.problems()]
        p += [f"student: {x}" for x in self.student_settings.problems()]
        return p


@dataclass
class StudyResult:
    config: DemoConfig
    teacher: RunResult
    students: list[RunResult]
    wall_s: float
    shipped: dict[str, Any] | None = None  # export.json of the student the export step shipped


MARKER = "demo.json"  # written into `out`: a folder holding it may be replaced by a new demo


def prepare_out(out: Path) -> None:
    """An empty `out`; a folder an earlier demo wrote (it holds MARKER) is replaced."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(
                f"{out} exists and was not written by the demo; choose another --out or empty it"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _common(cfg: DemoConfig) -> dict[str, Any]:
    return {
        "report_to": cfg.report_to,
        "wandb_dir": Path(cfg.out) if cfg.report_to == "wandb" else None,
        "project": cfg.project,
    }


def train_teacher(cfg: DemoConfig, log: Callable[[str], None] = print) -> RunResult:
    """The teacher, trained on the whole training split at its own resolution."""
    train, test = digits_data(cfg.teacher_resolution, split_seed=cfg.split_seed)
    info = RunInfo(
        experiment=cfg.experiment,
        role="teacher",
        method="ce",
        student=TEACHER_NAME,
        teacher=TEACHER_NAME,
        dataset=DATASET,
        resolution=cfg.teacher_resolution,
        seed=0,
    )
    log(f"teacher: {TEACHER_NAME} (width {cfg.teacher_width}) at {cfg.teacher_resolution} px "
        f"on all {len(train)} training images")  # fmt: skip
    torch.manual_seed(info.seed)  # initial weights
    net = digits_cnn(cfg.teacher_width)
    out = Path(cfg.out) / "runs" / info.run_name()
    record = train_run(net, info, train, test, out, cfg.teacher_settings, **_common(cfg))
    result = RunResult(info, record, net, test_inputs=test.images)
    log(f"{info.run_name()}: error {result.error:.2f}% ({record['wall_s']:.0f} s)")
    return result


def as_teacher(result: RunResult, cfg: DemoConfig) -> nn.Module:
    """The trained teacher wrapped for distillation (it resizes student batches to its size)."""
    from distill.teacher import Teacher

    return Teacher(
        result.model, input_size=cfg.teacher_resolution, name=TEACHER_NAME, source="distill.demo"
    )


def train_students(
    cfg: DemoConfig, teacher: RunResult, log: Callable[[str], None] = print
) -> list[RunResult]:
    """Every alpha x resolution x seed student, from scratch and distilled from `teacher`."""
    from distill.models import mobilenet_v1

    wrapped = as_teacher(teacher, cfg)
    st = cfg.student_settings
    results: list[RunResult] = []
    for resolution in cfg.resolutions:
        train, test = digits_data(
            resolution, train_fraction=cfg.train_fraction, split_seed=cfg.split_seed
        )
        for alpha in cfg.alphas:
            for seed in cfg.seeds:
                for role in ("scratch", "distilled"):
                    kd = role == "distilled"
                    info = RunInfo(
                        experiment=cfg.experiment,
                        role=role,
                        method="kd" if kd else "ce",
                        student=STUDENT_NAME,
                        teacher=TEACHER_NAME if kd else None,
                        dataset=DATASET,
                        alpha=alpha,
                        resolution=resolution,
                        temperature=st.temperature if kd else None,
                        kd_weight=st.kd_weight if kd else None,
                        seed=seed,
                    )
                    # the same initial weights for both roles of a seed: a paired comparison
                    torch.manual_seed(seed)
                    model = mobilenet_v1(alpha=alpha, num_classes=10, resolution=resolution)
                    out = Path(cfg.out) / "runs" / info.run_name()
                    record = train_run(
                        model,
                        info,
                        train,
                        test,
                        out,
                        st,
                        teacher=wrapped if kd else None,
                        **_common(cfg),
                    )
                    res = RunResult(info, record, model, test_inputs=test.images)
                    res.agreement = agreement(model, wrapped, test.images)
                    results.append(res)
                    log(f"{info.run_name()}: error {res.error:.2f}%, agrees with the teacher "
                        f"on {res.agreement:.1f}% ({record['wall_s']:.0f} s)")  # fmt: skip
    return results


def run_study(cfg: DemoConfig, log: Callable[[str], None] = print) -> StudyResult:
    """Train the teacher and every student into `cfg.out` (replacing an earlier demo there),
    then write report.html with `distill.compare`."""
    bad = cfg.problems()
    if bad:
        raise ValueError("invalid demo configuration: " + "; ".join(bad))
    start = time.perf_counter()
    out = Path(cfg.out)
    prepare_out(out)
    (out / MARKER).write_text("{}\n")
    teacher = train_teacher(cfg, log)
    students = train_students(cfg, teacher, log)
    if cfg.measure_speed:
        measure_inference([teacher, *students])
    shipped = None
    if cfg.export:  # before the report, which plots the latency it measures
        from distill.demo.ship import ship_best

        shipped = ship_best(out, students, log, repeats=cfg.latency_repeats)
    result = StudyResult(cfg, teacher, students, time.perf_counter() - start, shipped)
    from distill.demo.summary import summary_dict

    (out / MARKER).write_text(json.dumps(summary_dict(result), indent=2, default=str) + "\n")
    if cfg.write_report:
        from distill.compare import load_runs, write_report

        write_report(
            load_runs([out / "runs"]),
            out / "report.html",
            title="mobiledistill demo: MobileNet students on the digits, scratch vs distilled",
        )
    return result
