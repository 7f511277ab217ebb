"""Our MobileNets reproduce the cost figures of Howard et al. 2017 (arXiv:1704.04861).

Tolerances: 1% on mult-adds, 0.05M on parameters (the paper prints parameters to 0.1M).
Models are built on the meta device: FlopCounterMode counts from shapes, no weights needed.
"""

from __future__ import annotations

import pytest
import torch

from distill import paper
from distill.models import create_student
from distill.models.mobilenet import ConvBNAct, DepthwiseSeparable
from distill.profiling import profile

_VARIANT_BUILDER = {
    "standard": "mobilenet_v1",
    "fullconv": "mobilenet_v1_fullconv",
    "shallow": "mobilenet_v1_shallow",
}


def _check(mult_adds: int, params: int, fig_mult_adds_m: float, fig_params_m: float) -> None:
    assert mult_adds / 1e6 == pytest.approx(fig_mult_adds_m, rel=0.01)
    assert params / 1e6 == pytest.approx(fig_params_m, abs=0.05)


@pytest.mark.parametrize("fig", paper.TABLE3, ids=lambda f: f.name)
def test_table3_single_layer(fig: paper.LayerFigure) -> None:
    c = fig.channels
    with torch.device("meta"):
        layer = ConvBNAct(c, c, 3) if fig.kind == "conv" else DepthwiseSeparable(c, c)
    p = profile(layer, (c, fig.size, fig.size))
    _check(p.mult_adds, p.params, fig.mult_adds_m, fig.params_m)


MODEL_ROWS = [
    f
    for f in (*paper.TABLE4, *paper.TABLE5, *paper.TABLE6, *paper.TABLE7, *paper.TABLE9)
    if f.variant is not None
]


@pytest.mark.parametrize("fig", MODEL_ROWS, ids=lambda f: f"table{f.table}-{f.name}")
def test_tables_4_to_7_and_9(fig: paper.ModelFigure) -> None:
    assert fig.variant is not None and fig.alpha is not None and fig.resolution is not None
    with torch.device("meta"):
        model = create_student(
            _VARIANT_BUILDER[fig.variant], alpha=fig.alpha, resolution=fig.resolution
        )
    p = profile(model)  # input size from model.pretrained_cfg
    assert p.input_size == (3, fig.resolution, fig.resolution)
    _check(p.mult_adds, p.params, fig.mult_adds_m, fig.params_m)


def test_grid_lookup() -> None:
    assert paper.grid_figure(0.75, 224) == paper.TABLE6[1]
    assert paper.grid_figure(1.0, 128) == paper.TABLE7[3]
    assert paper.grid_figure(0.5, 160) == paper.TABLE9[0]
    assert paper.grid_figure(0.25, 128) is None
    assert "1704.04861" in paper.CITATION
    assert len(paper.ALPHAS) * len(paper.RESOLUTIONS) == 16
