"""The evaluators' numbers against references written out here in float64.

- Mean AP with missing labels: scikit-learn's `average_precision_score` per attribute, on a
  CelebA-format attribute file with unannotated (0) entries, read back by this test itself.
- Face verification on planted-signal embeddings (matching pairs closer by a known margin):
  FaceNet's validation rate at FAR 1e-3 (10 folds, threshold per fold interpolated on the other
  folds' FAR curve) and the strict pooled TAR at FAR 1e-4.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from distill import metrics as M
from distill.data.faces import CelebAFaces
from distill.evaluation import (
    EmbeddingEvaluator,
    Evaluator,
    MultiLabelEvaluator,
    make_evaluator,
)
from distill.losses import MultiLabelBCE, MultiLabelKDLoss
from distill.types import split_batch
from tests.datagen import make_celeba


def _same(x):  # gather on one process
    return x


# --------------------------------------------------------------------- mean AP, missing labels


def write_missing(attr_file: Path, rng: np.random.Generator, frac: float = 0.3) -> np.ndarray:
    """Blank out `frac` of the entries of list_attr_celeba.txt (0 = not annotated), make
    column 0 positive wherever known and column 1 unknown everywhere; returns the (N, 40)
    {-1, 0, 1} values as written."""
    lines = attr_file.read_text().splitlines()
    rows = [line.split() for line in lines[2:]]
    values = np.array([[int(v) for v in r[1:]] for r in rows])
    values[rng.random(values.shape) < frac] = 0
    values[:, 0] = np.where(values[:, 0] == 0, 0, 1)  # no known negative: AP 1 (sklearn)
    values[:, 1] = 0  # no known label at all: AP undefined
    body = [r[0] + " " + " ".join(f"{v:>2}" for v in vals) for r, vals in zip(rows, values)]
    attr_file.write_text("\n".join([*lines[:2], *body]) + "\n")
    return values


def read_attr_file(attr_file: Path) -> np.ndarray:
    """The test's own parser of the CelebA attribute format: (N, 40) ints as written."""
    lines = attr_file.read_text().splitlines()
    return np.array([[int(v) for v in line.split()[1:]] for line in lines[2:]])


def reference_map(values: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(mean AP, mean accuracy) in percent: sklearn's AP of each attribute on its annotated
    entries (value != 0), averaged over the attributes that have a known positive; accuracy of
    logit > 0, averaged over the attributes that have a known label."""
    from sklearn.metrics import average_precision_score

    aps, accs = [], []
    for a in range(values.shape[1]):
        known = values[:, a] != 0
        y = values[known, a] == 1
        s = scores[known, a]
        if y.any():
            aps.append(average_precision_score(y, s))
        if known.any():
            accs.append(np.mean((s > 0) == y))
    return float(np.mean(aps) * 100), float(np.mean(accs) * 100)


@pytest.fixture(scope="module")
def celeba_missing(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("celeba_missing")
    info = make_celeba(root, n=60, size=(12, 14), splits=(40, 10, 10))
    values = write_missing(info["base"] / "list_attr_celeba.txt", np.random.default_rng(3))
    assert np.array_equal(read_attr_file(info["base"] / "list_attr_celeba.txt"), values)
    return root, values


def planted_scores(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """Logits that rank positives higher on average, float64."""
    rng = np.random.default_rng(seed)
    return np.where(values == 1, 0.8, -0.8) + rng.normal(0.0, 1.2, values.shape)


def run_multilabel(ev: Evaluator, scores: Tensor, target: Tensor, bs: int = 16):
    for i in range(0, len(target), bs):
        b = split_batch({"input": scores[i : i + bs], "target": target[i : i + bs]})
        ev.update([scores[i : i + bs]], b, _same)
    return ev.compute()


@pytest.mark.parametrize(
    "objective",
    [MultiLabelKDLoss(missing_label=-1), MultiLabelBCE(missing_label=-1)],
    ids=["kd", "bce"],
)
def test_map_with_missing_labels_matches_sklearn(celeba_missing, objective) -> None:
    root, values = celeba_missing
    ds = CelebAFaces(root, "all", target="attr", missing_label=-1)
    target = ds.attr  # (N, 40): 0/1 where annotated, -1 where not
    assert torch.equal(target == -1, torch.as_tensor(values == 0))
    scores = planted_scores(values)
    ref_map, ref_acc = reference_map(values, scores)
    with pytest.warns(UserWarning, match=r"leaves out 1 of 40 attributes .* columns \[1\]"):
        got = run_multilabel(
            make_evaluator("multilabel", objective), torch.as_tensor(scores), target
        )
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-9)
    assert got["mean_acc"] == pytest.approx(ref_acc, abs=1e-9)
    # the evaluator without the objective counts the missing entries as negatives
    with pytest.warns(UserWarning):
        blind = run_multilabel(make_evaluator("multilabel"), torch.as_tensor(scores), target)
    assert abs(blind["mAP"] - ref_map) > 1.0


def test_nan_missing_label_and_batch_mask_agree(celeba_missing) -> None:
    root, values = celeba_missing
    nan_target = CelebAFaces(root, "all", missing_label=float("nan")).attr
    assert torch.equal(torch.isnan(nan_target), torch.as_tensor(values == 0))
    scores = torch.as_tensor(planted_scores(values))
    ref_map, _ = reference_map(values, scores.numpy())
    with pytest.warns(UserWarning):
        got = run_multilabel(
            make_evaluator("multilabel", MultiLabelBCE(missing_label=float("nan"))),
            scores,
            nan_target,
        )
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-9)
    # a batch "mask" (1 = known) gives the same numbers without a missing_label
    ev = MultiLabelEvaluator()
    target = torch.as_tensor((values == 1).astype(np.float32))
    mask = torch.as_tensor((values != 0).astype(np.float32))
    b = split_batch({"input": scores, "target": target, "mask": mask})
    ev.update([scores], b, _same)
    with pytest.warns(UserWarning):
        assert ev.compute()["mAP"] == pytest.approx(ref_map, abs=1e-9)


def test_celeba_zero_entries_need_a_missing_label(celeba_missing) -> None:
    from distill.data.errors import AnnotationError

    root, _ = celeba_missing
    with pytest.raises(AnnotationError, match=r"-1 or 1 \(0 marks a missing annotation"):
        CelebAFaces(root, "all")
    with pytest.raises(ValueError, match="collides"):
        CelebAFaces(root, "all", missing_label=0)


def test_make_evaluator_signatures_and_edge_cases() -> None:
    assert make_evaluator("multilabel").missing_label is None  # type: ignore[attr-defined]
    assert make_evaluator("multilabel", nn.Identity()).missing_label is None  # type: ignore[attr-defined]
    assert isinstance(make_evaluator("embedding", MultiLabelBCE(-1)), EmbeddingEvaluator)
    with pytest.raises(ValueError, match="collides"):
        MultiLabelEvaluator(missing_label=1.0)
    # all known labels positive: AP 1 (sklearn); no known positive at all: an error
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    s = torch.tensor([[0.1, 0.3], [0.9, 0.2], [0.5, 0.1]])
    aps = M.average_precisions(s, y, (y != -1).float())
    assert aps[0] == 1.0 and math.isnan(aps[1])
    with pytest.raises(ValueError, match="no attribute has a known positive"):
        M.mean_average_precision(s[:, 1:], y[:, 1:])


class LabelledVectors(Dataset):
    """Fixed inputs whose identity student makes the scores; targets with -1 = missing."""

    def __init__(self, scores: np.ndarray, target: np.ndarray) -> None:
        self.x = torch.as_tensor(scores, dtype=torch.float32)
        self.y = torch.as_tensor(target, dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input": self.x[i], "target": self.y[i]}


def test_distiller_evaluate_masks_the_objectives_missing_label(tmp_path: Path) -> None:
    from distill import Distiller, DistillerConfig

    rng = np.random.default_rng(1)
    values = rng.choice([-1, 0, 1], size=(48, 6), p=[0.35, 0.3, 0.35])
    values[:, 0] = np.where(values[:, 0] == 0, 0, 1)
    target = np.where(values == 0, -1, (values == 1).astype(float))
    scores = planted_scores(values).astype(np.float32)
    student = nn.Sequential(nn.Identity())
    student.register_parameter("w", nn.Parameter(torch.zeros(1)))  # an optimiser needs one
    d = Distiller(
        student,
        None,
        MultiLabelBCE(missing_label=-1),
        torch.optim.SGD(student.parameters(), lr=0.0),
        config=DistillerConfig(output_dir=str(tmp_path), progress=False, task="multilabel"),
    )
    got = d.evaluate(DataLoader(LabelledVectors(scores, target), batch_size=8))
    ref_map, _ = reference_map(values, scores.astype(np.float64))
    assert got["mAP"] == pytest.approx(ref_map, abs=1e-4)


# ----------------------------------------------------------------------- face verification

FOLDS, PER_FOLD = 10, 300  # LFW: 10 folds of 300 matching + 300 non-matching pairs


def planted_pairs(seed: int = 0, dim: int = 16) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray]:
    """(emb1, emb2, squared distances, same): unit embeddings at planted squared L2 distances,
    matching pairs ~ U(0.2, 1.2) and non-matching ~ U(0.9, 2.5) (closer by a margin of 0.7 on
    average, overlapping on [0.9, 1.2]); each fold lists its matching pairs first, as LFW."""
    rng = np.random.default_rng(seed)
    same = np.tile(np.r_[np.ones(PER_FOLD), np.zeros(PER_FOLD)], FOLDS).astype(bool)
    d = np.where(same, rng.uniform(0.2, 1.2, same.size), rng.uniform(0.9, 2.5, same.size))
    e0 = rng.normal(size=(same.size, dim))
    e0 /= np.linalg.norm(e0, axis=1, keepdims=True)
    perp = rng.normal(size=(same.size, dim))
    perp -= (perp * e0).sum(1, keepdims=True) * e0
    perp /= np.linalg.norm(perp, axis=1, keepdims=True)
    cos = 1.0 - d / 2.0  # |a - b|^2 = 2 - 2 cos(angle) for unit a, b
    e1 = cos[:, None] * e0 + np.sqrt(1.0 - cos**2)[:, None] * perp
    emb1, emb2 = torch.as_tensor(e0), torch.as_tensor(e1)
    # the evaluator's inputs are not unit length: it normalises them
    return emb1 * 3.0, emb2 * 0.5, d, same


def reference_val_far(d: np.ndarray, same: np.ndarray, target: float) -> tuple[float, float]:
    """FaceNet's calculate_val, written out: thresholds 0, 0.001, ..., 3.999; per fold the
    training FAR at each threshold; the threshold interpolated linearly between the last
    grid point with FAR < target and the next one; VAL and FAR on the fold, averaged."""
    grid = [i * 0.001 for i in range(4000)]
    idx = np.arange(len(d)).reshape(FOLDS, -1)
    vals, fars = [], []
    for f in range(FOLDS):
        train = np.concatenate([idx[g] for g in range(FOLDS) if g != f])
        neg = d[train][~same[train]]
        far_train = [float(np.sum(neg < t)) / len(neg) for t in grid]
        i = next(k for k, far in enumerate(far_train) if far >= target)
        thr = grid[i - 1] + (target - far_train[i - 1]) * (grid[i] - grid[i - 1]) / (
            far_train[i] - far_train[i - 1]
        )
        test = idx[f]
        accept = d[test] < thr
        vals.append(np.sum(accept & same[test]) / np.sum(same[test]))
        fars.append(np.sum(accept & ~same[test]) / np.sum(~same[test]))
    return float(np.mean(vals) * 100), float(np.mean(fars))


def reference_strict_tar(d: np.ndarray, same: np.ndarray, far: float) -> float:
    """Pooled TAR at FAR <= far: at most floor(far * N) false accepts, so accept what lies
    below the (floor(far * N) + 1)-th smallest non-matching distance."""
    neg = np.sort(d[~same])
    k = math.floor(far * len(neg))
    return 100.0 if k >= len(neg) else float(np.mean(d[same] < neg[k]) * 100)


def evaluate_pairs(emb1: Tensor, emb2: Tensor, same: np.ndarray) -> dict[str, float]:
    ev = EmbeddingEvaluator()
    t = torch.as_tensor(same.astype(np.int64))
    for i in range(0, len(t), 500):
        b = split_batch(
            {"input": emb1[i : i + 500], "input2": emb2[i : i + 500], "target": t[i : i + 500]}
        )
        ev.update([emb1[i : i + 500].float(), emb2[i : i + 500].float()], b, _same)
    return ev.compute()


def test_verification_metrics_match_float64_references() -> None:
    emb1, emb2, d, same = planted_pairs()
    got = evaluate_pairs(emb1, emb2, same)
    assert set(got) == {
        "verification_acc",
        "val_at_far_1e-3",
        "val_at_far_1e-3_far_reached",
        "tar_at_far_1e-4",
    }
    ref_val, ref_far = reference_val_far(d, same, 1e-3)
    assert got["val_at_far_1e-3"] == pytest.approx(ref_val, abs=1e-9)
    assert got["val_at_far_1e-3_far_reached"] == pytest.approx(ref_far, abs=1e-12)
    # the planted signal: the threshold sits near 0.9 + 1.6e-3 ⇒ VAL ≈ P(U(0.2, 1.2) < 0.9016)
    assert ref_val == pytest.approx(70.16, abs=2.0) and ref_far < 3e-3
    assert got["tar_at_far_1e-4"] == pytest.approx(reference_strict_tar(d, same, 1e-4), abs=1e-9)


def test_strict_tar_is_zero_false_accepts_on_lfw_sized_data() -> None:
    _, _, d, same = planted_pairs(seed=1)
    assert (~same).sum() == 3000  # 1e-4 * 3000 < 1: no false accept allowed
    zero_fa = float(np.mean(d[same] < d[~same].min()) * 100)
    assert M.tar_at_far(d, same, 1e-4) == pytest.approx(zero_fa, abs=1e-9)
    for far in (1e-3, 1e-2, 0.1):  # resolvable FARs allow floor(far * 3000) false accepts
        assert M.tar_at_far(d, same, far) == pytest.approx(
            reference_strict_tar(d, same, far), abs=1e-9
        )


def test_val_threshold_matches_scipy_interpolation() -> None:
    from scipy.interpolate import interp1d

    rng = np.random.default_rng(4)
    for n in (270, 2700, 5400):
        neg = rng.uniform(0.3, 3.0, n)
        grid = M.FACENET_THRESHOLDS
        far = (neg[None, :] < grid[:, None]).mean(1)
        # 1e-3 * n is not a whole number of pairs here, so no FAR value equals the target and
        # "linear" is Sandberg's "slinear" (which scipy now refuses on the repeated FARs)
        ref = float(interp1d(far, grid, kind="linear")(1e-3 * 1.05))
        assert M.far_threshold(neg, 1e-3 * 1.05) == pytest.approx(ref, abs=1e-12)


def test_val_at_far_edge_cases() -> None:
    d = np.array([0.1, 0.2, 0.3, 1.0, 1.1, 1.2])
    with pytest.raises(ValueError, match="both matching and non-matching"):
        M.val_at_far(d, np.ones(6), 1e-3, folds=2)
    with pytest.raises(ValueError, match="far_target"):
        M.val_at_far(d, np.r_[1, 1, 1, 0, 0, 0], 0.0, folds=2)
    with pytest.raises(ValueError, match="no non-matching pairs"):
        M.val_at_far(d, np.r_[1, 1, 1, 0, 0, 0], 1e-3, folds=2)
