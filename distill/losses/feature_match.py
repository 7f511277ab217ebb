"""Feature matching with a learned or given transform: VID and factor transfer.

VID (Ahn et al., CVPR 2019, "Variational Information Distillation for Knowledge Transfer"; the
layout of RepDistiller's `VIDLoss`, HobbitLong/RepDistiller distiller_zoo/VID.py): a Gaussian
q(t | s) = N(μ(s), σ²) per teacher channel, with μ a 1×1-conv regressor
conv -> ReLU -> conv -> ReLU -> conv (student -> mid -> mid -> teacher channels) and a learnable
variance σ²_c = softplus(α_c) + eps, eps = 1e-5, α initialised so σ² starts at `init_var` = 5.
The term per layer pair is the negative log-likelihood without its constant,

    mean_{B, C, H, W} ½ · ((μ − t)² / σ² + log σ²)

(torchdistill's `VIDLoss` on the same μ, σ²), and loss = weight · Σ_layers (the paper's λ; the
VID-I ImageNet / CIFAR setting and RepDistiller use 1). The term is a bound that can go below 0.
Maps of different spatial sizes meet at the smaller one: the larger map, student's or
teacher's, is average-pooled (RepDistiller pools to the smaller square; resize_map below).

Factor transfer (Kim, Park & Kwak, NeurIPS 2018, "Paraphrasing Complex Network: Network
Compression via Factor Transfer"; the authors' code Jangho-Kim/Factor-Transfer-pytorch). A
paraphraser (an auto-encoder trained to reconstruct a teacher map) gives the teacher factor
F_T, a translator on the student's map the student factor F_S (`distill.losses.factor`), and
the term is ‖F_T/‖F_T‖₂ − F_S/‖F_S‖₂‖_p per sample (flattened), p = 1 taken as the mean
over all elements (torchdistill's `FTLoss(p=1, reduction="mean")`, and the authors'
`nn.L1Loss()` on `utils.FT(x) = F.normalize(x.view(B, -1))`). FTLoss takes its inputs one of
two ways:

- inputs="factors" (the constructor's default): the hooked layers already output factors
  (modules of the user's own models); the objective computes the term only.
- inputs="maps" (what `FTLoss.from_models` builds): the hooked layers are feature maps, the
  last stage both networks share by stride, after its activation (the authors hook the last
  map, `outputs[2]` = layer3 after its ReLU of their CIFAR ResNets; RepDistiller `feat[-2]`),
  and the objective owns a `Paraphraser` for the teacher's channels and a `Translator` for the
  student's (learnable: add `objective.parameters()` to the optimizer).

β = 500 is the authors' CIFAR-10 value (ResNet-56 -> ResNet-20; train_student.py `--beta 500`,
loss = BETA · L1Loss(FT(factor_s), FT(factor_t.detach())) + CE). torchdistill's ImageNet
sample config (ResNet-34 -> ResNet-18, configs/sample/ilsvrc2012/ft/resnet18_from_resnet34.yaml)
weighs the same term by 1000. RepDistiller's script uses `-b 200`, but its `FactorTransfer`
compares normalised channel means of the squared factors (a spatial attention of them), not
the factors. The paper's text could not be checked here: its β for other settings is unverified.

One run instead of the authors' two (inputs="maps"). With e the fractional epoch of
`on_progress`: while e < paraphraser_epochs, loss = recon_weight · ft_recon + logit loss, the
reconstruction error of the paraphraser on the detached teacher map (`reconstruction_loss`,
L1 as the authors' train_Paraphraser.py); the factor term's weight is 0 and the translator is
not trained (its factor is computed without gradient, to log "ft"). From then on
loss = β · ft + logit loss and the paraphraser is frozen: it runs under no_grad, so its
parameters get no gradient (an optimizer skips them, weight decay included, when gradients
are reset to None as the Distiller does) and "ft_recon" is only logged. Where this differs:
- the authors train the paraphraser first, alone, with its own SGD (lr 0.1, momentum 0.9,
  weight decay 5e-4) for `--epoch 5`, which their inclusive loop `range(0, 5 + 1)` makes 6
  passes over CIFAR-10; then a new run trains a fresh student and the translator with
  CE + 500 · FT for 164 passes (`--epoch 163`), lr 0.1, ×0.1 at epochs 82 and 123;
- here the student already trains on the logit loss during the first paraphraser_epochs
  (default 5, the authors' flag value), the paraphraser shares the run's optimizer and
  schedule (its step is the run's lr times recon_weight), so the factor term acts for
  paraphraser_epochs fewer epochs, later in the student's schedule, and the translator starts
  from its initialisation against a partly trained student;
- for the authors' scheme, pass paraphraser_epochs=0 and load a paraphraser trained
  beforehand into `objective.paraphraser` (e.g. from a run whose paraphraser_epochs covers it).
A teacher map larger or smaller than the student's (a 128 px student, a 224 px teacher) is
paraphrased at its own size; the teacher factor is then resized to the student factor's
(H, W) (`resize_map`); the authors feed both networks the same 32 px images. In each phase one
of the two modules takes no part in the loss, so multi-process DDP needs
find_unused_parameters=True.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.base import (
    Objective,
    as_float,
    check_non_negative,
    check_positive,
    feature,
    full_precision,
)
from distill.losses.factor import (
    FACTOR_RATE,
    RECON_LOSSES,
    Paraphraser,
    ReconLoss,
    Translator,
    reconstruction_loss,
)
from distill.losses.feature import _check_map, _FeatureObjective, resize_map, stage_pairs
from distill.losses.review import LogitLoss, resolve_logit_loss
from distill.types import Outputs

FtInputs = Literal["factors", "maps"]
FT_INPUTS: tuple[str, ...] = ("factors", "maps")
PARAPHRASER_EPOCHS = 5.0  # the authors' train_Paraphraser.py --epoch 5 (module docstring)

# ---------------------------------------------------------------- VID


def vid_nll(mean: Tensor, variance: Tensor, teacher_map: Tensor) -> Tensor:
    """mean ½((μ − t)²/σ² + log σ²) over all elements; `variance` broadcasts against `mean`."""
    t = as_float(teacher_map.detach()).to(mean.dtype)
    if mean.shape != t.shape:
        raise ValueError(
            f"VID's predicted mean {tuple(mean.shape)} and the teacher's map {tuple(t.shape)} "
            "differ: the regressor must map to the teacher's channels and size"
        )
    return (0.5 * ((mean - t).pow(2) / variance + torch.log(variance))).mean()


class VIDRegressor(nn.Module):
    """μ(s): three 1×1 convs with ReLUs between, and σ²_c = softplus(α_c) + eps per channel."""

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        *,
        mid_channels: int,
        init_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(student_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, teacher_channels, kernel_size=1, bias=False),
        )
        self.eps = eps
        # softplus⁻¹(init_var − eps), so that σ² starts at init_var
        self.log_scale = nn.Parameter(
            torch.full((teacher_channels,), math.log(math.expm1(init_var - eps)))
        )

    def variance(self) -> Tensor:
        return F.softplus(self.log_scale) + self.eps  # (C,)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(μ (B, Ct, H, W), σ² (1, Ct, 1, 1)) in float32 or wider, outside autocast."""
        with full_precision(x):
            mean = self.mean(as_float(x).to(self.log_scale.dtype))
            return mean, self.variance().to(mean.dtype).view(1, -1, 1, 1)


def _meet(student_map: Tensor, teacher_map: Tensor) -> tuple[Tensor, Tensor]:
    """Average-pool the larger map, student's or teacher's, to (min H, min W)."""
    size = (
        min(student_map.shape[-2], teacher_map.shape[-2]),
        min(student_map.shape[-1], teacher_map.shape[-1]),
    )
    return resize_map(student_map, size), resize_map(teacher_map, size)


class VIDLoss(_FeatureObjective):
    """Variational information distillation; part "vid" (Σ over layer pairs) (+ logit_loss's);
    loss = weight · vid + logit loss.

    `layers` maps student to teacher module paths, `channels` gives (student, teacher) channels
    per pair in the same order; hooked as "vid0", "vid1", ... The regressors and variances are
    learnable: add `objective.parameters()` to the optimizer. `mid_channels=None` uses the
    teacher's channels (RepDistiller).
    """

    def __init__(
        self,
        layers: Mapping[str, str],
        channels: list[tuple[int, int]],
        *,
        logit_loss: Objective | None,
        weight: float = 1.0,
        mid_channels: int | None = None,
        init_var: float = 5.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__(logit_loss)
        if not layers or len(channels) != len(layers):
            raise ValueError(
                f"give one (student, teacher) channel pair per layer pair: {len(layers)} layers, "
                f"{len(channels)} channel pairs, e.g. layers={{'blocks.11': 'layer3'}}, "
                "channels=[(512, 1024)]"
            )
        self.weight = check_non_negative("weight", weight, "VID's lambda; the paper uses 1")
        check_positive("eps", eps, "RepDistiller uses 1e-5")
        if not isinstance(init_var, (int, float)) or not init_var > eps:
            raise ValueError(f"init_var must be > eps={eps}, got {init_var!r}; RepDistiller uses 5")
        self.names: list[str] = []
        self.regressors = nn.ModuleList()
        for i, ((s_path, t_path), (cs, ct)) in enumerate(zip(layers.items(), channels)):
            for what, c in (("student", cs), ("teacher", ct), ("mid", mid_channels or ct)):
                if not isinstance(c, int) or c < 1:
                    raise ValueError(f"{what} channels must be a positive int, got {c!r}")
            self._hook(f"vid{i}", s_path, t_path)
            self.names.append(f"vid{i}")
            self.regressors.append(
                VIDRegressor(cs, ct, mid_channels=mid_channels or ct, init_var=init_var, eps=eps)
            )
        self.channels = [tuple(c) for c in channels]

    @classmethod
    def from_models(cls, student: nn.Module, teacher: nn.Module | None, **options: Any) -> VIDLoss:
        """Every shared stage but the deepest (RepDistiller's VID takes the intermediate maps,
        not the last); `options` go to the constructor."""
        pairs = stage_pairs(cls.__name__, student, teacher, options)
        pairs = pairs[:-1] or pairs
        return cls(
            {s.path: t.path for s, t in pairs},
            [(s.channels, t.channels) for s, t in pairs],
            **options,
        )

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        total: Tensor | None = None
        for n, reg, (cs, ct) in zip(self.names, self.regressors, self.channels):
            f_s = feature(student, n, "student", self.student_features[n])
            f_t = feature(t_out, n, "teacher", self.teacher_features[n])
            _check_map(f_s, "student")
            _check_map(f_t, "teacher")
            if (f_s.shape[1], f_t.shape[1]) != (cs, ct):
                raise ValueError(
                    f"{n}: maps have (student, teacher) channels {(f_s.shape[1], f_t.shape[1])} "
                    f"but channels gives {(cs, ct)}: set channels[{self.names.index(n)}] = "
                    f"{(f_s.shape[1], f_t.shape[1])}"
                )
            f_s, f_t = _meet(as_float(f_s), as_float(f_t.detach()))  # pool in float32
            mean, var = reg(f_s)
            value = vid_nll(mean, var, f_t)
            total = value if total is None else total + value
        assert total is not None  # layers is non-empty
        return self._combine({"loss": self.weight * total, "vid": total}, student, t_out, target)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


# ---------------------------------------------------------------- factor transfer


def ft_loss(student_factor: Tensor, teacher_factor: Tensor, *, p: float = 1.0) -> Tensor:
    """Factor transfer on given factors (B, ...): p = 1 is the mean |F̂_S − F̂_T| over all
    elements, otherwise the batch mean of ‖F̂_S − F̂_T‖_p, with F̂ = F/‖F‖₂ per sample."""
    check_positive("p", p, "factor transfer uses p = 1")
    if student_factor.shape != teacher_factor.shape:
        raise ValueError(
            f"factors differ in shape: student {tuple(student_factor.shape)}, teacher "
            f"{tuple(teacher_factor.shape)}; the translator must output the paraphraser's shape"
        )
    if student_factor.dim() < 2:
        raise ValueError(f"factors must be (B, ...), got shape {tuple(student_factor.shape)}")
    s = F.normalize(as_float(student_factor).flatten(1), dim=1)  # (B, D)
    t = F.normalize(as_float(teacher_factor.detach()).flatten(1), dim=1).to(s.dtype)
    if p == 1.0:
        return (s - t).abs().mean()
    diff = (s - t).abs()  # (B, D)
    # ‖d‖_p = max|d| · ‖d / max|d|‖_p: no overflow for large p, and the inner sum is ≥ 1 unless
    # d = 0, so clamping it at 1 only keeps the gradient of d = 0 finite (the value stays 0)
    top = diff.amax(dim=1, keepdim=True)  # (B, 1)
    inner = (diff / top.clamp_min(1e-30)).pow(p).sum(1).clamp_min(1.0)
    return (top.squeeze(1) * inner.pow(1.0 / p)).mean()


class FTLoss(_FeatureObjective):
    """Factor transfer; parts "ft" (+ "ft_recon" with inputs="maps") (+ logit_loss's).

    inputs="factors": `student_layer` is the translator's output in the student,
    `teacher_layer` the paraphraser's encoder output in the teacher; loss = beta · ft + logit
    loss. inputs="maps" (`FTLoss.from_models` builds it): the layers are feature maps with
    `channels` = (student, teacher) channels, and the objective owns `paraphraser` and
    `translator`; loss = recon_weight · ft_recon + logit loss during the first
    `paraphraser_epochs` (fractional, from `on_progress`), beta · ft + logit loss after, with
    the paraphraser frozen (module docstring). `paraphraser_epochs=0` expects a pre-trained
    paraphraser loaded into `objective.paraphraser`. `rate` is the paraphrase rate k and
    `recon_loss` the reconstruction error ("l1", the authors, or "l2").
    """

    def __init__(
        self,
        *,
        student_layer: str,
        teacher_layer: str,
        logit_loss: Objective | None,
        beta: float = 500.0,
        p: float = 1.0,
        inputs: FtInputs = "factors",
        channels: tuple[int, int] | None = None,
        rate: float = FACTOR_RATE,
        paraphraser_epochs: float = PARAPHRASER_EPOCHS,
        recon_loss: ReconLoss = "l1",
        recon_weight: float = 1.0,
    ) -> None:
        super().__init__(logit_loss)
        self.beta = check_non_negative("beta", beta, "the FT authors use 500 (CIFAR-10)")
        self.p = check_positive("p", p, "factor transfer uses p = 1")
        if inputs not in FT_INPUTS:
            raise ValueError(
                f"inputs must be one of {FT_INPUTS}, got {inputs!r}: 'factors' when the hooked "
                "layers output factors, 'maps' to have the objective paraphrase feature maps"
            )
        self.inputs: FtInputs = inputs
        # the paraphraser, then the translator, goes without gradients (distill.step.ddp_ready)
        self.ddp_unused_parameters = inputs == "maps"
        self._hook("ft", student_layer, teacher_layer)
        self.epoch: float | None = None
        if inputs == "factors":
            _refuse_map_options(channels, rate, paraphraser_epochs, recon_loss, recon_weight)
            return
        if channels is None or len(channels) != 2:
            raise ValueError(
                f"inputs='maps' needs channels=(student, teacher) of the hooked maps, got "
                f"{channels!r}; FTLoss.from_models reads them from the two networks"
            )
        if recon_loss not in RECON_LOSSES:
            raise ValueError(f"recon_loss must be one of {RECON_LOSSES}, got {recon_loss!r}")
        self.recon_loss: ReconLoss = recon_loss
        self.paraphraser_epochs = check_non_negative(
            "paraphraser_epochs", paraphraser_epochs, "the authors train the paraphraser for 5"
        )
        self.recon_weight = check_non_negative("recon_weight", recon_weight)
        cs, ct = channels
        self.paraphraser = Paraphraser(ct, rate=rate)
        self.translator = Translator(cs, self.paraphraser.factor_channels)
        self.channels = (cs, ct)

    @classmethod
    def from_models(
        cls,
        student: nn.Module,
        teacher: nn.Module | None,
        *,
        logit_loss: LogitLoss = "ce",
        **options: Any,
    ) -> FTLoss:
        """Paraphrase the last stage both networks share by stride (after its activation, as
        the authors) with inputs="maps"; `logit_loss` "ce" is the authors' CrossEntropy term;
        `options` go to the constructor."""
        if options.pop("inputs", "maps") != "maps":
            raise ValueError("FTLoss.from_models builds inputs='maps'; for factors build FTLoss")
        s, t = stage_pairs(cls.__name__, student, teacher, options)[-1]
        return cls(
            student_layer=s.path,
            teacher_layer=t.path,
            logit_loss=resolve_logit_loss(logit_loss),
            inputs="maps",
            channels=(s.channels, t.channels),
            **options,
        )

    @property
    def training_paraphraser(self) -> bool:
        """Whether the run is in its first phase (inputs="maps"): the paraphraser trains on the
        reconstruction and the factor term is off."""
        if self.inputs != "maps" or self.paraphraser_epochs == 0:
            return False
        if self.epoch is None:
            raise RuntimeError(
                f"FTLoss(paraphraser_epochs={self.paraphraser_epochs:g}) was never told the "
                "epoch: call objective.on_progress(step, epoch) before each step (the Distiller "
                "does), or pass paraphraser_epochs=0 with a pre-trained objective.paraphraser"
            )
        return self.epoch < self.paraphraser_epochs

    def on_progress(self, step: int, epoch: float) -> None:
        super().on_progress(step, epoch)
        was = self.epoch is not None and self.training_paraphraser
        self.epoch = float(epoch)
        if was and not self.training_paraphraser:
            # frozen from now on: drop gradients a loop may have zeroed rather than reset, which
            # momentum would otherwise keep applying
            for param in self.paraphraser.parameters():
                param.grad = None

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        t_out = self._teacher(teacher)
        f_s = feature(student, "ft", "student", self.student_features["ft"])
        f_t = feature(t_out, "ft", "teacher", self.teacher_features["ft"])
        if self.inputs == "factors":
            ft = ft_loss(f_s, f_t, p=self.p)
            own = {"loss": self.beta * ft, "ft": ft}
        else:
            own = self._paraphrase(f_s, f_t)
        return self._combine(own, student, t_out, target)

    def _paraphrase(self, f_s: Tensor, f_t: Tensor) -> dict[str, Tensor]:
        """The inputs="maps" parts of one batch: maps (B, Cs, Hs, Ws) and (B, Ct, Ht, Wt)."""
        for side, x, c in (("student", f_s, self.channels[0]), ("teacher", f_t, self.channels[1])):
            _check_map(x, side)
            if x.shape[1] != c:
                cs, ct = self.channels
                fix = (x.shape[1], ct) if side == "student" else (cs, x.shape[1])
                raise ValueError(
                    f"the {side}'s map has {x.shape[1]} channels (shape {tuple(x.shape)}) but "
                    f"channels={self.channels}: set channels={fix}"
                )
        x_t = as_float(f_t.detach())  # the teacher is frozen: the paraphraser only reads it
        first = self.training_paraphraser
        with torch.set_grad_enabled(first and torch.is_grad_enabled()):
            factor_t, rec = self.paraphraser(x_t)  # (B, kCt, Ht, Wt), (B, Ct, Ht, Wt)
            recon = reconstruction_loss(rec, x_t, kind=self.recon_loss)
        with torch.set_grad_enabled(not first and torch.is_grad_enabled()):
            factor_s = self.translator(f_s)  # (B, kCt, Hs, Ws)
            factor_t = resize_map(factor_t.detach(), (factor_s.shape[-2], factor_s.shape[-1]))
            ft = ft_loss(factor_s, factor_t, p=self.p)
        loss = self.recon_weight * recon if first else self.beta * ft
        return {"loss": loss, "ft": ft, "ft_recon": recon}

    def extra_repr(self) -> str:
        text = f"beta={self.beta}, p={self.p}, inputs={self.inputs!r}"
        if self.inputs == "maps":
            text += (
                f", channels={self.channels}, paraphraser_epochs={self.paraphraser_epochs:g}, "
                f"recon_loss={self.recon_loss!r}, recon_weight={self.recon_weight}"
            )
        return text


def _refuse_map_options(
    channels: tuple[int, int] | None,
    rate: float,
    paraphraser_epochs: float,
    recon_loss: str,
    recon_weight: float,
) -> None:
    """inputs="factors" has no paraphraser: say so rather than ignore its settings."""
    given = {
        "channels": channels is not None,
        "rate": rate != FACTOR_RATE,
        "paraphraser_epochs": paraphraser_epochs != PARAPHRASER_EPOCHS,
        "recon_loss": recon_loss != "l1",
        "recon_weight": recon_weight != 1.0,
    }
    if any(given.values()):
        names = [name for name, set_ in given.items() if set_]
        raise ValueError(
            f"{names} only apply with inputs='maps' (the objective's own paraphraser and "
            "translator); with inputs='factors' the hooked layers already give the factors"
        )
