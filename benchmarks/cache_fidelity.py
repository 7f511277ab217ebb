"""What the teacher-output cache loses, and whether it matters for the student.

    python benchmarks/cache_fidelity.py                 # digits + synthetic 1000-class logits
    python benchmarks/cache_fidelity.py --teacher-arch torchvision:resnet50 \\
        --teacher-weights r50.safetensors --data-dir imagenet/val --samples 2000   # a real teacher

1. Fidelity: mean KL(p_T || q_T) in nats between the teacher's softmax(z / T) and the one
   reconstructed from its top-k logits (`distill.data.teacher_cache.topk_kl`: fp16 values, the
   other classes sharing the remaining T = 1 mass uniformly, as a version-1 cache did, or with
   the 8-bit tail of the default cache), for k = 1, 5, 10, 20 and T = 1, 4, on
   - the digits teacher (a small CNN) trained here (10 classes: k >= 10 is exact), on shifted
     test crops;
   - synthetic 1000-class logits shaped like a confident ImageNet classifier (documented in
     `synthetic_logits`; a stand-in, since no pretrained weights can be downloaded here);
   - with --teacher-arch/--teacher-weights/--data-dir: a real teacher on centre crops.
2. Exactness: the relative difference between the KD loss (`soft_kd_loss`, T^2 KL) from the
   cache and online, and between their gradients with respect to the student's logits
   (||g_cached - g_online|| / ||g_online||), at T = 1, 2, 4, 8 and k = 5, 10, 20 on 1000
   classes, for three ways of storing the tail: its mass at T = 1 (format version 1, "before"),
   its mass at the training temperature (`tail="mass"`), and 8 bits per class (the default),
   against an untrained student (independent logits) and a half-trained one (0.6 z + noise).
3. Accuracy on scikit-learn digits of the same student trained by the same Distiller, online
   (teacher forward every step, fresh random shifts) vs from the cache (K stored shifts per
   image, replayed as epoch mod K), over --seeds seeds; plus the student trained from labels.

Rows are appended to benchmarks/RESULTS.md (--no-write to skip).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
KS = (1, 5, 10, 20)
TS = (1.0, 4.0)


def kl_row(logits: Tensor, tail: str = "mass") -> dict[str, float]:
    from distill.data.teacher_cache import topk_kl

    out = {}
    for t in TS:
        for k in KS:
            kk = min(k, logits.shape[1])
            kl = topk_kl(logits, kk, t, tail=tail)  # type: ignore[arg-type]
            out[f"T={t:g},k={k}"] = max(0.0, float(kl.mean()))
    return out


def synthetic_logits(
    n: int = 2000, classes: int = 1000, seed: int = 0, noise: str = "gaussian"
) -> Tensor:
    """Logits of a confident 1000-way classifier: N(0, 1.2²) noise, +5 on 5 'related' classes
    (fine-grained neighbours, as ImageNet's dog breeds), +10 on the predicted class. Mean top-1
    probability ≈ 0.81 and mean entropy ≈ 1.3 nats, the order of a ResNet-50's on ImageNet
    val. `noise="student-t"`: heavy-tailed noise instead, 1.5 x Student-t with 4 degrees of
    freedom (top-1 ≈ 0.71, entropy ≈ 1.1 nats, logits spanning ≈ 26 against ≈ 14). A stand-in:
    the per-class shape of a real teacher's tail is not modelled."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g)
    if noise == "student-t":  # a normal over sqrt(chi2(4) / 4), chi2(4) the sum of 4 squares
        chi2 = (torch.randn(4, n, classes, generator=g) ** 2).sum(0)
        z = z / (chi2 / 4).sqrt() * 1.5
    else:
        z = z * 1.2
    top = torch.randint(classes, (n,), generator=g)
    related = torch.randint(classes, (n, 5), generator=g)
    z.scatter_add_(1, related, torch.full((n, 5), 5.0))
    z[torch.arange(n), top] += 10.0
    return z


def students(z: Tensor, seed: int = 1) -> dict[str, Tensor]:
    """Student logits to measure against: untrained (independent of the teacher) and
    half-trained (correlated with the teacher's logits z, its tail included)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "untrained": torch.randn(z.shape, generator=g),
        "half-trained": 0.6 * z + 1.5 * torch.randn(z.shape, generator=g),
    }


STORAGES = ("mass at T=1 (v1)", "mass at T", "8-bit tail")


def cached_teacher(z: Tensor, k: int, temperature: float, storage: str) -> Tensor:
    """The dense logits a cache hands the loss at `temperature`: as `TeacherCache.logits`
    computes them for a cache storing the tail's mass at T = 1 only (format version 1), its
    mass at the training temperature, or 8 bits per tail class (the default build, which
    stores the mass at T = 1 only: no correction at other temperatures)."""
    from distill.data.teacher_cache import compress_topk, reconstruct_logits, tempered_tail_lse

    quantized = storage == "8-bit tail"
    c = compress_topk(z, k, tail="quantized" if quantized else "mass")
    t = temperature if storage == "mass at T" else 1.0
    lse = tempered_tail_lse(z, c.indices, [t])[:, 0]
    if quantized and t != temperature:
        lse = None
    return reconstruct_logits(
        c.values.half(), c.indices, lse, z.shape[1], temperature=t,
        tail_codes=c.tail_codes, tail_range=c.tail_range,
    )  # fmt: skip


def kd_difference(
    student: Tensor, teacher: Tensor, cached: Tensor, t: float
) -> tuple[float, float]:
    """(|loss_cached - loss_online| / loss_online, ||g_cached - g_online|| / ||g_online||) of
    the KD soft loss, g its gradient with respect to the student's logits."""
    from distill.losses.kd import soft_kd_loss

    out = []
    for target in (teacher, cached):
        s = student.clone().requires_grad_(True)
        loss = soft_kd_loss(s, target, temperature=t)
        (grad,) = torch.autograd.grad(loss, s)
        out.append((float(loss.detach()), grad))
    (lo, go), (lc, gc) = out
    return abs(lc - lo) / lo, float((gc - go).norm() / go.norm())


EXACT_TS = (1.0, 2.0, 4.0, 8.0)
EXACT_KS = (5, 10, 20)


def exactness_table(z: Tensor) -> str:
    """One row per (student, k, storage): loss and gradient differences (%) at each T."""
    head = "| student | k | tail stored as | " + " | ".join(f"T={t:g}" for t in EXACT_TS)
    text = head + " |\n" + "|---" * (3 + len(EXACT_TS)) + "|\n"
    for name, s in students(z).items():
        for k in EXACT_KS:
            for storage in STORAGES:
                cells = []
                for t in EXACT_TS:
                    dl, dg = kd_difference(s, z, cached_teacher(z, k, t, storage), t)
                    cells.append(f"{100 * dl:.3g}% / {100 * dg:.3g}%")
                text += f"| {name} | {k} | {storage} | " + " | ".join(cells) + " |\n"
    return text


def describe(logits: Tensor) -> str:
    p = logits.float().softmax(1)
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum(1).mean())
    return f"mean top-1 prob {float(p.max(1).values.mean()):.2f}, entropy {entropy:.2f} nats"


# --------------------------------------------------------------------------- digits training


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def small_cnn(num_classes: int = 10) -> nn.Module:
    """The digits teacher: three conv-BN-ReLU-maxpool stages (32, 64, 128) and a linear head."""

    def stage(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        stage(3, 32), stage(32, 64), stage(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, num_classes),
    )  # fmt: skip


def train_teacher(train: Any, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    teacher = small_cnn()
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    opt = torch.optim.SGD(teacher.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=epochs * len(loader))
    teacher.train()
    for _ in range(epochs):
        for batch in loader:
            loss = nn.functional.cross_entropy(teacher(batch["input"]), batch["target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return teacher.eval()


def distil(
    student: nn.Module,
    teacher: nn.Module | None,
    loader: Any,
    epochs: int,
    out: str,
    seed: int,
) -> float:
    from distill.distiller import Distiller, DistillerConfig
    from distill.losses import CrossEntropy, KDLoss
    from distill.teacher import Teacher

    steps = epochs * len(loader)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=steps)
    cfg = DistillerConfig(
        output_dir=out,
        epochs=epochs,
        progress=False,
        export_student=False,
        save_at_epoch_end=False,
        check_compatible=False,
        seed=seed,
        log_every=10_000,
    )
    objective = CrossEntropy() if teacher is None else KDLoss(temperature=4.0, alpha=0.9)
    wrapped = None if teacher is None else Teacher(copy.deepcopy(teacher))
    t0 = time.perf_counter()
    Distiller(student, wrapped, objective, opt, sched, config=cfg).fit(loader)
    return time.perf_counter() - t0


def digits_runs(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float], str]:
    from distill.data.digits import load_digits_splits
    from distill.data.teacher_cache import CachedDataset, ReplayableShifts, build_cache
    from distill.models import mobilenet_v1

    train, test = load_digits_splits(args.resolution, seed=0)
    xt, yt = test.tensors()
    t0 = time.perf_counter()
    teacher = train_teacher(train, args.teacher_epochs, seed=0)
    teacher_acc = accuracy(teacher, xt, yt)
    print(f"teacher CNN: {teacher_acc:.2f}% ({time.perf_counter() - t0:.0f}s)", flush=True)

    # Teacher logits on shifted test crops, for the fidelity table.
    shifts = ReplayableShifts.from_dataset(test)
    shifts.max_shift = train.max_shift
    g = torch.Generator().manual_seed(0)
    crops = torch.stack([shifts.draw(i, g)[1]["input"] for i in range(len(shifts))])
    with torch.no_grad():
        fidelity = kl_row(teacher(crops))

    rows: list[dict[str, Any]] = []
    replay = ReplayableShifts.from_dataset(train)
    with tempfile.TemporaryDirectory() as tmp:
        caches = {}
        for k in args.cache_topk:
            t0 = time.perf_counter()
            caches[k] = build_cache(
                teacher, replay, f"{tmp}/cache_k{k}", crops=args.crops, topk=k, batch_size=256,
                progress=False,
            )  # fmt: skip
            print(f"cache k={k}: {time.perf_counter() - t0:.1f}s", flush=True)
        results: dict[str, list[float]] = {}
        times: dict[str, list[float]] = {}
        for seed in range(args.seeds):
            runs: list[tuple[str, nn.Module | None, Any]] = [
                ("scratch (labels only)", None, train),
                ("online KD", teacher, train),
            ]
            for k, cache in caches.items():
                runs.append(
                    (f"cached KD, top-{k}, K={args.crops}", teacher, CachedDataset(replay, cache))
                )
            for name, t, data in runs:
                torch.manual_seed(seed)
                student = mobilenet_v1(alpha=args.alpha, num_classes=10, resolution=args.resolution)
                g = torch.Generator().manual_seed(seed)
                loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=g)
                wall = distil(student, t, loader, args.epochs, f"{tmp}/{seed}-{len(results)}", seed)
                acc = accuracy(student, xt, yt)
                results.setdefault(name, []).append(acc)
                times.setdefault(name, []).append(wall)
                print(f"  seed {seed} {name}: {acc:.2f}% ({wall:.1f}s)", flush=True)
    for name, accs in results.items():
        rows.append(
            {
                "run": name,
                "top1_mean": statistics.mean(accs),
                "top1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "wall_s": statistics.median(times[name]),
                "n": len(accs),
            }
        )
    setup = (
        f"digits @{args.resolution}px, teacher 3-stage CNN ({teacher_acc:.1f}%), student "
        f"MobileNetV1-{args.alpha:g}, {args.epochs} epochs, T=4, soft weight 0.9, shifts ≤ "
        f"{train.max_shift}px"
    )
    return rows, fidelity, setup


def real_teacher_logits(args: argparse.Namespace) -> Tensor:
    """Logits of a local teacher checkpoint on centre crops of --data-dir (ImageFolder)."""
    from torchvision.datasets import ImageFolder

    from distill.cli.cache_teacher import build_teacher
    from distill.constants import IMAGENET_MEAN, IMAGENET_STD
    from distill.data.transforms import build_transforms

    ns = argparse.Namespace(
        teacher_arch=args.teacher_arch,
        teacher_weights=args.teacher_weights,
        num_classes=args.num_classes,
        teacher_arg=[],
        teacher_resolution=args.teacher_resolution,
        teacher_mean=IMAGENET_MEAN,
        teacher_std=IMAGENET_STD,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = build_teacher(ns).to(device)
    ds = ImageFolder(args.data_dir, transform=build_transforms(args.teacher_resolution))
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[: args.samples]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(ds, idx.tolist()), batch_size=128, num_workers=4
    )
    out = []
    for x, _ in loader:
        out.append(teacher(x.to(device), prepared=True).output.float().cpu())
    return torch.cat(out)


def fidelity_table(rows: dict[str, dict[str, float]], notes: dict[str, str]) -> str:
    cols = [f"T={t:g},k={k}" for t in TS for k in KS]
    head = "| teacher | " + " | ".join(c.replace(",", ", ") for c in cols) + " |\n"
    head += "|---" * (len(cols) + 1) + "|\n"
    body = ""
    for name, r in rows.items():
        body += f"| {name} ({notes[name]}) | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |\n"
    return head + body


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    head = "| run | top-1 % (mean ± sd) | seeds | train wall s (median) |\n|---|---|---|---|\n"
    return head + "".join(
        f"| {r['run']} | {r['top1_mean']:.2f} ± {r['top1_std']:.2f} | {r['n']} | {r['wall_s']:.1f} |\n"
        for r in rows
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--resolution", type=int, default=48, help="px (MobileNetV1 does not learn digits at 32)"
    )
    p.add_argument("--alpha", type=float, default=0.25, help="student width")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--crops", type=int, default=10, help="K cached shifts per image")
    p.add_argument(
        "--cache-topk", type=int, nargs="+", default=[10, 2], help="k of the cached runs"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-training", action="store_true", help="fidelity only")
    p.add_argument("--teacher-arch", help="a real teacher, e.g. torchvision:resnet50")
    p.add_argument("--teacher-weights")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--teacher-resolution", type=int, default=224)
    p.add_argument("--data-dir", help="ImageFolder of images for the real teacher")
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/cache_fidelity.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    fidelity: dict[str, dict[str, float]] = {}
    notes: dict[str, str] = {}

    syn = synthetic_logits()
    fidelity["synthetic 1000-class"] = kl_row(syn)
    notes["synthetic 1000-class"] = describe(syn) + ", 2000 rows"
    fidelity["synthetic 1000-class, 8-bit tail"] = kl_row(syn, tail="quantized")
    notes["synthetic 1000-class, 8-bit tail"] = "the same rows, the default cache of format 2"
    exact = ""
    for noise in ("gaussian", "student-t"):
        z = synthetic_logits(n=512, noise=noise)
        exact += (
            f"\nCached vs online KD, relative difference of the loss / of its gradient, on 512 "
            f"synthetic 1000-class rows with {noise} noise ({describe(z)}):\n\n"
        )
        exact += exactness_table(z)
    if args.teacher_arch:
        if not (args.teacher_weights and args.data_dir):
            print("error: --teacher-arch needs --teacher-weights and --data-dir", file=sys.stderr)
            return 2
        real = real_teacher_logits(args)
        fidelity[args.teacher_arch] = kl_row(real)
        notes[args.teacher_arch] = describe(real) + f", {len(real)} centre crops"

    acc_rows: list[dict[str, Any]] = []
    setup = ""
    if not args.skip_training:
        acc_rows, digits_kl, setup = digits_runs(args)
        fidelity["digits CNN"] = digits_kl
        notes["digits CNN"] = "10 classes: k ≥ 10 is exact, 450 shifted test crops"

    text = f"\n\n### cache fidelity, {date}, CPU\n\n`{command}`\n\n"
    text += "Mean KL(teacher ‖ top-k reconstruction) in nats, over rows:\n\n"
    text += fidelity_table(fidelity, notes)
    text += exact
    if acc_rows:
        text += f"\nStudent accuracy on the digits test split ({setup}):\n\n" + accuracy_table(
            acc_rows
        )
    print(text)
    if not args.no_write:
        base = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
        args.results.write_text(base.rstrip("\n") + text)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
