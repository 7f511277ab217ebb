"""Face datasets on torchvision's CelebA and LFWPairs, with their checksum checks replaced.

torchvision verifies the md5 of every CelebA annotation file and of LFW's download archive.
Those checks only pass for byte-identical official files (and LFW's archive is often deleted
after extraction), so the subclasses below override `_check_integrity` alone: they check that
the files exist and that every annotation line parses, and raise an `AnnotationError` naming the
file and line otherwise. Parsing and indexing stay torchvision's.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.datasets import CelebA, LFWPairs

from distill.data.datasets import Transform
from distill.data.errors import AnnotationError, DataLayoutError
from distill.data.images import DEFAULT_MAX_PIXELS, load_image
from distill.data.transforms import run_transform

CELEBA_LAYOUT = """  <root>/celeba/img_align_celeba/000001.jpg ...   (or <root> may be the celeba folder itself)
  <root>/celeba/list_attr_celeba.txt
  <root>/celeba/identity_CelebA.txt
  <root>/celeba/list_bbox_celeba.txt
  <root>/celeba/list_landmarks_align_celeba.txt
  <root>/celeba/list_eval_partition.txt"""

LFW_LAYOUT = """  <root>/lfw-py/lfw_funneled/<Name>/<Name>_0001.jpg   (or <root> may be the lfw-py folder)
  <root>/lfw-py/pairs.txt        (10-fold protocol; pairsDevTrain.txt / pairsDevTest.txt for
                                  split="train"/"test"), tab-separated"""

# file -> (header lines, what the values are); the column count comes from the header names
_CELEBA_FILES: dict[str, tuple[int, str]] = {
    "list_eval_partition.txt": (0, "partition"),
    "list_attr_celeba.txt": (2, "attr"),
    "identity_CelebA.txt": (0, "identity"),
    "list_bbox_celeba.txt": (2, "int"),
    "list_landmarks_align_celeba.txt": (2, "int"),
}


def _tokens(line: str) -> list[str]:
    # the tokenisation torchvision's CelebA._load_csv uses
    return next(csv.reader([line], delimiter=" ", skipinitialspace=True), [])


def validate_celeba(base: str | Path, *, missing: bool = False) -> None:
    """Check the CelebA folder `base` line by line, as torchvision will parse it.

    Attributes are -1 or 1; with `missing`, 0 is also accepted and marks an attribute nobody
    annotated (see `CelebAFaces`).
    """
    base = Path(base)
    allowed = (-1, 0, 1) if missing else (-1, 1)
    allowed_text = (
        "-1, 0 (not annotated) or 1"
        if missing
        else "-1 or 1 (0 marks a missing annotation only when a missing label is set, e.g. "
        "--missing-label -1)"
    )
    if not (base / "img_align_celeba").is_dir():
        raise DataLayoutError(base, "no img_align_celeba/ folder", CELEBA_LAYOUT)
    order: list[str] | None = None
    for fname, (n_header, kind) in _CELEBA_FILES.items():
        path = base / fname
        if not path.is_file():
            raise DataLayoutError(base, f"{fname} is missing", CELEBA_LAYOUT)
        with open(path) as f:
            lines = f.read().splitlines()
        # the trailing newline of the last line is fine; csv gives no row for it
        if n_header:
            if len(lines) < 2:
                raise AnnotationError(
                    path, len(lines) + 1, "expected a count line and a header line"
                )
            try:
                count = int(lines[0].strip())
            except ValueError:
                raise AnnotationError(
                    path, 1, f"expected the number of images, got {lines[0]!r}"
                ) from None
            names = [t for t in _tokens(lines[1]) if t]
            if fname == "list_bbox_celeba.txt" and names[:1] == ["image_id"]:
                names = names[1:]
            n_values = len(names)
        else:
            count, n_values = -1, 1
        rows = lines[n_header:]
        if count >= 0 and count != len(rows):
            raise AnnotationError(path, 1, f"says {count} images but {len(rows)} rows follow")
        names_here = []
        for i, line in enumerate(rows, start=n_header + 1):
            toks = _tokens(line)
            if len(toks) != 1 + n_values:
                hint = " (a trailing space counts as an empty value)" if toks[-1:] == [""] else ""
                raise AnnotationError(
                    path,
                    i,
                    f"expected an image name and {n_values} values, got {len(toks) - 1}{hint}: {line!r}",
                )
            try:
                values = [int(t) for t in toks[1:]]
            except ValueError:
                raise AnnotationError(path, i, f"values must be integers: {line!r}") from None
            if kind == "attr" and any(v not in allowed for v in values):
                raise AnnotationError(path, i, f"attributes must be {allowed_text}: {line!r}")
            if kind == "partition" and values[0] not in (0, 1, 2):
                raise AnnotationError(
                    path, i, f"partition must be 0 (train), 1 (valid) or 2 (test): {line!r}"
                )
            names_here.append(toks[0])
        if order is None:
            order = names_here
        elif names_here != order:
            j = next(
                (k for k, (a, b) in enumerate(zip(names_here, order)) if a != b),
                min(len(order), len(names_here)),
            )
            raise AnnotationError(
                path,
                j + n_header + 1,
                f"rows must list the same images in the same order as list_eval_partition.txt "
                f"({len(names_here)} rows here, {len(order)} there)",
            )


class _CelebA(CelebA):
    def __init__(self, root: str, base_folder: str, missing: bool, **kwargs: Any) -> None:
        self.base_folder = base_folder
        self.missing = missing
        super().__init__(root, **kwargs)

    def _check_integrity(self) -> bool:
        validate_celeba(os.path.join(self.root, self.base_folder), missing=self.missing)
        return True

    def raw_attr(self) -> torch.Tensor:
        """(N, 40) int in {-1, 0, 1} as the file writes them, rows in `self.filename` order
        (torchvision's `attr` maps 0 to 0 with -1, i.e. to a negative)."""
        csv_ = self._load_csv("list_attr_celeba.txt", header=1)
        row = {name: i for i, name in enumerate(csv_.index)}
        return csv_.data[[row[name] for name in self.filename]]


def _celeba_root(root: str | Path) -> tuple[str, str]:
    root = Path(root).expanduser()
    if (root / "celeba").is_dir():
        return str(root), "celeba"
    if (root / "img_align_celeba").is_dir() or (root / "list_attr_celeba.txt").is_file():
        return str(root), ""
    raise DataLayoutError(root, "no CelebA folder here", CELEBA_LAYOUT)


class CelebAFaces(Dataset[dict[str, Any]]):
    """CelebA aligned faces: {"input", "target", "index"} with target chosen by `target`:

    "attr": (40,) float32 in {0, 1} (multi-label BCE / multi-label KD);
    "identity": the identity number as in identity_CelebA.txt (1-based, int64);
    None: no target (teacher-only distillation on unlabelled faces).

    `missing_label`: list_attr_celeba.txt may then write 0 for an attribute nobody annotated
    (-1 and 1 as usual elsewhere); the target holds `missing_label` there, the value the
    multi-label objectives and evaluator are given to leave those entries out (e.g. -1, or
    NaN). Without it a 0 in the file is an error: torchvision would read it as a negative.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        transform: Transform | None = None,
        *,
        target: str | None = "attr",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        missing_label: float | None = None,
    ) -> None:
        if missing_label is not None and 0.0 <= missing_label <= 1.0:
            raise ValueError(
                f"missing_label={missing_label} collides with the 0/1 labels; use e.g. -1"
            )
        if target not in ("attr", "identity", None):
            raise ValueError(f"target must be 'attr', 'identity' or None, got {target!r}")
        if split not in ("train", "valid", "test", "all"):
            raise ValueError(f"CelebA split must be train/valid/test/all, got {split!r}")
        tv_root, base_folder = _celeba_root(root)
        self.tv = _CelebA(
            tv_root,
            base_folder,
            missing_label is not None,
            split=split,
            target_type=["attr", "identity"],
        )
        self.images_dir = Path(tv_root) / base_folder / "img_align_celeba"
        self.attr_names = [n for n in self.tv.attr_names if n]
        self.filenames: list[str] = list(self.tv.filename)
        self.attr = self.tv.attr.to(torch.float32)  # (N, 40) in {0, 1}
        if missing_label is not None:
            self.attr[self.tv.raw_attr() == 0] = missing_label
        self.identity = self.tv.identity[:, 0].to(torch.int64)
        self.transform = transform
        self.target = target
        self.max_pixels = max_pixels

    @property
    def num_outputs(self) -> int:
        return len(self.attr_names)

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = load_image(self.images_dir / self.filenames[index], max_pixels=self.max_pixels)
        out = run_transform(self.transform, img, index)
        if self.target == "attr":
            out["target"] = self.attr[index]
        elif self.target == "identity":
            out["target"] = self.identity[index]
        out["index"] = index
        return out


def validate_lfw_pairs(
    pairs_file: str | Path, images_dir: str | Path, ten_fold: bool
) -> tuple[int, int]:
    """Check pairs.txt (or pairsDevTrain/Test.txt) line by line; returns (folds, pairs per fold)."""
    pairs_file, images_dir = Path(pairs_file), Path(images_dir)
    lines = pairs_file.read_text().splitlines()
    if not lines:
        raise AnnotationError(pairs_file, 1, "empty file")
    head = lines[0].strip().split("\t")
    try:
        if ten_fold:
            if len(head) != 2:
                raise ValueError
            n_folds, n_pairs = int(head[0]), int(head[1])
        else:
            n_folds, n_pairs = 1, int(head[0])
    except ValueError:
        header = "'<folds>\\t<pairs per fold>'" if ten_fold else "'<number of pairs>'"
        raise AnnotationError(
            pairs_file, 1, f"expected a header {header}, got {lines[0]!r}"
        ) from None
    body = lines[1:]
    if len(body) < 2 * n_folds * n_pairs:
        raise AnnotationError(
            pairs_file,
            len(lines),
            f"header promises {n_folds} x 2 x {n_pairs} pair rows but only {len(body)} follow",
        )
    for k, line in enumerate(body[: 2 * n_folds * n_pairs]):
        lineno = k + 2
        matched = (k // n_pairs) % 2 == 0
        f = line.strip().split("\t")
        want = 3 if matched else 4
        if len(f) != want:
            kind = (
                "same-person rows 'Name\\ti\\tj'"
                if matched
                else "different-person rows 'A\\ti\\tB\\tj'"
            )
            raise AnnotationError(
                pairs_file,
                lineno,
                f"expected {want} tab-separated fields ({kind}), got {len(f)}: {line!r}",
            )
        refs = [(f[0], f[1]), (f[0], f[2])] if matched else [(f[0], f[1]), (f[2], f[3])]
        for name, no in refs:
            try:
                num = int(no)
            except ValueError:
                raise AnnotationError(
                    pairs_file, lineno, f"image number {no!r} is not an integer"
                ) from None
            img = images_dir / name / f"{name}_{num:04d}.jpg"
            if not img.is_file():
                raise AnnotationError(pairs_file, lineno, f"references {img}, which does not exist")
    return n_folds, n_pairs


class _LFWPairs(LFWPairs):
    def __init__(self, root: str, base_folder: str, **kwargs: Any) -> None:
        self.base_folder = base_folder
        super().__init__(root, **kwargs)

    def _check_integrity(self) -> bool:
        images_dir = os.path.join(self.root, self.file_dict[self.image_set][0])
        if not os.path.isdir(images_dir):
            raise DataLayoutError(
                self.root, f"no {os.path.basename(images_dir)}/ folder", LFW_LAYOUT
            )
        labels = os.path.join(self.root, self.labels_file)
        if not os.path.isfile(labels):
            raise DataLayoutError(self.root, f"{self.labels_file} is missing", LFW_LAYOUT)
        self.folds = validate_lfw_pairs(labels, images_dir, self.split == "10fold")
        return True


def _lfw_root(root: str | Path) -> tuple[str, str]:
    root = Path(root).expanduser()
    if (root / "lfw-py").is_dir():
        return str(root), "lfw-py"
    if any((root / d).is_dir() for d, _, _ in LFWPairs.file_dict.values()):
        return str(root), ""
    raise DataLayoutError(root, "no LFW folder here", LFW_LAYOUT)


class LFWPairsDataset(Dataset[dict[str, Any]]):
    """LFW verification pairs: {"input", "input2", "target" (1 same person, 0 not), "fold",
    "index"}; a transform's "teacher_input" comes as "teacher_input"/"teacher_input2".

    `fold` is the pair's fold in the 10-fold protocol (0 for split="train"/"test").
    """

    def __init__(
        self,
        root: str | Path,
        transform: Transform | None = None,
        *,
        split: str = "10fold",
        image_set: str = "funneled",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        tv_root, base_folder = _lfw_root(root)
        self.tv = _LFWPairs(tv_root, base_folder, split=split, image_set=image_set)
        self.n_folds, self.pairs_per_fold = self.tv.folds
        self.pairs: list[tuple[str, str]] = list(self.tv.data)
        self.targets: list[int] = [int(t) for t in self.tv.targets]
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, Any]:
        p1, p2 = self.pairs[index]
        a = run_transform(self.transform, load_image(p1, max_pixels=self.max_pixels), index)
        b = run_transform(self.transform, load_image(p2, max_pixels=self.max_pixels), index)
        out = dict(a)
        out.update({f"{k}2": v for k, v in b.items() if k != "crop"})
        out["target"] = self.targets[index]
        out["fold"] = index // (2 * self.pairs_per_fold)
        out["index"] = index
        return out
