"""recipes/face_attributes.py on a generated CelebA (img_align_celeba/ + the five annotation files).

Stage "teacher" fine-tunes a torchvision MobileNetV3-small (random init, 40-attribute head) with
BCE; stage "distill" loads its exported weights as a `file:` teacher and trains MobileNetV1 0.25
at 32 px with multi-label KD + BCE. One training image is a zero-byte file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from recipes.face_attributes import main
from tests.datagen import make_celeba, make_identity_folders
from tests.test_recipes_common import check_run_dir, launch, ok, read_json, tiny_args


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("celeba_recipe")
    info = make_celeba(base / "data", n=12, size=(24, 30), splits=(8, 2, 2))
    (info["base"] / "img_align_celeba" / "000002.jpg").write_bytes(b"")  # zero bytes
    # stage 1, in this process: the teacher the other tests distil from
    teacher_out = base / "teacher"
    code = main(
        [
            "--stage",
            "teacher",
            "--data-dir",
            str(base / "data"),
            "--teacher",
            "torchvision:mobilenet_v3_small weights=none input_size=32",
            *tiny_args(teacher_out, steps=2),
        ]
    )
    assert code == 0
    return {"root": base / "data", "teacher_run": teacher_out, "base": base}


def distill_args(data: dict[str, Path], out: Path, steps: int) -> list[str]:
    weights = data["teacher_run"] / "student.safetensors"
    return [
        "--data-dir",
        str(data["root"]),
        "--teacher",
        f"file:{weights} arch=torchvision:mobilenet_v3_small input_size=32",
        *tiny_args(out, steps=steps),
    ]


def test_teacher_stage_trains_the_teacher(data: dict[str, Path]) -> None:
    m = check_run_dir(data["teacher_run"], steps=2)
    assert (m["role"], m["method"], m["teacher"]) == ("teacher", "multilabel_bce", None)
    assert set(m["metrics"]) == {"mAP", "mean_acc"} and m["primary_metric"] == "mAP"
    assert m["skipped_images"]["files"][0]["path"].endswith("000002.jpg")


def test_distill_single_process_resume_eval(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "student"
    r = ok(launch("face_attributes.py", *distill_args(data, out, 2), "--save-every", "1"))
    assert "resolved config (FaceAttributesConfig):" in r.stdout
    m = check_run_dir(out, steps=2)
    assert (m["role"], m["method"], m["alpha"], m["resolution"]) == (
        "distilled",
        "multilabel_kd",
        0.25,
        32,
    )
    assert set(m["teacher_metrics"]) == {"mAP", "mean_acc"}
    assert "000002.jpg" in r.stderr and "empty" in r.stderr  # the skip report

    assert main([*distill_args(data, out, 3), "--resume", "latest"]) == 0
    assert "resumed from" in capsys.readouterr().out
    check_run_dir(out, steps=3)
    assert main([*distill_args(data, out, 3), "--eval-only", "--resume", "latest"]) == 0
    ev = read_json(out / "eval.json")
    assert "model.safetensors" in ev["weights"] and set(ev["metrics"]) == {"mAP", "mean_acc"}


def test_distill_two_processes_and_resume(data: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    ok(launch("face_attributes.py", *distill_args(data, out, 2), "--save-every", "1", processes=2))
    check_run_dir(out, steps=2, processes=2)
    r = ok(
        launch("face_attributes.py", *distill_args(data, out, 3), "--resume", "latest", processes=2)
    )
    assert "resumed from" in r.stdout
    check_run_dir(out, steps=3, processes=2)


def test_teacher_targets_only_with_unlabeled_faces(data: dict[str, Path], tmp_path: Path) -> None:
    extra = data["base"] / "unlabeled"
    if not extra.exists():
        make_identity_folders(extra, n_identities=2, per_identity=2, size=32)
    out = tmp_path / "kd1"
    args = [*distill_args(data, out, 1), "--kd-weight", "1", "--unlabeled-dir", str(extra)]
    assert main(args) == 0
    m = read_json(out / "metrics.json")
    assert m["kd_weight"] == 1.0 and m["info_recipe"]["unlabeled_dir"] == str(extra)


def test_bad_input(data: dict[str, Path], tmp_path: Path, capsys: Any) -> None:
    # an attribute row with the wrong number of columns: file and line named
    broken = tmp_path / "celeba_broken"
    shutil.copytree(data["root"], broken)
    attr = broken / "celeba" / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[4] = lines[4].rsplit(" ", 1)[0]  # drop the last attribute of the third image
    attr.write_text("\n".join(lines) + "\n")
    args = distill_args(data, tmp_path / "x", 1)
    args[1] = str(broken)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "list_attr_celeba.txt, line 5: expected an image name and 40 values, got 39" in err

    # a teacher whose head is not the 40 attributes
    from tests.test_recipes_common import TINY_TEACHER_OPTIONS, save_teacher

    t10 = save_teacher(tmp_path / "t10.safetensors", 10)
    args = distill_args(data, tmp_path / "y", 1)
    args[3] = f"file:{t10}"
    assert main([*args, "--teacher-options", TINY_TEACHER_OPTIONS]) == 2
    assert "has 10 outputs but celeba has 40 attributes" in capsys.readouterr().err

    # a missing data dir shows the CelebA layout
    args = distill_args(data, tmp_path / "z", 1)
    args[1] = str(tmp_path / "nowhere")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "list_eval_partition.txt" in err and "img_align_celeba" in err


# ------------------------------------------------------------------ missing annotations


@pytest.fixture(scope="module")
def celeba_missing(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A CelebA whose list_attr_celeba.txt writes 0 for about 30% of the attributes (not
    annotated), as `tests.test_metrics_references.write_missing` plants them."""
    import numpy as np

    from tests.test_metrics_references import write_missing

    root = tmp_path_factory.mktemp("celeba_missing_recipe") / "data"
    info = make_celeba(root, n=24, size=(24, 30), splits=(16, 4, 4))
    values = write_missing(info["base"] / "list_attr_celeba.txt", np.random.default_rng(5))
    return root, values


def scratch_args(root: Path, out: Path, steps: int = 1) -> list[str]:
    return [
        "--data-dir",
        str(root),
        "--method",
        "multilabel_bce",
        "--missing-label",
        "-1",
        *tiny_args(out, steps=steps),
    ]


def test_missing_annotations_train_and_evaluate(celeba_missing, tmp_path: Path) -> None:
    root, _ = celeba_missing
    with pytest.warns(UserWarning, match="no known positive label"):
        assert main(scratch_args(root, tmp_path / "run")) == 0
    m = read_json(tmp_path / "run" / "metrics.json")
    assert set(m["metrics"]) == {"mAP", "mean_acc"} and m["info_recipe"]["missing_label"] == -1


def test_missing_annotations_reach_the_evaluator(celeba_missing, tmp_path: Path) -> None:
    """The recipe's eval loader and objective, through the evaluator the Distiller makes
    (`make_evaluator(task, objective)`), against sklearn on the attribute file itself."""
    import contextlib

    import numpy as np
    import torch

    from distill.evaluation import evaluate_loader, make_evaluator, student_net
    from recipes._config import parse_config
    from recipes._run import Context
    from recipes.face_attributes import FaceAttributesConfig, build
    from tests.test_metrics_references import reference_map

    root, values = celeba_missing
    cfg, _ = parse_config(FaceAttributesConfig, scratch_args(root, tmp_path / "x"))
    built = build(cfg, Context(cfg, None, 4, 4))
    assert built.objective.missing_label == -1
    built.student.eval()
    net = student_net(built.student)

    class CPU:  # what evaluate_loader needs of an Accelerator, on one process
        device = torch.device("cpu")
        autocast = staticmethod(contextlib.nullcontext)
        gather_for_metrics = staticmethod(lambda x: x)

    with torch.no_grad():
        scores = torch.cat([net(b["input"], None) for b in built.eval_loader]).double().numpy()
    evaluator = make_evaluator(built.task, built.objective)
    with pytest.warns(UserWarning, match="no known positive label"):
        got = evaluate_loader(net, built.eval_loader, evaluator, accelerator=CPU())
    ref_map, ref_acc = reference_map(values[16:20], scores)  # the valid partition: rows 17-20
    assert np.isfinite(ref_map) and got["mAP"] == pytest.approx(ref_map, abs=1e-9)
    assert got["mean_acc"] == pytest.approx(ref_acc, abs=1e-9)


def test_teacher_stage_refuses_a_resolution_it_would_ignore(
    data: dict[str, Path], tmp_path: Path, capsys: Any
) -> None:
    args = [
        "--stage", "teacher", "--data-dir", str(data["root"]),
        "--teacher", "torchvision:mobilenet_v3_small weights=none input_size=32",
        *tiny_args(tmp_path / "t", steps=1),
    ]  # fmt: skip
    args[args.index("--resolution") + 1] = "64"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "trains the teacher at its own input size (32 px" in err and "input_size=64" in err
