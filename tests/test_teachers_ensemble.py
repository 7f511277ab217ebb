"""Multi-teacher distillation: `Teachers` (combine="probs" / "losses"), `PerTeacher`, each
member's own view of the batch, a Distiller run and a teacher cache of the ensemble."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from distill import Distiller, DistillerConfig, PerTeacher, Teacher, Teachers
from distill.data.gpu_pipeline import GpuBatchTransform
from distill.data.teacher_cache import ReplayableShifts, build_cache
from distill.data.transforms import paired_views, sample_crop_params, to_uint8_image
from distill.ensemble import mean_probs_logits, mean_sigmoid_logits, member_key, unit_concat
from distill.losses import KDLoss, MultiLabelKDLoss, soft_kd_loss
from distill.types import Outputs
from tests.datagen import synth_image

T = 2.0


class Recorder(nn.Module):
    """A linear classifier on a (3, side, side) input that keeps the last input it saw."""

    def __init__(self, side: int, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(3 * side * side, classes)
        self.seen: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        self.seen = x.clone()
        return self.fc(x.flatten(1))


def _members(classes: int = 4, output: str = "logits") -> tuple[Teacher, Teacher]:
    """A 12 px bicubic teacher with its own normalisation, and one at the student's 8 px."""
    a = Teacher(
        Recorder(12, classes, seed=1), input_size=12, mean=(0.4,) * 3, std=(0.3,) * 3,
        interpolation="bicubic", output=output, name="big",  # type: ignore[arg-type]
    )  # fmt: skip
    b = Teacher(Recorder(8, classes, seed=2), output=output, name="small")  # type: ignore[arg-type]
    return a, b


def _kl_to(p: Tensor, student: Tensor, t: float) -> Tensor:
    """T² · mean_b Σ_k p log(p / q), q = softmax(s/T), written out."""
    log_q = torch.log_softmax(student / t, dim=1)
    return (p * (p.log() - log_q)).sum(1).mean() * t * t


# ---------------------------------------------------------------- (a) combine="probs"


def test_probs_is_the_weighted_mean_of_tempered_probabilities_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(6, 10, generator=g, dtype=torch.float64) * s for s in (1.0, 3.0, 9.0)]
    w = (0.5, 0.2, 0.3)
    p = torch.stack([wi * torch.softmax(zi / T, dim=1) for wi, zi in zip(w, z)]).sum(0)
    out = mean_probs_logits(z, w, temperature=T)
    assert out.dtype == torch.float64
    torch.testing.assert_close(torch.softmax(out / T, dim=1), p, rtol=0, atol=1e-9)
    torch.testing.assert_close(out, T * torch.log(p), rtol=0, atol=1e-9)
    # KD against the ensemble is KL to the averaged target
    s = torch.randn(6, 10, generator=g, dtype=torch.float64)
    kd = soft_kd_loss(s, out, temperature=T)
    torch.testing.assert_close(kd, _kl_to(p, s, T), rtol=0, atol=1e-9)
    # attribute logits: the mean of the tempered sigmoids, per attribute
    q = torch.stack([wi * torch.sigmoid(zi / T) for wi, zi in zip(w, z)]).sum(0)
    ml = mean_sigmoid_logits(z, w, temperature=T)
    torch.testing.assert_close(torch.sigmoid(ml / T), q, rtol=0, atol=1e-9)
    # stable where probabilities underflow: logits 1e4 apart stay finite
    far = [torch.tensor([[0.0, 1e4, -1e4]], dtype=torch.float64), torch.zeros(1, 3).double()]
    assert torch.isfinite(mean_probs_logits(far, (0.5, 0.5), temperature=1.0)).all()
    assert torch.isfinite(mean_sigmoid_logits(far, (0.5, 0.5), temperature=1.0)).all()


def test_the_module_averages_its_members_and_kd_reads_the_average() -> None:
    a, b = _members()
    ens = Teachers([a, b], weights=[3.0, 1.0], temperature=T)
    assert ens.weights == (0.75, 0.25) and ens.name == "big+small"
    x = torch.randn(5, 3, 8, 8)
    out = ens(x)
    p = 0.75 * torch.softmax(a(x).output / T, 1) + 0.25 * torch.softmax(b(x).output / T, 1)
    torch.testing.assert_close(torch.softmax(out.output / T, 1), p, rtol=0, atol=1e-6)
    assert not out.output.requires_grad and not out.output.is_inference()
    s = torch.randn(5, 4, requires_grad=True)
    parts = KDLoss(temperature=T, alpha=1.0)(Outputs(s), out, None)
    torch.testing.assert_close(parts["kd"], _kl_to(p.double(), s.double(), T).float())
    parts["loss"].backward()  # the ensemble's output is a plain tensor, fit for autograd
    # multilabel members: the tempered sigmoids are averaged
    ma, mb = _members(output="multilabel")
    mens = Teachers([ma, mb], temperature=T)
    q = 0.5 * torch.sigmoid(ma(x).output / T) + 0.5 * torch.sigmoid(mb(x).output / T)
    torch.testing.assert_close(torch.sigmoid(mens(x).output / T), q, rtol=0, atol=1e-6)
    assert MultiLabelKDLoss(temperature=T, alpha=1.0)(Outputs(s), mens(x), None)["loss"] > 0
    # members in bf16 (Teacher.to_precision): the ensemble still answers in float32
    ens.to_precision("bf16")
    assert ens.dtype == torch.bfloat16 and a.dtype == b.dtype == torch.bfloat16
    low = ens(x).output
    assert low.dtype == torch.float32
    torch.testing.assert_close(torch.softmax(low / T, 1), p, rtol=0, atol=2e-2)


# ------------------------------------------------------ (b) each member sees its own input


def test_each_member_sees_what_it_would_see_alone() -> None:
    a, b = _members()
    ens = Teachers([a, b], combine="losses")
    x = torch.randn(3, 3, 8, 8)
    out = ens(x)
    seen = [m.model.seen for m in ens]
    for i, m in enumerate((a, b)):
        alone = m(x).output
        assert torch.equal(m.model.seen, seen[i])  # type: ignore[arg-type]
        assert torch.equal(out.features[member_key(i)], alone)
    assert seen[0].shape == (3, 3, 12, 12) and torch.equal(seen[1], x)  # type: ignore[union-attr]


def test_paired_views_render_one_native_view_per_member() -> None:
    a, b = _members()
    ens = Teachers([a, b], temperature=T)
    paired = paired_views(ens, 8, train=True)
    img = synth_image(3, (40, 30))
    params = sample_crop_params(40, 30, generator=torch.Generator().manual_seed(1))
    item = paired.apply(img, params)
    views = item["teacher_input"]
    assert isinstance(views, tuple) and len(views) == 2
    # what each member alone gets from paired_views: its native view, or the student's tensor
    alone_a = paired_views(a, 8, train=True).apply(img, params)
    alone_b = paired_views(b, 8, train=True).apply(img, params)
    assert torch.equal(views[0], alone_a["teacher_input"]) and views[0].shape == (3, 12, 12)
    assert "teacher_input" not in alone_b and torch.equal(views[1], alone_b["input"])
    # the batched pipeline (its CPU path) renders the same tuple
    gpu = GpuBatchTransform.from_paired(paired, device="cpu", channels_last=False)
    batched = gpu.apply([to_uint8_image(img)], [params])
    assert all(torch.equal(v[None], bv) for v, bv in zip(views, batched["teacher_input"]))
    assert gpu.config()["teacher"] == [
        {"resolution": (12, 12), "mean": (0.4,) * 3, "std": (0.3,) * 3, "interpolation": "bicubic"},
        {"resolution": (8, 8), "mean": paired.student.mean, "std": paired.student.std,
         "interpolation": "bilinear"},
    ]  # fmt: skip
    # prepared=True: each member runs on its view exactly as alone (collated: a list)
    batch = [v[None] for v in views]
    out = ens(batch, prepared=True)
    seen = [m.model.seen for m in (a, b)]
    assert all(torch.equal(s, v) for s, v in zip(seen, batch))  # type: ignore[arg-type]
    single = [a(batch[0], prepared=True).output, b(item["input"][None]).output]
    p = torch.stack([0.5 * torch.softmax(z / T, 1) for z in single]).sum(0)
    torch.testing.assert_close(torch.softmax(out.output / T, 1), p, rtol=0, atol=1e-6)
    # members that all take the student's tensors: no teacher view, each converts the batch
    _, b2 = _members()
    assert paired_views(Teachers([b, b2], temperature=T), 8, train=False).teacher is None


# ------------------------------------------------------------- (c) combine="losses"


def test_per_teacher_is_the_weighted_sum_of_per_teacher_kd() -> None:
    a, b = _members()
    ens = Teachers([a, b], weights=[1.0, 3.0], combine="losses")
    x, target = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    out = ens(x)
    za, zb = a(x).output, b(x).output
    torch.testing.assert_close(out.output, 0.25 * za + 0.75 * zb)  # what evaluation scores
    s = torch.randn(6, 4, requires_grad=True)
    parts = PerTeacher(KDLoss(temperature=T, alpha=0.7), ens.weights)(Outputs(s), out, target)
    ce = F.cross_entropy(s, target)
    kd = [_kl_to(torch.softmax(z / T, 1), s, T) for z in (za, zb)]
    per = [0.7 * k + 0.3 * ce for k in kd]
    torch.testing.assert_close(parts["loss"], 0.25 * per[0] + 0.75 * per[1])
    torch.testing.assert_close(parts["kd"], 0.25 * kd[0] + 0.75 * kd[1])  # unweighted term
    torch.testing.assert_close(parts["ce"], ce)
    assert torch.allclose(parts["loss"], 0.7 * parts["kd"] + 0.3 * parts["ce"])
    # a cached (combined) answer has no members: the error says what to do
    with pytest.raises(ValueError, match="combine='losses'"):
        PerTeacher(KDLoss(), ens.weights)(Outputs(s), Outputs(out.output), target)
    with pytest.raises(ValueError, match="one weight per member"):
        PerTeacher(KDLoss(), [1.0, 1.0, 1.0])(Outputs(s), out, target)


def test_embeddings_are_refused_in_probs_and_concatenated_in_losses() -> None:
    a = Teacher(nn.Linear(5, 3), output="embedding", name="e3")
    b = Teacher(nn.Linear(5, 7), output="embedding", name="e7")
    with pytest.raises(ValueError, match="combine='losses'"):
        Teachers([a, b], temperature=T)
    ens = Teachers([a, b], weights=[1.0, 3.0], combine="losses")
    x = torch.randn(4, 5)
    e = ens(x).output
    assert e.shape == (4, 10)
    cos = [F.normalize(m(x).output) @ F.normalize(m(x).output).T for m in (a, b)]
    torch.testing.assert_close(e @ e.T, 0.25 * cos[0] + 0.75 * cos[1])
    torch.testing.assert_close(unit_concat([a(x).output], [1.0]).norm(dim=1), torch.ones(4))


def test_features_come_from_one_named_member_only() -> None:
    a, b = _members()
    ens = Teachers([a, b], temperature=T)
    with pytest.raises(ValueError, match=r"not defined.*member=0"):
        ens.add_features({"f": "fc"})
    ens.add_features({"f": "fc"}, member="small")
    ens.add_features({"f": "fc"})  # what the Distiller then asks for is already hooked
    assert ens.features == {"f": "fc"} and "f" in ens(torch.randn(2, 3, 8, 8)).features
    with pytest.raises(ValueError, match="taken"):
        ens.add_features({"teacher0": "fc"}, member=0)


# ------------------------------------------------------------ (d) a real Distiller run


def tiny_student() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 4),
    )  # fmt: skip


@pytest.mark.parametrize("combine", ["probs", "losses"])
def test_distiller_fits_against_an_ensemble(tmp_path: Path, combine: str) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 4, (32,)))
    a, _ = _members()
    plain = nn.Sequential(nn.Flatten(), nn.Linear(192, 4))  # wrapped by as_teacher
    temperature = T if combine == "probs" else None
    ens = Teachers([a, plain], combine=combine, temperature=temperature)  # type: ignore[arg-type]
    kd = KDLoss(temperature=T, alpha=0.7)
    objective = kd if combine == "probs" else PerTeacher(kd, ens.weights)
    student = tiny_student()
    cfg = DistillerConfig(
        output_dir=str(tmp_path), max_steps=4, progress=False, save_at_epoch_end=False
    )
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    d = Distiller(student, ens, objective, opt, config=cfg)
    assert d.teacher is ens
    d.fit(DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=16))
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["teacher"] == "big+Sequential" and record["steps"] == 4
    assert set(record["teacher_metrics"]) == {"top1", "top5"}
    assert ens.num_outputs == 4  # found by the compatibility check


# ------------------------------------------------------------------ (e) the teacher cache


class Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


def test_the_cache_stores_the_ensemble_and_replays_it(tmp_path: Path) -> None:
    from distill.data.digits import load_digits_splits

    train, _ = load_digits_splits(8, max_shift=1)
    data = ReplayableShifts(
        train.images[:12], train.targets[:12], max_shift=1, background=train.background
    )
    torch.manual_seed(0)
    big = Teacher(Tiny(16), input_size=12, mean=(0.5,) * 3, std=(0.25,) * 3, name="t12")
    ens = Teachers([big, Teacher(Tiny(8), name="t8")], weights=[2.0, 1.0], temperature=4.0)
    cache = build_cache(ens, data, tmp_path / "c", crops=2, topk=10, batch_size=8, progress=False)
    assert cache.manifest["teacher_meta"]["ensemble"]["weights"] == pytest.approx([2 / 3, 1 / 3])
    for i in range(12):
        for d in range(2):
            x = data.replay(i, cache.params(i, d))["input"]
            online = ens(x[None]).output[0]
            stored = cache.logits(i, d, raw=True, temperature=4.0)  # fp16 top-k values
            torch.testing.assert_close(stored, online, rtol=0, atol=1e-3)
            p_online, p_stored = (torch.softmax(z / 4.0, 0) for z in (online, stored))
            torch.testing.assert_close(p_stored, p_online, rtol=0, atol=2e-5)


# ------------------------------------------------------------------------- (f) errors


def test_errors_say_what_to_change() -> None:
    a, b = _members()
    with pytest.raises(ValueError, match="one weight per teacher"):
        Teachers([a, b], weights=[1.0], temperature=T)
    for bad in ([1.0, 0.0], [1.0, -2.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="finite numbers > 0"):
            Teachers([a, b], weights=bad, temperature=T)
    with pytest.raises(ValueError, match="pass temperature=T"):
        Teachers([a, b])
    with pytest.raises(ValueError, match="combine must be one of"):
        Teachers([a, b], combine="mean", temperature=T)  # type: ignore[arg-type]
    ten = Teacher(Recorder(8, classes=10), num_outputs=10, name="ten")
    four = Teacher(Recorder(8, classes=4), num_outputs=4, name="four")
    with pytest.raises(ValueError, match=r"different numbers of outputs.*ten: 10"):
        Teachers([ten, four], temperature=T)
    unknown = Teachers([Teacher(Recorder(8, classes=10)), b], temperature=T)
    with pytest.raises(ValueError, match=r"do not combine.*same classes"):
        unknown(torch.randn(2, 3, 8, 8))  # counts unknown until the outputs disagree
    ma, _ = _members(output="multilabel")
    with pytest.raises(ValueError, match=r"different kinds.*big: multilabel"):
        Teachers([ma, b], temperature=T)
    with pytest.raises(ValueError, match="one view per member"):
        Teachers([a, b], temperature=T)(torch.randn(2, 3, 8, 8), prepared=True)
    with pytest.raises(ValueError, match="appears twice"):
        Teachers([a, a], temperature=T)
