"""Student/teacher transforms: one crop rendered twice, replayable from its parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.data.transforms import (
    CropParams,
    PairedTransform,
    ViewSpec,
    apply_crop,
    build_transforms,
    center_crop_params,
    sample_crop_params,
)
from tests.datagen import synth_image

S = ViewSpec(16)  # student: ImageNet statistics
T = ViewSpec(32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))  # teacher: its own


def _unnormalize(x: torch.Tensor, v: ViewSpec) -> torch.Tensor:
    m = torch.tensor(v.mean).view(3, 1, 1)
    s = torch.tensor(v.std).view(3, 1, 1)
    return x * s + m


@pytest.mark.parametrize("train", [True, False])
def test_build_transforms_shapes_and_normalisation(train: bool) -> None:
    img = synth_image(1, (40, 30))
    x = build_transforms((12, 20), train=train)(img)
    assert x.shape == (3, 12, 20) and x.dtype == torch.float32
    y = build_transforms(16, mean=(0, 0, 0), std=(1, 1, 1), train=train)(img)
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_eval_transform_is_resize_then_center_crop() -> None:
    from torchvision.transforms import v2

    img = synth_image(2, (40, 30))
    x = build_transforms(16, mean=(0, 0, 0), std=(1, 1, 1), train=False)(img)
    ref = v2.Compose([v2.Resize(int(16 / 0.875)), v2.CenterCrop(16), v2.PILToTensor()])(img)
    assert torch.allclose(x, ref.float() / 255)


def test_paired_views_show_the_same_region() -> None:
    img = synth_image(3, (48, 40))
    t = PairedTransform(S, T, train=True, scale=(0.3, 1.0))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        p = t.sample_params(img.size, g)
        out = t.apply(img, p)
        assert out["input"].shape == (3, 16, 16) and out["teacher_input"].shape == (3, 32, 32)
        student = _unnormalize(out["input"], S)
        teacher_down = F.interpolate(
            _unnormalize(out["teacher_input"], T)[None], size=(16, 16), mode="area"
        )[0]
        # same pixels at two resolutions: differences are resampling only
        assert (student - teacher_down).abs().mean() < 0.02
        other = t.apply(img, CropParams(0, 0, 20, 20, not p.flip))
        assert (student - _unnormalize(other["input"], S)).abs().mean() > 0.03


def test_flip_mirrors_both_views() -> None:
    img = synth_image(4, 32)
    t = PairedTransform(S, T, train=True)
    a = t.apply(img, CropParams(2, 3, 20, 24, False))
    b = t.apply(img, CropParams(2, 3, 20, 24, True))
    for k in ("input", "teacher_input"):
        assert torch.allclose(a[k].flip(-1), b[k])


def test_replay_reproduces_tensors_exactly() -> None:
    img = synth_image(5, (36, 44))
    t = PairedTransform(S, T, train=True, seed=123, return_params=True)
    first = t(img, index=7)
    params = CropParams.from_tensor(first["crop"])
    replay = t.apply(img, params)
    for k in ("input", "teacher_input", "crop"):
        assert torch.equal(first[k], replay[k])
    # the same (seed, epoch, index) gives the same crop anywhere; params_for says which
    assert params == t.params_for(img.size, index=7)
    assert torch.equal(t(img, index=7)["input"], first["input"])
    assert t.params_for(img.size, index=8) != params
    t.set_epoch(1)
    assert t.params_for(img.size, index=7) != params
    assert t.params_for(img.size, index=7, epoch=0) == params


def test_generator_sampling_is_deterministic() -> None:
    a = [sample_crop_params(50, 30, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    b = [sample_crop_params(50, 30, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    assert a == b and len(set(a)) == 4


def test_eval_pairing_uses_the_center_region() -> None:
    img = synth_image(6, (40, 32))
    t = PairedTransform(S, T, train=False, return_params=True)
    out = t(img)
    p = CropParams.from_tensor(out["crop"])
    assert p == center_crop_params(40, 32) == CropParams(2, 6, 28, 28, False)
    # equals the conventional resize + centre-crop up to resampling
    ref = build_transforms(16, train=False)(img)
    assert (ref - out["input"]).abs().mean() < 0.05
    assert torch.equal(t(img)["teacher_input"], out["teacher_input"])


def test_student_only_pairing() -> None:
    out = PairedTransform(S, None, train=True)(synth_image(0, 24))
    assert set(out) == {"input"}


@settings(max_examples=60, deadline=None)
@given(
    w=st.integers(1, 400),
    h=st.integers(1, 400),
    seed=st.integers(0, 2**31),
    lo=st.floats(0.01, 1.0),
)
def test_sampled_boxes_stay_inside_the_image(w: int, h: int, seed: int, lo: float) -> None:
    p = sample_crop_params(w, h, scale=(lo, 1.0), generator=torch.Generator().manual_seed(seed))
    assert p.top >= 0 and p.left >= 0 and p.height >= 1 and p.width >= 1
    assert p.top + p.height <= h and p.left + p.width <= w


def test_crop_params_tensor_round_trip_and_apply() -> None:
    p = CropParams(1, 2, 3, 4, True)
    assert CropParams.from_tensor(p.as_tensor()) == p
    assert apply_crop(synth_image(0, 10), p, ViewSpec(5)).shape == (3, 5, 5)
    with pytest.raises(ValueError, match="5 values"):
        CropParams.from_tensor([1, 2, 3])


def test_invalid_specs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="std must be > 0"):
        ViewSpec(16, std=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="resolution must be positive"):
        ViewSpec(0)
    with pytest.raises(ValueError, match="interpolation"):
        ViewSpec(16, interpolation="lanczos9")
    with pytest.raises(ValueError, match="scale"):
        sample_crop_params(10, 10, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="seed"):
        PairedTransform(S, train=True).generator_for(0)
