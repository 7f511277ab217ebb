"""MobileNetV1 as in Table 1 of Howard et al. 2017, "MobileNets" (arXiv:1704.04861).

A 3x3 stride-2 convolution, 13 depthwise separable blocks (3x3 depthwise + 1x1 pointwise, each
followed by BatchNorm and ReLU), global average pooling, dropout and one linear layer. The width
multiplier alpha thins every layer to `int(c * alpha)` channels; the resolution multiplier rho is
simply the input size (224, 192, 160, 128) and is recorded in `model.pretrained_cfg`.

Module names (usable with `get_submodule` and forward hooks):
    stem                    3x3 conv, stride 2                        (B, 32a, H/2, W/2)
    blocks.0 .. blocks.12   separable blocks, each with `.dw` and `.pw` (B, C, H/r, W/r)
    blocks.i.dw / .pw       ConvBNAct with children `conv`, `bn`, `act`
    global_pool             average over H, W                         (B, 1024a)
    head_drop, classifier   dropout and the linear layer              (B, num_classes)
Aliases, resolved by `get_submodule`: `reduction_2` .. `reduction_32` (the last module at that
stride), `pre_logits` (= global_pool) and `logits` (= classifier). The shallow variant has 8
blocks, so prefer the aliases when code must work for every variant.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import Tensor, nn

from distill.constants import IMAGENET_MEAN, IMAGENET_STD
from distill.models.registry import register_student

__all__ = [
    "MOBILENET_V1_BLOCKS",
    "VARIANTS",
    "ConvBNAct",
    "DepthwiseSeparable",
    "MobileNetV1",
    "mobilenet_v1",
    "mobilenet_v1_fullconv",
    "mobilenet_v1_shallow",
    "scale_channels",
]

Variant = Literal["standard", "fullconv", "shallow"]
VARIANTS: tuple[str, ...] = ("standard", "fullconv", "shallow")


STEM_CHANNELS = 32
# (out_channels, depthwise stride) of the 13 separable blocks at alpha = 1, from Table 1.
# Table 1 prints stride 2 for the last depthwise layer (input 7x7x1024); that is a typo: its
# output is still 7x7 (the following average pool is 7x7) and only stride 1 gives 569M mult-adds.
MOBILENET_V1_BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
)
# Table 5's shallow MobileNet drops the five 14x14x512 separable blocks.
_SHALLOW_REMOVED = frozenset(range(6, 11))
MIN_INPUT_SIZE = 32  # five stride-2 stages: smaller inputs leave nothing to pool

NormLayer = Callable[[int], nn.Module]
ActivationLayer = Callable[[], nn.Module]


def scale_channels(channels: int, alpha: float) -> int:
    """The paper's width multiplier: `int(channels * alpha)`, no rounding to multiples of 8."""
    return int(channels * alpha)


def _relu() -> nn.Module:
    # Not in-place: a forward hook on a `.bn` module must keep seeing the pre-activation tensor
    # (pre-ReLU feature distillation); an in-place ReLU would overwrite it after the hook ran.
    return nn.ReLU()


class ConvBNAct(nn.Sequential):
    """Convolution (no bias, "same" padding) -> norm -> activation, children `conv`, `bn`, `act`."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm_layer: NormLayer | None = None,
        activation_layer: ActivationLayer | None = None,
    ) -> None:
        norm_layer = norm_layer or nn.BatchNorm2d
        activation_layer = activation_layer or _relu
        conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        super().__init__(
            OrderedDict(
                [("conv", conv), ("bn", norm_layer(out_channels)), ("act", activation_layer())]
            )
        )
        self.out_channels = out_channels


class DepthwiseSeparable(nn.Sequential):
    """3x3 depthwise conv (carries the stride) -> BN -> ReLU, then 1x1 pointwise -> BN -> ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: NormLayer | None = None,
        activation_layer: ActivationLayer | None = None,
    ) -> None:
        super().__init__(
            OrderedDict(
                [
                    (
                        "dw",
                        ConvBNAct(
                            in_channels,
                            in_channels,
                            3,
                            stride,
                            groups=in_channels,
                            norm_layer=norm_layer,
                            activation_layer=activation_layer,
                        ),
                    ),
                    (
                        "pw",
                        ConvBNAct(
                            in_channels,
                            out_channels,
                            1,
                            norm_layer=norm_layer,
                            activation_layer=activation_layer,
                        ),
                    ),
                ]
            )
        )
        self.out_channels = out_channels


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C): averages whatever spatial size arrives (no hard-coded 7x7)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


def _check_input(x: Tensor, in_chans: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"MobileNetV1 expects a (B, {in_chans}, H, W) image batch, got shape "
            f"{tuple(x.shape)}; build the model with in_chans={x.shape[1] if x.dim() == 4 else '?'}"
            " or convert the input."
        )
    h, w = x.shape[-2], x.shape[-1]
    if h < MIN_INPUT_SIZE or w < MIN_INPUT_SIZE:
        raise ValueError(
            f"MobileNetV1 downsamples by 32, so inputs must be at least {MIN_INPUT_SIZE}x"
            f"{MIN_INPUT_SIZE}; got {h}x{w}. Resize or pad the images (e.g. "
            f"torchvision.transforms.Resize({MIN_INPUT_SIZE}))."
        )


# Keep the shape check a leaf call under torch.fx tracing (create_feature_extractor).
torch.fx.wrap("_check_input")


class MobileNetV1(nn.Module):
    """MobileNetV1 and the paper's two model-choice variants (see the module docstring).

    variant: "standard" (Table 1), "fullconv" (each separable block replaced by one standard
    3x3 convolution with the same stride and channels, Table 4) or "shallow" (the five
    14x14x512 separable blocks removed, Table 5). `resolution` does not change the weights; it
    is the input size the model is meant for and goes into `pretrained_cfg`.
    """

    def __init__(
        self,
        *,
        alpha: float = 1.0,
        resolution: int = 224,
        num_classes: int = 1000,
        dropout: float = 0.001,
        in_chans: int = 3,
        norm_layer: NormLayer | None = None,
        activation_layer: ActivationLayer | None = None,
        variant: Variant = "standard",
    ) -> None:
        super().__init__()
        _validate(alpha, resolution, num_classes, dropout, in_chans, variant)
        self.alpha = float(alpha)
        self.resolution = int(resolution)
        self.variant: str = variant
        self.in_chans = in_chans
        self.drop_rate = dropout

        c = scale_channels(STEM_CHANNELS, alpha)
        self.stem = ConvBNAct(
            in_chans, c, 3, 2, norm_layer=norm_layer, activation_layer=activation_layer
        )
        reduction = 2
        info: list[dict[str, Any]] = [{"module": "stem", "num_chs": c, "reduction": reduction}]
        blocks: list[nn.Module] = []
        for i, (out, stride) in enumerate(MOBILENET_V1_BLOCKS):
            if variant == "shallow" and i in _SHALLOW_REMOVED:
                continue
            out = scale_channels(out, alpha)
            block: nn.Module
            if variant == "fullconv":
                block = ConvBNAct(
                    c, out, 3, stride, norm_layer=norm_layer, activation_layer=activation_layer
                )
            else:
                block = DepthwiseSeparable(c, out, stride, norm_layer, activation_layer)
            reduction *= stride
            info.append({"module": f"blocks.{len(blocks)}", "num_chs": out, "reduction": reduction})
            blocks.append(block)
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.num_features = c
        self.feature_info = info
        self.feature_aliases: dict[str, str] = {
            f"reduction_{d['reduction']}": d["module"] for d in info
        }  # later entries win: the last module at each stride
        self.feature_aliases.update(pre_logits="global_pool", logits="classifier")

        self.global_pool = GlobalAvgPool()
        self.head_drop = nn.Dropout(dropout)
        self.num_classes = num_classes
        self.classifier: nn.Module = self._make_classifier(num_classes)

        mean = IMAGENET_MEAN if in_chans == 3 else (0.5,) * in_chans
        std = IMAGENET_STD if in_chans == 3 else (0.5,) * in_chans
        self.pretrained_cfg: dict[str, Any] = {
            "architecture": "mobilenet_v1" if variant == "standard" else f"mobilenet_v1_{variant}",
            "input_size": (in_chans, self.resolution, self.resolution),
            "resolution": self.resolution,
            "alpha": self.alpha,
            "variant": variant,
            "mean": mean,
            "std": std,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "num_classes": num_classes,
            "paper": "Howard et al. 2017, arXiv:1704.04861",
        }
        self._init_weights()

    def _make_classifier(self, num_classes: int) -> nn.Module:
        if num_classes == 0:
            return nn.Identity()
        fc = nn.Linear(self.num_features, num_classes)
        nn.init.normal_(fc.weight, 0.0, 0.01)
        nn.init.zeros_(fc.bias)
        return fc

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a fresh one for `num_classes` outputs (0: no head, pooled features)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 removes the head), got {num_classes}")
        device = next(self.parameters()).device
        self.classifier = self._make_classifier(num_classes).to(device)
        self.num_classes = num_classes
        self.pretrained_cfg["num_classes"] = num_classes

    def get_submodule(self, target: str) -> nn.Module:
        """`nn.Module.get_submodule`, also accepting the aliases in `feature_aliases`."""
        return super().get_submodule(self.feature_aliases.get(target, target))

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> (B, num_features, ceil(H/32), ceil(W/32))."""
        _check_input(x, self.in_chans)
        return self.blocks(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """(B, C, h, w) -> logits (B, num_classes), or pooled features (B, C) if `pre_logits`."""
        x = self.global_pool(x)
        if pre_logits:
            return x
        return self.classifier(self.head_drop(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _validate(
    alpha: float, resolution: int, num_classes: int, dropout: float, in_chans: int, variant: str
) -> None:
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha (width multiplier) must be a number > 0, got {alpha!r}")
    if scale_channels(STEM_CHANNELS, alpha) < 1:
        raise ValueError(
            f"alpha={alpha} leaves the 32-channel stem with int(32 * alpha) = 0 channels; "
            f"use alpha >= 1/32 (the paper uses 1, 0.75, 0.5 and 0.25)"
        )
    if not isinstance(resolution, int) or resolution < MIN_INPUT_SIZE:
        raise ValueError(
            f"resolution must be an int >= {MIN_INPUT_SIZE} (the paper uses 224, 192, 160, 128), "
            f"got {resolution!r}"
        )
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(
            f"num_classes must be an int >= 0 (0 removes the head), got {num_classes!r}"
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout is a probability in [0, 1), got {dropout!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")


@register_student("mobilenet_v1")
def mobilenet_v1(
    *,
    alpha: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    dropout: float = 0.001,
    in_chans: int = 3,
    norm_layer: NormLayer | None = None,
    activation_layer: ActivationLayer | None = None,
    variant: Variant = "standard",
) -> MobileNetV1:
    """MobileNetV1 (Table 1) with width multiplier `alpha`, meant for `resolution` px inputs.

    `dropout` defaults to 0.001, the keep probability 0.999 of the authors' TF-slim code.
    """
    return MobileNetV1(
        alpha=alpha,
        resolution=resolution,
        num_classes=num_classes,
        dropout=dropout,
        in_chans=in_chans,
        norm_layer=norm_layer,
        activation_layer=activation_layer,
        variant=variant,
    )


@register_student("mobilenet_v1_fullconv")
def mobilenet_v1_fullconv(
    *,
    alpha: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    dropout: float = 0.001,
    in_chans: int = 3,
    norm_layer: NormLayer | None = None,
    activation_layer: ActivationLayer | None = None,
) -> MobileNetV1:
    """Table 4's "Conv MobileNet": standard 3x3 convolutions instead of separable blocks."""
    return mobilenet_v1(
        alpha=alpha,
        resolution=resolution,
        num_classes=num_classes,
        dropout=dropout,
        in_chans=in_chans,
        norm_layer=norm_layer,
        activation_layer=activation_layer,
        variant="fullconv",
    )


@register_student("mobilenet_v1_shallow")
def mobilenet_v1_shallow(
    *,
    alpha: float = 1.0,
    resolution: int = 224,
    num_classes: int = 1000,
    dropout: float = 0.001,
    in_chans: int = 3,
    norm_layer: NormLayer | None = None,
    activation_layer: ActivationLayer | None = None,
) -> MobileNetV1:
    """Table 5's "Shallow MobileNet": the five 14x14x512 separable blocks removed."""
    return mobilenet_v1(
        alpha=alpha,
        resolution=resolution,
        num_classes=num_classes,
        dropout=dropout,
        in_chans=in_chans,
        norm_layer=norm_layer,
        activation_layer=activation_layer,
        variant="shallow",
    )
