"""Student/teacher transforms: one crop rendered twice, replayable from its parameters."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.data.transforms import (
    CropParams,
    PairedTransform,
    ViewSpec,
    build_transforms,
    center_crop_params,
    crop_generator,
    draw_crop_seed,
    paired_views,
    render_view,
    sample_crop_params,
    to_uint8_image,
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
    assert render_view(synth_image(0, 10), p, ViewSpec(5)).shape == (3, 5, 5)
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
    with pytest.raises(ValueError, match="ratio"):
        PairedTransform(S, train=True, ratio=(2.0, 1.0))  # at construction, not per image
    with pytest.raises(ValueError, match="crop_pct"):
        PairedTransform(S, train=False, crop_pct=1.5)
    with pytest.raises(ValueError, match="uint8"):
        render_view(torch.zeros(3, 8, 8), CropParams(0, 0, 4, 4), ViewSpec(4))


@pytest.mark.parametrize("size", [(120, 200), (30, 300), (300, 20), (7, 5), (1, 1)])
def test_the_sampler_is_torchvisions_draw_for_draw(size: tuple[int, int]) -> None:
    from torchvision.transforms import v2

    h, w = size
    rrc = v2.RandomResizedCrop(32, scale=(0.1, 0.9), ratio=(0.5, 2.0))
    for s in range(200):
        torch.manual_seed(s)
        ref = rrc.make_params([torch.zeros(3, h, w)])
        p = sample_crop_params(
            w, h, scale=(0.1, 0.9), ratio=(0.5, 2.0), generator=crop_generator(s)
        )
        assert (p.top, p.left, p.height, p.width) == tuple(
            ref[k] for k in ("top", "left", "height", "width")
        ), (s, p, ref)


def test_flips_are_fair_and_drawn_last() -> None:
    flips = [sample_crop_params(40, 30, generator=crop_generator(s)).flip for s in range(2000)]
    assert abs(sum(flips) / len(flips) - 0.5) < 0.04
    never = sample_crop_params(40, 30, flip_p=0.0, generator=crop_generator(3))
    always = sample_crop_params(40, 30, flip_p=1.0, generator=crop_generator(3))
    assert (never.flip, always.flip) == (False, True)
    assert never.as_tensor()[:4].tolist() == always.as_tensor()[:4].tolist()


def test_calls_draw_their_crop_from_the_default_generator() -> None:
    img = synth_image(7, (50, 40))
    t = PairedTransform(S, T, train=True, return_params=True)
    torch.manual_seed(11)
    first = t(img)
    torch.manual_seed(11)
    seed = draw_crop_seed()
    assert 0 <= seed < 2**62
    expected = t.sample_params(img.size, crop_generator(seed))
    assert CropParams.from_tensor(first["crop"]) == expected == t.crop_for(img.size, seed)
    torch.manual_seed(11)
    assert torch.equal(t(img)["teacher_input"], first["teacher_input"])
    torch.manual_seed(12)
    assert CropParams.from_tensor(t(img)["crop"]) != expected


def test_pil_images_and_uint8_tensors_render_identically() -> None:
    img = synth_image(8, (44, 36))
    x = to_uint8_image(img)
    assert x.shape == (3, 36, 44) and x.dtype == torch.uint8
    t = PairedTransform(S, T, train=True)
    p = CropParams(3, 5, 25, 30, True)
    a, b = t.apply(img, p), t.apply(x, p)
    assert torch.equal(a["input"], b["input"]) and torch.equal(
        a["teacher_input"], b["teacher_input"]
    )
    gray = img.convert("L")  # not RGB: converted like load_image does
    assert render_view(gray, p, S).shape == (3, 16, 16)


def test_render_view_is_crop_resize_flip_normalise() -> None:
    from torchvision.transforms.v2 import functional as TF

    x = to_uint8_image(synth_image(9, (40, 30)))
    view = ViewSpec((12, 20), mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), interpolation="bicubic")
    out = render_view(x, CropParams(2, 4, 20, 30, True), view)
    crop = TF.resize(x[:, 2:22, 4:34], [12, 20], interpolation=TF.InterpolationMode.BICUBIC)
    ref = (crop.flip(-1).float() / 255 - torch.tensor(view.mean).view(3, 1, 1)) / torch.tensor(
        view.std
    ).view(3, 1, 1)
    assert out.shape == (3, 12, 20) and torch.allclose(out, ref, atol=1e-6)


class _TeacherLike:
    def __init__(self, size: tuple[int, int] | None, mean: Any, std: Any, interp: str) -> None:
        self.input_size, self.mean, self.std, self.interpolation = size, mean, std, interp


def test_paired_views_for_a_teacher_and_a_student_resolution() -> None:
    from distill import Teacher

    teacher = Teacher(torch.nn.Identity(), input_size=(224, 200), mean=(0.5,) * 3, std=(0.25,) * 3)
    t = paired_views(teacher, 128, train=True, scale=(0.3, 1.0))
    assert t.student == ViewSpec(128) and t.train and t.scale == (0.3, 1.0)
    assert t.teacher == ViewSpec((224, 200), (0.5,) * 3, (0.25,) * 3, "bilinear")
    out = t(synth_image(1, 64))
    assert out["input"].shape == (3, 128, 128) and out["teacher_input"].shape == (3, 224, 200)
    # no teacher, or one that wants the student's tensors: the student view only
    assert paired_views(None, 96, train=False).teacher is None
    like = _TeacherLike((128, 128), None, None, "bilinear")
    assert paired_views(like, 128, train=True).teacher is None  # type: ignore[arg-type]
    # the student's own statistics carry over to a teacher without any; "area" renders bilinear
    other = _TeacherLike((160, 160), None, None, "area")
    t2 = paired_views(other, 128, train=False, model_mean=(0.5,) * 3, model_std=(0.5,) * 3)  # type: ignore[arg-type]
    assert t2.teacher == ViewSpec((160, 160), (0.5,) * 3, (0.5,) * 3, "bilinear")
    assert not t2.train and t2.crop_pct == 0.875
