"""Tiny datasets written in the exact on-disk formats the real loaders read.

Every generator takes a root directory, writes a few tiny images (default 24-40 px) and returns
a small dict describing what it wrote, so tests can assert against it. Images are seeded
gradients with noise: deterministic, and different enough that crops differ.
Shared by every test area (helper D owns this file).
"""

from __future__ import annotations

import csv
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CELEBA_ATTRS = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
CELEBA_LANDMARKS = [
    "lefteye_x",
    "lefteye_y",
    "righteye_x",
    "righteye_y",
    "nose_x",
    "nose_y",
    "leftmouth_x",
    "leftmouth_y",
    "rightmouth_x",
    "rightmouth_y",
]


def synth_image(seed: int, size: int | tuple[int, int] = 32) -> Image.Image:
    """A deterministic RGB image of PIL size (w, h): a coloured gradient plus noise."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 215, size=3)
    slope = rng.uniform(-3, 3, size=(3, 2))
    chans = [base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)]
    img = np.stack(chans, -1) + rng.normal(0, 10, size=(h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def _save(img: Image.Image, path: Path, fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "JPEG":
        img.save(path, format="JPEG", quality=92)
    else:
        img.save(path, format=fmt)
    return path


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ ImageNet


def make_imagenet(
    root: str | Path,
    n_classes: int = 3,
    per_class: int = 4,
    val_per_class: int = 2,
    size: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """ILSVRC-2012 as `torchvision.datasets.ImageNet` leaves it after parsing the archives.

    root/meta.bin     torch.save((wnid_to_classes, val_wnids)): wnid_to_classes maps each wnid to
                      a tuple of class names; val_wnids is the wnid of each val image, in order
    root/train/<wnid>/<wnid>_<k>.JPEG
    root/val/<wnid>/ILSVRC2012_val_<8 digits>.JPEG
    """
    import torch

    root = Path(root)
    wnids = [f"n{1440764 + 1000 * i:08d}" for i in range(n_classes)]
    wnid_to_classes = {w: (f"class{i}", f"synonym{i}") for i, w in enumerate(wnids)}
    k = seed * 100_000
    for w in wnids:
        for j in range(per_class):
            k += 1
            _save(synth_image(k, size), root / "train" / w / f"{w}_{j + 1}.JPEG")
    # val images are numbered globally; the ground truth interleaves the classes
    val_wnids = [w for _ in range(val_per_class) for w in wnids]
    for n, w in enumerate(val_wnids, start=1):
        k += 1
        _save(synth_image(k, size), root / "val" / w / f"ILSVRC2012_val_{n:08d}.JPEG")
    torch.save((wnid_to_classes, val_wnids), root / "meta.bin")
    return {
        "wnids": wnids,
        "classes": [wnid_to_classes[w] for w in wnids],
        "n_train": n_classes * per_class,
        "n_val": n_classes * val_per_class,
    }


def make_image_folder(
    root: str | Path,
    classes: tuple[str, ...] = ("cat", "dog", "fox"),
    per_class: int = 3,
    size: int | tuple[int, int] = 32,
    seed: int = 0,
    ext: str = ".jpg",
) -> dict[str, Any]:
    """root/<class>/<k><ext>, the `torchvision.datasets.ImageFolder` layout."""
    root = Path(root)
    k = seed * 100_000
    paths = []
    for c in classes:
        for j in range(per_class):
            k += 1
            fmt = "JPEG" if ext.lower() in (".jpg", ".jpeg") else "PNG"
            paths.append(_save(synth_image(k, size), root / c / f"{j:04d}{ext}", fmt))
    return {"classes": list(classes), "n": len(paths), "paths": paths}


# -------------------------------------------------------------------------------------- CelebA


def make_celeba(
    root: str | Path,
    n: int = 10,
    size: tuple[int, int] = (24, 30),
    seed: int = 0,
    n_identities: int = 3,
    splits: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """CelebA as `torchvision.datasets.CelebA(root)` reads it, aligned-and-cropped images only.

    root/celeba/img_align_celeba/000001.jpg ...  (real images are 178x218; ours are `size`)
    root/celeba/list_attr_celeba.txt             count, 40 names, rows of -1/1 padded to 2 chars
    root/celeba/identity_CelebA.txt              "000001.jpg 2880", no header
    root/celeba/list_bbox_celeba.txt             count, "image_id x_1 y_1 width height", rows
    root/celeba/list_landmarks_align_celeba.txt  count, 10 coordinate names, rows
    root/celeba/list_eval_partition.txt          "000001.jpg 0" (0 train, 1 valid, 2 test)

    `splits` gives the number of train/valid/test images (default: about 60/20/20).
    """
    base = Path(root) / "celeba"
    rng = np.random.default_rng(seed)
    if splits is None:
        n_valid = max(1, n // 5)
        n_test = max(1, n // 5)
        splits = (n - n_valid - n_test, n_valid, n_test)
    if sum(splits) != n:
        raise ValueError(f"splits {splits} must add up to n={n}")
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    attrs = rng.choice([-1, 1], size=(n, len(CELEBA_ATTRS)))
    identities = rng.integers(1, n_identities + 1, size=n)
    partition = [0] * splits[0] + [1] * splits[1] + [2] * splits[2]
    for i, name in enumerate(names):
        _save(synth_image(seed * 100_000 + i, size), base / "img_align_celeba" / name)

    def rows(values: np.ndarray, fmt: str) -> list[str]:
        return [
            name + " " + " ".join(fmt.format(int(v)) for v in row)
            for name, row in zip(names, values)
        ]

    attr_lines = [str(n), " ".join(CELEBA_ATTRS) + " ", *rows(attrs, "{:>2}")]
    bbox = rng.integers(10, 300, size=(n, 4))
    bbox_lines = [
        str(n),
        "image_id x_1 y_1 width height",
        *[f"{nm} {b[0]:>5} {b[1]:>3} {b[2]:>3} {b[3]:>3}" for nm, b in zip(names, bbox)],
    ]
    lm = rng.integers(60, 160, size=(n, 10))
    lm_lines = [str(n), " ".join(CELEBA_LANDMARKS), *rows(lm, "{:>4}")]
    files = {
        "list_attr_celeba.txt": attr_lines,
        "identity_CelebA.txt": [f"{nm} {int(i)}" for nm, i in zip(names, identities)],
        "list_bbox_celeba.txt": bbox_lines,
        "list_landmarks_align_celeba.txt": lm_lines,
        "list_eval_partition.txt": [f"{nm} {p}" for nm, p in zip(names, partition)],
    }
    for fname, lines in files.items():
        (base / fname).write_text("\n".join(lines) + "\n")
    return {
        "names": names,
        "attrs": (attrs + 1) // 2,
        "identity": identities,
        "partition": partition,
        "base": base,
    }


# ----------------------------------------------------------------------------------------- LFW


def make_lfw_pairs(
    root: str | Path,
    n_people: int = 4,
    images_per_person: int = 3,
    n_folds: int = 2,
    pairs_per_fold: int = 2,
    size: int = 32,
    seed: int = 0,
    base_folder: str = "lfw-py",
) -> dict[str, Any]:
    """LFW as `torchvision.datasets.LFWPairs(root, image_set="funneled")` reads it.

    root/lfw-py/lfw_funneled/<Name>/<Name>_0001.jpg
    root/lfw-py/pairs.txt   "<folds>\\t<pairs per fold>" then, per fold, that many matched rows
                            "Name\\ti\\tj" followed by as many mismatched rows "A\\ti\\tB\\tj"
    """
    if images_per_person < 2 or n_people < 2:
        raise ValueError("need >= 2 people with >= 2 images each for matched/mismatched pairs")
    base = Path(root) / base_folder
    rng = np.random.default_rng(seed)
    people = [f"Person_{chr(65 + i)}{'x' * (i % 2)}_Name" for i in range(n_people)]
    k = seed * 100_000
    for p in people:
        for j in range(1, images_per_person + 1):
            k += 1
            _save(synth_image(k, size), base / "lfw_funneled" / p / f"{p}_{j:04d}.jpg")
    lines = [f"{n_folds}\t{pairs_per_fold}"]
    targets = []
    for _fold in range(n_folds):
        for _ in range(pairs_per_fold):
            p = people[int(rng.integers(n_people))]
            i, j = rng.choice(np.arange(1, images_per_person + 1), size=2, replace=False)
            lines.append(f"{p}\t{int(i)}\t{int(j)}")
            targets.append(1)
        for _ in range(pairs_per_fold):
            a, b = rng.choice(n_people, size=2, replace=False)
            i, j = rng.integers(1, images_per_person + 1, size=2)
            lines.append(f"{people[a]}\t{int(i)}\t{people[b]}\t{int(j)}")
            targets.append(0)
    (base / "pairs.txt").write_text("\n".join(lines) + "\n")
    return {"people": people, "targets": targets, "base": base, "n_pairs": len(targets)}


def make_identity_folders(
    root: str | Path,
    n_identities: int = 3,
    per_identity: int = 3,
    size: int = 40,
    seed: int = 0,
) -> dict[str, Any]:
    """Aligned face crops in one folder per identity (VGGFace2 / CASIA-WebFace layout):
    root/n000001/0001_01.jpg ..."""
    root = Path(root)
    ids = [f"n{i + 1:06d}" for i in range(n_identities)]
    k = seed * 100_000
    paths = []
    for ident in ids:
        for j in range(per_identity):
            k += 1
            paths.append(_save(synth_image(k, size), root / ident / f"{j + 1:04d}_01.jpg"))
    return {"identities": ids, "n": len(paths), "paths": paths}


# ------------------------------------------------------------------------- Hugging Face formats


def make_hf_imagefolder(
    root: str | Path,
    n: int = 8,
    n_classes: int = 3,
    size: int = 32,
    seed: int = 0,
    split_dirs: tuple[str, ...] = ("train", "test"),
) -> dict[str, Any]:
    """A `datasets` imagefolder with metadata: root/<split>/metadata.csv + images.

    metadata.csv has a header "file_name,label,caption"; file_name is relative to the csv.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {}
    k = seed * 100_000
    for split in split_dirs:
        d = root / split
        labels = [int(x) for x in rng.integers(0, n_classes, size=n)]
        rows = []
        for i, lab in enumerate(labels):
            k += 1
            name = f"img_{i:04d}.jpg"
            _save(synth_image(k, size), d / "images" / name)
            rows.append({"file_name": f"images/{name}", "label": lab, "caption": f"image {i}"})
        with open(d / "metadata.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["file_name", "label", "caption"])
            w.writeheader()
            w.writerows(rows)
        info[split] = labels
    return info


def make_webdataset_shards(
    root: str | Path,
    n_shards: int = 2,
    per_shard: int = 4,
    n_classes: int = 3,
    size: int = 32,
    seed: int = 0,
    prefix: str = "train",
) -> dict[str, Any]:
    """WebDataset tar shards: root/<prefix>-00000.tar holding NNNNNN.jpg, NNNNNN.cls, NNNNNN.json
    (members of one sample adjacent, as webdataset and `datasets` require)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards, labels, keys = [], [], []
    idx = 0
    for s in range(n_shards):
        path = root / f"{prefix}-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for _ in range(per_shard):
                key = f"{idx:06d}"
                label = int(rng.integers(0, n_classes))
                members = {
                    f"{key}.jpg": _jpeg_bytes(synth_image(seed * 100_000 + idx, size)),
                    f"{key}.cls": str(label).encode(),
                    f"{key}.json": json.dumps({"label": label, "key": key}).encode(),
                }
                for name, data in members.items():
                    ti = tarfile.TarInfo(name)
                    ti.size = len(data)
                    ti.mtime = 0
                    tar.addfile(ti, io.BytesIO(data))
                labels.append(label)
                keys.append(key)
                idx += 1
        shards.append(path)
    return {"shards": shards, "labels": labels, "keys": keys}


# ----------------------------------------------------------------------------------- bad images


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but carries one tiny IDAT: a few dozen bytes
    that PIL opens (and would refuse as a decompression bomb) without decoding anything."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def make_bad_images(root: str | Path, size: int = 24) -> dict[str, Path]:
    """One file per failure mode, keyed by what it is:

    converted: "grayscale" (L JPEG), "cmyk" (CMYK JPEG), "rgba" (PNG, half transparent),
               "palette" (P PNG with a transparent index), "gray16" (16-bit PNG, I;16),
               "good" (plain RGB JPEG)
    refused:   "truncated" (JPEG cut in half), "empty" (0 bytes), "text" (text named .jpg),
               "huge" (PNG header claiming 40000x40000, a few dozen bytes on disk)
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    base = synth_image(7, size)
    out: dict[str, Path] = {}
    out["good"] = _save(base, root / "good.jpg")
    out["grayscale"] = _save(base.convert("L"), root / "grayscale.jpg")
    out["cmyk"] = _save(base.convert("CMYK"), root / "cmyk.jpg")
    rgba = base.convert("RGBA")
    alpha = np.full((size, size), 255, np.uint8)
    alpha[:, : size // 2] = 0  # left half fully transparent
    rgba.putalpha(Image.fromarray(alpha, "L"))
    out["rgba"] = _save(rgba, root / "rgba.png", "PNG")
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    out["palette"] = _save(pal, root / "palette.png", "PNG")
    ramp = (np.linspace(0, 65535, size * size).reshape(size, size)).astype(np.uint16)
    out["gray16"] = _save(Image.fromarray(ramp), root / "gray16.png", "PNG")
    full = _jpeg_bytes(synth_image(8, 40))
    (root / "truncated.jpg").write_bytes(full[: len(full) * 2 // 3])  # header intact, scan cut
    out["truncated"] = root / "truncated.jpg"
    (root / "empty.jpg").write_bytes(b"")
    out["empty"] = root / "empty.jpg"
    (root / "text.jpg").write_text("this is not an image\n")
    out["text"] = root / "text.jpg"
    (root / "huge.png").write_bytes(_png_header_only(40_000, 40_000))
    out["huge"] = root / "huge.png"
    return out


BAD_IMAGE_REASONS = {
    "truncated": "truncated",
    "empty": "empty",
    "text": "not_an_image",
    "huge": "too_large",
}
CONVERTED_IMAGES = ("good", "grayscale", "cmyk", "rgba", "palette", "gray16")
