"""Distillation step throughput, side by side in one process on the same job.

    python benchmarks/throughput.py --device cpu      # small job: ResNet-18 -> MobileNetV1-0.25
    python benchmarks/throughput.py --device cuda     # ResNet-50 -> MobileNetV1-1.0, 224 px, B=256

Methods (all train the same student from the same initial weights on the same synthetic batch,
already on the device, so only the step is timed; SGD with momentum, T = 4, soft weight 0.9):

- naive        the reference: fp32, teacher forward under no_grad, student forward/backward,
               nn.KLDivLoss(reduction="batchmean") on softmax targets + cross-entropy;
- online       this project's step: `Distiller` + `Teacher` + `KDLoss` (teacher under
               inference_mode, one log-softmax per side, no host sync), channels_last, bf16
               autocast (on CUDA, and on CPUs with native bf16), torch.compile on CUDA; the
               teacher's weights stay fp32 (`teacher_dtype="fp32"`);
- online_bf16_teacher (not in the default --methods) the same step with the teacher's own
               precision: its weights cast to bf16 once (`teacher_dtype="bf16"`), its input
               cast per batch, outside autocast; the student as in cached/student (fp32 on the
               CPU, bf16 autocast on CUDA);
- cached       the same step fed cached top-k teacher logits (densified on the device), no
               teacher forward; autocast bf16 on CUDA, fp32 on the CPU (MobileNet's depthwise
               convolutions are slower in bf16 there);
- student      the student trained alone (cross-entropy), same settings as cached: the
               reference for the memory ratio;
- torchdistill torchdistill 1.1.5's KDLoss fed by its ForwardHookManager, fp32 (its default);
- timm         timm 1.0's LogitDistillationTask, fp32 (its default).

Images/s is the median over --repeats timed windows of --steps steps, run round-robin across
methods so that machine noise hits all of them alike. On the CPU, ratios use images per
CPU-second of this process (time spent waiting for a core on a shared machine is not counted;
on an idle machine the two agree) and torch runs one thread by default. Peak memory is what a
step allocates above what was allocated before it (activations, gradients, workspaces): CUDA's
max_memory_allocated, or on the CPU the running sum of the profiler's allocation events;
"resident" is the weights and optimizer state of the method. Rows are appended to
benchmarks/RESULTS.md (--no-write to skip).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_METHODS = ("naive", "online", "cached", "student", "torchdistill", "timm")
METHODS = (*DEFAULT_METHODS, "online_bf16_teacher")
RESULTS = ROOT / "benchmarks" / "RESULTS.md"


@dataclass
class Job:
    device: str
    teacher: str = "resnet18"
    alpha: float = 0.25
    resolution: int = 96
    batch_size: int = 32
    num_classes: int = 1000
    temperature: float = 4.0
    kd_weight: float = 0.9  # weight of the soft term; 1 - kd_weight for cross-entropy
    topk: int = 10
    compile: bool = False
    online_precision: str = "fp32"  # fp32 | bf16, for the online step (teacher + student)
    channels_last: bool = False
    student_precision: str = "fp32"  # for the cached and student-alone steps
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ models


def make_teacher(job: Job) -> nn.Module:
    import torchvision

    torch.manual_seed(job.seed)
    model = torchvision.models.get_model(job.teacher, weights=None, num_classes=job.num_classes)
    return model.eval().requires_grad_(False).to(job.device)


def make_student(job: Job) -> nn.Module:
    from distill.models import mobilenet_v1

    torch.manual_seed(job.seed + 1)
    return mobilenet_v1(alpha=job.alpha, num_classes=job.num_classes).to(job.device)


def make_batch(job: Job) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(job.seed + 2)
    x = torch.randn(job.batch_size, 3, job.resolution, job.resolution, generator=g)
    y = torch.randint(job.num_classes, (job.batch_size,), generator=g)
    return x.to(job.device), y.to(job.device)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=4e-5)


@dataclass
class Method:
    name: str
    step: Callable[[], None]
    setting: str
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer | None


# ------------------------------------------------------------------------------------ methods


def build_naive(job: Job, teacher: nn.Module, x: Tensor, y: Tensor) -> Method:
    student = make_student(job)
    opt = sgd(student)
    kl = nn.KLDivLoss(reduction="batchmean")
    t = job.temperature

    def step() -> None:
        with torch.no_grad():
            t_logits = teacher(x)
        s_logits = student(x)
        soft = kl(F.log_softmax(s_logits / t, 1), F.softmax(t_logits / t, 1)) * t * t
        loss = job.kd_weight * soft + (1 - job.kd_weight) * F.cross_entropy(s_logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Method(
        "naive", step, "fp32, no_grad teacher, nn.KLDivLoss(batchmean)", [student, teacher], opt
    )


def _distiller(
    job: Job,
    teacher: nn.Module | None,
    objective: nn.Module,
    tmp: str,
    precision: str,
    teacher_precision: str = "fp32",
) -> Any:
    from distill.distiller import Distiller, DistillerConfig
    from distill.teacher import Teacher

    student = make_student(job)
    opt = sgd(student)
    cfg = DistillerConfig(
        output_dir=tmp,
        mixed_precision="bf16" if precision == "bf16" else "no",
        channels_last=job.channels_last,
        compile=job.compile,
        progress=False,
        check_compatible=False,
        export_student=False,
        seed=job.seed,
        teacher_dtype=teacher_precision,  # type: ignore[arg-type]
    )
    wrapped = None if teacher is None else Teacher(teacher)  # same normalisation and size
    d = Distiller(student, wrapped, objective, opt, config=cfg, accelerator=accelerator(precision))
    d._prepare(None, None)
    d.step_module.train()
    return d


_ACCELERATORS: dict[str, Any] = {}


def accelerator(precision: str) -> Any:
    """accelerate keeps one process-wide state, so one Accelerator cannot be "bf16" while
    another is "no". The bf16 one is made first; the fp32 one is a copy with autocast off
    (`native_amp` is what accelerate's autocast and prepare() consult)."""
    from accelerate import Accelerator

    if not _ACCELERATORS:
        base = Accelerator(mixed_precision="bf16", step_scheduler_with_optimizer=False)
        _ACCELERATORS["bf16"] = base
        fp32 = copy.copy(base)
        fp32.native_amp = False
        _ACCELERATORS["fp32"] = fp32
    return _ACCELERATORS[precision]


def _setting(job: Job, precision: str) -> str:
    parts = [precision]
    if job.channels_last:
        parts.append("channels_last")
    if job.compile:
        parts.append("compile")
    return ", ".join(parts)


def build_online(
    job: Job, teacher: nn.Module, x: Tensor, y: Tensor, tmp: str, *, bf16_teacher: bool = False
) -> Method:
    from distill.losses import KDLoss
    from distill.types import split_batch

    objective = KDLoss(job.temperature, job.kd_weight)
    precision = job.student_precision if bf16_teacher else job.online_precision
    t_precision = "bf16" if bf16_teacher else "fp32"
    d = _distiller(job, copy.deepcopy(teacher), objective, tmp, precision, t_precision)
    batch = {"input": x, "target": y}

    def step() -> None:
        d._train_micro_step(split_batch(batch))

    setting = _setting(job, precision) + ", Teacher (inference_mode) + KDLoss"
    if bf16_teacher:
        setting = f"student {setting}, teacher bf16 weights"
    name = "online_bf16_teacher" if bf16_teacher else "online"
    return Method(name, step, setting, [d.student, d.teacher], d.optimizer)


def build_cached(job: Job, teacher: nn.Module, x: Tensor, y: Tensor, tmp: str) -> Method:
    from distill.data.teacher_cache import compress_topk, densify_batch
    from distill.losses import KDLoss
    from distill.types import split_batch

    with torch.inference_mode():
        c = compress_topk(teacher(x).float(), job.topk)
    # The Distiller requires a Teacher for KDLoss even when every batch carries cached logits;
    # it is never called here (split_batch's teacher_cached short-cuts it).
    objective = KDLoss(job.temperature, job.kd_weight)
    d = _distiller(job, copy.deepcopy(teacher), objective, tmp, job.student_precision)
    cached = {
        "input": x,
        "target": y,
        "teacher_topk_values": c.values.half().clone(),
        "teacher_topk_indices": c.indices.clone(),
        "teacher_tail_lse": c.tail_lse.clone(),
    }

    def step() -> None:
        d._train_micro_step(split_batch(densify_batch(cached, job.num_classes)))

    setting = (
        _setting(job, job.student_precision)
        + f", top-{job.topk} fp16 logits densified on the device"
    )
    return Method("cached", step, setting, [d.student], d.optimizer)


def build_student(job: Job, teacher: nn.Module, x: Tensor, y: Tensor, tmp: str) -> Method:
    from distill.losses import CrossEntropy
    from distill.types import split_batch

    d = _distiller(job, None, CrossEntropy(), tmp, job.student_precision)
    batch = {"input": x, "target": y}

    def step() -> None:
        d._train_micro_step(split_batch(batch))

    return Method(
        "student",
        step,
        _setting(job, job.student_precision) + ", cross-entropy only",
        [d.student],
        d.optimizer,
    )


def build_torchdistill(job: Job, teacher: nn.Module, x: Tensor, y: Tensor) -> Method:
    from torchdistill.core.forward_hook import ForwardHookManager
    from torchdistill.losses.mid_level import KDLoss as TDKDLoss

    student = make_student(job)
    t_model = copy.deepcopy(teacher)
    opt = sgd(student)
    s_hooks, t_hooks = ForwardHookManager(job.device), ForwardHookManager(job.device)
    s_hooks.add_hook(student, "classifier", requires_input=False, requires_output=True)
    t_hooks.add_hook(t_model, "fc", requires_input=False, requires_output=True)
    # torchdistill's alpha weighs the cross-entropy, beta (default 1 - alpha) the soft term.
    crit = TDKDLoss(
        "classifier", "output", "fc", "output", job.temperature, alpha=1 - job.kd_weight
    )

    def step() -> None:
        with torch.no_grad():
            t_model(x)
        t_io = t_hooks.pop_io_dict()
        student(x)
        s_io = s_hooks.pop_io_dict()
        loss = crit(s_io, t_io, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Method(
        "torchdistill",
        step,
        "fp32 (its default), ForwardHookManager + KDLoss",
        [student, t_model],
        opt,
    )


def build_timm(job: Job, teacher: nn.Module, x: Tensor, y: Tensor) -> Method:
    from timm.task.distillation import LogitDistillationTask

    student = make_student(job)
    opt = sgd(student)
    task = LogitDistillationTask(
        student,
        copy.deepcopy(teacher),
        criterion=nn.CrossEntropyLoss(),
        task_loss_weight=1 - job.kd_weight,
        distill_loss_weight=job.kd_weight,
        temperature=job.temperature,
        device=torch.device(job.device),
        verbose=False,
    )
    task.train()

    def step() -> None:
        out = task(x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return Method(
        "timm", step, "fp32 (its default), LogitDistillationTask", [student, task.teacher], opt
    )


def build(name: str, job: Job, teacher: nn.Module, x: Tensor, y: Tensor, tmp: str) -> Method:
    if name == "naive":
        return build_naive(job, teacher, x, y)
    if name == "online":
        return build_online(job, teacher, x, y, tmp)
    if name == "online_bf16_teacher":
        return build_online(job, teacher, x, y, tmp, bf16_teacher=True)
    if name == "cached":
        return build_cached(job, teacher, x, y, tmp)
    if name == "student":
        return build_student(job, teacher, x, y, tmp)
    if name == "torchdistill":
        return build_torchdistill(job, teacher, x, y)
    if name == "timm":
        return build_timm(job, teacher, x, y)
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")


# ------------------------------------------------------------------------------------ timing


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def resident_bytes(m: Method) -> int:
    seen: set[int] = set()
    total = 0
    tensors: list[Tensor] = []
    for mod in m.modules:
        tensors += list(mod.parameters()) + list(mod.buffers())
    if m.optimizer is not None:
        for state in m.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def cuda_step_peak(m: Method, device: str, steps: int = 3) -> int:
    sync(device)
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        m.step()
    sync(device)
    return torch.cuda.max_memory_allocated() - before


def cpu_step_peak(m: Method, steps: int = 2) -> int:
    """Peak bytes allocated by torch on the CPU during `steps` steps, above what was allocated
    before them: the running sum of the profiler's allocation/free events (the CPU analogue of
    CUDA's max_memory_allocated; RSS would mostly show the allocator's caching)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            m.step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        if str(e.device_type()) != "DeviceType.CPU":
            continue
        now += int(e.nbytes())
        peak = max(peak, now)
    return peak


def time_methods(
    methods: list[Method], job: Job, *, steps: int, warmup: int, repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Images/s per timed window: by the wall clock, and per CPU-second of this process (on a
    shared machine the latter does not count time spent waiting for a core)."""
    for m in methods:
        t0 = time.perf_counter()
        for _ in range(warmup):
            m.step()
        sync(job.device)
        print(f"  warm-up {m.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    wall: dict[str, list[float]] = {m.name: [] for m in methods}
    cpu: dict[str, list[float]] = {m.name: [] for m in methods}
    for r in range(repeats):
        for m in methods:
            sync(job.device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                m.step()
            sync(job.device)
            images = steps * job.batch_size
            wall[m.name].append(images / (time.perf_counter() - t0))
            cpu[m.name].append(images / max(time.process_time() - c0, 1e-9))
        print(
            f"  repeat {r + 1}/{repeats}: "
            + ", ".join(f"{k} {v[-1]:.0f} ({cpu[k][-1]:.0f}/cpu-s)" for k, v in wall.items()),
            flush=True,
        )
    return wall, cpu


# ------------------------------------------------------------------------------------ report


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| date | device | job | method | setting | images/s | images/CPU-s | × naive | "
        "peak mem (MiB) | resident (MiB) | command |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = ""
    for r in rows:
        mem = "–" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.0f}"
        per_cpu = "–" if r["images_per_cpu_s"] is None else f"{r['images_per_cpu_s']:.1f}"
        body += (
            f"| {r['date']} | {r['device']} | {r['job']} | {r['method']} | {r['setting']} | "
            f"{r['images_per_s']:.1f} | {per_cpu} | {r['ratio_to_naive']:.2f} | {mem} | "
            f"{r['resident_mib']:.0f} | `{r['command']}` |\n"
        )
    return head + body


def write_results(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    text = text.rstrip("\n") + f"\n\n### {title}\n\n" + table(rows)
    path.write_text(text)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=METHODS)
    p.add_argument("--teacher", help="torchvision teacher (cpu: resnet18, cuda: resnet50)")
    p.add_argument("--alpha", type=float, help="student width (cpu: 0.25, cuda: 1.0)")
    p.add_argument("--resolution", type=int, help="px (cpu: 96, cuda: 224)")
    p.add_argument("--batch-size", type=int, help="(cpu: 32, cuda: 256)")
    p.add_argument("--steps", type=int, help="steps per timed window (cpu: 3, cuda: 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (cpu: 2, cuda: 10)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="auto: on for cuda"
    )
    p.add_argument(
        "--online-precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="online step autocast; auto: bf16 on cuda and on CPUs with native bf16 "
        "(AVX512-BF16/AMX), else fp32",
    )
    p.add_argument(
        "--student-precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="cached/student/online_bf16_teacher step autocast; auto: bf16 on cuda, fp32 on "
        "cpu (depthwise convolutions are slower in bf16 on the CPU)",
    )
    p.add_argument(
        "--channels-last", choices=["on", "off"], default="on", help="student and teacher"
    )
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (cpu default: 1, so that other processes on a shared machine "
        "do not stall OpenMP barriers; cuda: torch's default)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    p.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def job_from(args: argparse.Namespace) -> Job:
    cuda = args.device.startswith("cuda")
    return Job(
        device=args.device,
        teacher=args.teacher or ("resnet50" if cuda else "resnet18"),
        alpha=args.alpha if args.alpha is not None else (1.0 if cuda else 0.25),
        resolution=args.resolution or (224 if cuda else 96),
        batch_size=args.batch_size or (256 if cuda else 32),
        topk=min(args.topk, args.num_classes),
        num_classes=args.num_classes,
        compile=args.compile == "on" or (args.compile == "auto" and cuda),
        online_precision=_precision(args.online_precision, cuda, cpu_bf16=cpu_has_bf16()),
        student_precision=_precision(args.student_precision, cuda, cpu_bf16=False),
        channels_last=args.channels_last == "on",
    )


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic: AVX512-BF16 or AMX. (mkldnn's `_is_mkldnn_bf16_supported` also
    says yes on AVX512 CPUs that only emulate bf16, where a ResNet-18 forward in bf16 took 2.4x
    as long as in fp32.)"""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def _precision(flag: str, cuda: bool, *, cpu_bf16: bool) -> str:
    if flag != "auto":
        return flag
    return "bf16" if cuda or cpu_bf16 else "fp32"


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    job = job_from(args)
    cuda = job.device.startswith("cuda")
    steps = args.steps or (20 if cuda else 3)
    warmup = args.warmup or (10 if cuda else 2)
    print(f"job: {asdict(job)}; {steps} steps x {args.repeats} repeats", flush=True)

    teacher = make_teacher(job)
    x, y = make_batch(job)
    with tempfile.TemporaryDirectory() as tmp:
        methods = [build(n, job, teacher, x, y, tmp) for n in args.methods]
        wall, cpu_rates = time_methods(
            methods, job, steps=steps, warmup=warmup, repeats=args.repeats
        )
        peaks: dict[str, int | None] = {}
        for m in methods:
            if args.no_memory:
                peaks[m.name] = None
            elif cuda:
                peaks[m.name] = cuda_step_peak(m, job.device)
            else:
                peaks[m.name] = cpu_step_peak(m)
        resident = {m.name: resident_bytes(m) for m in methods}

    med_wall = {k: statistics.median(v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_rates.items()}
    # Ratios: per CPU-second on the CPU (robust to other processes on a shared machine, and
    # equal to wall-clock ratios on an idle one), wall clock on CUDA.
    med = med_wall if cuda else med_cpu
    ref = med.get("naive")
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    command = "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    jobtxt = (
        f"{job.teacher}→MobileNetV1-{job.alpha:g}@{job.resolution}, B={job.batch_size}, "
        f"T={job.temperature:g}, top-{job.topk}"
    )
    rows = []
    for m in methods:
        peak = peaks[m.name]
        rows.append(
            {
                "date": date,
                "device": device_name(job.device),
                "job": jobtxt,
                "method": m.name,
                "setting": m.setting,
                "images_per_s": med_wall[m.name],
                "images_per_cpu_s": None if cuda else med_cpu[m.name],
                "all_images_per_s": wall[m.name],
                "ratio_to_naive": med[m.name] / ref if ref else float("nan"),
                "peak_mem_mib": None if peak is None else peak / 2**20,
                "resident_mib": resident[m.name] / 2**20,
                "command": command,
            }
        )
    print()
    print(table(rows))

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.2f}" if a in med and b in med else "n/a"

    summary = {
        "online/torchdistill": ratio("online", "torchdistill"),
        "online/timm": ratio("online", "timm"),
        "cached/online": ratio("cached", "online"),
    }
    if "online_bf16_teacher" in med:
        summary["online_bf16_teacher/online"] = ratio("online_bf16_teacher", "online")
    if peaks.get("online") and peaks.get("student"):
        same = job.online_precision == job.student_precision
        summary["peak online/student"] = (
            f"{peaks['online'] / peaks['student']:.2f}"  # type: ignore[operator]
            if same
            else "n/a (different precisions)"
        )
    print("ratios:", ", ".join(f"{k} = {v}" for k, v in summary.items()))
    if args.json:
        args.json.write_text(
            json.dumps({"job": asdict(job), "rows": rows, "summary": summary}, indent=1)
        )
    if not args.no_write:
        title = f"throughput, {job.device}, {date}: " + ", ".join(
            f"{k} = {v}" for k, v in summary.items()
        )
        write_results(rows, args.results, title)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
