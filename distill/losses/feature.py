"""Feature-map distillation: FitNets hints and attention transfer.

FitNets (Romero et al., ICLR 2015). The default follows RepDistiller's `ConvReg` + `HintLoss`
(HobbitLong/RepDistiller, models/util.py; mdistiller's `ConvReg` is the same): a learnable
regressor conv -> BatchNorm -> ReLU maps the student's map (B, Cs, H, W) to the teacher's
channels, and the hint term is the mean squared error over all elements,
mean (r(f_s) − f_t)². The ReLU is the paper's rule that the regressor carry the non-linearity
of the teacher's hint layer (adri-romsor/FitNets builds a rectified conv for a rectified hint
layer); pass `adapter_relu=False` for a teacher map hooked before its activation, which a ReLU
could not reach below 0. Where ours differs: the conv is 1×1 without a bias (BatchNorm's shift
makes one redundant), and a spatial mismatch is handled by resizing the teacher's map (below)
instead of RepDistiller's strided / transposed / (1 + Hs − Ht) kernel. The paper's ½·Σ per sample
differs from the mean by a constant; fold it into `weight` (RepDistiller and mdistiller use 100
with this mean).

Attention transfer (Zagoruyko & Komodakis, ICLR 2017). The default follows the authors' code
(szagoruyko/attention-transfer: utils.at, utils.at_loss, and `opt.beta * sum(loss_groups)` in
cifar.py/imagenet.py with `--beta 1e+3`), which RepDistiller (`Attention`, beta 1000) and
mdistiller (`AT`, FEAT_WEIGHT 1000) reproduce: the attention map of (B, C, H, W) is
a(f) = normalize(mean_c |f|^p) flattened to (B, H·W), p = 2, the term per layer pair is
mean_{B, H·W} (a_s − a_t)², and the loss is beta · Σ_layers with beta = 1000. This equals
torchdistill's `ATLoss(mode="code")` times beta. Not offered: the paper's Eq. 2 (beta/2 times the
p-norm of the difference, torchdistill's mode="paper"), which is not what the published numbers
used. The authors' multi-GPU runs sum per-GPU means (`data_parallel`, then `.sum()`), so their
ImageNet `--ngpu 2` weighs the full-batch mean by 2·beta; on one GPU (CIFAR) it is beta exactly.
Channel counts may differ.

When the spatial sizes differ (e.g. a 128 px student against a 224 px teacher), AT follows
RepDistiller/mdistiller: the larger *feature map*, student's or teacher's, is adaptive-average
pooled to the smaller size before its attention map is taken (they pool to a square (H, H); we
pool each side to (min H, min W), the same for square maps). `resize="attention"` pools the
larger *attention map* mean_c |f|^p instead: it keeps the activation energy of each region,
which pooling the features first loses where activations of opposite sign cancel, so we think
it the better-defined statistic for resolution-mismatched pairs; it is not the default because
the published hyper-parameters were tuned with feature pooling. FitNets resizes the teacher's
map to the student's size: area-averaged when shrinking, bilinear otherwise. The teacher is
frozen, so no gradient flows through its side.

Each objective also takes `logit_loss` (e.g. KDLoss(...) or CrossEntropy()) whose parts are
added to its own; pass `logit_loss=None` to train on the feature term alone (FitNets stage 1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import (
    Objective,
    as_float,
    check_non_negative,
    check_positive,
    feature,
    full_precision,
)
from distill.models.stages import Stage, match_stages, stage_map
from distill.types import Outputs

AtResize = Literal["feature", "attention"]
AT_RESIZES: tuple[str, ...] = ("feature", "attention")


def _check_map(x: Tensor, side: str) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"{side} feature must be a (B, C, H, W) map, got shape {tuple(x.shape)}; hook a "
            "convolutional layer (token features: reshape to (B, C, H, W) first)"
        )


def resize_map(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize (B, C, H, W) to `size`: area averaging when shrinking, bilinear otherwise."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def hint_loss(student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """mean (f_s − f_t)² over all elements; `student_map` already adapted to the teacher's
    channels; the teacher's map is resized to the student's spatial size and detached."""
    _check_map(student_map, "student")
    _check_map(teacher_map, "teacher")
    s, t = as_float(student_map), as_float(teacher_map.detach())
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"hint maps disagree in batch or channels: student {tuple(s.shape)} vs teacher "
            f"{tuple(t.shape)}; the adapter must map student channels to teacher channels"
        )
    t = resize_map(t, (s.shape[-2], s.shape[-1]))
    return F.mse_loss(s, t.to(s.dtype))


def attention_map(x: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """normalize(mean_c |x|^p) as (B, H·W); the map mean_c |x|^p is resized to `size` before
    normalising if given."""
    _check_map(x, "feature")
    a = as_float(x).abs().pow(p).mean(dim=1, keepdim=True)  # (B, 1, H, W)
    if size is not None:
        a = resize_map(a, size)
    return F.normalize(a.flatten(1), dim=1)


def at_loss(
    student_map: Tensor, teacher_map: Tensor, *, p: float = 2.0, resize: AtResize = "feature"
) -> Tensor:
    """mean (a_s − a_t)² over (B, H·W) for one layer pair (without beta). Maps of different
    sizes meet at (min H, min W): the larger feature map is average-pooled first
    (resize="feature", RepDistiller/mdistiller) or its attention map is (resize="attention")."""
    _check_map(student_map, "student")
    _check_map(teacher_map, "teacher")
    if student_map.shape[0] != teacher_map.shape[0]:
        raise ValueError(
            f"batch sizes differ: student {student_map.shape[0]}, teacher {teacher_map.shape[0]}"
        )
    if resize not in AT_RESIZES:
        raise ValueError(f"resize must be one of {AT_RESIZES}, got {resize!r}")
    size = (
        min(student_map.shape[-2], teacher_map.shape[-2]),
        min(student_map.shape[-1], teacher_map.shape[-1]),
    )
    s, t = as_float(student_map), as_float(teacher_map.detach())
    if resize == "feature":  # only ever shrinks, so resize_map area-averages
        a_s, a_t = attention_map(resize_map(s, size), p), attention_map(resize_map(t, size), p)
    else:
        a_s, a_t = attention_map(s, p, size=size), attention_map(t, p, size=size)
    return (a_s - a_t.to(a_s.dtype)).pow(2).mean()


def refuse_layers(name: str, given: set[str]) -> None:
    """`from_models` chooses layers and channels itself: say how to choose them instead."""
    if given:
        raise TypeError(
            f"{name}.from_models picks {sorted(given)} from the stage maps; to choose them "
            f"yourself build {name}(...) directly"
        )


def stage_pairs(
    name: str, student: nn.Module, teacher: nn.Module | None, options: Mapping[str, Any]
) -> list[tuple[Stage, Stage]]:
    """The stages both networks share by stride (distill.models.stages), for a `from_models`
    that picks layers itself (refusing layer options the user gave)."""
    taken = {"layers", "channels", "student_layer", "teacher_layer", "student_channels",
             "teacher_channels"}  # fmt: skip
    refuse_layers(name, taken & set(options))
    if teacher is None:
        raise ValueError(f"{name} needs a teacher to read its stages from")
    return match_stages(stage_map(student), stage_map(teacher))


class HintAdapter(nn.Module):
    """FitNets regressor, student -> teacher channels: 1×1 conv (no bias) + BatchNorm + ReLU, as
    RepDistiller's ConvReg; relu=False drops the ReLU."""

    def __init__(self, student_channels: int, teacher_channels: int, *, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(teacher_channels)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        # Disable autocast: the adapter is part of the loss, which runs in float32 or wider.
        with full_precision(x):
            y = self.bn(self.conv(as_float(x).to(self.conv.weight.dtype)))
            return F.relu(y) if self.relu else y

    def extra_repr(self) -> str:
        return f"relu={self.relu}"


class _FeatureObjective(Objective):
    """Shared plumbing: an optional logit objective whose parts join this one's."""

    def __init__(self, logit_loss: Objective | None) -> None:
        super().__init__()
        self.logit_loss = logit_loss
        if logit_loss is not None:
            self.student_features.update(logit_loss.student_features)
            self.teacher_features.update(logit_loss.teacher_features)

    def _hook(self, name: str, student_path: str, teacher_path: str) -> None:
        if name in self.student_features or name in self.teacher_features:
            raise ValueError(
                f"feature name {name!r} is already used by logit_loss "
                f"({type(self.logit_loss).__name__}); nest different objectives"
            )
        self.student_features[name] = student_path
        self.teacher_features[name] = teacher_path

    def _combine(
        self,
        own: dict[str, Tensor],
        student: Outputs,
        teacher: Outputs | None,
        target: Tensor | None,
    ) -> dict[str, Tensor]:
        if self.logit_loss is None:
            return own
        other = self.logit_loss(student, teacher, target)
        clash = (set(own) & set(other)) - {"loss"}
        if clash:
            raise ValueError(f"loss parts {sorted(clash)} are produced twice; rename one")
        return {**other, **own, "loss": own["loss"] + other["loss"]}

    def on_progress(self, step: int, epoch: float) -> None:
        if self.logit_loss is not None:
            self.logit_loss.on_progress(step, epoch)


class FitNetLoss(_FeatureObjective):
    """FitNets hint objective; parts "hint" (+ logit_loss's); loss = weight·hint + logit loss.

    Hooks `student_layer` in the student and `teacher_layer` in the teacher under the name
    "hint". The adapter is learnable: add `objective.parameters()` to the optimizer. In train
    mode its BatchNorm needs more than one value per channel (batch 1 needs H·W > 1).
    `adapter_relu=False` drops the regressor's ReLU (for a teacher map taken before its
    activation).
    """

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        student_channels: int,
        teacher_channels: int,
        logit_loss: Objective | None,
        weight: float = 1.0,
        adapter_relu: bool = True,
    ) -> None:
        super().__init__(logit_loss)
        for name, c in (
            ("student_channels", student_channels),
            ("teacher_channels", teacher_channels),
        ):
            if not isinstance(c, int) or c < 1:
                raise ValueError(f"{name} must be a positive int, got {c!r}")
        self.weight = check_non_negative("weight", weight, "FitNets' hint weight")
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self.adapter = HintAdapter(student_channels, teacher_channels, relu=adapter_relu)
        self._hook("hint", student_layer, teacher_layer)

    @classmethod
    def from_models(
        cls, student: nn.Module, teacher: nn.Module | None, **options: Any
    ) -> FitNetLoss:
        """The hint at stride 8 (mdistiller's HINT_LAYER 2: ResNet layer2, MobileNetV1's
        stride-8 stage), else the middle shared stage; `options` go to the constructor."""
        pairs = stage_pairs(cls.__name__, student, teacher, options)
        s, t = next(((s, t) for s, t in pairs if s.stride == 8), pairs[len(pairs) // 2])
        return cls(
            student_layer=s.path,
            teacher_layer=t.path,
            student_channels=s.channels,
            teacher_channels=t.channels,
            **options,
        )

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        f_s = feature(student, "hint", "student", self.student_features["hint"])
        f_t = feature(t_out, "hint", "teacher", self.teacher_features["hint"])
        _check_map(f_s, "student")
        if f_s.shape[1] != self.student_channels:
            raise ValueError(
                f"the student's hint map has {f_s.shape[1]} channels (shape {tuple(f_s.shape)}) "
                f"but student_channels={self.student_channels}: set student_channels="
                f"{f_s.shape[1]}"
            )
        _check_map(f_t, "teacher")
        if f_t.shape[1] != self.teacher_channels:
            raise ValueError(
                f"the teacher's hint map has {f_t.shape[1]} channels but teacher_channels="
                f"{self.teacher_channels}: set teacher_channels={f_t.shape[1]}"
            )
        hint = hint_loss(self.adapter(f_s), f_t)
        return self._combine({"loss": self.weight * hint, "hint": hint}, student, t_out, target)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class ATLoss(_FeatureObjective):
    """Attention transfer; parts "at" (Σ over layer pairs) (+ logit_loss's);
    loss = beta · at + logit loss (the authors' code, RepDistiller and mdistiller).

    `layers` maps student module paths to teacher module paths, e.g.
    {"blocks.5": "layer2", "blocks.11": "layer3"}; they are hooked as "at0", "at1", ...
    `resize` says how maps of different sizes meet (see `at_loss`).
    """

    def __init__(
        self,
        layers: Mapping[str, str],
        *,
        logit_loss: Objective | None,
        beta: float = 1000.0,
        p: float = 2.0,
        resize: AtResize = "feature",
    ) -> None:
        super().__init__(logit_loss)
        if resize not in AT_RESIZES:
            raise ValueError(
                f"resize must be one of {AT_RESIZES}, got {resize!r}: 'feature' pools the larger "
                "feature map (RepDistiller/mdistiller), 'attention' the larger attention map"
            )
        self.resize: AtResize = resize
        if not layers:
            raise ValueError(
                'layers is empty: map student to teacher layers, e.g. {"blocks.11": "layer3"}'
            )
        self.beta = check_non_negative("beta", beta, "the AT authors' code uses 1000")
        self.p = check_positive("p", p, "the AT paper uses 2")
        self.names: list[str] = []
        for i, (s_path, t_path) in enumerate(layers.items()):
            name = f"at{i}"
            self._hook(name, s_path, t_path)
            self.names.append(name)

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module | None, **options: Any) -> ATLoss:
        """Every stage both networks share by stride (mdistiller's AT on ImageNet uses all four
        ResNet stages); `options` go to the constructor."""
        pairs = stage_pairs(cls.__name__, student, teacher, options)
        return cls({s.path: t.path for s, t in pairs}, **options)

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        terms = [
            at_loss(
                feature(student, n, "student", self.student_features[n]),
                feature(t_out, n, "teacher", self.teacher_features[n]),
                p=self.p,
                resize=self.resize,
            )
            for n in self.names
        ]
        at = terms[0]
        for term in terms[1:]:
            at = at + term
        own = {"loss": self.beta * at, "at": at}
        return self._combine(own, student, t_out, target)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, p={self.p}, resize={self.resize!r}"
