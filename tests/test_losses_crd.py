"""CRD: against torchdistill 1.1.5 and the paper's NCE equation (values and gradients in float64,
1e-6 relative), finite at hostile inputs, the memory bank's momentum rule, exact resumption of
the negative draws, class-aware negatives, and errors.

Mapping of conventions: torchdistill's `CRDLoss` takes the already embedded and normalised
vectors from io_dicts ("s_norm"/"t_norm" outputs; the positives and contrast indices as the
input of an empty module), `memory_v1` is our `memory_student`, `memory_v2` our
`memory_teacher`, `params` = [K, τ, Z_v1, Z_v2, m] with Z_v1 our `z_student`. Its own negative
sampler is broken in 1.1.5 (`draw` reads `self.prob`; building it with a dataset size that is
not a power of two fails in `init_prob_alias` for the same reason), so every comparison passes
explicit contrast indices and N = 64.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distill.losses import KDLoss
from distill.losses.crd import (
    CRDLoss,
    last_occurrences,
    memory_scores,
    momentum_update,
    nce_contrast_loss,
)
from distill.step import batch_extras
from distill.types import Batch, Outputs
from tests.test_losses_relation_new import _assert_close, _gen, _td, rel_diffs

D = torch.float64
N, K, T = 64, 9, 0.07


def _crd(**kw: Any) -> CRDLoss:
    args: dict[str, Any] = {
        "student_layer": "pool",
        "teacher_layer": "avgpool",
        "student_dim": 6,
        "teacher_dim": 5,
        "num_samples": N,
        "nce_k": K,
        "feat_dim": 4,
        "logit_loss": None,
        **kw,
    }
    torch.manual_seed(args.pop("init_seed", 0))  # the heads' weights
    return CRDLoss(**args)


def _sides(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[Outputs, Outputs]:
    b = f_s.shape[0]
    return Outputs(torch.zeros(b, 3), {"crd": f_s}), Outputs(torch.zeros(b, 3), {"crd": f_t})


def _features(seed: int, b: int = 5, dtype: torch.dtype = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    return torch.randn(b, 6, generator=g, dtype=dtype), torch.randn(b, 5, generator=g, dtype=dtype)


def _contrast(index: torch.Tensor, seed: int) -> torch.Tensor:
    neg = torch.randint(0, N, (index.shape[0], K), generator=_gen(seed))
    neg[0, 0] = index[0]  # a negative may be the positive itself (uniform draws allow it)
    return torch.cat([index.unsqueeze(1), neg], dim=1)


def _torchdistill(obj: CRDLoss) -> Any:
    ref = _td().CRDLoss("s_norm", "s_empty", "t_norm", obj.feat_dim, N, K, N, T, 0.5, 1e-7)
    ref.memory_v1 = obj.memory_student.clone()
    ref.memory_v2 = obj.memory_teacher.clone()
    z = [float(obj.z_student), float(obj.z_teacher)]
    ref.params = torch.tensor([K, T, *z, 0.5], dtype=D)
    return ref


def _td_call(
    ref: Any, v_s: torch.Tensor, v_t: torch.Tensor, idx: torch.Tensor, c: torch.Tensor
) -> Any:
    student = {"s_norm": {"output": v_s}, "s_empty": {"input": {"pos_idx": idx, "contrast_idx": c}}}
    return ref(student, {"t_norm": {"output": v_t}})


# --- references ---------------------------------------------------------------------------


@pytest.mark.parametrize("z", [(-1.0, -1.0), (37.5, 81.0)])
def test_pure_functions_match_torchdistill(z: tuple[float, float]) -> None:
    """Embeddings as the leaves: scores, Z from the first batch (z < 0) or given, NCE."""
    obj = _crd().double()
    obj.z_student.fill_(z[0])
    obj.z_teacher.fill_(z[1])
    idx = torch.tensor([3, 17, 63, 0, 17])
    c = _contrast(idx, 1)
    g = _gen(2)
    v = torch.nn.functional.normalize(torch.randn(10, 4, generator=g, dtype=D), dim=1)

    def ours(x: torch.Tensor) -> torch.Tensor:
        v_s, v_t = x[:5], x[5:]
        s = memory_scores(v_s, obj.memory_teacher, c, temperature=T)
        t = memory_scores(v_t, obj.memory_student, c, temperature=T)
        z_s = z[0] if z[0] > 0 else s.detach().mean() * N  # the authors' first-batch Z
        z_t = z[1] if z[1] > 0 else t.detach().mean() * N
        return nce_contrast_loss(s / z_s, N) + nce_contrast_loss(t / z_t, N)

    ref = _torchdistill(obj)
    _assert_close(rel_diffs(ours, lambda x: _td_call(ref, x[:5], x[5:], idx, c), v))


def _compare_step(obj: CRDLoss, ref: Any, index: torch.Tensor, seed: int) -> None:
    c = _contrast(index, seed)
    f_s, f_t = _features(seed + 10)
    v_t = obj.embed_t(f_t).detach()

    def ours(x: torch.Tensor) -> torch.Tensor:
        return obj(*_sides(x, f_t), None, index=index, contrast_index=c)["crd"]

    _assert_close(rel_diffs(ours, lambda x: _td_call(ref, obj.embed_s(x), v_t, index, c), f_s))


def test_objective_matches_torchdistill_over_steps() -> None:
    """The whole objective (our heads feed torchdistill): loss, feature gradients, Z and both
    banks after three steps with repeated indices."""
    obj = _crd().double()
    ref = _torchdistill(obj)
    for step, idx in enumerate([[0, 1, 2, 3, 4], [5, 1, 63, 7, 8], [1, 9, 1, 5, 9]]):
        _compare_step(obj, ref, torch.tensor(idx), 10 + step)
        torch.testing.assert_close(obj.z_student, ref.params[2], rtol=1e-12, atol=0)
        torch.testing.assert_close(obj.z_teacher, ref.params[3], rtol=1e-12, atol=0)
        torch.testing.assert_close(obj.memory_student, ref.memory_v1, rtol=0, atol=1e-12)
        torch.testing.assert_close(obj.memory_teacher, ref.memory_v2, rtol=0, atol=1e-12)


def _nce_paper(
    v: torch.Tensor, bank: torch.Tensor, c: torch.Tensor, z: float, n: int
) -> torch.Tensor:
    """Tian et al.'s objective written out: h = P/(P + K/N), P = exp(w·v/τ)/Z, and
    L = −(1/B) Σ_i [log h(i, positive) + Σ_k log(1 − h(i, negative k))]."""
    b, k1 = c.shape
    k = k1 - 1
    total = torch.zeros((), dtype=v.dtype)
    for i in range(b):
        for j in range(k1):
            p = torch.exp((bank[c[i, j]] * v[i]).sum() / T) / z
            h = p / (p + k / n)
            total = total + (torch.log(h) if j == 0 else torch.log(1 - h))
    return -total / b


def test_nce_matches_the_papers_equation() -> None:
    obj = _crd().double()
    idx = torch.tensor([5, 6, 7])
    c = _contrast(idx, 3)
    v = torch.nn.functional.normalize(torch.randn(3, 4, generator=_gen(4), dtype=D), dim=1)
    bank = obj.memory_teacher

    def ours(x: torch.Tensor) -> torch.Tensor:
        return nce_contrast_loss(memory_scores(x, bank, c, temperature=T, z=40.0), N, eps=0.0)

    _assert_close(rel_diffs(ours, lambda x: _nce_paper(x, bank, c, 40.0, N), v))


# --- hostile inputs ----------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2),
    scale=st.sampled_from([1e4, -1e4, 1e-4, 0.0]),
    seed=st.integers(0, 10_000),
    class_aware=st.booleans(),
)
def test_finite_at_extreme_features_and_tiny_batches(
    b: int, scale: float, seed: int, class_aware: bool
) -> None:
    labels = torch.arange(N) % 3 if class_aware else None
    obj = _crd(labels=labels, logit_loss=KDLoss())
    for step in range(2):  # the first step sets Z, the second uses it
        f_s, f_t = _features(seed + step, b, torch.float32)
        f_s = (f_s.sign() * scale).requires_grad_()  # ±1e4, or all zero
        s, t = _sides(f_s, f_t * scale)
        s.output = torch.randn(b, 3) * 1e4
        out = obj(s, t, torch.zeros(b, dtype=torch.long), index=torch.arange(b) * 7 + step)
        assert all(torch.isfinite(v) for v in out.values()), out
        out["loss"].backward()
        grads = [f_s.grad, *(p.grad for p in obj.parameters())]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
    for bank in (obj.memory_student, obj.memory_teacher):
        assert torch.isfinite(bank).all()


# --- behaviour ----------------------------------------------------------------------------


def test_bank_rows_follow_the_momentum_rule_and_stay_unit_norm() -> None:
    obj = _crd()
    f_s, f_t = _features(5, dtype=torch.float32)
    index = torch.tensor([4, 9, 2, 60, 33])
    before_s, before_t = obj.memory_student.clone(), obj.memory_teacher.clone()
    v_s, v_t = obj.embed_s(f_s).detach(), obj.embed_t(f_t).detach()
    obj(*_sides(f_s, f_t), None, index=index)
    for after, before, v in (
        (obj.memory_student, before_s, v_s),
        (obj.memory_teacher, before_t, v_t),
    ):
        mixed = 0.5 * before[index] + 0.5 * v
        torch.testing.assert_close(after[index], mixed / mixed.norm(dim=1, keepdim=True))
        torch.testing.assert_close(after[index].norm(dim=1), torch.ones(5))
        cos_before = torch.cosine_similarity(before[index], v)
        assert (torch.cosine_similarity(after[index], v) > cos_before).all()
        rest = torch.ones(N, dtype=torch.bool)
        rest[index] = False
        assert torch.equal(after[rest], before[rest])  # rows outside the batch stay


def test_eval_mode_leaves_the_state_alone() -> None:
    obj = _crd().eval()
    state = {k: v.clone() for k, v in obj.state_dict().items()}
    out = obj(*_sides(*_features(6, dtype=torch.float32)), None, index=torch.arange(5))
    assert torch.isfinite(out["loss"])
    for k, v in obj.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_the_matching_pair_costs_less_than_a_mismatched_one() -> None:
    """What CRD is named for: the loss falls when the student's embedding of sample i points
    at the teacher's bank row i, and rises when the rows are paired with other samples."""
    obj = _crd().double()
    idx = torch.arange(5)
    c = _contrast(idx, 7)
    z = float(N)
    matched = obj.memory_teacher[idx] / obj.memory_teacher[idx].norm(dim=1, keepdim=True)
    swapped = matched[[1, 2, 3, 4, 0]]

    def loss(v: torch.Tensor) -> float:
        return float(
            nce_contrast_loss(memory_scores(v, obj.memory_teacher, c, temperature=T, z=z), N)
        )

    assert loss(matched) < loss(swapped) - 1.0


def test_state_dict_round_trip_draws_the_same_negatives_and_loss() -> None:
    """Through safetensors, as checkpoints are written: a fresh objective (other seed, other
    heads) that loads the state continues with the same negatives, Z, banks and loss."""
    save, load = (
        pytest.importorskip("safetensors.torch").save,
        pytest.importorskip("safetensors.torch").load,
    )
    a = _crd(seed=3)
    for step in range(3):
        a(*_sides(*_features(30 + step, dtype=torch.float32)), None, index=torch.arange(5) + step)
    b = _crd(seed=99, init_seed=1)
    b.load_state_dict(load(save(a.state_dict())))
    index = torch.tensor([7, 8, 9, 10, 7])
    assert torch.equal(a.negatives(index), b.negatives(index))
    out_a = a(*_sides(*_features(40, dtype=torch.float32)), None, index=index)
    out_b = b(*_sides(*_features(40, dtype=torch.float32)), None, index=index)
    assert torch.equal(out_a["loss"], out_b["loss"])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert not torch.equal(a.negatives(index), _crd(seed=3).negatives(index))  # draws advance


def test_negatives_uniform_or_from_other_classes() -> None:
    index = torch.tensor([0, 1, 2, 5])
    uniform = _crd(nce_k=6000).negatives(index)
    assert torch.equal(uniform[:, 0], index)
    counts = torch.bincount(uniform[:, 1:].flatten(), minlength=N).double()
    assert counts.min() > 0.7 * counts.mean() and counts.max() < 1.3 * counts.mean()
    labels = torch.tensor([i % 3 if i < 40 else 2 for i in range(N)])  # unequal classes
    aware = _crd(nce_k=6000, labels=labels).negatives(index)
    for row, i in zip(aware, index):
        neg = row[1:]
        assert (labels[neg] != labels[i]).all()
        pool = (labels != labels[i]).nonzero().flatten()
        counts = torch.bincount(neg, minlength=N)[pool].double()
        assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()


def test_last_occurrences_and_the_update_rule() -> None:
    idx = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0, 3.0])
    assert sorted(last_occurrences(idx).tolist()) == [3, 4, 5]
    rows = torch.tensor([[1.0, 0.0]])
    torch.testing.assert_close(
        momentum_update(rows, torch.tensor([[0.0, 1.0]]), 0.5), rows.new_tensor([[0.5**0.5] * 2])
    )


def test_from_models_reads_the_penultimate_features() -> None:
    from torchvision.models import resnet18

    from distill.models.mobilenet import MobileNetV1

    student = MobileNetV1(alpha=0.25, num_classes=10)
    obj = CRDLoss.from_models(student, resnet18(num_classes=10), num_samples=100, nce_k=8)
    assert obj.student_features == {"crd": "global_pool"}
    assert obj.teacher_features == {"crd": "avgpool"}
    assert (obj.student_dim, obj.teacher_dim) == (256, 512)
    given = CRDLoss.from_models(
        student, student, num_samples=10, student_feature=("a", 3), teacher_feature=("b", 4)
    )
    assert (given.student_features, given.student_dim, given.teacher_dim) == ({"crd": "a"}, 3, 4)


# --- errors -------------------------------------------------------------------------------


def test_errors_say_what_to_change() -> None:
    obj = _crd()
    s, t = _sides(*_features(8, dtype=torch.float32))
    with pytest.raises(ValueError, match=r"must lie in \[0, 64\).*got range \[0, 64\]"):
        obj(s, t, None, index=torch.tensor([0, 1, 2, 3, 64]))
    with pytest.raises(ValueError, match="needs index="):
        obj(s, t, None)
    with pytest.raises(ValueError, match="index has 4 entries for a batch of 5"):
        obj(s, t, None, index=torch.arange(4))
    with pytest.raises(KeyError, match=r"reads the batch entries \['index'\].*WithIndex"):
        batch_extras(obj, Batch(input=torch.zeros(2, 3)))
    with pytest.raises(ValueError, match="student_dim=6: hook the penultimate"):
        obj(*_sides(torch.zeros(5, 7), torch.zeros(5, 5)), None, index=torch.arange(5))
    with pytest.raises(ValueError, match=r"logit_loss='kd': pass an objective"):
        _crd(logit_loss="kd")
    with pytest.raises(ValueError, match="nce_t must be a finite number > 0"):
        _crd(nce_t=0.0)
    with pytest.raises(ValueError, match="nce_k must be an int >= 1"):
        _crd(nce_k=0)
    with pytest.raises(ValueError, match="single class"):
        _crd(labels=torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(64,\)"):
        _crd(labels=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="needs labels but"):
        _crd(logit_loss="ce")(s, t, None, index=torch.arange(5))
    with pytest.raises(ValueError, match="not a CRDLoss state"):
        obj.set_extra_state(torch.tensor([9, 0, 0]))
