"""Default stage maps: where feature methods hook a network when the user names no module.

A *stage* is the last module at one spatial stride of a backbone (ResNet `layer1` .. `layer4`,
MobileNetV1's last block at strides 2 .. 32). For each stage `stage_map` gives the path of its
output (after the activation), the path of the same map *before* its last activation (what
OFD and ReviewKD hook) and the BatchNorm that feeds that activation (OFD's margin). The
penultimate feature (`penultimate`) is the pooled vector the classifier reads.

Supported: our MobileNetV1 (every width multiplier and variant), torchvision ResNets
(resnet18 .. resnet152, wide_resnet*, resnext*) and timm's `ResNet` class (resnet18 .. 152 and
its stem/downsampling variants, e.g. resnet50d). A `distill.Teacher` is read through `.model`.
Channels and strides are never taken from tables: one dry forward at 64 px (eval mode, no
grad, on the model's device and dtype, training flags restored after) measures them, so width
multipliers and custom stems are handled.

Pre-activation paths use the `FeatureHooks` ":input" syntax. In torchvision blocks one `relu`
module serves every activation of the block; its last call is the one after the residual
addition, so `"layer4.2.relu:input"` is the block's pre-ReLU output (what the OFD and ReviewKD
authors' modified ResNets return). timm blocks have `act3` (Bottleneck) / `act2` (BasicBlock)
for that activation. The MobileNetV1 path is the input of the stage's last `act`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from distill.models.mobilenet import ConvBNAct, DepthwiseSeparable, MobileNetV1
from distill.teacher import INPUT_SUFFIX, FeatureHooks, Teacher

__all__ = ["Stage", "match_stages", "penultimate", "stage_map"]

PROBE_SIZE = 64  # px of the dry forward: stride 32 leaves 2x2, every stride divides it


@dataclass(frozen=True)
class Stage:
    """One stage of a backbone.

    name: "layer1" .. "layer4" (ResNets) or "reduction_2" .. "reduction_32" (MobileNetV1).
    path: module whose output is the stage's feature map (B, channels, H/stride, W/stride).
    channels, stride: measured; stride is relative to the input.
    preact_path: hook path of the same map before its last activation (may end in ":input").
    norm_path: the BatchNorm whose output feeds that activation (for OFD's margin); in a
        residual block the addition sits between the two (see `distill.losses.ofd`).
    """

    name: str
    path: str
    channels: int
    stride: int
    preact_path: str | None = None
    norm_path: str | None = None

    def hook_path(self, preact: bool) -> str:
        """`preact_path` when `preact` (raising where none is known), else `path`."""
        if not preact:
            return self.path
        if self.preact_path is None:
            raise ValueError(
                f"stage {self.name} ({self.path}) has no known pre-activation path; pass "
                "preact=False to hook the stage's output, or give module paths explicitly"
            )
        return self.preact_path


@dataclass(frozen=True)
class _Plan:
    stages: tuple[tuple[str, str, str | None, str | None], ...]  # name, path, preact, norm
    penultimate: str


def _unwrap(model: nn.Module) -> nn.Module:
    if isinstance(model, Teacher):
        return model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module or a distill.Teacher, got {type(model).__name__}")
    return model


def _unknown(model: nn.Module) -> ValueError:
    return ValueError(
        f"no default stage map for {type(model).__name__}: distill knows its MobileNetV1, "
        "torchvision ResNets (resnet18..152, wide_resnet, resnext) and timm ResNets. Pass the "
        "module paths explicitly to the objective (e.g. ReviewKDLoss(student_layers=[...], "
        "teacher_layers=[...], ...)); print(dict(model.named_modules()).keys()) lists them"
    )


def _mobilenet_plan(model: MobileNetV1) -> _Plan:
    last: dict[int, str] = {}
    for info in model.feature_info:  # later entries win: the last module at each stride
        last[int(info["reduction"])] = str(info["module"])
    stages = []
    for reduction, path in sorted(last.items()):
        module = model.get_submodule(path)
        unit = module.pw if isinstance(module, DepthwiseSeparable) else module
        inner = "pw." if isinstance(module, DepthwiseSeparable) else ""
        preact = norm = None
        if isinstance(unit, ConvBNAct):
            preact, norm = f"{path}.{inner}act{INPUT_SUFFIX}", f"{path}.{inner}bn"
        stages.append((f"reduction_{reduction}", path, preact, norm))
    return _Plan(tuple(stages), "global_pool")


def _resnet_block_names(block: nn.Module) -> tuple[str | None, str | None]:
    """(activation applied after the residual addition, BatchNorm before the addition)."""
    if hasattr(block, "act3") and hasattr(block, "bn3"):  # timm Bottleneck
        return "act3", "bn3"
    if hasattr(block, "act2") and hasattr(block, "bn2") and not hasattr(block, "bn3"):
        return "act2", "bn2"  # timm BasicBlock
    if isinstance(getattr(block, "relu", None), nn.Module):  # torchvision: one reused ReLU
        if hasattr(block, "bn3"):
            return "relu", "bn3"
        if hasattr(block, "bn2"):
            return "relu", "bn2"
    return None, None


def _resnet_plan(model: nn.Module) -> _Plan | None:
    layers = [getattr(model, f"layer{k}", None) for k in range(1, 5)]
    if type(model).__name__ != "ResNet" or not all(
        isinstance(layer, nn.Sequential) and len(layer) > 0 for layer in layers
    ):
        return None
    stages = []
    for k, layer in enumerate(layers, start=1):
        assert isinstance(layer, nn.Sequential)
        last = f"layer{k}.{len(layer) - 1}"
        act, bn = _resnet_block_names(layer[-1])
        preact = f"{last}.{act}{INPUT_SUFFIX}" if act else None
        norm = f"{last}.{bn}" if bn else None
        stages.append((f"layer{k}", f"layer{k}", preact, norm))
    pooled = "avgpool" if isinstance(getattr(model, "avgpool", None), nn.Module) else None
    if pooled is None and isinstance(getattr(model, "global_pool", None), nn.Module):
        pooled = "global_pool"  # timm
    if pooled is None:
        return None
    return _Plan(tuple(stages), pooled)


def _plan(model: nn.Module) -> _Plan:
    if isinstance(model, MobileNetV1):
        return _mobilenet_plan(model)
    plan = _resnet_plan(model)
    if plan is None:
        raise _unknown(model)
    return plan


def _in_channels(model: nn.Module) -> int:
    if isinstance(model, MobileNetV1):
        return model.in_chans
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise _unknown(model)


@torch.no_grad()
def _measure(model: nn.Module) -> tuple[list[Stage], tuple[str, int]]:
    plan = _plan(model)
    hooks: dict[str, str] = {"pooled": plan.penultimate}
    for i, (_name, path, preact, _norm) in enumerate(plan.stages):
        hooks[f"out{i}"] = path
        if preact is not None:
            hooks[f"pre{i}"] = preact
    weight = next(iter(model.parameters()), None)
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
    shape = (1, _in_channels(model), PROBE_SIZE, PROBE_SIZE)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=dtype)
    modes = {m: m.training for m in model.modules()}
    probe = FeatureHooks(model, hooks)
    try:
        model.eval()  # no BatchNorm statistics move, no dropout
        model(x)
        got = probe.pop()
    finally:
        probe.remove()
        for m, mode in modes.items():
            m.training = mode
    stages = []
    for i, (name, path, preact, norm) in enumerate(plan.stages):
        out = got[f"out{i}"]  # (1, C, h, w)
        if preact is not None and got[f"pre{i}"].shape != out.shape:
            raise RuntimeError(
                f"{preact} has shape {tuple(got[f'pre{i}'].shape)} but {path} "
                f"{tuple(out.shape)}: the default stage map does not fit this "
                f"{type(model).__name__}; pass module paths explicitly"
            )
        stride = PROBE_SIZE // int(out.shape[-2])
        stages.append(Stage(name, path, int(out.shape[1]), stride, preact, norm))
    return stages, (plan.penultimate, int(got["pooled"].flatten(1).shape[1]))


def stage_map(model: nn.Module) -> list[Stage]:
    """The stages of `model` (or of a Teacher's model), shallow to deep; raises a ValueError
    for an architecture without a default map (then pass module paths explicitly)."""
    return _measure(_unwrap(model))[0]


def penultimate(model: nn.Module) -> tuple[str, int]:
    """(module path, dim) of the pooled pre-classifier feature: "global_pool" (MobileNetV1,
    timm, output (B, dim)) or "avgpool" (torchvision, output (B, dim, 1, 1))."""
    return _measure(_unwrap(model))[1]


def match_stages(student: Sequence[Stage], teacher: Sequence[Stage]) -> list[tuple[Stage, Stage]]:
    """Pair the stages of two networks by stride, shallow to deep: for each stride both have,
    the last stage at that stride on each side (MobileNetV1's stride-2 stage has no ResNet
    partner and is left out)."""
    by_stride = {s.stride: s for s in student}
    t_by_stride = {t.stride: t for t in teacher}
    pairs = [(by_stride[k], t_by_stride[k]) for k in sorted(t_by_stride) if k in by_stride]
    if not pairs:
        raise ValueError(
            f"the student's strides {sorted(by_stride)} and the teacher's {sorted(t_by_stride)} "
            "have none in common; pass module paths explicitly"
        )
    return pairs
