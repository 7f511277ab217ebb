"""Several frozen teachers as one: multi-teacher distillation.

`Teachers([t1, t2], weights=..., combine=..., temperature=T)` serves wherever a `Teacher` does
(the Distiller, the teacher cache, evaluating "the teacher's score"). Each member keeps its own
input size and normalisation: it converts the student's batch itself, or reads its own view from
`distill.data.transforms.paired_views(teachers, ...)`; all members run under one
`torch.inference_mode()`. The weights w_i are positive, one per member, normalised to sum 1
(equal by default).

combine="probs" (the default) averages the members' soft targets,

    p = Σ_i w_i · softmax(z_i / T),

and returns them as ordinary logits z = T · log p (`mean_probs_logits`, in log-sum-exp form), so
that softmax(z / T) = p exactly: every logit method (KD, DKD, DIST), the teacher cache and
evaluation run on the ensemble unchanged. T must be the KD loss's temperature. At another
temperature τ, softmax(z / τ) ∝ p^(T/τ), which is not the mean of the members' softmax(z_i / τ):
z are not the members' logits (nor their mean), so a loss that moves the temperature (CTKD's
learnable one) or rescales logits (logit standardisation) does not see the members' average at
its own temperature. Evaluation ranks classes by p (at T = 1 the usual probability ensemble).
Attribute logits ("multilabel") average the tempered sigmoid of each attribute instead,
p = Σ_i w_i · sigmoid(z_i / T), returned as z = T · logit(p) (`mean_sigmoid_logits`), so that
sigmoid(z / T) = p. Embeddings are refused: two models' embedding spaces are not aligned (their
axes mean nothing in common, even at equal sizes), so a mean of their embeddings is no
embedding at all; use combine="losses".

combine="losses" gives each member its own loss term, loss = Σ_i w_i · objective(student,
member i), through `PerTeacher(objective, teachers.weights)`. `Outputs.features` carries each
member's output under the reserved names "teacher0", "teacher1", ... (`member_key`);
`Outputs.output` is what evaluation scores: the weighted mean of the members' logits Σ_i w_i z_i,
or, for embeddings, the concatenation of √w_i · e_i / ‖e_i‖ (`unit_concat`), whose cosine
similarities are the weighted mean of the members' (their verification scores, ensembled). A
teacher cache stores only `Outputs.output`: cache a combine="probs" ensemble.

Feature distillation (FitNets, AT, ...) from an ensemble is not defined: the members'
activations have their own channels, resolutions and meaning, so there is no one map to match.
Hook a single member instead (`Teachers.add_features(..., member=...)`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import as_float, check_positive
from distill.losses.ensemble import PerTeacher, check_weights, is_member_key, member_key
from distill.teacher import OutputKind, Teacher, TeacherDtype, _plain, as_teacher
from distill.types import Outputs

__all__ = [
    "COMBINES",
    "Combine",
    "PerTeacher",
    "Teachers",
    "check_weights",
    "mean_logits",
    "mean_probs_logits",
    "mean_sigmoid_logits",
    "member_key",
    "unit_concat",
]

Combine = Literal["probs", "losses"]
COMBINES: tuple[str, ...] = ("probs", "losses")
_WHAT = {"logits": "classes", "multilabel": "attributes", "embedding": "dimensions"}


def _check_members(outputs: Sequence[Tensor], weights: Sequence[float]) -> None:
    if not outputs or len(outputs) != len(weights):
        raise ValueError(f"{len(outputs)} member outputs for {len(weights)} weights")


def mean_probs_logits(
    logits: Sequence[Tensor], weights: Sequence[float], *, temperature: float
) -> Tensor:
    """T · log Σ_i w_i softmax(z_i / T) of members' (B, K) logits, weights summing to 1: logits
    whose softmax at T is the weighted mean of the members' tempered probabilities. Summed in
    log space (log-sum-exp over members), so no small probability rounds to log 0."""
    t = check_positive("temperature", temperature, "the KD loss's temperature")
    _check_members(logits, weights)
    log_p = torch.stack(
        [F.log_softmax(as_float(z) / t, dim=1) + math.log(w) for z, w in zip(logits, weights)]
    )  # (M, B, K): log(w_i · p_i)
    return torch.logsumexp(log_p, dim=0) * t  # (B, K)


def mean_sigmoid_logits(
    logits: Sequence[Tensor], weights: Sequence[float], *, temperature: float
) -> Tensor:
    """T · logit(Σ_i w_i sigmoid(z_i / T)) of members' (B, A) attribute logits, weights summing
    to 1: sigmoid at T of the result is the weighted mean of the members' tempered sigmoids.
    log p and log(1 − p) are each summed in log space, so p near 0 or 1 stays finite."""
    t = check_positive("temperature", temperature, "the KD loss's temperature")
    _check_members(logits, weights)
    scaled = [as_float(z) / t for z in logits]
    log_w = [math.log(w) for w in weights]
    log_p = torch.logsumexp(torch.stack([F.logsigmoid(s) + a for s, a in zip(scaled, log_w)]), 0)
    log_q = torch.logsumexp(torch.stack([F.logsigmoid(-s) + a for s, a in zip(scaled, log_w)]), 0)
    return (log_p - log_q) * t  # (B, A)


def mean_logits(logits: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i w_i z_i of members' (B, K) logits."""
    _check_members(logits, weights)
    return torch.stack([as_float(z) * w for z, w in zip(logits, weights)]).sum(0)


def unit_concat(embeddings: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """cat_i(√w_i · e_i / ‖e_i‖) of members' (B, D_i) embeddings: (B, Σ D_i) unit rows (weights
    summing to 1) whose dot products are the weighted mean of the members' cosine similarities."""
    _check_members(embeddings, weights)
    parts = [F.normalize(as_float(e), dim=1) * math.sqrt(w) for e, w in zip(embeddings, weights)]
    return torch.cat(parts, dim=1)


class Teachers(nn.Module):
    """Frozen teachers combined into one (see the module docstring).

    Args:
        members: `Teacher`s, or plain modules (wrapped by `as_teacher` with its defaults), each
            with its own input size, normalisation and precision.
        weights: one number > 0 per member (normalised to sum 1); None: equal weights.
        combine: "probs" (average the tempered probabilities) or "losses" (one loss term per
            member, through `PerTeacher`).
        temperature: combine="probs" only, and required there: the KD loss's temperature.
        name: the ensemble's name in run records; by default its members' names joined by "+".
    """

    acts_as_teacher: ClassVar[bool] = True  # distill.teacher.as_teacher passes it through

    def __init__(
        self,
        members: Sequence[Teacher | nn.Module],
        *,
        weights: Sequence[float] | None = None,
        combine: Combine = "probs",
        temperature: float | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        teachers = _as_members(members)
        _check_combine(combine, temperature)
        self.combine: Combine = combine
        self.temperature = None if temperature is None else float(temperature)
        self.weights = check_weights(weights, len(teachers))
        self.output_kind = _common_kind(teachers, combine)
        self.student_mean, self.student_std = _common_student_norm(teachers)
        self.num_outputs = _common_count(teachers, self.output_kind)
        self.label_names = _common_labels(teachers)
        _check_feature_names(teachers)
        self.members = nn.ModuleList(teachers)
        self.name = name or "+".join(t.name for t in teachers)
        self.source: str | None = None

    def __iter__(self) -> Iterator[Teacher]:
        return (cast(Teacher, m) for m in self.members)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> Teacher:
        return cast(Teacher, self.members[i])

    # ------------------------------------------------------------ the Teacher interface
    def _one_view(self) -> bool:
        """Whether every member takes the same input (size, normalisation, interpolation)."""
        return len({(m.input_size, m.mean, m.std, m.interpolation) for m in self}) == 1

    def _shared(self, attr: str) -> Any:
        """`attr` of the members when they take one view, else None (no single view)."""
        return getattr(self[0], attr) if self._one_view() else None

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The members' input size when they all take the same view, else None."""
        return self._shared("input_size")  # type: ignore[no-any-return]

    @property
    def mean(self) -> tuple[float, ...] | None:
        return self._shared("mean")  # type: ignore[no-any-return]

    @property
    def std(self) -> tuple[float, ...] | None:
        return self._shared("std")  # type: ignore[no-any-return]

    @property
    def interpolation(self) -> str | None:
        return self._shared("interpolation")  # type: ignore[no-any-return]

    @property
    def features(self) -> dict[str, str]:
        """Every member's hooked activations, {name: module path} (names are unique)."""
        return {k: v for m in self for k, v in m.features.items()}

    def add_features(self, features: Mapping[str, str], member: int | str | None = None) -> None:
        """Capture named activations of one `member` (its index or name); they arrive in
        `Outputs.features` under the names given. Without `member`, only names already hooked
        with the same path are accepted: the Distiller calls this with the objective's
        `teacher_features`, which then meet the hooks a user added to one member beforehand."""
        if member is None:
            new = {k: v for k, v in features.items() if self.features.get(k) != v}
            if new:
                names = [m.name for m in self]
                raise ValueError(
                    f"feature distillation from an ensemble is not defined: its members' "
                    f"activations have their own channels, resolutions and meaning, so "
                    f"{sorted(new)} match no one map. Distil one member's features by hooking "
                    f"them first: teachers.add_features({new!r}, member=0) (an index, or one "
                    f"of {names}), or distil outputs (KD, DKD, DIST) instead"
                )
            return
        i = self._index(member)
        reserved = sorted(k for k in features if is_member_key(k))
        taken = sorted(k for j, m in enumerate(self) if j != i for k in m.features if k in features)
        if reserved or taken:
            raise ValueError(
                f"feature names {reserved + taken} are taken ('teacher<i>' names the members' "
                "outputs; other members hook the rest): choose other names"
            )
        self[i].add_features(features)

    def _index(self, member: int | str) -> int:
        names = [m.name for m in self]
        if isinstance(member, str) and names.count(member) == 1:
            return names.index(member)
        if isinstance(member, int) and not isinstance(member, bool) and 0 <= member < len(self):
            return member
        raise ValueError(
            f"member must be an index in [0, {len(self)}) or one of the unique member names "
            f"{names}, got {member!r}"
        )

    @property
    def meta(self) -> dict[str, Any]:
        members = [{k: v for k, v in m.meta.items() if k != "label_names"} for m in self]
        return {
            "name": self.name,
            "input_size": self.input_size,
            "mean": self.mean,
            "std": self.std,
            "output": self.output_kind,
            "num_outputs": self.num_outputs,
            "label_names": self.label_names,
            "source": self.source,
            "ensemble": {
                "combine": self.combine,
                "temperature": self.temperature,
                "weights": list(self.weights),
                "members": members,
            },
        }

    @property
    def dtype(self) -> torch.dtype:
        """The members' weight precision (float32 where they differ: each runs in its own)."""
        dtypes = {m.dtype for m in self}
        return dtypes.pop() if len(dtypes) == 1 else torch.float32

    def to_precision(
        self, precision: TeacherDtype | torch.dtype, device: torch.device | str | None = None
    ) -> Teachers:
        """Cast every member (`Teacher.to_precision`); outputs still reach the loss in float32."""
        for m in self:
            m.to_precision(precision, device)
        return self

    def train(self, mode: bool = True) -> Teachers:
        super().train(False)  # a teacher never trains, whatever a surrounding module asks
        return self

    @torch.no_grad()
    def check_compatible(
        self, student: nn.Module, example_input: Any, *, same_dim: bool | None = None
    ) -> None:
        """Each member's `Teacher.check_compatible` against the student, naming the member that
        does not fit; then `num_outputs` is known."""
        for i, m in enumerate(self):
            try:
                m.check_compatible(student, example_input, same_dim=same_dim)
            except ValueError as e:
                raise ValueError(f"teacher {i} of the ensemble ({m.name}): {e}") from e
        counts = [int(m.num_outputs) for m in self if m.num_outputs is not None]
        if counts:
            self.num_outputs = sum(counts) if self.output_kind == "embedding" else counts[0]

    # ------------------------------------------------------------------- the forward
    def forward(self, x: Any, *, prepared: bool = False) -> Outputs:
        """The ensemble's answer for a student batch, which each member converts itself; with
        `prepared=True`, for inputs in the members' own views: a tuple or list with one per
        member (what `paired_views(teachers, ...)` yields), or one input if they all take the
        same view."""
        inputs = self._inputs(x, prepared)
        with torch.inference_mode():
            raw = [m.infer(v, prepared=prepared) for m, v in zip(self, inputs)]
            outputs = [r.output for r in raw]
            self._check_outputs(outputs)
            combined = self._combine(outputs)
            features = {k: v for r in raw for k, v in r.features.items()}
            if self.combine == "losses":
                features.update({member_key(i): z for i, z in enumerate(outputs)})
        # float32 copies outside inference mode, which the losses can save for backward
        return Outputs(_plain(combined, True), {k: _plain(v, True) for k, v in features.items()})

    def _inputs(self, x: Any, prepared: bool) -> list[Any]:
        n = len(self)
        if not prepared:
            return [x] * n
        if isinstance(x, (tuple, list)):
            if len(x) != n:
                raise ValueError(
                    f"{len(x)} prepared inputs for an ensemble of {n} teachers: pass one per "
                    "member, in member order (paired_views(teachers, ...) yields them)"
                )
            return list(x)
        if not self._one_view():
            sizes = ", ".join(f"{m.name}: {m.input_size}" for m in self)
            raise ValueError(
                f"one prepared input for teachers that take different views ({sizes}): pass "
                "one view per member (paired_views(teachers, ...) renders them), or "
                "prepared=False to let each member convert the student's batch"
            )
        return [x] * n

    def _check_outputs(self, outputs: Sequence[Tensor]) -> None:
        shapes = [tuple(z.shape) for z in outputs]
        same = len({s[:1] if self.output_kind == "embedding" else s for s in shapes}) == 1
        if not same or any(len(s) != 2 for s in shapes):
            got = ", ".join(f"{m.name} {s}" for m, s in zip(self, shapes))
            what = _WHAT[self.output_kind]
            order = "" if self.output_kind == "embedding" else f", the same {what} in one order"
            raise ValueError(
                f"the teachers' outputs do not combine: {got}. Every member must return "
                f"(B, N) {self.output_kind} for the batch{order}"
            )

    def _combine(self, outputs: Sequence[Tensor]) -> Tensor:
        if self.output_kind == "embedding":  # combine="losses": probs refused them
            return unit_concat(outputs, self.weights)
        if self.combine == "losses":
            return mean_logits(outputs, self.weights)
        assert self.temperature is not None  # required by combine="probs"
        mean = mean_probs_logits if self.output_kind == "logits" else mean_sigmoid_logits
        return mean(outputs, self.weights, temperature=self.temperature)

    def extra_repr(self) -> str:
        weights = ", ".join(f"{w:.4g}" for w in self.weights)
        return (
            f"name={self.name!r}, combine={self.combine!r}, temperature={self.temperature}, "
            f"weights=({weights})"
        )


# ---------------------------------------------------------------- construction checks


def _as_members(members: Sequence[Teacher | nn.Module]) -> list[Teacher]:
    if isinstance(members, nn.Module) or not isinstance(members, Sequence):
        raise TypeError(
            f"Teachers takes a list of Teachers (or modules), got a {type(members).__name__}"
        )
    out: list[Teacher] = []
    for i, m in enumerate(members):
        if isinstance(m, Teachers):
            raise TypeError(
                f"member {i} is itself an ensemble: list its members instead, with its weight "
                "times theirs"
            )
        teacher = as_teacher(m)
        if not isinstance(teacher, Teacher):
            raise TypeError(f"member {i} is a {type(m).__name__}, not a Teacher or nn.Module")
        out.append(teacher)
    if not out:
        raise ValueError("Teachers needs at least one teacher")
    if len({id(t) for t in out}) != len(out):
        raise ValueError(
            "the same Teacher appears twice in the ensemble: give it a larger weight instead"
        )
    return out


def _check_combine(combine: str, temperature: float | None) -> None:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    if combine == "probs" and temperature is None:
        raise ValueError(
            "combine='probs' averages the members' probabilities at the KD temperature: pass "
            "temperature=T, the loss's own (KDLoss(temperature=4.0) -> Teachers(..., "
            "temperature=4.0))"
        )
    if combine == "losses" and temperature is not None:
        raise ValueError(
            "temperature is used by combine='probs' only; with combine='losses' each member's "
            "term takes the objective's temperature: drop it"
        )
    if temperature is not None:
        check_positive("temperature", temperature, "the KD loss's temperature")


def _listing(teachers: Sequence[Teacher], attr: str) -> str:
    return ", ".join(f"{t.name}: {getattr(t, attr)}" for t in teachers)


def _common_kind(teachers: Sequence[Teacher], combine: str) -> OutputKind:
    kinds = {t.output_kind for t in teachers}
    if len(kinds) > 1:
        raise ValueError(
            f"the teachers output different kinds ({_listing(teachers, 'output_kind')}): an "
            "ensemble combines outputs of one kind; build every member with the same output="
        )
    kind = kinds.pop()
    if kind == "embedding" and combine == "probs":
        raise ValueError(
            "combine='probs' averages probabilities, which embeddings are not, and a mean of "
            "embeddings from different models is not defined either (their spaces are not "
            "aligned). Use combine='losses' with PerTeacher(objective, teachers.weights): each "
            "member's embedding is then distilled on its own (EmbeddingDistillLoss(..., "
            "kind='rkd') compares relations, whatever the members' sizes)"
        )
    return kind


def _common_student_norm(teachers: Sequence[Teacher]) -> tuple[tuple[float, ...], ...]:
    norms = {(t.student_mean, t.student_std) for t in teachers}
    if len(norms) > 1:
        raise ValueError(
            f"the teachers expect different student normalisations "
            f"({_listing(teachers, 'student_mean')}), but they all read the same student "
            "batch: build them with the same student_mean and student_std"
        )
    return norms.pop()


def _common_count(teachers: Sequence[Teacher], kind: str) -> int | None:
    counts = [t.num_outputs for t in teachers]
    if kind == "embedding":
        return None if None in counts else sum(int(c) for c in counts if c is not None)
    known = {c for c in counts if c is not None}
    if len(known) > 1:
        raise ValueError(
            f"the teachers have different numbers of outputs ({_listing(teachers, 'num_outputs')})"
            f": an ensemble averages output j of every member, so they must all output the "
            f"same {_WHAT[kind]} in the same order"
        )
    return known.pop() if known else None


def _common_labels(teachers: Sequence[Teacher]) -> list[str] | None:
    named = [t for t in teachers if t.label_names is not None]
    if any(t.label_names != named[0].label_names for t in named):
        raise ValueError(
            f"the teachers name their outputs differently ({named[0].name} and "
            f"{next(t.name for t in named if t.label_names != named[0].label_names)}): an "
            "ensemble averages output j of every member, so output j must mean the same for all"
        )
    return list(named[0].label_names or ()) if named else None


def _check_feature_names(teachers: Sequence[Teacher]) -> None:
    names = [k for t in teachers for k in t.features]
    bad = sorted({k for k in names if names.count(k) > 1 or is_member_key(k)})
    if bad:
        raise ValueError(
            f"feature names {bad} are hooked twice or reserved ('teacher<i>' names the "
            "members' outputs): give each member's features names of their own"
        )
