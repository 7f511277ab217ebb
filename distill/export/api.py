"""`export_run`: a finished run folder in, checked deployable files out, export.json beside.

    from distill.export import export_run
    record = export_run("runs/kd-a0.5-r160", formats=("onnx", "pt2", "hf"), int8=True)

Every file is checked before it is kept: ONNX and .pt2 against eager PyTorch on real images
(within `atol`, same top-1 class), the hf folder by loading it back the way its card says,
INT8 by its metric next to fp32. When a check fails the export raises `ExportError` naming the
largest difference, and the files this call created are removed (export.json is written only
when every step passed). Nothing that exists is replaced unless `overwrite=True`;
metrics.json, config.json and student.safetensors are only read. INT8 that costs more than
`max_int8_drop` is kept and flagged (`formats.int8.over_threshold`; the CLI exits with 3).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from torch import nn

from distill.export.check import (
    DEFAULT_ATOL,
    Agreement,
    compare_outputs,
    conditioning_hint,
    top1_accuracy,
    torch_outputs,
)
from distill.export.data import DEFAULT_CALIBRATION, ExportData, resolve_data
from distill.export.int8 import DEFAULT_MAX_DROP, size_mb
from distill.export.latency import LatencySettings
from distill.export.record import write_export_record
from distill.export.run import ExportError, LoadedRun, load_run
from distill.files import sha256_file

__all__ = ["FORMATS", "ExportOptions", "export_run", "planned_files"]

FORMATS = ("onnx", "pt2", "hf")
FILES = {"onnx": "student.onnx", "int8": "student.int8.onnx", "pt2": "student.pt2", "hf": "hf"}


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how strictly to check it."""

    formats: tuple[str, ...] = ("onnx",)
    int8: bool = False
    out: str | None = None  # default: RUN_DIR/export
    overwrite: bool = False
    atol: float = DEFAULT_ATOL
    max_int8_drop: float = DEFAULT_MAX_DROP
    calibration_images: int = DEFAULT_CALIBRATION
    latency: bool = True
    latency_settings: LatencySettings = field(default_factory=LatencySettings)
    push_to_hub: str | None = None
    opset: int | None = None

    def problems(self) -> list[str]:
        p = [f"unknown format {f!r}; choose from {', '.join(FORMATS)}" for f in self.formats
             if f not in FORMATS]  # fmt: skip
        if not self.formats and not self.int8:
            p.append("nothing to export: give --format and/or --int8")
        if not self.atol > 0:
            p.append(f"atol must be > 0, got {self.atol}")
        if not self.max_int8_drop >= 0:
            p.append(f"max_int8_drop is in points of the metric, >= 0; got {self.max_int8_drop}")
        if self.calibration_images < 0:
            p.append(f"calibration_images must be >= 0, got {self.calibration_images}")
        if self.push_to_hub and "hf" not in self.formats:
            p.append("--push-to-hub uploads the hf folder: add --format hf")
        return p

    def steps(self) -> list[str]:
        """The files to make, in order (INT8 quantises the fp32 ONNX file, so needs it)."""
        wanted = set(self.formats) | ({"onnx", "int8"} if self.int8 else set())
        return [s for s in ("onnx", "int8", "pt2", "hf") if s in wanted]


def planned_files(run_dir: str | Path, options: ExportOptions) -> dict[str, Path]:
    out = Path(options.out) if options.out else Path(run_dir) / "export"
    return {step: out / FILES[step] for step in options.steps()}


def _refuse_existing(files: dict[str, Path], overwrite: bool) -> None:
    there = [str(p) for p in files.values() if p.exists()]
    if there and not overwrite:
        raise FileExistsError(
            f"already exported: {', '.join(there)}; pass --overwrite (overwrite=True) to replace "
            "them, or --out DIR to export elsewhere"
        )


def _metadata(run: LoadedRun, atol: float) -> dict[str, str]:
    d, pre = run.describe(), run.preprocess
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in d.items()}
    meta.update({k: json.dumps(v) for k, v in pre.to_dict().items()})
    meta.update(
        producer="mobiledistill",
        input_layout="NCHW",
        input_scale="RGB / 255, then (x - mean) / std",
        checked_atol=f"{atol:g}",
        description=(
            f"{run.student} distilled from {d['teacher'] or 'labels'} ({d['method']}) on "
            f"{d['dataset'] or 'unknown data'}; input {pre.input_size}, mean {list(pre.mean)}, "
            f"std {list(pre.std)}"
        ),
    )
    return meta


def _file_entry(path: Path, run_dir: Path, **extra: Any) -> dict[str, Any]:
    full, root = path.resolve(), run_dir.resolve()
    shown = full.relative_to(root) if full.is_relative_to(root) else full
    digest = sha256_file(path) if path.is_file() else None
    entry: dict[str, Any] = {"file": str(shown), "sha256": digest}
    if path.is_file():
        entry["size_mb"] = round(size_mb(path), 4)
    return {**entry, **extra}


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("torch", "onnx", "onnxruntime", "onnxscript", "timm", "torchvision"):
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    return out


def _checked(path: Path, check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a file's check; a file that fails it is removed before the error propagates."""
    try:
        return check()
    except BaseException:
        if path.is_file():
            path.unlink()
        raise


def _require(agree: Agreement, run: LoadedRun, data: ExportData) -> Agreement:
    if agree.passed:
        return agree
    return agree.require(conditioning_hint(run.model, data.inputs, agree))


def _onnx_step(run: LoadedRun, path: Path, data: ExportData, ref: Any, o: ExportOptions) -> dict:
    from distill.export.graph import export_onnx, onnx_session, run_onnx

    export_onnx(
        run.model, path, input_size=run.preprocess.input_size, metadata=_metadata(run, o.atol),
        opset=o.opset,
    )  # fmt: skip

    def check() -> dict[str, Any]:
        got = run_onnx(onnx_session(path), data.inputs)
        one = run_onnx(onnx_session(path), data.inputs[:1], batch_size=1)  # the batch-1 path
        agree = _require(compare_outputs(ref, got, runtime="onnxruntime", atol=o.atol), run, data)
        _require(
            compare_outputs(ref[:1], one, runtime="onnxruntime batch 1", atol=o.atol), run, data
        )
        return {"check": agree.to_dict()}

    return _checked(path, check)


def _pt2_step(run: LoadedRun, path: Path, data: ExportData, ref: Any, o: ExportOptions) -> dict:
    from distill.export.graph import export_pt2, run_pt2

    export_pt2(
        run.model, path, input_size=run.preprocess.input_size, metadata=_metadata(run, o.atol)
    )

    def check() -> dict[str, Any]:
        got, meta = run_pt2(path, data.inputs)
        if meta.get("student") != run.student:
            raise ExportError(f"{path}: its metadata did not survive torch.export.save/load")
        agree = compare_outputs(ref, got, runtime="torch.export", atol=o.atol)
        return {"check": _require(agree, run, data).to_dict()}

    return _checked(path, check)


def _int8_step(files: dict[str, Path], data: ExportData, o: ExportOptions) -> dict:
    from distill.export.int8 import quantize_int8, score_int8

    path = files["int8"]
    quantize_int8(files["onnx"], path, data.calibration)

    def check() -> dict[str, Any]:
        report = score_int8(
            files["onnx"], path, data.inputs, data.targets,
            calibration_images=len(data.calibration), max_drop=o.max_int8_drop,
        )  # fmt: skip
        return {**report.to_dict(), "summary": report.describe()}

    return _checked(path, check)


def _hf_step(run: LoadedRun, path: Path, data: ExportData, record: dict) -> dict:
    from distill.export.hf import check_hf_folder, export_hf

    folder = export_hf(run, path, export=record)
    agree = check_hf_folder(folder, run.model, data.inputs[:64])
    agree.require(" (the hf folder loads differently from the run's student)")
    return {**folder.to_dict(), "check": agree.to_dict(), "pushed_to": None}


def _push(run_dir: Path, folder: Path, record: dict[str, Any], repo: str) -> dict[str, Any]:
    """After everything is written and checked: a failed upload leaves a complete export."""
    from distill.export.hf import push_to_hub

    record["formats"]["hf"]["pushed_to"] = push_to_hub(folder, repo)
    return write_export_record(run_dir, record)


def export_run(
    run_dir: str | Path,
    options: ExportOptions | None = None,
    *,
    data: Any = None,
    student: str | None = None,
    model: nn.Module | None = None,
    log: Callable[[str], None] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Export a run folder's student (see the module docstring); returns export.json's dict.

    options: an ExportOptions, or its fields as keyword arguments (formats=("onnx", "hf"),
    int8=True, out=..., overwrite=..., ...). data: None (the digits), an image folder, tensors
    (inputs, targets) or a loader: see distill.export.data.resolve_data. student / model:
    for runs that did not record a buildable student name.
    """
    if options is not None and overrides:
        raise TypeError("pass options or keyword overrides, not both")
    if "formats" in overrides:
        overrides["formats"] = _formats(overrides["formats"])
    o = options or ExportOptions(**overrides)
    bad = o.problems()
    if bad:
        raise ValueError("; ".join(bad))
    say = log or (lambda _msg: None)
    root = Path(run_dir)
    files = planned_files(root, o)
    _refuse_existing(files, o.overwrite)
    run = load_run(root, student=student, model=model)
    for note in run.notes:
        say(f"{run.run_name}: {note}")
    d = resolve_data(run, data, calibration=o.calibration_images)
    if o.int8 and len(d.calibration) == 0:  # before anything is written
        raise ExportError(
            f"the INT8 calibration set is empty ({d.name}): calibration needs a few hundred "
            "training images; pass --calibration-images N > 0, or a --data-dir whose train/ "
            "folder holds images"
        )
    ref = torch_outputs(run.model, d.inputs)
    record = _base_record(run, d, ref)
    new = [p for p in files.values() if not p.exists()]
    try:
        written = _run_steps(run, files, d, ref, record, o, say)
    except BaseException:  # a later step failed: no half export is left behind
        for p in new:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        raise
    if o.push_to_hub:
        written = _push(root, files["hf"], written, o.push_to_hub)
        say(f"pushed {files['hf']} to {written['formats']['hf']['pushed_to']}")
    return written


def _base_record(run: LoadedRun, d: ExportData, ref: Any) -> dict[str, Any]:
    return {
        "run_name": run.run_name,
        "student": run.student,
        "alpha": run.alpha,
        "resolution": run.resolution,
        "num_classes": run.num_classes,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
        "preprocess": run.preprocess.to_dict(),
        "evaluation": {
            "data": d.name,
            "images": len(d.inputs),
            "metric": "top1" if d.targets is not None else None,
            "pytorch": None if d.targets is None else top1_accuracy(ref, d.targets),
        },
        "formats": {},
        "latency": None,
    }


def _run_steps(
    run: LoadedRun,
    files: dict[str, Path],
    d: ExportData,
    ref: Any,
    record: dict[str, Any],
    o: ExportOptions,
    say: Callable[[str], None],
) -> dict[str, Any]:
    from distill.export.latency import measure_latency

    formats = record["formats"]
    for step in (s for s in o.steps() if s != "hf"):
        if step == "onnx":
            formats["onnx"] = _onnx_step(run, files["onnx"], d, ref, o)
        elif step == "pt2":
            formats["pt2"] = _pt2_step(run, files["pt2"], d, ref, o)
        else:
            formats["int8"] = _int8_step(files, d, o)
        formats[step] = _file_entry(files[step], run.run_dir, **formats[step])
        check = formats[step].get("check")
        say(f"{step}: {files[step]}" + (f" — {_summary(check)}" if check else ""))
        if step == "int8":
            say(formats["int8"]["summary"])
    if o.latency and "onnx" in formats:
        say("measuring CPU latency (ONNX Runtime and eager PyTorch)")
        record["latency"] = measure_latency(
            run.model, run.preprocess.input_size, onnx=files["onnx"],
            int8=files.get("int8") if "int8" in formats else None, settings=o.latency_settings,
        )  # fmt: skip
    if "hf" in files:
        formats["hf"] = _file_entry(
            files["hf"], run.run_dir, **_hf_step(run, files["hf"], d, record)
        )
        say(f"hf: {files['hf']} (loads with {formats['hf']['loader']})")
    written = write_export_record(run.run_dir, record)
    say(f"wrote {run.run_dir / 'export.json'}")
    return written


def _summary(check: dict[str, Any]) -> str:
    return (
        f"max |Δ| vs PyTorch {check['max_abs_diff']:.2g}, top-1 agreement "
        f"{check['top1_agreement']:.1f}% on {check['images']} images"
    )


def _formats(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)
