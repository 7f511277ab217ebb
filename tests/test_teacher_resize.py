"""The Teacher resizes a student batch the way torchvision v2 resizes an image (antialias on,
upscaling included), so the teacher sees what its own transforms would have shown it."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from distill import Teacher


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(32, 48), (160, 224)])  # down and up
def test_teacher_resize_matches_torchvision_v2(interpolation: str, size: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 96, 96, generator=g)  # noise: where resampling kernels differ most
    t = Teacher(nn.Identity(), input_size=size, interpolation=interpolation)
    mode = TF.InterpolationMode(interpolation)
    expected = TF.resize(x, list(size), interpolation=mode, antialias=True)
    assert (t.convert(x) - expected).abs().max() < 1e-5
