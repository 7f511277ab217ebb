"""Inception-ResNet-v1, the FaceNet embedding network.

Architecture: Szegedy et al. 2016, "Inception-v4, Inception-ResNet and the Impact of Residual
Connections on Learning" (arXiv:1602.07261), Figures 14-16 (stem), 10-13 (blocks);
embedding and training: Schroff et al. 2015, "FaceNet" (arXiv:1503.03832). The public
checkpoints (20180402-114759 trained on VGGFace2, 20180408-102900 on CASIA-WebFace) come
from David Sandberg's TensorFlow release, converted to PyTorch by facenet-pytorch.

Module names and parameter shapes equal facenet-pytorch 2.6.0's `InceptionResnetV1`, so its
``.pt`` files load here with ``strict=True``:

    conv2d_1a .. conv2d_4b      stem: BasicConv2d (children `conv`, `bn`)   (B, 256, 17, 17)
    repeat_1.0 .. repeat_1.4    5 x block35 (Inception-ResNet-A), scale 0.17 (B, 256, 17, 17)
    mixed_6a                    reduction A                                 (B, 896, 8, 8)
    repeat_2.0 .. repeat_2.9    10 x block17 (Inception-ResNet-B), scale 0.1 (B, 896, 8, 8)
    mixed_7a                    reduction B                                 (B, 1792, 3, 3)
    repeat_3.0 .. repeat_3.4    5 x block8 (Inception-ResNet-C), scale 0.2   (B, 1792, 3, 3)
    block8                      one more block8, scale 1, no ReLU            (B, 1792, 3, 3)
    avgpool_1a, dropout, last_linear (no bias), last_bn -> 512-d embedding
    logits                      identity classifier of the training set (8631 or 10575)
Shapes are for the 160 x 160 input the checkpoints were trained with.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EMBEDDING_DIM", "BasicConv2d", "InceptionResnetV1", "inception_resnet_v1"]

EMBEDDING_DIM = 512
# TensorFlow's BatchNorm epsilon, kept by the converted checkpoints.
_BN_EPS = 1e-3

# (out_channels, kernel, stride, padding) of one conv in a branch.
ConvSpec = tuple[int, int | tuple[int, int], int, int | tuple[int, int]]


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3), ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=_BN_EPS, momentum=0.1)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn(self.conv(x)))


def _branch(in_channels: int, specs: Sequence[ConvSpec]) -> nn.Module:
    """A chain of BasicConv2d; a single conv is kept bare (its keys have no index)."""
    layers: list[nn.Module] = []
    c = in_channels
    for out, k, s, p in specs:
        layers.append(BasicConv2d(c, out, k, s, p))
        c = out
    return layers[0] if len(layers) == 1 else nn.Sequential(*layers)


def _out_channels(branch: nn.Module) -> int:
    convs = [m for m in branch.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class ResidualInception(nn.Module):
    """Inception-ResNet block: parallel branches, concat, 1x1 projection, scaled residual add.

    Branches are registered as `branch0`, `branch1`, ...; the projection (with bias) as
    `conv2d`.
    """

    def __init__(
        self,
        channels: int,
        branches: Sequence[Sequence[ConvSpec]],
        *,
        scale: float,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.n_branches = len(branches)
        width = 0
        for i, specs in enumerate(branches):
            branch = _branch(channels, specs)
            self.add_module(f"branch{i}", branch)
            width += _out_channels(branch)
        self.conv2d = nn.Conv2d(width, channels, kernel_size=1)
        self.relu: nn.Module = nn.ReLU() if activation else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        parts = [getattr(self, f"branch{i}")(x) for i in range(self.n_branches)]
        residual = self.conv2d(torch.cat(parts, dim=1))
        return self.relu(x + self.scale * residual)


class Reduction(nn.Module):
    """Grid reduction: stride-2 conv branches and a 3x3/2 max pool, concatenated."""

    def __init__(self, in_channels: int, branches: Sequence[Sequence[ConvSpec]]) -> None:
        super().__init__()
        self.n_branches = len(branches) + 1
        for i, specs in enumerate(branches):
            self.add_module(f"branch{i}", _branch(in_channels, specs))
        self.add_module(f"branch{len(branches)}", nn.MaxPool2d(3, stride=2))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([getattr(self, f"branch{i}")(x) for i in range(self.n_branches)], 1)


def _block35(scale: float = 0.17) -> ResidualInception:
    return ResidualInception(
        256,
        [
            [(32, 1, 1, 0)],
            [(32, 1, 1, 0), (32, 3, 1, 1)],
            [(32, 1, 1, 0), (32, 3, 1, 1), (32, 3, 1, 1)],
        ],
        scale=scale,
    )


def _block17(scale: float = 0.10) -> ResidualInception:
    return ResidualInception(
        896,
        [[(128, 1, 1, 0)], [(128, 1, 1, 0), (128, (1, 7), 1, (0, 3)), (128, (7, 1), 1, (3, 0))]],
        scale=scale,
    )


def _block8(scale: float = 0.20, activation: bool = True) -> ResidualInception:
    return ResidualInception(
        1792,
        [[(192, 1, 1, 0)], [(192, 1, 1, 0), (192, (1, 3), 1, (0, 1)), (192, (3, 1), 1, (1, 0))]],
        scale=scale,
        activation=activation,
    )


class InceptionResnetV1(nn.Module):
    """FaceNet's Inception-ResNet-v1.

    `forward` returns L2-normalised 512-d embeddings (B, 512), or identity logits
    (B, num_identities) when `classify` is true. `num_identities` adds the `logits` layer the
    released checkpoints carry (8631 for VGGFace2, 10575 for CASIA-WebFace); None leaves it out.
    Inputs are faces standardised as ``(pixel - 127.5) / 128`` at 160 x 160.
    """

    def __init__(
        self,
        *,
        num_identities: int | None = None,
        classify: bool = False,
        dropout: float = 0.6,
    ) -> None:
        super().__init__()
        if classify and num_identities is None:
            raise ValueError("classify=True needs num_identities (the size of the logits layer)")
        self.classify = classify
        self.conv2d_1a = BasicConv2d(3, 32, 3, stride=2)
        self.conv2d_2a = BasicConv2d(32, 32, 3)
        self.conv2d_2b = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool_3a = nn.MaxPool2d(3, stride=2)
        self.conv2d_3b = BasicConv2d(64, 80, 1)
        self.conv2d_4a = BasicConv2d(80, 192, 3)
        self.conv2d_4b = BasicConv2d(192, 256, 3, stride=2)
        self.repeat_1 = nn.Sequential(*[_block35() for _ in range(5)])
        self.mixed_6a = Reduction(
            256, [[(384, 3, 2, 0)], [(192, 1, 1, 0), (192, 3, 1, 1), (256, 3, 2, 0)]]
        )
        self.repeat_2 = nn.Sequential(*[_block17() for _ in range(10)])
        self.mixed_7a = Reduction(
            896,
            [
                [(256, 1, 1, 0), (384, 3, 2, 0)],
                [(256, 1, 1, 0), (256, 3, 2, 0)],
                [(256, 1, 1, 0), (256, 3, 1, 1), (256, 3, 2, 0)],
            ],
        )
        self.repeat_3 = nn.Sequential(*[_block8() for _ in range(5)])
        self.block8 = _block8(scale=1.0, activation=False)
        self.avgpool_1a = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.last_linear = nn.Linear(1792, EMBEDDING_DIM, bias=False)
        self.last_bn = nn.BatchNorm1d(EMBEDDING_DIM, eps=_BN_EPS, momentum=0.1)
        self.logits: nn.Linear | None = (
            nn.Linear(EMBEDDING_DIM, num_identities) if num_identities is not None else None
        )

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, 1792, H', W') before pooling."""
        for name in ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b"):
            x = getattr(self, name)(x)
        x = self.conv2d_4b(self.conv2d_4a(x))
        x = self.mixed_6a(self.repeat_1(x))
        x = self.mixed_7a(self.repeat_2(x))
        return self.block8(self.repeat_3(x))

    def forward_head(self, x: Tensor, *, pre_logits: bool = False) -> Tensor:
        """(B, 1792, H', W') -> embedding before normalisation (B, 512) if `pre_logits`,
        otherwise the model's output (normalised embedding or logits)."""
        x = self.dropout(torch.flatten(self.avgpool_1a(x), 1))
        x = self.last_bn(self.last_linear(x))  # (B, 512)
        if pre_logits:
            return x
        if self.classify:
            assert self.logits is not None
            return self.logits(x)
        return F.normalize(x, p=2, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the identity `logits` layer by a fresh one and output its logits."""
        self.logits = nn.Linear(EMBEDDING_DIM, num_classes)
        self.classify = True


def inception_resnet_v1(
    *, num_identities: int | None = None, classify: bool = False, dropout: float = 0.6
) -> InceptionResnetV1:
    """Builder in torchvision's style; weights are loaded by `teachers.load("facenet:...")`."""
    return InceptionResnetV1(num_identities=num_identities, classify=classify, dropout=dropout)
