"""Every registered logit-task method through `recipes/imagenet.py --method NAME` on 2 gloo ranks
(a torchvision ResNet-18 teacher, MobileNetV1 student, default stage maps: no module named by
hand), each method's YAML under recipes/configs/, and CRD's exact resume on 2 ranks.

Three methods run in the fast suite (one logit, one feature, the one with a memory bank); the
others are `slow` (about 12 s each).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.losses import methods_for
from tests.conftest import launch_env
from tests.datagen import make_imagenet
from tests.test_recipes_common import launch, ok, read_json

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"
TEACHER = "torchvision:resnet18 weights=none input_size=32 num_classes=3"
FAST = {"kd", "reviewkd", "crd"}
METHOD_ARGS = {"crd": "{nce_k: 8}"}  # 24 training images: fewer negatives than the default


def _args(data: Path, out: Path, method: str, steps: int = 2) -> list[str]:
    args = [
        "--data-dir", str(data), "--teacher", TEACHER, "--method", method,
        "--output-dir", str(out), "--student", "mobilenet_v1", "--alpha", "0.25",
        "--resolution", "32", "--batch-size", "8", "--max-steps", str(steps), "--workers", "0",
        "--progress", "false", "--save-every", "2",
    ]  # fmt: skip
    if method in METHOD_ARGS:
        args += ["--method-args", METHOD_ARGS[method]]
    return args


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("methods") / "imagenet"
    make_imagenet(root, n_classes=3, per_class=8, val_per_class=4, size=32)
    return root


@pytest.mark.parametrize(
    "method",
    [m if m in FAST else pytest.param(m, marks=pytest.mark.slow) for m in methods_for("logits")],
)
def test_every_method_runs_on_two_processes(method: str, imagenet: Path, tmp_path: Path) -> None:
    out = tmp_path / method
    result = ok(launch("imagenet.py", *_args(imagenet, out, method), processes=2))
    record = read_json(out / "metrics.json")
    assert (record["method"], record["num_processes"], record["steps"]) == (method, 2, 2)
    assert record["role"] == ("scratch" if method == "ce" else "distilled")
    assert 0.0 <= record["metrics"]["top1"] <= 100.0
    assert "Traceback" not in result.stderr


def test_every_method_has_a_config_with_its_published_number() -> None:
    """recipes/configs/imagenet_<method>.yaml sets `method: <method>` and says what was
    published for the pair: a top-1 with its source, or that none is known."""
    import yaml

    for method in methods_for("logits"):
        path = CONFIGS / f"imagenet_{method}.yaml"
        assert path.is_file(), f"add {path.relative_to(ROOT)}"
        text = path.read_text()
        cfg = yaml.safe_load(text)
        assert cfg["method"] == method, path
        published = [line for line in text.splitlines() if line.startswith("# published: ")]
        assert published, f"{path.name}: add a '# published: ...' line"
        said = published[0]
        cited = "%" in said and "et al." in said
        assert cited or "none for ResNet-50 -> MobileNetV1" in said, f"{path.name}: {said}"


def test_configs_parse_into_the_recipe() -> None:
    from recipes._config import parse_config
    from recipes.imagenet import ImageNetConfig

    for path in sorted(CONFIGS.glob("imagenet_*.yaml")):
        cfg, _ = parse_config(ImageNetConfig, ["--config", str(path), "--data-dir", "/d"])
        assert cfg.method in methods_for("logits"), path


def test_crd_resumes_exactly_on_two_processes(imagenet: Path, tmp_path: Path) -> None:
    """4 steps straight == 2 steps, then --resume latest to 4: the student, the heads and both
    memory banks bit-identical (the banks and the negative draws are in the checkpoint)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ok(launch("imagenet.py", *_args(imagenet, straight, "crd", steps=4), processes=2))
    ok(launch("imagenet.py", *_args(imagenet, resumed, "crd", steps=2), processes=2))
    again = [*_args(imagenet, resumed, "crd", steps=4), "--resume", "latest"]
    ok(launch("imagenet.py", *again, "--allow-resume-changes", processes=2))
    a = load_file(str(straight / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and any("memory_student" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


SECOND = "torchvision:mobilenet_v3_small weights=none input_size=48 num_classes=3"


@pytest.mark.parametrize("ensemble", ["probs", "losses"])
def test_two_teachers_make_an_ensemble(ensemble: str, imagenet: Path, tmp_path: Path) -> None:
    """--teacher twice: each teacher gets its own view (32 and 48 px), combined as mean tempered
    probabilities or as one KD loss per teacher; the record names both."""
    out = tmp_path / ensemble
    args = [*_args(imagenet, out, "kd"), "--teacher", SECOND, "--ensemble", ensemble]
    ok(launch("imagenet.py", *args, "--teacher-weights", "3,1", processes=2))
    record = read_json(out / "metrics.json")
    assert record["teacher"] == "torchvision:resnet18+torchvision:mobilenet_v3_small"
    assert record["method"] == "kd" and record["temperature"] == 1.0
    assert set(record["teacher_metrics"]) == {"top1", "top5"}


def test_ensemble_settings_are_checked_before_anything_loads(
    imagenet: Path, tmp_path: Path
) -> None:
    args = [*_args(imagenet, tmp_path / "bad", "kd"), "--teacher", SECOND]
    script = str(ROOT / "recipes" / "imagenet.py")
    cmd = [sys.executable, script, *args, "--teacher-weights", "1,2,3"]
    result = subprocess.run(cmd, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "teacher_weights has 3 weights for 2 teachers" in result.stderr
    one = [sys.executable, str(ROOT / "recipes" / "facenet.py"), "--teacher", "a", "--teacher", "b"]
    result = subprocess.run(one, env=launch_env(), capture_output=True, text=True, timeout=120)
    assert (
        result.returncode == 2 and "the facenet recipe takes one --teacher, got 2" in result.stderr
    )
