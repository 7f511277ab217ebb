"""distill.export on run folders in the exact on-disk layout a run leaves (metrics.json through
the one writer, config.json, student.safetensors): ONNX for MobileNetV1 at two alpha/rho, a
timm and a torchvision student, checked here again with ONNX Runtime against the in-memory
model; the .pt2 archive; the hf folder through timm; and every bad input's error."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.latency import calibrated as realistic  # random weights with O(1) logits
from distill.data.digits import load_digits_splits
from distill.export import ExportError, export_run
from distill.export.check import compare_outputs
from distill.files import write_json_atomic
from distill.models import build_student
from distill.serialization import save_safetensors
from distill.tracking import RunInfo, write_metrics_json

pytest.importorskip("onnxruntime", reason="the export extra: pip install 'mobiledistill[export]'")
pytest.importorskip("onnxscript", reason="the export extra: pip install 'mobiledistill[export]'")


def make_run(
    root: Path,
    model: nn.Module,
    *,
    student: str,
    alpha: float | None = None,
    resolution: int = 32,
    weights: bool = True,
) -> Path:
    info = RunInfo(
        experiment="export-test", role="distilled", method="kd", student=student,
        dataset="sklearn-digits", teacher="digits_cnn", alpha=alpha, resolution=resolution,
        temperature=4.0, kd_weight=0.9,
    )  # fmt: skip
    run = root / info.run_name()
    if weights:
        save_safetensors(model.state_dict(), run / "student.safetensors")
    params = sum(p.numel() for p in model.parameters())
    write_metrics_json(run / "metrics.json", info, metrics={"top1": 50.0}, mult_adds=10**6,
                       params=params)  # fmt: skip
    write_json_atomic(run / "config.json", {"student": student, "alpha": alpha,
                                            "resolution": resolution, "distiller": {}})  # fmt: skip
    return run


def digest(run: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(run.iterdir())
        if f.is_file() and f.name != "export.json"
    }


CASES = [
    ("mobilenet_v1", 0.5, 32),
    ("mobilenet_v1", 0.25, 40),
    ("timm:resnet18", None, 32),
    ("torchvision:mobilenet_v2", None, 32),
]


@pytest.mark.parametrize(
    ("student", "alpha", "res"), CASES, ids=[f"{s}-{a}-{r}" for s, a, r in CASES]
)
def test_onnx_matches_pytorch_with_dynamic_batch_and_metadata(
    tmp_path: Path, student: str, alpha: float | None, res: int
) -> None:
    import onnxruntime as ort

    if student.startswith("timm:"):
        pytest.importorskip("timm")
    model = realistic(build_student(student, num_classes=10, alpha=alpha, resolution=res), res)
    run = make_run(tmp_path, model, student=student, alpha=alpha, resolution=res)
    before = digest(run)
    record = export_run(run, latency=False)
    check = record["formats"]["onnx"]["check"]
    assert check["passed"] and check["max_abs_diff"] <= 1e-4 and check["images"] == 450
    assert check["top1_agreement"] == 100.0

    session = ort.InferenceSession(str(run / "export" / "student.onnx"))
    dim0 = session.get_inputs()[0].shape[0]
    assert isinstance(dim0, str), f"batch axis is fixed to {dim0}"
    x = load_digits_splits(res, augment=False)[1].tensors()[0]
    for n in (1, 3, 17):
        got = session.run(None, {"input": x[:n].numpy()})[0]
        with torch.no_grad():
            ref = model(x[:n]).numpy()
        assert np.abs(ref).max() > 0.1, "logits too small to check anything"
        assert np.abs(got - ref).max() <= 1e-4
        assert (got.argmax(1) == ref.argmax(1)).all()
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["input_size"]) == [3, res, res]
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert json.loads(meta["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert json.loads(meta["label_names"]) == [str(i) for i in range(10)]
    assert (meta["teacher"], meta["method"], meta["student"]) == ("digits_cnn", "kd", student)
    assert digest(run) == before  # the run's own files are only read
    assert json.loads((run / "export.json").read_text())["formats"]["onnx"]["file"] == (
        "export/student.onnx"
    )


def test_pt2_archive_loads_back_with_its_metadata(tmp_path: Path) -> None:
    model = realistic(build_student("mobilenet_v1", num_classes=10, alpha=0.25), 32)
    run = make_run(tmp_path, model, student="mobilenet_v1", alpha=0.25)
    record = export_run(run, formats=("pt2",), latency=False)
    assert record["formats"]["pt2"]["check"]["passed"]
    extra = {"mobiledistill.json": ""}
    program = torch.export.load(str(run / "export" / "student.pt2"), extra_files=extra)
    x = load_digits_splits(32, augment=False)[1].tensors()[0][:5]
    with torch.no_grad():
        assert torch.allclose(program.module()(x), model(x), atol=1e-5)
    assert json.loads(json.loads(extra["mobiledistill.json"])["input_size"]) == [3, 32, 32]


def test_a_failed_check_names_the_largest_difference_and_keeps_nothing(tmp_path: Path) -> None:
    model = realistic(build_student("mobilenet_v1", num_classes=10, alpha=0.25), 32)
    run = make_run(tmp_path, model, student="mobilenet_v1", alpha=0.25)
    with pytest.raises(ExportError) as err:
        export_run(run, latency=False, atol=1e-12)  # float32 runtimes never agree this closely
    text = str(err.value)
    assert "does not match" in text and "max |Δ|" in text and "image" in text and "class" in text
    assert not (run / "export" / "student.onnx").exists() and not (run / "export.json").exists()


def test_compare_outputs_counts_ties_apart_and_fails_on_flips() -> None:
    ref = np.array([[1.0, 0.99999, -1.0], [0.0, 2.0, 1.0]])
    tie_flip = np.array([[0.99999, 1.0, -1.0], [0.0, 2.0, 1.0]])
    a = compare_outputs(ref, tie_flip, runtime="rt")
    assert a.passed and a.near_ties == 1 and a.top1_agreement == 50.0
    real_flip = np.array([[1.0, 0.99999, -1.0], [0.0, 2.0, 2.5]])
    b = compare_outputs(ref, real_flip, runtime="rt")
    assert not b.passed and b.disagreements == 1 and (b.worst_image, b.worst_class) == (1, 2)
    nan = compare_outputs(ref, np.where(ref > 1.5, np.nan, ref), runtime="rt")
    assert not nan.passed and nan.non_finite == 1 and "non-finite" in nan.describe()


class Branchy(nn.Module):
    """A forward torch.export cannot trace: Python control flow on a tensor's value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


class CumMax(nn.Module):
    """Traceable, but ONNX has no translation for aten.cummax."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(self.fc(x.flatten(1)), dim=1).values


def test_untraceable_forward_names_the_line_and_the_fix(tmp_path: Path) -> None:
    run = make_run(tmp_path, Branchy(), student="Branchy")
    with pytest.raises(ExportError, match="not a registered student") as err:
        export_run(run, latency=False)
    assert "--student" in str(err.value) and "model=" in str(err.value)
    with pytest.raises(ExportError) as err:
        export_run(run, latency=False, model=Branchy())
    text = str(err.value)
    assert "could not trace" in text and "if x.mean() > 0" in text
    assert "torch.where" in text and "pt2" in text


def test_op_without_onnx_translation_is_named_and_pt2_still_works(tmp_path: Path) -> None:
    run = make_run(tmp_path, CumMax(), student="CumMax")
    with pytest.raises(ExportError, match=r"aten\.cummax\.default") as err:
        export_run(run, latency=False, model=CumMax())
    assert "--format pt2" in str(err.value)
    record = export_run(run, formats=("pt2",), latency=False, model=CumMax())
    assert record["formats"]["pt2"]["check"]["passed"]


def test_a_class_name_without_alpha_is_rebuilt_from_the_weights(tmp_path: Path) -> None:
    model = realistic(build_student("mobilenet_v1", num_classes=7, alpha=0.25), 32)
    run = make_run(tmp_path, model, student="MobileNetV1")  # what a bare Distiller could record
    notes: list[str] = []
    rec = export_run(run, formats=("pt2",), latency=False, log=notes.append)
    assert (rec["student"], rec["alpha"], rec["num_classes"]) == ("mobilenet_v1", 0.25, 7)
    assert any("alpha 0.25 inferred from the stem" in n for n in notes)


def test_bad_run_folders_are_clear_errors(tmp_path: Path) -> None:
    model = build_student("mobilenet_v1", num_classes=10, alpha=0.25)
    with pytest.raises(ExportError, match="no such run folder"):
        export_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="not a finished run folder"):
        export_run(tmp_path / "empty")
    run = make_run(tmp_path, model, student="mobilenet_v1", alpha=0.25, weights=False)
    with pytest.raises(ExportError, match=r"no student\.safetensors") as err:
        export_run(run)
    assert "export_student=False" in str(err.value)
    with pytest.raises(ValueError, match="unknown format 'tflite'"):
        export_run(run, formats=("tflite",))


def test_nothing_is_overwritten_unless_asked(tmp_path: Path) -> None:
    model = realistic(build_student("mobilenet_v1", num_classes=10, alpha=0.25), 32)
    run = make_run(tmp_path, model, student="mobilenet_v1", alpha=0.25)
    export_run(run, formats=("pt2",), latency=False)
    first = (run / "export" / "student.pt2").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_run(run, formats=("pt2",), latency=False)
    assert (run / "export" / "student.pt2").read_bytes() == first
    record = export_run(run, formats=("pt2",), latency=False, overwrite=True)
    assert record["formats"]["pt2"]["check"]["passed"]


def test_hf_folder_of_mobilenet_v1_loads_in_timm(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = realistic(build_student("mobilenet_v1", num_classes=10, alpha=1.0), 32)
    run = make_run(tmp_path, model, student="mobilenet_v1", alpha=1.0)
    record = export_run(run, formats=("hf",))
    assert record["formats"]["hf"]["loader"] == "timm"
    folder = run / "export" / "hf"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    x = load_digits_splits(32, augment=False)[1].tensors()[0][:8]
    with torch.no_grad():
        ref = model(x)
        local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        overlay = timm.create_model(
            "mobilenetv1_100", pretrained=True, num_classes=10, act_layer="relu",
            pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=10),
        ).eval()  # fmt: skip
        assert torch.allclose(local(x), ref, atol=1e-5)
        assert torch.allclose(overlay(x), ref, atol=1e-5)
    assert local.pretrained_cfg["input_size"] == [3, 32, 32]
    assert local.pretrained_cfg["label_names"] == [str(i) for i in range(10)]
    card = (folder / "README.md").read_text()
    assert 'timm.create_model("local-dir:' in card and "act_layer=relu" in card


def test_hf_folder_of_a_timm_student_loads_in_timm(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    model = realistic(build_student("timm:resnet18", num_classes=10), 32)
    run = make_run(tmp_path, model, student="timm:resnet18")
    export_run(run, formats=("hf",))
    loaded = timm.create_model(f"local-dir:{run / 'export' / 'hf'}", pretrained=True).eval()
    x = load_digits_splits(32, augment=False)[1].tensors()[0][:4]
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_import_distill_does_not_import_the_export_extra() -> None:
    # every module of the package and its CLI: the extra is imported inside functions only
    code = (
        "import sys, distill, distill.compare, distill.cli.export, distill.demo.ship\n"
        "import distill.export.api, distill.export.graph, distill.export.int8\n"
        "import distill.export.hf, distill.export.latency, distill.export.data\n"
        "from distill.export import read_export_json, export_run\n"
        "print([m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
