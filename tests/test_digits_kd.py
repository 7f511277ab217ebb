"""The reduced digits benchmark (benchmarks/digits_kd.py): distillation transfers the teacher.

On scikit-learn's real digits, a small CNN teacher is trained, then the same MobileNetV1
0.25 student (32 px) is trained on a quarter of the training split from labels alone and with
KD, for 2 seeds, all through the Distiller. Asserted is only what is robust at this size: the
teacher is good, and the distilled student agrees with the teacher more often than the scratch
student does (averaged over the seeds). The full benchmark reports error rates.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from distill.demo import DemoConfig, TrainSettings, train_students, train_teacher


def test_distilled_student_agrees_with_teacher_more_than_scratch(tmp_path: Path) -> None:
    from distill.tracking import read_metrics_json

    cfg = DemoConfig(
        out=str(tmp_path),
        alphas=(0.25,),
        resolutions=(32,),
        seeds=(0, 1),
        train_fraction=0.25,
        teacher_width=16,
        teacher_settings=TrainSettings(steps=150),
        student_settings=TrainSettings(steps=120),
        report_to="none",
        measure_speed=False,
        write_report=False,
    )
    quiet = lambda _: None  # noqa: E731
    teacher = train_teacher(cfg, quiet)
    assert teacher.error < 6.0, f"teacher error {teacher.error:.2f}%"
    students = train_students(cfg, teacher, quiet)

    agree = {"scratch": [], "distilled": []}
    for s in students:
        assert s.agreement is not None
        agree[s.info.role].append(s.agreement)
        m = read_metrics_json(tmp_path / "runs" / s.info.run_name() / "metrics.json")
        assert m["role"] == s.info.role and m["steps"] == 120 and m["mult_adds"] > 0
    assert len(agree["scratch"]) == len(agree["distilled"]) == 2
    kd, scratch = statistics.fmean(agree["distilled"]), statistics.fmean(agree["scratch"])
    assert kd > scratch, (
        f"agreement with the teacher: distilled {kd:.1f}% vs scratch {scratch:.1f}%"
    )
