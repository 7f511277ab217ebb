"""Is an exported model the model? Outputs compared with eager PyTorch on real images.

An export passes when every output is within `atol` (1e-4) of PyTorch's and the top-1 class
agrees on every image. A top-1 flip between two classes whose PyTorch logits are within
2·atol of each other is a tie that any float reordering may break; it is counted apart
(`near_ties`) and does not fail the export. Anything else fails with the largest difference
named (image, class, both values).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.export.run import ExportError

__all__ = [
    "DEFAULT_ATOL",
    "Agreement",
    "compare_outputs",
    "conditioning_hint",
    "float32_error",
    "require",
    "top1_accuracy",
    "torch_outputs",
]

DEFAULT_ATOL = 1e-4
_EXTRA = "pip install 'mobiledistill[export]' (onnx, onnxruntime, onnxscript)"


def require(name: str) -> ModuleType:
    """Import an optional export dependency, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ExportError(f"exporting needs {name}: {_EXTRA}") from e


@torch.no_grad()
def torch_outputs(model: nn.Module, inputs: Tensor, batch_size: int = 64) -> np.ndarray:
    """Eager PyTorch outputs (N, K) of `model` in eval mode, as float32."""
    model.eval()
    outs = [model(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return torch.cat(outs).float().numpy()


@dataclass(frozen=True)
class Agreement:
    """One runtime's outputs against a reference on the same images."""

    runtime: str
    reference: str
    images: int
    max_abs_diff: float
    worst_image: int
    worst_class: int
    worst_reference: float
    worst_value: float
    top1_agreement: float  # % of images with the same top-1 class
    disagreements: int  # top-1 flips that are not near-ties
    near_ties: int
    atol: float
    non_finite: int

    @property
    def passed(self) -> bool:
        return self.non_finite == 0 and self.max_abs_diff <= self.atol and not self.disagreements

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def describe(self) -> str:
        text = (
            f"{self.runtime} vs {self.reference} on {self.images} images: max |Δ| "
            f"{self.max_abs_diff:.3g} (image {self.worst_image}, class {self.worst_class}: "
            f"{self.worst_value:.6g} vs {self.worst_reference:.6g}; allowed {self.atol:g}), "
            f"top-1 agreement {self.top1_agreement:.2f}%"
        )
        if self.near_ties:
            text += f" ({self.near_ties} flips between classes tied within 2·atol)"
        if self.non_finite:
            text += f", {self.non_finite} non-finite outputs"
        return text

    def require(self, hint: str = "") -> Agreement:
        """Raise ExportError naming the largest difference unless the check passed."""
        if not self.passed:
            raise ExportError(f"the exported model does not match: {self.describe()}.{hint}")
        return self


def compare_outputs(
    reference: np.ndarray,
    got: np.ndarray,
    *,
    runtime: str,
    reference_name: str = "PyTorch",
    atol: float = DEFAULT_ATOL,
) -> Agreement:
    """Compare (N, K) outputs elementwise and by top-1 class (see the module docstring)."""
    ref = np.asarray(reference, dtype=np.float64).reshape(len(reference), -1)
    out = np.asarray(got, dtype=np.float64).reshape(len(got), -1)
    if ref.shape != out.shape:
        raise ExportError(f"{runtime} returned shape {out.shape}, PyTorch {ref.shape}")
    finite = np.isfinite(out)
    diff = np.where(finite, np.abs(out - ref), np.inf)
    i, k = np.unravel_index(int(np.argmax(diff)), diff.shape)
    same = ref.argmax(1) == np.where(finite, out, -np.inf).argmax(1)
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.zeros((len(ref), 2))
    tie = (top2[:, 1] - top2[:, 0]) <= 2 * atol
    return Agreement(
        runtime=runtime,
        reference=reference_name,
        images=len(ref),
        max_abs_diff=float(diff[i, k]),
        worst_image=int(i),
        worst_class=int(k),
        worst_reference=float(ref[i, k]),
        worst_value=float(out[i, k]),
        top1_agreement=float(same.mean() * 100.0),
        disagreements=int((~same & ~tie).sum()),
        near_ties=int((~same & tie).sum()),
        atol=atol,
        non_finite=int((~finite).sum()),
    )


@torch.no_grad()
def float32_error(model: nn.Module, inputs: Tensor, batch_size: int = 64) -> float:
    """max |eager float32 - eager float64| of `model` on `inputs`: how far float32 rounding
    alone moves this model's outputs (BatchNorm channels with running_var near 0 amplify it)."""
    import copy

    wide = copy.deepcopy(model).double().eval()
    ref = torch_outputs(model, inputs, batch_size)
    outs = [wide(inputs[i : i + batch_size].double()) for i in range(0, len(inputs), batch_size)]
    return float(np.abs(torch.cat(outs).numpy() - ref).max())


def conditioning_hint(model: nn.Module, inputs: Tensor, agreement: Agreement) -> str:
    """A sentence for a failed check: is it the export, or float32 itself?"""
    if agreement.non_finite or agreement.disagreements:
        return ""
    try:
        err = float32_error(model, inputs)
    except Exception:  # a model that cannot run in float64: no diagnosis
        return ""
    if err >= agreement.atol / 4:
        return (
            f" PyTorch's own float32 outputs are {err:.2g} from float64 on these images, so "
            "most of the difference is float32 rounding in an ill-conditioned model (e.g. "
            "BatchNorm channels with running_var near 0), not the export; pass a larger --atol "
            "if that is acceptable."
        )
    return f" (PyTorch float32 vs float64: {err:.2g}: the difference comes from the export.)"


def top1_accuracy(outputs: np.ndarray, targets: Tensor | np.ndarray) -> float:
    """% of images whose top-1 class is the label."""
    t = np.asarray(targets)
    return float((np.asarray(outputs).argmax(1) == t).mean() * 100.0)
