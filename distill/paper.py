"""Published figures of the MobileNet paper, as typed data for tests, tables and plots.

Howard, Zhu, Chen, Kalenichenko, Wang, Weyand, Andreetto, Adam: "MobileNets: Efficient
Convolutional Neural Networks for Mobile Vision Applications", arXiv:1704.04861, 2017.
Mult-adds and parameters are in millions as printed; top-1 is ImageNet accuracy in percent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ALPHAS",
    "ARXIV",
    "CITATION",
    "RESOLUTIONS",
    "TABLE3",
    "TABLE4",
    "TABLE5",
    "TABLE6",
    "TABLE7",
    "TABLE8",
    "TABLE9",
    "LayerFigure",
    "ModelFigure",
    "find_figure",
    "grid_figure",
]

ARXIV = "1704.04861"
CITATION = (
    "A. G. Howard, M. Zhu, B. Chen, D. Kalenichenko, W. Wang, T. Weyand, M. Andreetto, H. Adam. "
    "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications. "
    "arXiv:1704.04861, 2017."
)

# The 16-model grid of Figures 4 and 5: width multiplier x input resolution (rho = R / 224).
ALPHAS: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)
RESOLUTIONS: tuple[int, ...] = (224, 192, 160, 128)


@dataclass(frozen=True)
class ModelFigure:
    """One row of a results table. `alpha`/`resolution`/`variant` are None for non-MobileNets."""

    table: int
    name: str  # as printed in the paper
    mult_adds_m: float
    params_m: float
    top1: float | None
    alpha: float | None = None
    resolution: int | None = None
    variant: str | None = "standard"  # "standard" | "fullconv" | "shallow" | None


@dataclass(frozen=True)
class LayerFigure:
    """Table 3: the cost of one layer on a `size` x `size` x `channels` input, 3x3 kernel."""

    name: str
    kind: Literal["conv", "separable"]
    channels: int  # input = output channels
    size: int  # input = output height = width
    mult_adds_m: float
    params_m: float


# Table 3: one 14x14x512 layer with a 3x3x512x512 kernel. Each row applies on top of the
# previous one: the rho row is the alpha = 0.75 layer at rho = 0.714, i.e. 10x10x384.
TABLE3: tuple[LayerFigure, ...] = (
    LayerFigure("Convolution", "conv", 512, 14, 462.0, 2.36),
    LayerFigure("Depthwise Separable Conv", "separable", 512, 14, 52.3, 0.27),
    LayerFigure("alpha = 0.75", "separable", 384, 14, 29.6, 0.15),
    LayerFigure("rho = 0.714", "separable", 384, 10, 15.1, 0.15),
)

# Table 4: depthwise separable vs full convolutions.
TABLE4: tuple[ModelFigure, ...] = (
    ModelFigure(4, "Conv MobileNet", 4866.0, 29.3, 71.7, 1.0, 224, "fullconv"),
    ModelFigure(4, "MobileNet", 569.0, 4.2, 70.6, 1.0, 224),
)

# Table 5: narrow vs shallow MobileNet (the shallow one is alpha = 1 without the 5 blocks).
TABLE5: tuple[ModelFigure, ...] = (
    ModelFigure(5, "0.75 MobileNet", 325.0, 2.6, 68.4, 0.75, 224),
    ModelFigure(5, "Shallow MobileNet", 307.0, 2.9, 65.3, 1.0, 224, "shallow"),
)

# Table 6: width multiplier at 224 px.
TABLE6: tuple[ModelFigure, ...] = (
    ModelFigure(6, "1.0 MobileNet-224", 569.0, 4.2, 70.6, 1.0, 224),
    ModelFigure(6, "0.75 MobileNet-224", 325.0, 2.6, 68.4, 0.75, 224),
    ModelFigure(6, "0.5 MobileNet-224", 149.0, 1.3, 63.7, 0.5, 224),
    ModelFigure(6, "0.25 MobileNet-224", 41.0, 0.5, 50.6, 0.25, 224),
)

# Table 7: resolution multiplier at alpha = 1.
TABLE7: tuple[ModelFigure, ...] = (
    ModelFigure(7, "1.0 MobileNet-224", 569.0, 4.2, 70.6, 1.0, 224),
    ModelFigure(7, "1.0 MobileNet-192", 418.0, 4.2, 69.1, 1.0, 192),
    ModelFigure(7, "1.0 MobileNet-160", 290.0, 4.2, 67.2, 1.0, 160),
    ModelFigure(7, "1.0 MobileNet-128", 186.0, 4.2, 64.4, 1.0, 128),
)

# Table 8: MobileNet next to popular models.
TABLE8: tuple[ModelFigure, ...] = (
    ModelFigure(8, "1.0 MobileNet-224", 569.0, 4.2, 70.6, 1.0, 224),
    ModelFigure(8, "GoogleNet", 1550.0, 6.8, 69.8, None, None, None),
    ModelFigure(8, "VGG 16", 15300.0, 138.0, 71.5, None, None, None),
)

# Table 9: a small MobileNet next to popular small models.
TABLE9: tuple[ModelFigure, ...] = (
    ModelFigure(9, "0.50 MobileNet-160", 76.0, 1.32, 60.2, 0.5, 160),
    ModelFigure(9, "Squeezenet", 1700.0, 1.25, 57.5, None, None, None),
    ModelFigure(9, "AlexNet", 720.0, 60.0, 57.2, None, None, None),
)


def grid_figure(alpha: float, resolution: int) -> ModelFigure | None:
    """The paper's figure for a standard MobileNet of the 16-model grid (Tables 6, 7, 9), if any."""
    for row in (*TABLE6, *TABLE7, *TABLE9):
        if row.alpha == alpha and row.resolution == resolution and row.variant == "standard":
            return row
    return None


def find_figure(alpha: float, resolution: int, variant: str = "standard") -> ModelFigure | None:
    """The first figure for this MobileNet in Tables 4 to 9 (most specific table first)."""
    if variant == "standard":
        return grid_figure(alpha, resolution)
    for row in (*TABLE4, *TABLE5):
        if (row.alpha, row.resolution, row.variant) == (alpha, resolution, variant):
            return row
    return None
