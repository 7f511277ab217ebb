"""CRD: contrastive representation distillation with a memory bank of every training sample.

Tian, Krishnan & Isola, ICLR 2020, "Contrastive Representation Distillation"; the authors' code
is HobbitLong/RepDistiller (crd/criterion.py, crd/memory.py), refactored by torchdistill as
`CRDLoss` and by mdistiller as `CRD`. The penultimate features f_s (B, Ds), f_t (B, Dt) are
embedded by a linear map to D = 128 dimensions and L2-normalised, v = g(f) / ‖g(f)‖ (the
authors' `Embed`). Two banks hold one unit vector per training sample, M_s and M_t (N, D). For
each sample i of the batch, K indices j_1..j_K are drawn (column 0 holds i itself) and

    P_s[i, k] = exp(M_t[j_k] · v_s[i] / τ) / Z_s      (the student's embedding against the
    P_t[i, k] = exp(M_s[j_k] · v_t[i] / τ) / Z_t       teacher's bank, and the other way round)

where Z_s, Z_t are fixed once, from the first training batch, to N · mean(exp(·/τ)) so that the
P approximate a density over the N samples. The NCE loss of a (B, K+1) score matrix P, noise
probability 1/N (uniform over the data), is the paper's

    h = P / (P + K/N),   L = −(1/B) Σ_i [ log h[i, 0] + Σ_{k≥1} log(1 − h[i, k]) ]

(the authors' `ContrastLoss` adds eps = 1e-7 to the denominators), and crd = L(P_s) + L(P_t).
After the scores, each bank row of the batch moves toward the new embedding and is renormalised:
M[i] ← normalize(m · M[i] + (1 − m) · v[i]), m = 0.5. The gradient flows into the embeddings
(and through them into the student and both heads), never into the banks.

The authors train with CE + α·KD + β·CRD (RepDistiller's train_student.py: `-r 1 -a 0 -b 0.8` for
CRD, `-a 1 -b 0.8` for CRD+KD, KD at T = 4), τ = 0.07, K = 16384, m = 0.5, D = 128; mdistiller's
ImageNet ResNet-50 -> MobileNetV1 config is the same (CE weight 1, CRD weight 0.8, no KD). Here
`logit_loss` defaults to CrossEntropy() and `weight` to 0.8 (= CRD). CRD+KD in our KD convention
(KDLoss = alpha·kd + (1 − alpha)·ce): CE:KD:CRD = 1:1:0.8 is `logit_loss=KDLoss(temperature=4,
alpha=0.5), weight=0.4` (the same objective at half the scale: mind the learning rate).

Where we differ from the authors' code, and why:
- Negatives. The authors' data loaders (dataset/cifar100.py, dataset/imagenet.py) draw the K
  negatives of a sample uniformly, with replacement, from the samples of *other classes* and
  hand them to the memory; only without them does the memory draw uniformly over all N
  (torchdistill's path). Here the objective draws them itself: uniformly over all N (may include
  the positive, as the memory's sampler), or, given `labels` (the class of every training
  sample), uniformly from the other classes, as the authors' published runs did.
- The draws are reproducible: the draw number t of process r uses a generator seeded with a
  hash of (seed, r, t), and the objective's state holds (seed, t), so a resumed run draws the
  same negatives whichever process saved it. Processes draw different negatives.
- Several processes (DDP, each with part of the batch): the indices and embeddings of every
  process are gathered (in rank order; unequal sizes are padded) and every process applies the
  same update, so the banks stay identical; Z is computed from the scores of all processes.
  The authors' code is single-process. A sample that occurs twice in one update (e.g. the
  padding of a DistributedSampler) takes its last occurrence (rank order, then batch order),
  where the authors' `index_copy_` leaves it unspecified on CUDA.
- Bank rows whose new embedding is not finite keep their old value (a non-finite batch that the
  loop skips must not poison the bank for good); the banks are updated in train() mode only;
  normalisation divides by max(‖x‖, 1e-12) (the authors divide by ‖x‖; they differ only below
  1e-12); Z is a device tensor (the authors read it to the host every step) accumulated in
  float64; the banks start from a generator seeded with `seed` (identical on every process).

Memory: the banks take 2·N·D·4 bytes (1.3 GB for ImageNet at D = 128) and are in the state dict
(checkpoints, and `sync_buffers`' all-reduce, which leaves identical banks unchanged); a step
gathers (B, K+1, D) bank rows per side (2.1 GB at B = 256, K = 16384, float32) as the authors do.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import (
    Objective,
    as_float,
    check_fraction,
    check_non_negative,
    check_positive,
    feature,
    full_precision,
)
from distill.losses.ce import CrossEntropy
from distill.losses.feature import _FeatureObjective
from distill.types import Outputs

_MASK64 = (1 << 64) - 1
_STATE_VERSION = 1

# ---------------------------------------------------------------- pure functions


def nce_contrast_loss(scores: Tensor, num_samples: int, *, eps: float = 1e-7) -> Tensor:
    """The NCE loss of (B, K+1) normalised scores P, the positive in column 0, K negatives drawn
    with noise probability 1/num_samples: −(1/B) Σ_i [log P₀/(P₀ + c) + Σ_k log (K/N)/(P_k + c)]
    with c = K/N + eps (the authors' `ContrastLoss`; eps = 0 gives the paper's equation)."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"scores must be (B, K+1) with the positive in column 0 and K >= 1 negatives, got "
            f"shape {tuple(scores.shape)}"
        )
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(
            f"num_samples must be a positive int (the dataset size), got {num_samples!r}"
        )
    check_non_negative("eps", eps, "the authors use 1e-7")
    noise = (scores.shape[1] - 1) / num_samples  # K · P_noise
    pos, neg = scores[:, 0], scores[:, 1:]  # (B,), (B, K)
    log_d1 = torch.log(pos / (pos + (noise + eps)))
    log_d0 = torch.log(noise / (neg + (noise + eps)))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def memory_scores(
    embedding: Tensor,
    bank: Tensor,
    contrast_index: Tensor,
    *,
    temperature: float,
    z: float | Tensor = 1.0,
) -> Tensor:
    """exp(bank[j] · v / τ) / z for every drawn index j: (B, K+1) from embeddings v (B, D), a
    bank (N, D) (read without gradient) and indices (B, K+1). z = 1 gives the unnormalised
    scores from which Z is set."""
    b, d = embedding.shape
    if contrast_index.dim() != 2 or contrast_index.shape[0] != b:
        raise ValueError(
            f"contrast_index must be (B, K+1) = ({b}, K+1) for {b} embeddings, got "
            f"{tuple(contrast_index.shape)}"
        )
    if bank.dim() != 2 or bank.shape[1] != d:
        raise ValueError(f"bank must be (N, {d}) for {d}-dim embeddings, got {tuple(bank.shape)}")
    rows = bank.detach().index_select(0, contrast_index.reshape(-1))
    rows = rows.view(b, contrast_index.shape[1], d).to(embedding.dtype)  # (B, K+1, D)
    dots = torch.bmm(rows, embedding.unsqueeze(2)).squeeze(2)  # (B, K+1)
    return torch.exp(dots / temperature) / z


def momentum_update(rows: Tensor, new: Tensor, momentum: float) -> Tensor:
    """normalize(momentum · rows + (1 − momentum) · new) row-wise, (n, D)."""
    mixed = rows * momentum + new.to(rows.dtype) * (1.0 - momentum)
    return mixed / mixed.norm(dim=1, keepdim=True).clamp_min(1e-12)


def last_occurrences(index: Tensor) -> Tensor:
    """Positions of the last occurrence of each distinct value of a 1-D `index`, (n_unique,)."""
    ordered, order = torch.sort(index, stable=True)
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[:-1] = ordered[1:] != ordered[:-1]
    return order[last]


# ---------------------------------------------------------------- processes


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: Tensor) -> Tensor:
    """Every process's rows (n_r, ...) concatenated in rank order (n_r may differ: each is padded
    to the largest before the all-gather); `x` itself in a single process. No gradient."""
    _, world = _world()
    if world < 2:
        return x
    with torch.no_grad():
        n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        counts = [int(s) for s in sizes]
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])


def _all_sum(x: Tensor) -> Tensor:
    if _world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _MASK64)) + 0x9E3779B97F4A7C15) & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


# ---------------------------------------------------------------- modules


class CRDEmbed(nn.Module):
    """Linear to `out_dim`, then L2 normalisation (the authors' `Embed`); (B, ...) is flattened.
    Runs outside autocast: it is part of the loss."""

    def __init__(self, in_dim: int, out_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        with full_precision(x):
            y = self.linear(as_float(x).flatten(1).to(self.linear.weight.dtype))
            return F.normalize(y, dim=1)


def _check_int(name: str, value: int, low: int, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r} ({hint})")
    return value


class CRDLoss(_FeatureObjective):
    """Contrastive representation distillation; part "crd" (+ logit_loss's);
    loss = weight · crd + logit loss. See the module docstring for the maths and the authors'
    settings, which are the defaults.

    Reads the batch entry "index" (each sample's position in the training set, [0,
    num_samples)) and hooks `student_layer` / `teacher_layer` (the penultimate features, e.g.
    "global_pool" / "avgpool") as "crd". The two heads are learnable (add
    `objective.parameters()` to the optimizer); the banks and Z are buffers, in the state dict
    with the draw counter, so a resumed run continues exactly. `labels` (num_samples,): the
    class of every training sample, to draw negatives from other classes as the authors did.
    """

    batch_keys = ("index",)
    # every rank applies the same gathered update: DDP need not broadcast them (distill.step)
    synced_buffers: tuple[str, ...] = ("memory_student", "memory_teacher", "z_student", "z_teacher")
    memory_student: Tensor  # (N, D) buffers, registered in __init__
    memory_teacher: Tensor
    z_student: Tensor  # () buffers
    z_teacher: Tensor
    _labels: Tensor  # (N,) non-persistent buffers, with `labels` only
    _order: Tensor
    _count: Tensor
    _start: Tensor

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        student_dim: int,
        teacher_dim: int,
        num_samples: int,
        logit_loss: Objective | Literal["ce"] | None = "ce",
        weight: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        eps: float = 1e-7,
        labels: Tensor | None = None,
        seed: int = 0,
    ) -> None:
        if isinstance(logit_loss, str) and logit_loss != "ce":
            raise ValueError(
                f"logit_loss={logit_loss!r}: pass an objective (e.g. KDLoss(temperature=4.0, "
                "alpha=0.5) for CRD+KD), 'ce' (the default) or None; create_objective('crd', "
                "logit_loss='kd') builds one by name"
            )
        super().__init__(CrossEntropy() if isinstance(logit_loss, str) else logit_loss)
        self.student_dim = _check_int("student_dim", student_dim, 1, "the student feature width")
        self.teacher_dim = _check_int("teacher_dim", teacher_dim, 1, "the teacher feature width")
        self.num_samples = _check_int("num_samples", num_samples, 2, "the training set size")
        self.feat_dim = _check_int("feat_dim", feat_dim, 1, "the authors use 128")
        self.nce_k = _check_int("nce_k", nce_k, 1, "negatives per sample; the authors use 16384")
        self.seed = _check_int("seed", seed, 0, "seeds the banks and the negative draws")
        self.weight = check_non_negative("weight", weight, "the authors use 0.8")
        self.nce_t = check_positive("nce_t", nce_t, "the authors use 0.07")
        self.momentum = check_fraction("momentum", momentum, "the authors use 0.5")
        self.eps = check_non_negative("eps", eps, "the authors use 1e-7")
        self._hook("crd", student_layer, teacher_layer)
        self.embed_s = CRDEmbed(student_dim, feat_dim)
        self.embed_t = CRDEmbed(teacher_dim, feat_dim)
        g = torch.Generator().manual_seed(_mix(self.seed, 0xBA4C))
        stdv = 1.0 / math.sqrt(feat_dim / 3.0)  # the authors' U(−stdv, stdv): rows of norm ≈ 1
        for name in ("memory_student", "memory_teacher"):
            bank = (torch.rand(num_samples, feat_dim, generator=g) * 2.0 - 1.0) * stdv
            self.register_buffer(name, bank)
        # Z of the student- and teacher-anchored scores; < 0 until the first training batch
        self.register_buffer("z_student", torch.tensor(-1.0))
        self.register_buffer("z_teacher", torch.tensor(-1.0))
        self._set_labels(labels)
        self.draws = 0  # training steps drawn so far, part of the state
        self._z_ready = False  # cache of (z > 0): reading it costs a host sync

    def _set_labels(self, labels: Tensor | None) -> None:
        self.class_aware = labels is not None
        if labels is None:
            return
        labels = torch.as_tensor(labels)
        if labels.shape != (self.num_samples,) or labels.is_floating_point():
            raise ValueError(
                f"labels must be the integer class of every training sample, shape "
                f"({self.num_samples},), got {tuple(labels.shape)} {labels.dtype}"
            )
        if int(labels.min()) < 0:
            raise ValueError("labels must be >= 0 (class indices)")
        labels = labels.long()
        counts = torch.bincount(labels)
        if int(counts.max()) == self.num_samples:
            raise ValueError("labels hold a single class: there are no other-class negatives")
        # samples sorted by class; class c occupies order[start[c] : start[c] + counts[c]]
        self.register_buffer("_labels", labels, persistent=False)
        self.register_buffer("_order", torch.sort(labels, stable=True).indices, persistent=False)
        self.register_buffer("_count", counts, persistent=False)
        self.register_buffer("_start", torch.cumsum(counts, 0) - counts, persistent=False)

    @classmethod
    def from_models(  # type: ignore[override]
        cls,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        num_samples: int,
        student_feature: tuple[str, int] | None = None,
        teacher_feature: tuple[str, int] | None = None,
        **options: object,
    ) -> CRDLoss:
        """CRD on the penultimate features: `student_feature` / `teacher_feature` as (module
        path, width), read by `distill.models.stages.penultimate` when not given (the teacher
        may be a `distill.Teacher`)."""
        if teacher is None:
            raise ValueError("CRD distils from a teacher's features: pass the teacher")
        if student_feature is None or teacher_feature is None:
            from distill.models.stages import penultimate  # a dry forward of each network

            student_feature = student_feature or penultimate(student)
            teacher_feature = teacher_feature or penultimate(teacher)
        (s_path, s_dim), (t_path, t_dim) = student_feature, teacher_feature
        return cls(
            student_layer=s_path,
            teacher_layer=t_path,
            student_dim=s_dim,
            teacher_dim=t_dim,
            num_samples=num_samples,
            **options,  # type: ignore[arg-type]
        )

    # ------------------------------------------------------------ state

    def get_extra_state(self) -> Tensor:
        # a tensor, not a dict: checkpoints are written with safetensors
        return torch.tensor([_STATE_VERSION, self.seed, self.draws], dtype=torch.int64)

    def set_extra_state(self, state: Tensor) -> None:
        values = torch.as_tensor(state).tolist()
        if len(values) != 3 or values[0] != _STATE_VERSION:
            raise ValueError(f"not a CRDLoss state (version {_STATE_VERSION}): {values!r}")
        self.seed, self.draws = int(values[1]), int(values[2])
        self._z_ready = False

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self._z_ready = False  # Z buffers may change
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------ the steps

    def negatives(self, index: Tensor) -> Tensor:
        """(B, K+1) contrast indices for positives `index` (B,): column 0 is `index`, then K
        draws (uniform over all samples, or over the other classes' with `labels`) from this
        process's generator for the current draw number."""
        rank, _ = _world()
        dev = index.device
        g = torch.Generator(device=dev).manual_seed(_mix(self.seed, rank, self.draws))
        shape = (index.shape[0], self.nce_k)
        if not self.class_aware:
            neg = torch.randint(0, self.num_samples, shape, generator=g, device=dev)
        else:
            c = self._labels[index].unsqueeze(1)  # (B, 1)
            count, start = self._count[c], self._start[c]
            pool = self.num_samples - count  # samples of other classes
            u = torch.rand(shape, generator=g, device=dev, dtype=torch.float64)
            j = (u * pool).long().clamp_max(pool - 1)  # uniform in [0, pool)
            neg = self._order[j + count * (j >= start)]  # skip the positive's class
        return torch.cat([index.unsqueeze(1), neg], dim=1)

    def _check_index(self, index: Tensor | None, batch: int) -> Tensor:
        if index is None:
            raise ValueError(
                "CRDLoss needs index=, the dataset position of each sample (its batch_keys): "
                "yield dict batches with an 'index' entry (e.g. wrap the training set in "
                "distill.data.WithIndex)"
            )
        if not isinstance(index, Tensor) or index.is_floating_point() or index.dim() != 1:
            raise ValueError(f"index must be a 1-D integer tensor, got {index!r:.80}")
        if index.shape[0] != batch:
            raise ValueError(f"index has {index.shape[0]} entries for a batch of {batch}")
        if index.device.type == "cpu" and index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_samples:
                raise ValueError(
                    f"dataset indices must lie in [0, {self.num_samples}) (num_samples), got "
                    f"range [{lo}, {hi}]: set num_samples to the training set's size, and pass "
                    "each sample's position in it"
                )
        return index.to(self.memory_student.device, torch.long)

    def _normalisers(self, scores_s: Tensor, scores_t: Tensor) -> tuple[Tensor, Tensor]:
        """Z_s, Z_t: the stored ones, else N · mean score over every process's first batch
        (stored in train mode; in eval mode they are only used for this batch)."""
        if not self._z_ready:
            self._z_ready = bool((self.z_student > 0) & (self.z_teacher > 0))
        if self._z_ready:
            return self.z_student, self.z_teacher
        with torch.no_grad():
            f64 = torch.float64
            n = torch.tensor(float(scores_s.numel()), dtype=f64, device=scores_s.device)
            stats = _all_sum(torch.stack([scores_s.sum(dtype=f64), scores_t.sum(dtype=f64), n]))
            z = stats[:2] / stats[2] * self.num_samples
            z_s, z_t = z[0].to(self.z_student.dtype), z[1].to(self.z_teacher.dtype)
            if self.training:
                self.z_student.copy_(z_s)
                self.z_teacher.copy_(z_t)
                self._z_ready = True
        return z_s, z_t

    @torch.no_grad()
    def _update_memory(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """The momentum update, with every process's rows: the same on every process."""
        d = self.feat_dim
        packed = torch.cat([index.double().unsqueeze(1), v_s.double(), v_t.double()], dim=1)
        packed = gather_rows(packed)  # (ΣB, 1 + 2D), exact: indices < 2^53, float32 ⊂ float64
        keep = last_occurrences(packed[:, 0])
        packed = packed[keep]
        idx = packed[:, 0].long()
        for bank, new in (
            (self.memory_student, packed[:, 1 : 1 + d]),
            (self.memory_teacher, packed[:, 1 + d :]),
        ):
            rows = bank.index_select(0, idx)
            updated = momentum_update(rows, new, self.momentum)
            finite = torch.isfinite(new).all(dim=1, keepdim=True)
            bank.index_copy_(0, idx, torch.where(finite, updated, rows))

    def _features(self, student: Outputs, teacher: Outputs) -> tuple[Tensor, Tensor]:
        f_s = feature(student, "crd", "student", self.student_features["crd"])
        f_t = feature(teacher, "crd", "teacher", self.teacher_features["crd"])
        for side, f, dim in (
            ("student", f_s, self.student_dim),
            ("teacher", f_t, self.teacher_dim),
        ):
            width = math.prod(f.shape[1:]) if f.dim() >= 2 else -1
            if width != dim:
                raise ValueError(
                    f"the {side}'s CRD feature has shape {tuple(f.shape)} but {side}_dim={dim}: "
                    f"hook the penultimate (pooled) layer, (B, {dim}) or (B, {dim}, 1, 1), or "
                    f"set {side}_dim to its width"
                )
        if f_s.shape[0] != f_t.shape[0]:
            raise ValueError(
                f"batch sizes differ: student {f_s.shape[0]}, teacher {f_t.shape[0]}; feed both "
                "models the same batch"
            )
        return f_s, f_t

    def forward(  # type: ignore[override]
        self,
        student: Outputs,
        teacher: Outputs | None,
        target: Tensor | None,
        *,
        index: Tensor | None = None,
        contrast_index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """`contrast_index` (B, K+1), positive first, replaces the objective's own draw."""
        t_out = self._teacher(teacher)
        f_s, f_t = self._features(student, t_out)
        idx = self._check_index(index, f_s.shape[0])
        with full_precision(f_s):
            v_s = self.embed_s(f_s)  # (B, D)
            v_t = self.embed_t(f_t.detach())  # (B, D)
            if contrast_index is None:
                contrast_index = self.negatives(idx)
            cidx = contrast_index.to(idx.device, torch.long)
            scores_s = memory_scores(v_s, self.memory_teacher, cidx, temperature=self.nce_t)
            scores_t = memory_scores(v_t, self.memory_student, cidx, temperature=self.nce_t)
            z_s, z_t = self._normalisers(scores_s, scores_t)
            crd = nce_contrast_loss(scores_s / z_s, self.num_samples, eps=self.eps)
            crd = crd + nce_contrast_loss(scores_t / z_t, self.num_samples, eps=self.eps)
        if self.training:
            self._update_memory(idx, v_s.detach(), v_t.detach())
            self.draws += 1
        return self._combine({"loss": self.weight * crd, "crd": crd}, student, t_out, target)

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, weight={self.weight}, feat_dim={self.feat_dim}, "
            f"nce_k={self.nce_k}, nce_t={self.nce_t}, momentum={self.momentum}, "
            f"class_aware={self.class_aware}, seed={self.seed}"
        )
