"""`python -m distill export` end to end on a real run folder written by `distill.Distiller`
(MobileNetV1 0.25 @32 px trained on the digits for 100 steps): ONNX + INT8 + pt2 + hf with the
INT8 accuracy on the digits, sizes and latency in export.json, the compare report's latency
plot, `profile --latency`, --push-to-hub up to the folder, and the INT8 errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from distill.cli.export import main as export_main
from distill.export import ExportError, export_run, read_export_json
from distill.export.latency import all_threads

pytest.importorskip("onnxruntime", reason="the export extra: pip install 'mobiledistill[export]'")
pytest.importorskip("onnxscript", reason="the export extra: pip install 'mobiledistill[export]'")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Distiller run on the digits (~15 s), copied by the `run` fixture for each test."""
    from distill.data.digits import load_digits_splits
    from distill.demo import TrainSettings, train_run
    from distill.models import mobilenet_v1
    from distill.tracking import RunInfo

    train, test = load_digits_splits(32)
    info = RunInfo(experiment="export-test", role="scratch", method="ce", student="mobilenet_v1",
                   dataset="sklearn-digits", alpha=0.25, resolution=32, seed=0)  # fmt: skip
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("trained") / info.run_name()
    model = mobilenet_v1(alpha=0.25, resolution=32, num_classes=10)
    train_run(model, info, train, test, run, TrainSettings(steps=100))
    shutil.rmtree(run / "checkpoints")
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "runs" / trained.name
    shutil.copytree(trained, copy)
    return copy


def _hashes(run: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in run.glob("*.*")}


FAST = ["--repeats", "3", "--warmup", "1", "--latency-batch", "4"]


def test_cli_ships_onnx_int8_pt2_hf_with_accuracy_sizes_and_latency(run: Path, capsys: Any) -> None:
    before = _hashes(run)
    metrics = json.loads((run / "metrics.json").read_text())
    argv = [str(run), "--format", "onnx", "pt2", "hf", "--int8", *FAST]
    assert export_main(argv) == 0
    printed = capsys.readouterr().out
    rec = read_export_json(run)
    assert _hashes(run) == {**before, "export.json": _hashes(run)["export.json"]}

    # the export's own PyTorch evaluation is the run's: same digits test split, same weights
    assert rec["evaluation"]["images"] == 450
    assert rec["evaluation"]["pytorch"] == pytest.approx(metrics["metrics"]["top1"], abs=1e-6)
    assert rec["evaluation"]["pytorch"] > 30, "the fixture did not train"
    for fmt in ("onnx", "pt2"):
        assert rec["formats"][fmt]["check"]["passed"], rec["formats"][fmt]["check"]
    int8 = rec["formats"]["int8"]
    assert int8["metric"] == "top1" and int8["calibration_images"] == 300
    assert int8["before"] == pytest.approx(rec["evaluation"]["pytorch"])
    assert abs(int8["drop"]) < 15 and int8["drop"] == pytest.approx(int8["before"] - int8["after"])
    assert int8["int8_size_mb"] < 0.6 * int8["fp32_size_mb"]
    assert int8["fp32_size_mb"] == pytest.approx(
        (run / "export" / "student.onnx").stat().st_size / 1e6
    )
    assert f"INT8: top1 {int8['before']:.2f} -> {int8['after']:.2f}" in printed

    lat = rec["latency"]
    threads = sorted({1, all_threads()})
    combos = {(r["runtime"], r["precision"], r["batch_size"], r["threads"]) for r in lat["rows"]}
    want = {(rt, p, b, t) for rt, p in (("onnxruntime", "fp32"), ("onnxruntime", "int8"),
            ("pytorch", "fp32")) for b in (1, 4) for t in threads}  # fmt: skip
    assert combos == want
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in lat["rows"])
    assert "| onnxruntime | int8 | 1 | 1 |" in printed

    card = (run / "export" / "hf" / "README.md").read_text()
    for text in ("teacher", "method", "sklearn-digits", f"{metrics['metrics']['top1']:.2f}",
                 "mult-adds", "params", "Batch-1 latency", "build_student(", "INT8"):  # fmt: skip
        assert text in card, text
    _load_hf_like_the_card(run, metrics)

    from distill.compare import load_runs, write_report

    html = write_report(load_runs([run]), run.parent / "report.html")
    assert (run.parent / "report-sklearn-digits-top1-latency_ms.png").is_file()
    assert "CPU latency: ONNX Runtime fp32, batch 1, one thread" in html.read_text()


def _load_hf_like_the_card(run: Path, metrics: dict[str, Any]) -> None:
    from safetensors.torch import load_file

    from distill.data.digits import load_digits_splits
    from distill.models import build_student

    folder = run / "export" / "hf"
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architecture"] == "mobilenet_v1" and cfg["num_classes"] == 10
    model = build_student("mobilenet_v1", num_classes=10, alpha=0.25).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"))
    _, test = load_digits_splits(32)
    x, y = test.tensors()
    with torch.no_grad():
        top1 = float((model(x).argmax(1) == y).float().mean() * 100)
    assert top1 == pytest.approx(metrics["metrics"]["top1"], abs=1e-6)


def test_run_data_from_an_image_folder(run: Path, tmp_path: Path, capsys: Any) -> None:
    from PIL import Image

    from distill.data.digits import digits_arrays

    x, y = digits_arrays(32)  # the real digits as PNG files in the recipes' folder layout
    for split, offset in (("train", 0), ("val", 500)):
        for cls in range(10):
            folder = tmp_path / "data" / split / str(cls)
            folder.mkdir(parents=True)
            idx = (y == cls).nonzero().flatten()[offset // 50 : offset // 50 + 3]
            for i in idx.tolist():
                pixels = (x[i].permute(1, 2, 0) * 255).round().byte().numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    argv = [str(run), "--int8", "--no-latency", "--data-dir", str(tmp_path / "data")]
    assert export_main(argv) == 0
    rec = read_export_json(run)
    assert rec["evaluation"]["data"].endswith("data (val)") and rec["evaluation"]["images"] == 30
    assert rec["formats"]["onnx"]["check"]["images"] == 30
    assert (
        rec["formats"]["int8"]["calibration_images"] == 30
        and rec["formats"]["int8"]["metric"] == "top1"
    )


def test_a_bare_distiller_run_exports(tmp_path: Path) -> None:
    """No run_info at all: metrics.json records the class name, which maps back to the
    builder; the classifier gives the class count, and the digits check the runtimes."""
    from torch import nn

    from distill import Distiller, DistillerConfig, KDLoss, Teacher
    from distill.models import mobilenet_v1

    g = torch.Generator().manual_seed(0)
    data = [{"input": torch.randn(8, 3, 32, 32, generator=g),
             "target": torch.randint(0, 4, (8,), generator=g)} for _ in range(3)]  # fmt: skip
    torch.manual_seed(0)
    student = mobilenet_v1(alpha=0.5, resolution=32, num_classes=4)
    teacher = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 4)), input_size=12)
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    cfg = DistillerConfig(output_dir=str(tmp_path / "bare"), max_steps=3, progress=False)
    Distiller(student, teacher, KDLoss(temperature=2.0, alpha=0.7), opt, None, config=cfg).fit(
        data, data
    )
    metrics = json.loads((tmp_path / "bare" / "metrics.json").read_text())
    assert metrics["student"] == "MobileNetV1"
    rec = export_run(tmp_path / "bare", formats=("onnx", "pt2"), latency=False)
    assert (rec["student"], rec["alpha"], rec["num_classes"]) == ("mobilenet_v1", 0.5, 4)
    assert rec["evaluation"]["metric"] is None  # digits labels are not this run's classes
    assert rec["formats"]["onnx"]["check"]["passed"] and rec["formats"]["pt2"]["check"]["passed"]


def test_int8_over_the_threshold_is_said_plainly(run: Path, capsys: Any, monkeypatch: Any) -> None:
    import distill.export.int8 as int8_mod

    real = int8_mod.score_int8

    def worse(*args: Any, **kwargs: Any) -> Any:  # fault injection: INT8 loses 20 points
        import dataclasses

        r = real(*args, **kwargs)
        return dataclasses.replace(r, after=r.after - 20.0)

    monkeypatch.setattr(int8_mod, "score_int8", worse)
    assert export_main([str(run), "--int8", "--no-latency", "--max-int8-drop", "0.5"]) == 3
    out = capsys.readouterr()
    assert "INT8 COSTS TOO MUCH" in out.out and "more than --max-int8-drop 0.5" in out.err
    int8 = read_export_json(run)["formats"]["int8"]
    assert int8["over_threshold"] and int8["max_drop"] == 0.5 and int8["drop"] > 19


def test_empty_calibration_set_is_an_error(run: Path, capsys: Any) -> None:
    assert export_main([str(run), "--int8", "--no-latency", "--calibration-images", "0"]) == 2
    assert "calibration set is empty" in capsys.readouterr().err
    assert not (run / "export" / "student.int8.onnx").exists()
    assert not (run / "export.json").exists()


def test_non_finite_int8_outputs_are_an_error(run: Path, monkeypatch: Any) -> None:
    import onnx
    from onnx import numpy_helper

    import distill.export.int8 as int8_mod

    def broken(fp32: Path, out: Path, calibration: torch.Tensor, **_: Any) -> Path:
        # fault injection: an "INT8" model whose classifier bias is NaN
        proto = onnx.load(str(fp32))
        for init in proto.graph.initializer:
            if init.name.endswith("classifier.bias"):
                nan = np.full(numpy_helper.to_array(init).shape, np.nan, dtype=np.float32)
                init.CopyFrom(numpy_helper.from_array(nan, init.name))
        onnx.save(proto, str(out))
        return Path(out)

    monkeypatch.setattr(int8_mod, "quantize_int8", broken)
    with pytest.raises(ExportError, match="non-finite values") as err:
        export_run(run, int8=True, formats=(), latency=False)
    assert "4500 non-finite" in str(err.value)
    assert not (run / "export" / "student.int8.onnx").exists()


def test_profile_latency_table_for_a_run_folder(run: Path, capsys: Any) -> None:
    from distill.cli.profile import main as profile_main

    argv = [str(run), "--latency", "--repeats", "2", "--warmup", "0", "--latency-batch", "2"]
    assert profile_main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["input_size"] == [3, 32, 32] and out["student"] == "mobilenet_v1"
    rows = out["latency_table"]["rows"]
    assert {(r["runtime"], r["batch_size"]) for r in rows} == {
        (rt, b) for rt in ("onnxruntime", "pytorch") for b in (1, 2)
    }
    assert {r["threads"] for r in rows} == {1, all_threads()}


def test_push_to_hub_uploads_the_folder(run: Path, monkeypatch: Any) -> None:
    import huggingface_hub

    calls: list[tuple[str, dict[str, Any]]] = []

    class FakeApi:  # the network is not reachable from tests: record what would be sent
        def __init__(self, token: str | None = None) -> None:
            self.token = token

        def create_repo(self, repo_id: str, **kw: Any) -> None:
            calls.append(("create_repo", {"repo_id": repo_id, **kw}))

        def upload_folder(self, **kw: Any) -> Any:
            calls.append(("upload_folder", kw))
            assert {p.name for p in Path(kw["folder_path"]).iterdir()} == {
                "config.json", "model.safetensors", "README.md"
            }  # fmt: skip
            return type("Info", (), {"commit_url": "https://huggingface.co/me/student/commit/1"})

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    rec = export_run(run, formats=("hf",), push_to_hub="me/student")
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert calls[1][1]["repo_id"] == "me/student"
    assert rec["formats"]["hf"]["pushed_to"].startswith("https://huggingface.co/me/student")


def test_push_to_hub_offline_says_what_it_needs(run: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="needs the network") as err:
        export_run(run, formats=("hf",), push_to_hub="me/student", overwrite=True)
    assert "huggingface-cli upload me/student" in str(err.value)
    assert (run / "export" / "hf" / "model.safetensors").is_file()  # the folder is complete
    assert read_export_json(run)["formats"]["hf"]["pushed_to"] is None  # and recorded
