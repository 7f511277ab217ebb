"""The real images an export is checked and calibrated on.

By default scikit-learn's digits (`distill.data.load_digits_splits`, at the student's input
size, normalised with its mean/std): the test split is the evaluation set, the first few
hundred training images calibrate INT8. Their labels count only for runs trained on the
digits; on any other run the digits still check that the runtimes agree (same inputs, same
outputs), and INT8 is scored by its top-1 agreement with fp32. A run's own data is an image
folder (`--data-dir`, evaluated with the eval transform: resize, centre crop, normalise) or,
from Python, tensors.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.export.run import ExportError, LoadedRun

__all__ = ["DEFAULT_CALIBRATION", "ExportData", "digits_data", "folder_data", "resolve_data"]

DEFAULT_CALIBRATION = 300  # training images that calibrate INT8


@dataclass
class ExportData:
    """Evaluation inputs (N, C, H, W), their labels (None: agreement only), calibration inputs."""

    name: str
    inputs: Tensor
    targets: Tensor | None
    calibration: Tensor

    def __post_init__(self) -> None:
        if self.inputs.dim() != 4 or len(self.inputs) == 0:
            raise ExportError(
                f"{self.name}: the evaluation set must be a non-empty (N, C, H, W) batch, got "
                f"shape {tuple(self.inputs.shape)}"
            )
        if self.targets is not None and len(self.targets) != len(self.inputs):
            raise ExportError(
                f"{self.name}: {len(self.targets)} labels for {len(self.inputs)} images"
            )
        for what, x in (("evaluation", self.inputs), ("calibration", self.calibration)):
            if x.numel() and not torch.isfinite(x).all():
                raise ExportError(f"{self.name}: the {what} images hold NaN or infinite values")


def digits_data(run: LoadedRun, *, calibration: int = DEFAULT_CALIBRATION) -> ExportData:
    """The digits at the run's input size (3 channels, square), normalised as it expects."""
    from distill.data.digits import load_digits_splits

    c, h, w = run.preprocess.input_size
    if c != 3 or h != w:
        raise ExportError(
            f"the digits are square 3-channel images but the student takes {c}x{h}x{w}; pass the "
            "run's own data (--data-dir DIR, or data=(inputs, targets) in Python)"
        )
    train, test = load_digits_splits(
        h, mean=run.preprocess.mean, std=run.preprocess.std, augment=False
    )
    inputs, targets = test.tensors()
    what = "sklearn digits, test split" + ("" if run.on_digits else " (labels unused)")
    return ExportData(
        name=what,
        inputs=inputs,
        targets=targets if run.on_digits else None,
        calibration=train.tensors()[0][:calibration],
    )


def _stack(ds: Any, limit: int | None) -> tuple[Tensor, Tensor | None]:
    """Up to `limit` items drawn with a fixed seed across the whole folder (an image folder
    lists its samples class by class: the first N would be the first few classes only)."""
    n = len(ds) if limit is None else min(limit, len(ds))
    picked = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort()
    items = [ds[i] for i in picked.values.tolist()]
    if not items:
        return torch.empty(0), None
    x = torch.stack([it["input"] for it in items])
    has = all("target" in it for it in items)
    y = torch.as_tensor([int(it["target"]) for it in items]) if has else None
    return x, y


def folder_data(
    run: LoadedRun,
    data_dir: str | Path,
    *,
    calibration: int = DEFAULT_CALIBRATION,
    eval_images: int | None = 1000,
) -> ExportData:
    """An image folder (one sub-folder per class, the recipes' layout): DIR/train calibrates
    and DIR/val evaluates when both exist, else DIR does both."""
    from distill.data.datasets import image_folder
    from distill.data.transforms import build_transforms

    root = Path(data_dir)
    pre = run.preprocess
    tf = build_transforms(
        pre.input_size[1:],
        pre.mean,
        pre.std,
        train=False,
        crop_pct=pre.crop_pct or 1.0,
        interpolation=pre.interpolation,
    )
    split = (root / "train").is_dir() and (root / "val").is_dir()
    try:
        evaluation = image_folder(root / "val" if split else root, tf, num_classes=run.num_classes)
        calib = image_folder(root / "train", tf) if split else evaluation
    except (ValueError, OSError) as e:
        raise ExportError(f"--data-dir {root}: {e}") from e
    inputs, targets = _stack(evaluation, eval_images)
    calib_x, _ = _stack(calib, calibration)
    return ExportData(f"{root} ({'val' if split else 'all'})", inputs, targets, calib_x)


def resolve_data(
    run: LoadedRun, data: Any = None, *, calibration: int = DEFAULT_CALIBRATION
) -> ExportData:
    """None: the digits; an ExportData; a folder path; (inputs, targets[, calibration])
    tensors; or an iterable of {"input", "target"} batches (a DataLoader)."""
    if data is None:
        return digits_data(run, calibration=calibration)
    if isinstance(data, ExportData):
        return data
    if isinstance(data, (str, Path)):
        return folder_data(run, data, calibration=calibration)
    if isinstance(data, tuple) and data and isinstance(data[0], Tensor):
        inputs, targets = data[0], data[1] if len(data) > 1 else None
        calib = data[2] if len(data) > 2 else inputs[:calibration]
        return ExportData("given tensors", inputs.float(), targets, calib.float())
    if isinstance(data, Iterable):
        xs, ys = [], []
        for batch in data:
            xs.append(batch["input"] if isinstance(batch, dict) else batch[0])
            ys.append(batch.get("target") if isinstance(batch, dict) else batch[1])
        if not xs:
            raise ExportError("the data given holds no batches")
        x = torch.cat(xs).float()
        labels = [t for t in ys if t is not None]
        y = torch.cat(labels) if len(labels) == len(ys) else None
        return ExportData("given batches", x, y, x[:calibration])
    raise ExportError(f"cannot use {type(data).__name__} as export data (see resolve_data)")
