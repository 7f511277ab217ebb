"""Safe decoding of awkward images, and skip-and-count of the unusable ones across workers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.data.datasets import ImageSamples, image_folder
from distill.data.images import BadImageError, load_image
from distill.data.skipping import (
    SkipBadSamples,
    SkipLog,
    SkipLogLoader,
    Skipped,
    collate_skipping,
    take_skipped,
)
from distill.data.transforms import build_transforms
from tests.datagen import (
    BAD_IMAGE_REASONS,
    CONVERTED_IMAGES,
    make_bad_images,
    make_image_folder,
)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_bad_images(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("kind", CONVERTED_IMAGES)
def test_convertible_images_become_8bit_rgb(bad: dict, kind: str) -> None:
    img = load_image(bad[kind])
    assert img.mode == "RGB"
    assert img.size == (24, 24)
    assert np.asarray(img).dtype == np.uint8


@pytest.mark.parametrize("kind", sorted(BAD_IMAGE_REASONS))
def test_unusable_images_raise_typed_error_with_name(bad: dict, kind: str) -> None:
    with pytest.raises(BadImageError) as ei:
        load_image(bad[kind])
    assert ei.value.reason == BAD_IMAGE_REASONS[kind]
    assert ei.value.path == str(bad[kind])
    assert str(bad[kind]) in str(ei.value)


def test_missing_file_is_a_bad_image(tmp_path) -> None:
    with pytest.raises(BadImageError) as ei:
        load_image(tmp_path / "nope.jpg")
    assert ei.value.reason == "missing"


def test_rgba_is_composited_on_white(bad: dict) -> None:
    a = np.asarray(load_image(bad["rgba"]))
    assert (a[:, :12] == 255).all()  # the transparent half
    src = np.asarray(Image.open(bad["rgba"]).convert("RGB"))
    assert np.array_equal(a[:, 12:], src[:, 12:])  # the opaque half is untouched
    black = np.asarray(load_image(bad["rgba"], background=(0, 0, 0)))
    assert (black[:, :12] == 0).all()


def test_16bit_png_is_scaled_not_clipped(bad: dict) -> None:
    a = np.asarray(load_image(bad["gray16"]))[..., 0].astype(int)
    assert a.min() == 0 and a.max() == 255
    # a linear ramp over 0..65535 stays a ramp: many distinct levels, not a white image
    assert len(np.unique(a)) > 200
    assert np.all(np.diff(a.ravel()) >= 0)


def test_cmyk_and_grayscale_match_their_source(bad: dict) -> None:
    g = np.asarray(load_image(bad["grayscale"]))
    assert np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])
    good = np.asarray(load_image(bad["good"])).astype(int)
    cmyk = np.asarray(load_image(bad["cmyk"])).astype(int)
    assert np.abs(good - cmyk).mean() < 12  # JPEG twice, through CMYK: close, not equal


def test_max_pixels_is_checked_before_decoding(bad: dict) -> None:
    with pytest.raises(BadImageError, match="max_pixels=100") as ei:
        load_image(bad["good"], max_pixels=100)
    assert ei.value.reason == "too_large"
    assert load_image(bad["good"], max_pixels=24 * 24).size == (24, 24)


def test_bytes_source_and_name(bad: dict) -> None:
    assert load_image(bad["good"].read_bytes()).size == (24, 24)
    with pytest.raises(BadImageError) as ei:
        load_image(b"", name="shard-0.tar:000001")
    assert ei.value.path == "shard-0.tar:000001" and ei.value.reason == "empty"


def test_bad_image_error_survives_pickling_and_one_arg_reraise() -> None:
    import pickle

    e = pickle.loads(pickle.dumps(BadImageError("a.jpg", "truncated", "cut")))
    assert (e.path, e.reason, e.detail) == ("a.jpg", "truncated", "cut")
    # DataLoader re-raises worker errors as exc_type(message)
    assert "a.jpg: truncated" in str(BadImageError(str(e)))


# ------------------------------------------------------------------------- skip and count


def _mixed_folder(tmp_path, bad: dict) -> ImageSamples:
    make_image_folder(tmp_path, classes=("a", "b"), per_class=3, size=24)
    for kind in ("truncated", "empty", "text", "huge", "rgba", "gray16"):
        src = bad[kind]
        (tmp_path / "b" / f"zz_{kind}{src.suffix}").write_bytes(src.read_bytes())
    return image_folder(tmp_path, build_transforms(16, train=False))


def test_skip_collate_counts_names_and_keeps_good_samples(tmp_path, bad: dict) -> None:
    ds = SkipBadSamples(_mixed_folder(tmp_path, bad))
    assert len(ds) == 12 and ds.classes == ["a", "b"]  # attributes fall through
    loader = DataLoader(ds, batch_size=5, collate_fn=collate_skipping)
    log = SkipLog()
    seen = 0
    for batch in SkipLogLoader(loader, log):
        assert "skipped" not in batch
        assert batch["input"].shape[1:] == (3, 16, 16)
        seen += batch["input"].shape[0]
    assert seen == 8  # 6 good + rgba + 16-bit converted
    assert log.total == 4
    names = {r: [p.rsplit("/", 1)[1] for p in ps] for r, ps in log.by_reason().items()}
    assert names == {
        "empty": ["zz_empty.jpg"],
        "not_an_image": ["zz_text.jpg"],
        "too_large": ["zz_huge.png"],
        "truncated": ["zz_truncated.jpg"],
    }
    report = log.report()
    assert (
        "4 skip(s) of 4 file(s)" in report and "zz_huge.png" in report and "--strict-data" in report
    )


def test_skip_counts_reach_the_main_process_from_workers(tmp_path, bad: dict) -> None:
    ds = SkipBadSamples(_mixed_folder(tmp_path, bad))
    loader = DataLoader(ds, batch_size=3, collate_fn=collate_skipping, num_workers=2)
    log = SkipLog()
    for _epoch in range(2):
        n = sum(b["input"].shape[0] for b in SkipLogLoader(loader, log))
        assert n == 8
    assert log.total == 8  # 4 bad files, twice
    assert all(c == 2 for c in log.counts.values())


def test_all_bad_batch_is_dropped(tmp_path, bad: dict) -> None:
    samples = [(str(bad["empty"]), 0), (str(bad["text"]), 1), (str(bad["good"]), 0)]
    ds = SkipBadSamples(ImageSamples(samples, build_transforms(8)))
    raw = list(DataLoader(ds, batch_size=2, collate_fn=collate_skipping))
    assert set(raw[0]) == {"skipped"}  # nothing left but the record
    log = SkipLog()
    batches = list(SkipLogLoader(DataLoader(ds, batch_size=2, collate_fn=collate_skipping), log))
    assert len(batches) == 1 and batches[0]["target"].tolist() == [0]
    assert log.total == 2


def test_replace_mode_keeps_batch_size_and_records_skips(tmp_path, bad: dict) -> None:
    folder = _mixed_folder(tmp_path, bad)
    ds = SkipBadSamples(folder, replace=True)
    log = SkipLog()
    batches = list(SkipLogLoader(DataLoader(ds, batch_size=4, collate_fn=collate_skipping), log))
    assert [b["input"].shape[0] for b in batches] == [4, 4, 4]  # 12 samples, none dropped
    # 4 bad files; zz_text's stand-in search also hits zz_truncated, counted once more
    assert len(log.counts) == 4 and log.total == 5
    # the stand-in for a bad sample is the next good one, and says so
    bad_idx = next(i for i, (p, _) in enumerate(folder.samples) if p.endswith("zz_huge.png"))
    item = ds[bad_idx]
    assert item["skipped"] == [(folder.samples[bad_idx][0], "too_large")]
    assert item["index"] not in (bad_idx,) and item["target"] == 1


def test_take_skipped_for_training_loops() -> None:
    log = SkipLog()
    batch, empty = take_skipped({"input": torch.zeros(1), "skipped": [("a.jpg", "empty")]}, log)
    assert set(batch) == {"input"} and not empty and log.total == 1
    batch, empty = take_skipped({"skipped": [("b.jpg", "truncated")]}, log)
    assert empty and log.total == 2
    t = torch.zeros(2)
    assert take_skipped(t, log) == (t, False)


def test_strict_mode_raises_in_process_and_from_workers(tmp_path, bad: dict) -> None:
    ds = SkipBadSamples(_mixed_folder(tmp_path, bad), strict=True)
    with pytest.raises(BadImageError):
        for i in range(len(ds)):
            ds[i]
    loader = DataLoader(ds, batch_size=4, collate_fn=collate_skipping, num_workers=1)
    with pytest.raises(BadImageError, match="zz_"):
        list(loader)


def test_skip_log_merge_json_and_gather(tmp_path) -> None:
    a, b = SkipLog(), SkipLog()
    a.update([("x.jpg", "truncated"), ("y.jpg", "empty")])
    b.update([("x.jpg", "truncated")])
    a.merge(b)
    assert a.counts[("x.jpg", "truncated")] == 2 and a.total == 3
    a.write_json(tmp_path / "skips.json")
    back = SkipLog.from_dict(json.loads((tmp_path / "skips.json").read_text()))
    assert back.counts == a.counts
    assert a.all_gather() is a  # not distributed: unchanged
    assert SkipLog().report() == "skipped images: none"


def test_collate_accepts_tuples_and_markers() -> None:
    batch = collate_skipping([(torch.zeros(2), 1), Skipped("bad.jpg", "empty"), (torch.ones(2), 0)])
    assert batch["input"].shape == (2, 2) and batch["target"].tolist() == [1, 0]
    assert batch["skipped"] == [("bad.jpg", "empty")]
