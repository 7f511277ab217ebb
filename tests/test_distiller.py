"""The one loop: outputs written, exact resume, bf16 on CPU, non-finite losses, 2 processes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from distill import Distiller, DistillerConfig, NonFiniteLossError, Teacher
from distill.checkpoint import CheckpointError, find_latest, list_checkpoints
from distill.losses import CrossEntropy, KDLoss
from distill.types import Outputs
from tests.conftest import accelerate_cmd, launch_env

HERE = Path(__file__).parent


class NoisyImages(Dataset):
    """Random augmentation drawn from the global RNG, like torchvision transforms do."""

    def __init__(self, n: int = 48) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=g)
        self.y = torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        x = self.x[i] + 0.1 * torch.randn(3, 8, 8)
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"input": x, "target": self.y[i]}


def tiny_student(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(8, 4),
    )


def tiny_teacher() -> Teacher:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 4))
    return Teacher(model, input_size=12, mean=(0.4,) * 3, std=(0.3,) * 3)


def make(tmp: Path, **cfg: object) -> Distiller:
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    config = DistillerConfig(output_dir=str(tmp), progress=False, log_every=2, **cfg)  # type: ignore[arg-type]
    return Distiller(
        student, tiny_teacher(), KDLoss(temperature=2.0, alpha=0.7), opt, sched, config=config
    )


def loader() -> DataLoader:
    return DataLoader(NoisyImages(), batch_size=8, shuffle=True)


def test_fit_writes_checkpoints_metrics_and_student(tmp_path: Path) -> None:
    d = make(tmp_path, epochs=2, save_every=4)
    result = d.fit(loader(), DataLoader(NoisyImages(16), batch_size=8))
    assert set(result) == {"top1", "top5"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["epochs"] == pytest.approx(2.0)
    assert metrics["params"] == sum(p.numel() for p in d.unwrapped_student.parameters())
    assert metrics["mult_adds"] > 0 and metrics["teacher_metrics"]["top1"] >= 0
    weights = load_file(tmp_path / "student.safetensors")
    assert torch.equal(weights["0.weight"], d.unwrapped_student.state_dict()["0.weight"])
    steps = [p.name for p in list_checkpoints(tmp_path / "checkpoints")]
    assert steps == ["step_00000008", "step_00000012"]  # keep_checkpoints=2
    # the frozen teacher stays out of checkpoints
    ckpt_weights = load_file(tmp_path / "checkpoints" / "step_00000012" / "model.safetensors")
    assert all(k.startswith(("student.", "objective.")) for k in ckpt_weights)


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_equals_uninterrupted(tmp_path: Path, accum: int) -> None:
    full = make(tmp_path / "full", epochs=3, grad_accum_steps=accum)
    full.fit(loader())
    # the same run, stopped after 4 optimizer steps (mid-epoch), then resumed from disk
    part = make(tmp_path / "part", max_steps=4, grad_accum_steps=accum)
    part.fit(loader())
    total = full.progress.step
    resumed = make(tmp_path / "part", epochs=3, grad_accum_steps=accum, resume="latest")
    resumed.fit(loader())
    assert resumed.progress.step == total
    a, b = full.unwrapped_student.state_dict(), resumed.unwrapped_student.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa, ob = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    for k in oa:
        assert torch.equal(oa[k]["momentum_buffer"], ob[k]["momentum_buffer"])
    assert full.scheduler.get_last_lr() == resumed.scheduler.get_last_lr()


def test_tampered_checkpoint_is_refused(tmp_path: Path) -> None:
    make(tmp_path, max_steps=2).fit(loader())
    latest = find_latest(tmp_path / "checkpoints")
    assert latest is not None
    opt_file = latest / "optimizer.bin"
    opt_file.write_bytes(opt_file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match="checksum"):
        make(tmp_path, max_steps=4, resume="latest").fit(loader())


def test_incomplete_checkpoint_is_skipped(tmp_path: Path) -> None:
    make(tmp_path, max_steps=2).fit(loader())
    fake = tmp_path / "checkpoints" / "step_00000099"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"half-written")
    d = make(tmp_path, max_steps=3, resume="latest")
    d.fit(loader())
    assert d.progress.step == 3  # resumed from step 2, not from the broken 99


def test_bf16_on_cpu(tmp_path: Path) -> None:
    d = make(tmp_path, max_steps=3, mixed_precision="bf16")
    d.fit(loader())
    assert str(d.accelerator.mixed_precision) == "bf16"
    assert all(torch.isfinite(p).all() for p in d.unwrapped_student.parameters())


class ExplodingLoss(KDLoss):
    def __init__(self, at_call: int) -> None:
        super().__init__(temperature=2.0, alpha=0.5)
        self.calls, self.at_call = 0, at_call

    def forward(
        self, student: Outputs, teacher: Outputs | None, target: Tensor | None
    ) -> dict[str, Tensor]:
        parts = super().forward(student, teacher, target)
        self.calls += 1
        if self.calls == self.at_call:
            parts["kd"] = parts["kd"] * float("nan")
            parts["loss"] = parts["loss"] + parts["kd"]
        return parts


def test_nonfinite_loss_stops_with_step_part_and_checkpoint(tmp_path: Path) -> None:
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    cfg = DistillerConfig(
        output_dir=str(tmp_path), progress=False, save_every=2, log_every=100, epochs=2
    )
    d = Distiller(student, tiny_teacher(), ExplodingLoss(at_call=5), opt, config=cfg)
    with pytest.raises(NonFiniteLossError, match=r"step 5 \(parts: .*kd") as err:
        d.fit(loader())
    assert "step_00000004" in str(err.value)


def test_nonfinite_skip_counts_batches(tmp_path: Path) -> None:
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    cfg = DistillerConfig(
        output_dir=str(tmp_path), progress=False, on_nonfinite="skip", max_steps=6
    )
    d = Distiller(student, tiny_teacher(), ExplodingLoss(at_call=3), opt, config=cfg)
    d.fit(loader())
    assert d.progress.skipped_nonfinite == 1
    assert all(torch.isfinite(p).all() for p in d.unwrapped_student.parameters())
    assert json.loads((tmp_path / "metrics.json").read_text())["skipped_nonfinite"] == 1


def test_scratch_baseline_needs_no_teacher(tmp_path: Path) -> None:
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    cfg = DistillerConfig(output_dir=str(tmp_path), progress=False, max_steps=3)
    Distiller(student, None, CrossEntropy(), opt, config=cfg).fit(loader())
    assert json.loads((tmp_path / "metrics.json").read_text())["role"] == "scratch"
    with pytest.raises(ValueError, match="teacher is None"):
        Distiller(student, None, KDLoss(temperature=1.0, alpha=0.5), opt, config=cfg)


def test_objective_params_must_be_optimised(tmp_path: Path) -> None:
    student = tiny_student()
    objective = KDLoss(temperature=1.0, alpha=0.5)
    objective.proj = nn.Linear(4, 4)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="not in the optimizer"):
        Distiller(
            student,
            tiny_teacher(),
            objective,
            opt,
            config=DistillerConfig(output_dir=str(tmp_path)),
        )


def test_class_count_mismatch_is_reported_before_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="student has 10 classes, the teacher 4"):
        Distiller(
            student,
            tiny_teacher(),
            KDLoss(temperature=1.0, alpha=0.5),
            opt,
            config=DistillerConfig(output_dir=str(tmp_path)),
            example_input=torch.randn(2, 3, 8, 8),
        )


def test_unwritable_output_dir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    d = make(blocker / "run", max_steps=2)
    with pytest.raises(PermissionError, match="cannot write to output_dir"):
        d.fit(loader())


def test_any_module_pair_not_only_images(tmp_path: Path) -> None:
    """Tabular student/teacher: the Distiller does not assume images."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    teacher = Teacher(nn.Linear(5, 3))
    student = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    cfg = DistillerConfig(output_dir=str(tmp_path), progress=False, epochs=5)
    d = Distiller(student, teacher, KDLoss(temperature=1.0, alpha=1.0), opt, config=cfg)
    before = nn.functional.kl_div(
        student(x).log_softmax(-1),
        teacher(x).output.log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )
    d.fit(DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True))
    after = nn.functional.kl_div(
        student(x).log_softmax(-1),
        teacher(x).output.log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )
    assert after < before * 0.5


def test_two_process_gloo_run_matches_single_process_data(tmp_path: Path) -> None:
    """A real `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo)."""
    out = tmp_path / "ddp"
    cmd = accelerate_cmd(HERE / "scripts" / "ddp_fit.py", str(out), processes=2)
    proc = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["steps"] == 6  # 48 images / (8 per rank x 2 ranks) = 3 steps/epoch, 2 epochs
    assert metrics["images_seen"] == 96
    # resume in 2 processes from the latest checkpoint and train one more epoch
    proc = subprocess.run(
        [*cmd, "--epochs", "3", "--resume", "latest"],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout
    assert json.loads((out / "metrics.json").read_text())["steps"] == 9


def test_wandb_offline_run_has_the_comparison_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real offline W&B run from the Distiller, read back from its .wandb file."""
    from distill.tracking import RunInfo, read_wandb_run

    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_DISABLE_GIT": "true",
    }.items():
        monkeypatch.setenv(k, v)
    info = RunInfo(
        experiment="unit",
        role="distilled",
        method="kd",
        student="tiny",
        dataset="noise",
        teacher="linear",
        seed=0,
    )
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    cfg = DistillerConfig(
        output_dir=str(tmp_path / "run"),
        progress=False,
        max_steps=4,
        log_every=2,
        report_to="wandb",
        run_info=info.config(),
        # dir= explicitly: wandb's process-wide settings may hold an earlier test's WANDB_DIR
        tracker_init_kwargs={**info.wandb_init_kwargs(), "dir": str(tmp_path)},
    )
    d = Distiller(student, tiny_teacher(), KDLoss(temperature=2.0, alpha=0.5), opt, config=cfg)
    d.fit(loader(), DataLoader(NoisyImages(16), batch_size=8))
    run = read_wandb_run(tmp_path / "wandb", wait_s=30)
    assert run["group"] == "unit" and run["job_type"] == "distilled"
    summary = run["summary"]
    for key in (
        "mult_adds",
        "params",
        "images_per_s",
        "peak_mem",
        "eval/top1",
        "teacher/top1",
        "gap_to_teacher/top1",
    ):
        assert key in summary, key
    assert summary["gap_to_teacher/top1"] == pytest.approx(
        summary["eval/top1"] - summary["teacher/top1"]
    )
    assert [
        r["train/loss"] for r in run["history"] if "train/loss" in r
    ]  # loss parts logged per step


class PartlyBroken(NoisyImages):
    """Two of the images are unreadable files."""

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        from distill.data.images import BadImageError

        if i in (3, 17):
            raise BadImageError(f"/data/img_{i}.jpg", "truncated", "image file is truncated")
        return super().__getitem__(i)


def test_unreadable_images_are_skipped_counted_and_reported(tmp_path: Path) -> None:
    from distill.data.skipping import SkipBadSamples, collate_skipping

    d = make(tmp_path, epochs=1)
    data = DataLoader(SkipBadSamples(PartlyBroken()), batch_size=8, collate_fn=collate_skipping)
    d.fit(data)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["skipped_images"]["total"] == 2  # one shape: {"total", "files"}
    assert metrics["images_seen"] == 46  # 48 minus the two unreadable ones
    report = json.loads((tmp_path / "skipped.json").read_text())
    assert "/data/img_3.jpg" in json.dumps(report) and "/data/img_17.jpg" in json.dumps(report)


def test_cached_teacher_outputs_need_no_teacher_model(tmp_path: Path) -> None:
    teacher = tiny_teacher()
    data = NoisyImages()
    cached = [
        {**data[i], "teacher_logits": teacher(data.x[i : i + 1]).output[0]}
        for i in range(len(data))
    ]
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    cfg = DistillerConfig(
        output_dir=str(tmp_path), progress=False, max_steps=3, cached_teacher=True
    )
    d = Distiller(student, None, KDLoss(temperature=2.0, alpha=0.5), opt, config=cfg)
    d.fit(DataLoader(cached, batch_size=8))  # type: ignore[arg-type]
    assert d.progress.step == 3
    cfg.output_dir = str(tmp_path / "second")  # a new run (the first folder holds a finished one)
    with pytest.raises(ValueError, match="no 'teacher_logits'"):
        Distiller(student, None, KDLoss(temperature=2.0, alpha=0.5), opt, config=cfg).fit(loader())


def test_console_shows_the_teacher_and_plain_progress_lines(tmp_path: Path, capsys) -> None:
    """Each evaluation prints the teacher's score and the gap (the teacher evaluated once);
    without a terminal the progress is plain periodic lines, not a redrawn bar."""
    d = make(tmp_path, max_steps=4, eval_every=2)
    d.config.progress = True
    d.fit(loader(), DataLoader(NoisyImages(16), batch_size=8))
    captured = capsys.readouterr()
    evals = [line for line in captured.out.splitlines() if line.startswith("step ")]
    assert len(evals) >= 2 and all("(teacher " in line and ", gap " in line for line in evals)
    progress = [line for line in captured.err.splitlines() if line.startswith("train: ")]
    assert progress and "4/4 (100%) steps" in progress[-1] and "\r" not in captured.err
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["teacher_metrics"] and record["teacher_metrics"]["top1"] == pytest.approx(
        float(evals[-1].split("(teacher ")[1].split(",")[0]), abs=0.01
    )
