"""`make demo`'s export step: the best distilled student is shipped as ONNX + INT8, the
latency and the INT8 accuracy change are printed, and report.html plots accuracy vs latency."""

from __future__ import annotations

from pathlib import Path

import pytest

from distill.demo import DemoConfig, run_study
from distill.demo.ship import best_distilled
from distill.export import read_export_json

pytest.importorskip("onnxruntime", reason="the export extra: pip install 'mobiledistill[export]'")
pytest.importorskip("onnxscript", reason="the export extra: pip install 'mobiledistill[export]'")


def test_quick_demo_ships_its_best_distilled_student(tmp_path: Path) -> None:
    lines: list[str] = []
    cfg = DemoConfig.quick(str(tmp_path / "demo"), report_to="none", measure_speed=False)
    result = run_study(cfg, log=lines.append)
    best = best_distilled(result.students)
    assert best is not None and best.info.role == "distilled"
    run = tmp_path / "demo" / "runs" / best.info.run_name()
    record = read_export_json(run)
    assert result.shipped == record
    assert set(record["formats"]) == {"onnx", "int8"}
    assert (run / "export" / "student.onnx").is_file()
    assert (run / "export" / "student.int8.onnx").is_file()
    int8 = record["formats"]["int8"]
    text = "\n".join(lines)
    assert f"shipped the best distilled student, {best.info.run_name()}" in text
    assert f"INT8 top1 {int8['before']:.2f}% -> {int8['after']:.2f}%" in text
    assert "CPU latency, batch 1, one thread (median): ONNX Runtime fp32" in text
    assert int8["before"] == pytest.approx(best.record["metrics"]["top1"])
    html = (tmp_path / "demo" / "report.html").read_text()
    assert "top1 vs CPU latency" in html
    others = [r for r in result.students if r is not best]
    assert all(not (tmp_path / "demo" / "runs" / r.info.run_name() / "export.json").exists()
               for r in others)  # fmt: skip


def test_without_the_extra_the_demo_says_so_and_ships_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from distill.demo import ship

    real = importlib.util.find_spec
    monkeypatch.setattr(
        ship.importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name)
    )
    lines: list[str] = []
    assert ship.ship_best(tmp_path, [], lines.append) is None  # nothing distilled: nothing to say
    fake = type("R", (), {"info": type("I", (), {"role": "distilled"})(), "record": {
        "metrics": {"top1": 1.0}}})()  # fmt: skip
    assert ship.ship_best(tmp_path, [fake], lines.append) is None  # type: ignore[list-item]
    assert lines == [
        "not shipping the student: onnxruntime missing (pip install 'mobiledistill[export]')"
    ]
