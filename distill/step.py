"""What one training step is made of, apart from the loop that runs it: the student and the
objective as one module (so DDP syncs both), the checks that the optimizer holds what trains,
and the window of loss parts averaged into each log row."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from distill.guards import NonFiniteWatch
from distill.teacher import FeatureHooks, extract_output
from distill.types import Outputs

__all__ = [
    "FunctionObjective",
    "LossWindow",
    "StudentStep",
    "batch_extras",
    "channels_last",
    "check_optimizer",
    "dataset_name",
    "ddp_ready",
    "describe_objective",
    "describe_run",
    "epoch_length",
    "prepare_loader",
    "sync_buffers",
    "teacher_outputs",
    "total_steps",
    "wire",
]


class FunctionObjective(nn.Module):
    """Lets a plain function `(student, teacher, target) -> dict` serve as an objective."""

    def __init__(self, fn: Callable[..., dict[str, Tensor]]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, student: Outputs, teacher: Outputs | None, target: Any) -> dict[str, Tensor]:
        return self.fn(student, teacher, target)


class StudentStep(nn.Module):
    """Student + objective in one module, so DDP syncs the gradients of both (an objective
    may own parameters: FitNets adapters, embedding projections)."""

    def __init__(self, student: nn.Module, objective: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.objective = objective
        self.hooks = FeatureHooks(student, getattr(objective, "student_features", None))
        # buffers the objective keeps equal on every rank itself (CRD's memory banks): DDP need
        # not broadcast them from rank 0 before each forward (1.3 GB a step on ImageNet)
        kept = [f"objective.{n}" for n in getattr(objective, "synced_buffers", ())]
        if kept:
            from torch.nn.parallel import DistributedDataParallel as DDP

            DDP._set_params_and_buffers_to_ignore_for_model(self, kept)

    def forward(
        self, x: Any, teacher: Outputs | None, target: Any, extra: Any = None
    ) -> dict[str, Tensor]:
        self.hooks.pop()
        out = Outputs(extract_output(self.student(x)), {})
        out.features = self.hooks.pop()
        parts = self.objective(out, teacher, target, **(extra or {}))
        if not isinstance(parts, dict) or "loss" not in parts:
            raise TypeError(
                f"objective {type(self.objective).__name__} must return a dict with a 'loss' "
                f"entry, got {type(parts).__name__}"
            )
        return parts


def channels_last(x: Any) -> Any:
    """A 4-D image batch in channels-last memory order; anything else as it is."""
    if isinstance(x, Tensor) and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@dataclass
class LossWindow:
    """Loss parts summed since the last log row, and the run's first non-finite step."""

    watch: NonFiniteWatch
    sums: dict[str, Tensor] = field(default_factory=dict)
    n: int = 0

    def add(self, step: int, parts: dict[str, Tensor]) -> None:
        self.watch.record(step, parts)
        for k, v in parts.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v
        self.n += 1  # skipped batches (agreed by all ranks) are not averaged

    def take_row(
        self, accelerator: Any, *, lr: float, images_per_s: float, epoch: int
    ) -> dict[str, float]:
        """The log row of the window (loss parts averaged over its batches and the processes,
        "train/" keys), then an empty window; {} when the window saw no batch."""
        sums, n, self.sums, self.n = self.sums, self.n, {}, 0
        if n == 0 or not sums:
            return {}
        keys = sorted(sums)
        vec = torch.stack([sums[k] / n for k in keys])
        if accelerator.num_processes > 1:
            vec = accelerator.reduce(vec, reduction="mean")
        row = {f"train/{k}": v for k, v in zip(keys, vec.tolist())}
        row.update(
            {"train/lr": lr, "train/images_per_s": images_per_s, "train/epoch": float(epoch)}
        )
        return row


def check_optimizer(student: nn.Module, objective: nn.Module, optimizer: Any) -> None:
    """The optimizer must hold the student's and the objective's trainable parameters."""
    in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [
        n for n, p in objective.named_parameters() if p.requires_grad and id(p) not in in_opt
    ]
    if missing:
        raise ValueError(
            f"the objective has trainable parameters {missing[:5]} that are not in the "
            "optimizer: build it over list(student.parameters()) + list(objective.parameters())"
        )
    if not any(id(p) in in_opt for p in student.parameters()):
        raise ValueError("the optimizer holds none of the student's parameters")


def prepare_loader(accelerator: Any, loader: Any) -> Any:
    """`accelerator.prepare(loader)`, except for None and for a stream already split per
    process (`split_dataset_by_node`), which must not be sharded again."""
    if loader is None:
        return None
    if getattr(getattr(loader, "dataset", None), "sharded_by_node", False):
        return loader
    return accelerator.prepare(loader)


def epoch_length(loader: Any) -> int:
    """Batches per epoch (0 for a stream, which has no length)."""
    try:
        return len(loader)
    except TypeError:
        return 0


def total_steps(loader: Any, config: Any) -> int:
    """Optimizer steps of a run: `config.max_steps`, else `epochs` over `loader`."""
    if config.max_steps is not None:
        return int(config.max_steps)
    try:
        n = len(loader)
    except TypeError:
        raise ValueError("this data loader has no length (streaming data): set max_steps") from None
    return int(config.epochs * math.ceil(n / config.grad_accum_steps))


def ddp_ready(accelerator: Any, objective: nn.Module) -> Any:
    """The accelerator, told to let DDP find unused parameters when the objective says some of
    its own go unused in a step (factor transfer trains its paraphraser, then its translator)."""
    if getattr(objective, "ddp_unused_parameters", False):
        from dataclasses import replace

        from accelerate.utils import DistributedDataParallelKwargs

        handler = accelerator.ddp_handler or DistributedDataParallelKwargs()
        accelerator.ddp_handler = replace(handler, find_unused_parameters=True)
    return accelerator


def batch_extras(objective: nn.Module, b: Any) -> dict[str, Any]:
    """The batch entries the objective asks for (`Objective.batch_keys`, e.g. CRD's "index"),
    with an error that says how to provide a missing one."""
    keys: tuple[str, ...] = getattr(objective, "batch_keys", ())
    missing = [k for k in keys if k not in b.extra]
    if missing:
        raise KeyError(
            f"{type(objective).__name__} reads the batch entries {list(keys)}, but this batch "
            f"has no {missing} (its extra entries: {sorted(b.extra) or 'none'}): yield dict "
            "batches with them, e.g. wrap the training set in distill.data.WithIndex"
        )
    return {k: b.extra[k] for k in keys}


def teacher_outputs(
    teacher: Any, objective: nn.Module, b: Any, accelerator: Any, *, to_channels_last: bool
) -> Outputs | None:
    """The teacher's answer for batch `b`: the cached one it carries, none when the objective
    needs no teacher, else the Teacher run on its own view of the batch (or on the student's,
    which it converts itself)."""
    if b.teacher_cached is not None:
        return b.teacher_cached  # type: ignore[no-any-return]
    if not getattr(objective, "needs_teacher", True):
        return None
    if teacher is None:
        raise ValueError(
            "cached_teacher=True but this batch has no 'teacher_logits': build the loader "
            "from a teacher cache (distill.data.teacher_cache.CachedDataset), or pass a Teacher"
        )
    x, prepared = (b.teacher_input, True) if b.teacher_input is not None else (b.input, False)
    with accelerator.autocast():
        return teacher(channels_last(x) if to_channels_last else x, prepared=prepared)  # type: ignore[no-any-return]


def sync_buffers(module: nn.Module, accelerator: Any) -> None:
    """Make every process hold the same buffers (BatchNorm running statistics drift apart, as
    each process updates them from its own batches): floating buffers are averaged, the others
    (counters) taken from the main process. What is then evaluated is what is saved."""
    if accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    world = accelerator.num_processes
    with torch.no_grad():
        for buf in module.buffers():
            if buf.is_floating_point():
                dist.all_reduce(buf, op=dist.ReduceOp.SUM)
                buf.div_(world)
            else:
                dist.broadcast(buf, src=0)


def describe_objective(objective: nn.Module) -> dict[str, Any]:
    """What the run record says of an objective: its registered name (distill.losses.LOSSES),
    its temperature, and the weight of its teacher term (`kd_weight`) where it has one (the
    argument its class's `common_args` maps kd_weight to)."""
    from distill.losses import method_name

    inner = getattr(objective, "inner", objective)  # a wrapper (tests) shows its objective
    weight_arg = getattr(type(inner), "common_args", {}).get("kd_weight")
    kd_weight = getattr(inner, weight_arg, None) if weight_arg else None
    temperature = getattr(inner, "temperature", None)
    return {
        "method": method_name(inner),
        "temperature": float(temperature) if isinstance(temperature, (int, float)) else None,
        "kd_weight": float(kd_weight) if isinstance(kd_weight, (int, float)) else None,
    }


def dataset_name(loader: Any) -> str | None:
    """The name of the data a loader reads: a dataset's `name`, else its class name (through
    the wrappers the project puts around datasets)."""
    ds = getattr(loader, "dataset", None)
    for _ in range(8):  # SeededDataset > SkipBadSamples > Subset > the dataset
        inner = getattr(ds, "dataset", None)
        if inner is None or isinstance(inner, str):
            break
        ds = inner
    if ds is None:
        return None
    name = getattr(ds, "name", None)
    return name if isinstance(name, str) and name else type(ds).__name__


def describe_run(
    student: nn.Module,
    teacher: Any,
    objective: nn.Module,
    *,
    dataset: str | None,
    input_shape: tuple[int, ...] | None,
) -> dict[str, Any]:
    """What a run is, read from its parts (the record's defaults where run_info does not say,
    as in runs made through the Python API)."""
    alpha = getattr(student, "alpha", None)  # MobileNetV1's width multiplier
    return {
        "role": "distilled" if teacher is not None else "scratch",
        **describe_objective(objective),
        "student": getattr(student, "name", None) or type(student).__name__,
        "teacher": teacher.name if teacher is not None else None,
        "dataset": dataset,
        "alpha": float(alpha) if isinstance(alpha, (int, float)) else None,
        "resolution": input_shape[-1] if input_shape else None,
    }


def wire(
    student: nn.Module, teacher: Any, objective: Any, optimizer: Any, config: Any
) -> nn.Module:
    """Check that the parts of a run fit and connect them: a plain function becomes an
    objective, an objective that distils needs a teacher (or cached outputs), the optimizer
    holds what trains, the teacher captures the features the objective reads, and both models
    take channels-last memory when asked. Returns the objective."""
    if not isinstance(objective, nn.Module):
        objective = FunctionObjective(objective)
    needs = getattr(objective, "needs_teacher", True) and not config.cached_teacher
    if needs and teacher is None:
        raise ValueError(
            f"{type(objective).__name__} distils from a teacher, but teacher is None. Pass a "
            "Teacher, or use distill.losses.CrossEntropy to train from labels alone."
        )
    check_optimizer(student, objective, optimizer)
    teacher_features: dict[str, str] = getattr(objective, "teacher_features", None) or {}
    if teacher is not None and teacher_features:
        teacher.add_features(teacher_features)
    if config.channels_last:
        student.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)
    return objective
