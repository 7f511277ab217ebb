"""The Teacher wrapper: a frozen model fed the input it expects.

A Teacher owns freezing, eval mode and input conversion, so neither the loop nor the losses
need to know about them. A student trained at 128 px against a 224 px teacher is the paper's
resolution multiplier at work: the Teacher resizes and re-normalises the student's batch on
the device it is already on.

Being frozen, a teacher can also run in a lower precision than its student
(`Teacher.to_precision`, `DistillerConfig.teacher_dtype`): its weights are cast once, each batch
is converted in float32 and then cast, and its outputs reach the loss in float32.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any, cast, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.config import TeacherDtype
from distill.types import IMAGENET_MEAN, IMAGENET_STD, TASK_KINDS, Outputs, TaskKind

OutputKind = TaskKind  # what the teacher outputs is the task kind its student is evaluated on
OUTPUT_KINDS = TASK_KINDS
__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INPUT_SUFFIX",
    "OUTPUT_KINDS",
    "FeatureHooks",
    "OutputKind",
    "Teacher",
    "TeacherDtype",
    "as_teacher",
    "auto_teacher_dtype",
    "check_teacher_outputs",
    "split_hook_path",
    "teacher_dtype",
]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def auto_teacher_dtype(device: torch.device | str) -> torch.dtype:
    """The teacher precision `"auto"` picks on `device`: bf16 on CUDA devices that run it
    natively (Ampere and later: half the weight traffic, tensor-core matmuls, fp32's range),
    fp32 everywhere else. On the CPU bf16 is only faster with AVX512-BF16/AMX and changes the
    teacher's numbers with the machine a test runs on; fp16 is never picked, as its range
    (65504) can overflow in a teacher's activations: choose it explicitly."""
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if cuda and torch.cuda.get_device_capability(device) >= (8, 0):  # bf16 tensor cores
        return torch.bfloat16
    return torch.float32


def teacher_dtype(precision: TeacherDtype | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The torch dtype of a teacher precision name ("auto" resolved for `device`)."""
    if isinstance(precision, torch.dtype):
        if precision not in DTYPES.values():
            raise ValueError(f"a teacher runs in float32, bfloat16 or float16, not {precision}")
        return precision
    if precision == "auto":
        return auto_teacher_dtype(device)
    if precision not in DTYPES:
        allowed = ", ".join(get_args(TeacherDtype))
        raise ValueError(f"teacher precision must be one of {allowed}; got {precision!r}")
    return DTYPES[precision]


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    s = tuple(int(v) for v in size)
    if len(s) == 3:  # (C, H, W)
        s = s[1:]
    if len(s) != 2:
        raise ValueError(f"input_size must be an int, (H, W) or (C, H, W); got {size!r}")
    return (s[0], s[1])


def extract_output(out: Any) -> Tensor:
    """The tensor a classifier/embedder produced: plain tensors, HF outputs, dicts, tuples."""
    if isinstance(out, Tensor):
        return out
    for key in ("logits", "embeddings", "pooler_output"):
        value = getattr(out, key, None)
        if value is None and isinstance(out, Mapping):
            value = out.get(key)
        if isinstance(value, Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"cannot find the output tensor in a {type(out).__name__}; make the model return a "
        "tensor, or an object with .logits"
    )


INPUT_SUFFIX = ":input"


def split_hook_path(path: str) -> tuple[str, bool]:
    """("layer1.2.relu:input") -> ("layer1.2.relu", True): the module path, and whether the
    module's input is asked for rather than its output."""
    if path.endswith(INPUT_SUFFIX):
        return path[: -len(INPUT_SUFFIX)], True
    return path, False


class FeatureHooks:
    """Forward hooks that capture named intermediate activations of a model.

    `features` maps a name of your choice to a module path (`"layer3"`, `"blocks.10"`); the
    model itself is not edited. Captured tensors live until the next `clear()`.

    A path ending in ":input" captures the module's first positional input instead of its
    output, e.g. the pre-activation of a ReLU (`"layer1.2.relu:input"`). The input is copied
    before the module runs, because an in-place module (`ReLU(inplace=True)`, as in torchvision
    and timm ResNets) overwrites it. A module called several times per forward keeps the input
    of its *last* call: torchvision's Bottleneck/BasicBlock reuse one `relu` module for every
    activation of the block, so `"layerK.N.relu:input"` is the block's output before its final
    ReLU, after the residual addition. Outputs are not copied: a module whose output a later
    in-place op changes (`bn3` before `out += identity` in those ResNets) is captured as it is
    after the whole forward; hook the consumer's input instead.
    """

    def __init__(self, model: nn.Module, features: Mapping[str, str] | None) -> None:
        self.captured: dict[str, Tensor] = {}
        self._handles: list[Any] = []
        self.features = dict(features or {})
        modules = dict(model.named_modules())
        missing = [p for p in self.features.values() if split_hook_path(p)[0] not in modules]
        if missing:
            names = [n for n in modules if n][:40]
            raise ValueError(
                f"no module named {missing} in {type(model).__name__}; some of its module "
                f"names: {names} (a path may end in {INPUT_SUFFIX!r} to capture the module's "
                "input)"
            )
        for name, path in self.features.items():
            module_path, wants_input = split_hook_path(path)
            module = modules[module_path]
            if wants_input:
                self._handles.append(module.register_forward_pre_hook(self._input_hook(name)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(name)))

    def _hook(self, name: str) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.captured[name] = extract_output(output)

        return hook

    def _input_hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:
            if not inputs or not isinstance(inputs[0], Tensor):
                raise TypeError(
                    f"feature {name!r}: {type(module).__name__} was called without a tensor as "
                    f"its first positional argument, so its {INPUT_SUFFIX!r} cannot be captured; "
                    "hook the module that produces that tensor instead"
                )
            # a copy: an in-place module would overwrite its input right after this hook
            self.captured[name] = inputs[0].clone()

        return hook

    def pop(self) -> dict[str, Tensor]:
        out, self.captured = self.captured, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class Teacher(nn.Module):
    """A frozen teacher that converts the student's batch into what it expects.

    Args:
        model: any `nn.Module`; its parameters are frozen and it stays in eval mode.
        input_size: the teacher's own resolution (int or (H, W)); None leaves inputs unresized
            (non-image inputs).
        mean, std: the teacher's normalisation in 0..1 pixel units; None means the teacher
            takes the student's normalisation as is.
        output: what the model's output is: "logits", "multilabel" (per-attribute logits) or
            "embedding".
        features: {name: module path} of intermediate activations to capture for feature
            methods (FitNets, AT).
        student_mean, student_std: the normalisation of the batches the loop feeds in.
        num_outputs, label_names, source, name: metadata, kept in `meta`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        input_size: int | Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        output: OutputKind = "logits",
        features: Mapping[str, str] | None = None,
        student_mean: Sequence[float] = IMAGENET_MEAN,
        student_std: Sequence[float] = IMAGENET_STD,
        interpolation: str = "bilinear",
        num_outputs: int | None = None,
        label_names: Sequence[str] | None = None,
        source: str | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"Teacher needs an nn.Module, got {type(model).__name__}")
        if output not in OUTPUT_KINDS:
            raise ValueError(f"output must be one of {OUTPUT_KINDS}, got {output!r}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std for the teacher, or neither")
        if interpolation not in {"bilinear", "bicubic", "nearest", "area"}:
            raise ValueError(
                f"interpolation must be bilinear, bicubic, nearest or area, not {interpolation!r}"
            )
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.input_size = _pair(input_size) if input_size is not None else None
        self.output_kind: OutputKind = output
        self.interpolation = interpolation
        self.num_outputs = num_outputs
        self.label_names = list(label_names) if label_names is not None else None
        self.source = source
        self.name = name or type(model).__name__
        self.mean = tuple(float(v) for v in mean) if mean is not None else None
        self.std = tuple(float(v) for v in std) if std is not None else None
        self.student_mean = tuple(float(v) for v in student_mean)
        self.student_std = tuple(float(v) for v in student_std)
        if self.std is not None and any(s <= 0 for s in (*self.std, *self.student_std)):
            raise ValueError("std values must be > 0")
        # x_teacher = x_student * scale + shift: undo the student's normalisation, apply ours.
        # (1, C, 1, 1) non-persistent buffers: they follow .to(device) but stay out of checkpoints.
        scale, shift = self._affine()
        self.register_buffer("_scale", scale, persistent=False)
        self.register_buffer("_shift", shift, persistent=False)
        self._identity_norm = bool(torch.all(scale == 1) and torch.all(shift == 0))
        self._hooks = FeatureHooks(self.model, features)

    def _affine(self) -> tuple[Tensor, Tensor]:
        if self.mean is None or self.std is None:
            return torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
        if len(self.mean) != len(self.student_mean):
            raise ValueError(
                f"teacher mean has {len(self.mean)} channels, student mean "
                f"{len(self.student_mean)}: give matching normalisations"
            )
        tm, ts = torch.tensor(self.mean), torch.tensor(self.std)
        sm, ss = torch.tensor(self.student_mean), torch.tensor(self.student_std)
        return (ss / ts).view(1, -1, 1, 1), ((sm - tm) / ts).view(1, -1, 1, 1)

    @property
    def features(self) -> dict[str, str]:
        return dict(self._hooks.features)

    def add_features(self, features: Mapping[str, str]) -> None:
        """Capture more named activations (used by the Distiller for an objective's needs)."""
        merged = {**self._hooks.features, **features}
        self._hooks.remove()
        self._hooks = FeatureHooks(self.model, merged)

    @property
    def meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "output": self.output_kind,
            "num_outputs": self.num_outputs,
            "label_names": self.label_names,
            "source": self.source,
        }

    def train(self, mode: bool = True) -> Teacher:
        # A teacher never trains: BatchNorm statistics and dropout stay in inference behaviour
        # even when a surrounding module calls .train().
        super().train(False)
        return self

    def convert(self, x: Tensor) -> Tensor:
        """Re-normalise and resize a student batch (B, C, H, W) into the teacher's format."""
        if x.dim() == 4:
            if not self._identity_norm:
                scale, shift = cast(Tensor, self._scale), cast(Tensor, self._shift)
                x = x * scale.to(x.dtype) + shift.to(x.dtype)
            if self.input_size is not None and tuple(x.shape[-2:]) != self.input_size:
                # antialias in both directions, as torchvision v2 and PIL resize: for bicubic it
                # also picks their kernel (a = -0.5) over the one without it (a = -0.75)
                smooth = self.interpolation in {"bilinear", "bicubic"}
                x = F.interpolate(
                    x,
                    size=self.input_size,
                    mode=self.interpolation,
                    **({"align_corners": False, "antialias": True} if smooth else {}),
                )
        return x

    @property
    def dtype(self) -> torch.dtype:
        """The precision the model's weights are in (float32 for a model without any)."""
        return _weight(self.model).dtype

    def to_precision(
        self, precision: TeacherDtype | torch.dtype, device: torch.device | str | None = None
    ) -> Teacher:
        """Cast the model's floating-point weights and buffers to `precision` ("fp32", "bf16",
        "fp16", a torch dtype, or "auto": `auto_teacher_dtype` of `device`, by default the
        device the weights are on). A bf16/fp16 teacher gets its input in that dtype, runs
        outside the loop's autocast and returns float32 outputs. Casting down loses the weights'
        low bits: reload the teacher to go back to fp32."""
        dev = device if device is not None else _weight(self.model).device
        self.model.to(teacher_dtype(precision, dev))
        return self

    def forward(self, x: Any, *, prepared: bool = False) -> Outputs:
        """Run the teacher on a student batch (or on `x` already prepared for it)."""
        low = _weight(self.model).dtype != torch.float32
        with torch.inference_mode():
            raw = self.infer(x, prepared=prepared)
        # Inference tensors cannot be saved for backward; the losses need plain tensors (and
        # float32 ones from a bf16/fp16 teacher: softmax at temperature T wants the precision).
        feats = {k: _plain(v, low) for k, v in raw.features.items()}
        return Outputs(_plain(raw.output, low), feats)

    def infer(self, x: Any, *, prepared: bool = False) -> Outputs:
        """`forward` without its copies, for a caller already under `torch.inference_mode`
        (`distill.ensemble.Teachers` runs every member under one): inference tensors, in the
        dtype the model produced them in."""
        weight = _weight(self.model)
        low = weight.dtype != torch.float32
        # a bf16/fp16 teacher runs in its own dtype, not in the loop's autocast precision
        no_autocast = torch.autocast(weight.device.type, enabled=False) if low else nullcontext()
        with no_autocast:
            inp = x if prepared or not isinstance(x, Tensor) else self.convert(x)
            if low:
                inp = _cast_floats(inp, weight.dtype)
            self._hooks.pop()
            out = extract_output(self._run(inp, weight))
            return Outputs(out, self._hooks.pop())

    def _run(self, inp: Any, weight: Tensor) -> Any:
        try:
            return self.model(inp)
        except RuntimeError as e:
            if weight.dtype == torch.float32 or not any(
                w in str(e) for w in ("Half", "BFloat16", "dtype")
            ):
                raise
            name = {v: k for k, v in DTYPES.items()}[weight.dtype]
            raise RuntimeError(
                f"the teacher {self.name} cannot run in {name} on {weight.device.type}: {e}. "
                "Set teacher_dtype (recipes: --teacher-precision) to fp32, or to bf16 if this "
                "was fp16"
            ) from e

    @torch.no_grad()
    def check_compatible(
        self, student: nn.Module, example_input: Any, *, same_dim: bool | None = None
    ) -> None:
        """Run one dry batch through both models and say which shapes disagree.

        `same_dim` (default: True except for embeddings, which a projection may map) requires
        the last output dimension to match.
        """
        was_training = student.training
        student.eval()
        try:
            s_out = extract_output(student(example_input))
        finally:
            student.train(was_training)
        t_out = self(example_input).output
        if same_dim is None:
            same_dim = self.output_kind != "embedding"
        if s_out.shape[0] != t_out.shape[0]:
            raise ValueError(
                f"student returned a batch of {s_out.shape[0]} but the teacher {t_out.shape[0]}"
            )
        if same_dim and s_out.shape[1:] != t_out.shape[1:]:
            what = {"logits": "classes", "multilabel": "attributes", "embedding": "dimensions"}
            raise ValueError(
                f"student output {tuple(s_out.shape)} does not match teacher output "
                f"{tuple(t_out.shape)} ({self.output_kind}): the student has "
                f"{s_out.shape[-1]} {what[self.output_kind]}, the teacher {t_out.shape[-1]}. "
                "Build the student with num_classes matching the teacher, or give the teacher "
                "a head for your label set (teachers.load(..., num_classes=N))."
            )
        if self.num_outputs is None:
            self.num_outputs = int(t_out.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, input_size={self.input_size}, output={self.output_kind!r}, "
            f"features={self.features}, dtype={self.dtype}"
        )


def _weight(model: nn.Module) -> Tensor:
    """The model's first floating-point parameter or buffer: the dtype and device it runs in
    (an empty float32 CPU tensor for a model without any)."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return next((t for t in tensors if t.is_floating_point()), torch.zeros(0))


def _cast_floats(x: Any, dtype: torch.dtype) -> Any:
    """`x` (a tensor, or a mapping/sequence of them) with floating tensors cast to `dtype`."""
    if isinstance(x, Tensor):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, Mapping):
        return {k: _cast_floats(v, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_cast_floats(v, dtype) for v in x]
    return x


def _plain(t: Tensor, to_float32: bool) -> Tensor:
    """A normal (not inference-mode) copy of `t`, floating point as float32 if asked."""
    if to_float32 and t.is_floating_point():
        return t.to(torch.float32, copy=True)
    return t.clone()


def check_teacher_outputs(
    teacher: Teacher, expected: int, what: str, unit: str = "classes"
) -> None:
    """The teacher must produce one output per class/attribute of the dataset (`what`)."""
    n = teacher.num_outputs
    if n is not None and n != expected:
        raise ValueError(
            f"the teacher {teacher.name} has {n} outputs but {what} has {expected} {unit}: the "
            "teacher must have been trained on this label set. Point --teacher at such a "
            f"checkpoint, or add num_classes={expected} to the teacher options to replace its "
            "head (which re-initialises it: fine-tune it first)"
        )


def as_teacher(model: nn.Module | Teacher | None, **kwargs: Any) -> Teacher | None:
    """Wrap a bare module in a Teacher (pass-through for Teachers, None, and modules that act as
    one: `acts_as_teacher = True`, as `distill.ensemble.Teachers`, which serves wherever a
    Teacher does)."""
    if model is None or isinstance(model, Teacher):
        return model
    if getattr(model, "acts_as_teacher", False) is True:
        return cast(Teacher, model)  # duck-typed: distill.ensemble imports this module
    return Teacher(cast(nn.Module, model), **kwargs)
