"""`python -m distill compare`: run folders -> report.html, checked in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from distill.cli.compare import main as compare_main
from distill.compare import load_runs, sections, write_report
from distill.tracking import MetricsFileError, RunInfo, write_metrics_json

ALPHAS = (1.0, 0.5, 0.25)


def _cost(alpha: float, res: int, base_ma: float = 569e6, base_params: float = 4.2e6):
    """Rough MobileNet-like scaling: mult-adds ~ alpha^2 rho^2, params ~ alpha^2."""
    return int(base_ma * alpha**2 * (res / 224) ** 2), int(base_params * alpha**2)


def make_runs(
    root: Path,
    *,
    dataset: str = "digits",
    experiment: str = "digits-ab",
    resolutions: tuple[int, ...] = (32, 24, 16),
    seeds: tuple[int, ...] = (0, 1),
    teacher_top1: float = 98.6,
) -> list[Path]:
    """Run folders in the layout recipes write: <root>/<run_name>/metrics.json."""
    paths = []

    def write(info: RunInfo, top1: float, ma: int, params: int, tm: dict | None) -> None:
        path = root / info.run_name() / "metrics.json"
        write_metrics_json(
            path,
            info,
            metrics={"top1": top1, "top5": min(100.0, top1 + 1.2), "loss": (100 - top1) / 20},
            mult_adds=ma,
            params=params,
            teacher_metrics=tm,
            images_per_s=2e9 / max(ma, 1),
            peak_mem_bytes=ma * 4,
            steps=300,
            epochs=3.0,
            wall_s=12.5,
            device="cpu",
            date="2026-11-27T12:00:00+00:00",
        )
        paths.append(path)

    teacher = RunInfo(
        experiment=experiment,
        role="teacher",
        method="ce",
        student="resnet18",
        dataset=dataset,
        teacher="resnet18",
        resolution=max(resolutions),
    )
    write(teacher, teacher_top1, int(1.82e9 * (max(resolutions) / 224) ** 2), 11_200_000, None)
    tm = {"top1": teacher_top1}
    for seed in seeds:
        for a in ALPHAS:
            for r in resolutions:
                ma, params = _cost(a, r)
                span = max(max(resolutions) - min(resolutions), 1)
                base = teacher_top1 - 9.0 + 4.0 * a + 2.0 * (r - min(resolutions)) / span
                noise = 0.3 * ((seed * 7 + int(a * 4) + r) % 3 - 1)
                common = dict(
                    experiment=experiment,
                    student="mobilenet_v1",
                    dataset=dataset,
                    alpha=a,
                    resolution=r,
                    seed=seed,
                )
                scratch = RunInfo(role="scratch", method="ce", **common)  # type: ignore[arg-type]
                write(scratch, base + noise, ma, params, tm)
                kd = RunInfo(
                    role="distilled",
                    method="kd",
                    teacher="resnet18",
                    temperature=4.0,
                    kd_weight=0.9,
                    **common,  # type: ignore[arg-type]
                )
                write(kd, base + 1.8 + noise, ma, params, tm)
    return paths


# ----------------------------------------------------------------------------- data/errors


def test_load_runs_groups_seeds_and_finds_the_teacher(tmp_path: Path) -> None:
    make_runs(tmp_path / "runs")
    runs = load_runs([tmp_path / "runs"])
    assert len(runs) == 1 + 2 * 3 * 3 * 2
    (section,) = sections(runs)
    assert section.dataset == "digits" and section.metric == "top1"
    assert not section.paper_comparable
    kd = [c for c in section.cells if c.first["role"] == "distilled"]
    assert len(kd) == 9 and all(len(c.runs) == 2 for c in kd)
    cell = kd[0]
    assert section.teacher_for(cell) == pytest.approx(98.6)
    scratch = section.scratch_for(cell)
    assert scratch is not None and cell.mean - scratch.mean == pytest.approx(1.8)


def test_missing_and_malformed_metrics_are_clear_errors(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    assert compare_main([str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")]) == 2
    assert "no metrics.json found" in capsys.readouterr().err
    [path, *_] = make_runs(tmp_path / "runs", seeds=(0,), resolutions=(16,))
    data = json.loads(path.read_text())
    data["params"] = -5
    path.write_text(json.dumps(data))
    with pytest.raises(MetricsFileError) as err:
        load_runs([tmp_path / "runs"])
    assert str(path.resolve()) in str(err.value) and "'params'" in str(err.value)
    assert compare_main([str(tmp_path / "runs"), "-o", str(tmp_path / "r.html")]) == 2
    assert "'params'" in capsys.readouterr().err
    assert not (tmp_path / "r.html").exists()


def test_strings_are_escaped_and_paper_points_only_for_imagenet(tmp_path: Path) -> None:
    make_runs(
        tmp_path / "in",
        dataset="imagenet-1k",
        experiment="<b>x</b>",
        seeds=(0,),
        resolutions=(224, 160),
        teacher_top1=76.1,
    )
    make_runs(tmp_path / "dg", seeds=(0,), resolutions=(16,))
    out = write_report(load_runs([tmp_path]), tmp_path / "out" / "report.html", title="<T&>")
    text = out.read_text()
    assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text
    assert "<title>&lt;T&amp;&gt;</title>" in text
    assert "Grey crosses: MobileNet ImageNet top-1" in text  # the imagenet section
    assert "are not shown: these runs are on digits" in text  # the digits section
    # paper top-1 beside the cells with the same alpha x rho: 1.0-224, 1.0-160 (Table 7),
    # 0.5-160 (Table 9); none for 0.75 (not run) or 0.25-160 (not in the paper)
    assert "paper top-1" in text
    for value in ("70.6", "67.2", "60.2", "63.7", "50.6"):
        assert f"<td>{value}</td>" in text
    assert "<td>68.4</td>" not in text
    pngs = sorted(p.name for p in out.parent.glob("*.png"))
    assert pngs == [
        "report-digits-top1-mult_adds.png",
        "report-digits-top1-params.png",
        "report-imagenet-1k-top1-mult_adds.png",
        "report-imagenet-1k-top1-params.png",
    ]


def test_runs_without_profile_or_experiment_still_compare(tmp_path: Path) -> None:
    # What a bare Distiller run may write: no experiment/dataset, profiling failed, extra keys.
    kd = make_runs(tmp_path / "runs", seeds=(0,), resolutions=(16,))[2]
    data = json.loads(kd.read_text())
    data.update(experiment=None, mult_adds=None, images_seen=1234, info_note="extra keys kept")
    kd.write_text(json.dumps(data))
    out = write_report(load_runs([tmp_path / "runs"]), tmp_path / "report.html")
    text = out.read_text()
    assert "Left off the plots (no mult_adds/params recorded): " + data["run_name"] in text
    assert f'data-run="{data["run_name"]}"' in text


# ----------------------------------------------------------------------------- Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
]


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [CHROMIUM, *_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it)")
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    make_runs(tmp_path / "runs")
    html_path = tmp_path / "site" / "report.html"
    assert compare_main([str(tmp_path / "runs"), "-o", str(html_path), "--title", "digits KD"]) == 0

    dom = _chromium(tmp_path, "--dump-dom", html_path.as_uri()).stdout
    assert "<h1>digits KD</h1>" in dom
    assert dom.count('data-run="') == 37  # raw table: every run once
    assert 'data-run="teacher-resnet18-r32-s0"' in dom
    assert 'data-run="distilled-kd-mobilenet_v1-a0.25-r16-T4-w0.9-s1"' in dom
    # per-student table: 1 teacher + 9 scratch + 9 distilled cells (seeds aggregated)
    assert dom.count('data-cell="') == 19
    assert 'data-cell="distilled kd mobilenet_v1 a0.5 r24"' in dom
    assert "Distilled beats scratch in 9 of 9 student configurations" in dom
    assert dom.count('src="data:image/png;base64,') == 2

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", html_path.as_uri())
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1280)
    # The two plots sit side by side under the title (~y 90..600): they must be drawn, in
    # several colours (teacher purple, scratch orange, distilled blue), not blank boxes.
    band = img[80:620]
    non_white = (band < 235).any(axis=-1).mean()
    assert non_white > 0.05, f"plots look blank ({non_white:.1%} non-white)"
    colours = {tuple(int(v) // 32 for v in px) for px in band.reshape(-1, 3)[::7]}
    assert len(colours) >= 12, f"only {len(colours)} colour bins in the plot area"
    for hex_colour in ("#1967d2", "#e8710a"):
        rgb = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        close = (np.abs(band.astype(int) - rgb).sum(axis=-1) < 60).sum()
        assert close > 50, f"{hex_colour} barely drawn ({close} px)"
