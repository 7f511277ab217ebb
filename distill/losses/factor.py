"""Factor transfer's learnable modules: the teacher's paraphraser and the student's translator.

Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor Transfer",
NeurIPS 2018. The paraphraser is a convolutional auto-encoder on one teacher feature map
x (B, C, H, W): its encoder gives the *teacher factor* (B, k·C, H, W), k the paraphrase rate,
and its decoder reconstructs x from the factor. The translator is the same three-layer encoder
on a student map (B, Cs, H', W'), giving the *student factor* (B, k·C, H', W'). The objective
that trains them is `distill.losses.feature_match.FTLoss` (built by `FTLoss.from_models`).

Layout followed: the authors' code (Jangho-Kim/Factor-Transfer-pytorch, Models/
FeatureProjection.py: `Paraphraser`, `Translator`), with every layer a 3×3 convolution
(stride 1, padding 1, with bias) followed by LeakyReLU(0.1), no BatchNorm (theirs is commented
out), and the channel counts

    paraphraser encoder   C -> C -> kC -> kC     (Conv2d)
    paraphraser decoder   kC -> kC -> C -> C     (ConvTranspose2d; the last layer keeps its
                                                  LeakyReLU, as theirs)
    translator            Cs -> Cs -> kC -> kC   (Conv2d)

with k = 0.5 (`--rate 0.5` in their train_Paraphraser.py / train_student.py) and kC rounded as
they round it, int(round(C·k)). torchdistill 1.1.5's `Paraphraser4FactorTransfer(k, C,
uses_bn=False)` and `Translator4FactorTransfer(Cs, kC, uses_bn=False)` are the same layers in
the same order (their default uses_bn=True adds a BatchNorm before each LeakyReLU, which
`batch_norm=True` gives here; they round kC down, int(C·k), which differs from the authors'
rounding only when C·k is not an integer). RepDistiller's `Paraphraser` (models/util.py) is
also this layout with use_bn=False, but its `Translator` defaults to use_bn=True.

Reconstruction: the authors train the paraphraser with `nn.L1Loss()`, the mean absolute error
over all elements (train_Paraphraser.py); RepDistiller uses `nn.MSELoss()` and torchdistill's
sample config a summed MSE. `reconstruction_loss` offers "l1" (the authors) and "l2" (the
mean squared error). The paper's own equation could not be checked here.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import as_float, full_precision

__all__ = [
    "FACTOR_RATE",
    "RECON_LOSSES",
    "Paraphraser",
    "ReconLoss",
    "Translator",
    "factor_channels",
    "reconstruction_loss",
]

FACTOR_RATE = 0.5  # the authors' paraphrase rate k (--rate 0.5)
LEAKY_SLOPE = 0.1  # the authors' nn.LeakyReLU(0.1)
ReconLoss = Literal["l1", "l2"]
RECON_LOSSES: tuple[str, ...] = ("l1", "l2")


def factor_channels(channels: int, rate: float = FACTOR_RATE) -> int:
    """Channels of the factor of a C-channel map: round(C·k), as the authors'
    `int(round(64 * RATE))`."""
    if not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if not isinstance(rate, (int, float)) or not rate > 0:
        raise ValueError(f"the paraphrase rate must be > 0, got {rate!r}; the authors use 0.5")
    out = round(channels * rate)
    if out < 1:
        raise ValueError(
            f"a paraphrase rate of {rate} leaves no factor channel of a {channels}-channel map; "
            f"use a rate of at least {1 / channels:.3g}"
        )
    return out


def _layer(
    conv: type[nn.Conv2d] | type[nn.ConvTranspose2d], c_in: int, c_out: int, bn: bool
) -> list[nn.Module]:
    """3×3, stride 1, padding 1 (size-preserving) conv with bias, [BatchNorm,] LeakyReLU(0.1)."""
    layers: list[nn.Module] = [conv(c_in, c_out, kernel_size=3, stride=1, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE))
    return layers


def _run(seq: nn.Sequential, x: Tensor) -> Tensor:
    """Run part of the loss outside autocast, in the modules' dtype (float32 or wider)."""
    weight = next(iter(seq.parameters()))
    with full_precision(x):
        return seq(as_float(x).to(weight.dtype))  # type: ignore[no-any-return]


class Paraphraser(nn.Module):
    """Teacher side: `encode` maps (B, C, H, W) to the factor (B, round(k·C), H, W); `forward`
    returns (factor, reconstruction (B, C, H, W)). Layout in the module docstring."""

    def __init__(self, channels: int, *, rate: float = FACTOR_RATE, batch_norm: bool = False):
        super().__init__()
        self.channels, self.rate = channels, float(rate)
        self.factor_channels = f = factor_channels(channels, rate)
        c, bn = channels, batch_norm
        self.encoder = nn.Sequential(
            *_layer(nn.Conv2d, c, c, bn), *_layer(nn.Conv2d, c, f, bn), *_layer(nn.Conv2d, f, f, bn)
        )
        self.decoder = nn.Sequential(
            *_layer(nn.ConvTranspose2d, f, f, bn),
            *_layer(nn.ConvTranspose2d, f, c, bn),
            *_layer(nn.ConvTranspose2d, c, c, bn),
        )

    def encode(self, x: Tensor) -> Tensor:
        return _run(self.encoder, x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        factor = self.encode(x)
        return factor, _run(self.decoder, factor)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, rate={self.rate}, factor_channels={self.factor_channels}"


class Translator(nn.Module):
    """Student side: (B, Cs, H, W) -> the student factor (B, factor_channels, H, W), three
    3×3 conv + LeakyReLU(0.1) layers Cs -> Cs -> F -> F (the authors' `Translator`)."""

    def __init__(self, channels: int, factor_channels: int, *, batch_norm: bool = False) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("factor_channels", factor_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.channels, self.factor_channels = channels, factor_channels
        c, f, bn = channels, factor_channels, batch_norm
        self.encoder = nn.Sequential(
            *_layer(nn.Conv2d, c, c, bn), *_layer(nn.Conv2d, c, f, bn), *_layer(nn.Conv2d, f, f, bn)
        )

    def forward(self, x: Tensor) -> Tensor:
        return _run(self.encoder, x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor_channels={self.factor_channels}"


def reconstruction_loss(
    reconstruction: Tensor, teacher_map: Tensor, *, kind: ReconLoss = "l1"
) -> Tensor:
    """The paraphraser's reconstruction error against the (detached) teacher map, both
    (B, C, H, W): "l1" = mean |P(x) − x| (the authors' nn.L1Loss), "l2" = mean (P(x) − x)²."""
    if kind not in RECON_LOSSES:
        raise ValueError(
            f"kind must be one of {RECON_LOSSES}, got {kind!r}: 'l1' is the authors' "
            "nn.L1Loss, 'l2' RepDistiller's nn.MSELoss"
        )
    r, t = as_float(reconstruction), as_float(teacher_map.detach())
    if r.shape != t.shape:
        raise ValueError(
            f"the reconstruction {tuple(r.shape)} and the teacher map {tuple(t.shape)} differ: "
            "the paraphraser must be built for the teacher map's channels"
        )
    t = t.to(r.dtype)
    return F.l1_loss(r, t) if kind == "l1" else F.mse_loss(r, t)
