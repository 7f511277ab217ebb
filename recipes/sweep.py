"""The paper's width x resolution grid for any recipe and method, cell by cell, then `compare`.

    python recipes/sweep.py --recipe imagenet --method kd --output-dir runs/sweep-imagenet \\
        --launch-args "--num_processes 8 --mixed_precision bf16" \\
        -- --config recipes/configs/imagenet_kd.yaml --data-dir /data/imagenet

runs, one after another, the 16 students of Howard et al. 2017 (Table 7 / Figure 11):
alpha in {1, 0.75, 0.5, 0.25} x resolution in {224, 192, 160, 128} (`--alphas`/`--resolutions`
override the lists). Each cell is

    accelerate launch [LAUNCH_ARGS] recipes/<recipe>.py [RECIPE FLAGS after --] \\
        --method M --alpha A --resolution R --output-dir OUT/<method>-a<A>-r<R> [--resume latest]

and the sweep then writes OUT/report.html with `distill.compare` over every finished cell.

Resumable: a cell whose folder holds a valid metrics.json is skipped; a cell that has
checkpoints but no metrics.json (interrupted) is relaunched with `--resume latest`. Re-running
the same command after a crash or a Ctrl-C finishes the grid.

As a W&B sweep: `--wandb-sweep` writes OUT/sweep.yaml (a grid over alpha x resolution whose
program is this script in one-cell mode: `--alpha A --resolution R`), prints how to start it,
and runs nothing. Creating the sweep needs the network and an API key:

    wandb sweep --project mobiledistill OUT/sweep.yaml   # prints ENTITY/PROJECT/SWEEP_ID
    wandb agent ENTITY/PROJECT/SWEEP_ID                  # on each machine; cells run in turn
    python -m distill compare OUT -o OUT/report.html     # when the agents are done

(`--wandb-create` calls `wandb.sweep` for you.) Pass `--report-to wandb` to the recipe so each
cell logs its run: under an agent it becomes that sweep run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

PAPER_ALPHAS = (1.0, 0.75, 0.5, 0.25)
PAPER_RESOLUTIONS = (224, 192, 160, 128)
# the eval metric each recipe reports (metrics.json "primary_metric"), for the W&B sweep
RECIPE_METRICS = {
    "imagenet": "top1",
    "face_attributes": "mAP",
    "facenet": "verification_acc",
}
# flags the sweep sets per cell: the recipe flags after `--` may not set them
CELL_FLAGS = ("--alpha", "--resolution", "--output-dir", "--resume", "--method")


class SweepError(ValueError):
    """A problem with the sweep's arguments or its output folder; says what to change."""


@dataclass(frozen=True)
class Cell:
    alpha: float
    resolution: int
    method: str | None

    @property
    def name(self) -> str:
        base = f"a{self.alpha:g}-r{self.resolution}"
        return f"{self.method}-{base}" if self.method else base


@dataclass
class CellStatus:
    cell: Cell
    folder: Path
    state: str  # "done" (skipped: finished before), "todo", "resume"

    @property
    def metrics_file(self) -> Path:
        return self.folder / "metrics.json"


# ----------------------------------------------------------------------------- planning


def recipe_script(recipe: str) -> Path:
    """`imagenet` -> recipes/imagenet.py; a path to a .py file is taken as is."""
    path = Path(recipe)
    if path.suffix == ".py":
        if not path.is_file():
            raise SweepError(f"--recipe {recipe}: no such file")
        return path
    script = ROOT / "recipes" / f"{recipe}.py"
    if recipe.startswith("_") or recipe == "sweep" or not script.is_file():
        known = sorted(
            p.stem for p in (ROOT / "recipes").glob("*.py") if not p.stem.startswith("_")
        )
        known = [k for k in known if k != "sweep"]
        raise SweepError(
            f"--recipe {recipe!r} is not a recipe; choose one of {', '.join(known)} "
            "or give a path to a script"
        )
    return script


def check_passthrough(args: Sequence[str]) -> None:
    """The recipe flags may not set what the sweep sets per cell."""
    bad = sorted({a.split("=", 1)[0] for a in args if a.split("=", 1)[0] in CELL_FLAGS})
    if bad:
        raise SweepError(
            f"{', '.join(bad)} after `--` would fight the sweep, which sets them per cell: use "
            "the sweep's --alphas/--resolutions/--method/--output-dir instead"
        )


def plan(
    alphas: Sequence[float], resolutions: Sequence[int], method: str | None, out: Path
) -> list[CellStatus]:
    """Every cell with what is left to do, judged from its folder."""
    from distill.checkpoint import find_latest
    from distill.tracking import MetricsFileError, read_metrics_json

    if not alphas or not resolutions:
        raise SweepError("the grid is empty: give at least one alpha and one resolution")
    cells = []
    for alpha in alphas:
        for resolution in resolutions:
            cell = Cell(float(alpha), int(resolution), method)
            folder = out / cell.name
            status = CellStatus(cell, folder, "todo")
            if status.metrics_file.is_file():
                try:
                    m = read_metrics_json(status.metrics_file)
                except MetricsFileError:
                    m = None  # half-written or foreign: run the cell again (resuming)
                if m is not None:
                    if (m.get("alpha"), m.get("resolution")) != (cell.alpha, cell.resolution):
                        raise SweepError(
                            f"{status.metrics_file} is a run at alpha {m.get('alpha')}, "
                            f"resolution {m.get('resolution')}, not this cell's {cell.alpha}, "
                            f"{cell.resolution}: move it away or choose another --output-dir"
                        )
                    status.state = "done"
            if status.state == "todo" and find_latest(folder / "checkpoints") is not None:
                status.state = "resume"
            cells.append(status)
    return cells


def cell_command(
    script: Path,
    status: CellStatus,
    passthrough: Sequence[str],
    *,
    launcher: str = "accelerate",
    launch_args: Sequence[str] = (),
) -> list[str]:
    """The command that runs one cell."""
    if launcher == "accelerate":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(script)]
    elif launcher == "python":
        cmd = [sys.executable, str(script)]
    else:
        raise SweepError(f"--launcher must be accelerate or python, got {launcher!r}")
    cell = status.cell
    cmd += list(passthrough)
    if cell.method:
        cmd += ["--method", cell.method]
    cmd += [
        "--alpha",
        f"{cell.alpha:g}",
        "--resolution",
        str(cell.resolution),
        "--output-dir",
        str(status.folder),
    ]
    if status.state == "resume":
        cmd += ["--resume", "latest"]
    return cmd


# ----------------------------------------------------------------------------- W&B sweep


def wandb_sweep_config(
    recipe: str,
    out: Path,
    passthrough: Sequence[str],
    *,
    alphas: Sequence[float],
    resolutions: Sequence[int],
    method: str | None,
    launcher: str = "accelerate",
    launch_args: Sequence[str] = (),
    metric: str | None = None,
) -> dict[str, Any]:
    """A W&B grid sweep whose agent runs this script for one cell (`--alpha A --resolution R`),
    so cells land in the same folders, with the same skip/resume rules, as a sequential sweep."""
    metric = metric or RECIPE_METRICS.get(Path(recipe).stem, "top1")
    fixed = ["--recipe", recipe, "--output-dir", str(out), "--launcher", launcher]
    if method:
        fixed += ["--method", method]
    if launch_args:
        fixed += ["--launch-args", shlex.join(launch_args)]
    command: list[str] = ["${env}", "${interpreter}", "${program}", *fixed, "${args}"]
    if passthrough:
        command += ["--", *passthrough]
    return {
        "name": f"{Path(recipe).stem}-{method or 'recipe'}-alpha-x-resolution",
        "description": "MobileNet width x resolution grid (Howard et al. 2017, Figure 11)",
        "program": "recipes/sweep.py",
        "method": "grid",
        "metric": {"name": f"eval/{metric}", "goal": "maximize"},
        "parameters": {
            "alpha": {"values": [float(a) for a in alphas]},
            "resolution": {"values": [int(r) for r in resolutions]},
        },
        "command": command,
    }


def write_sweep_yaml(config: dict[str, Any], path: Path) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False, width=100))


# ----------------------------------------------------------------------------- running


def compare(out: Path, cells: Sequence[CellStatus]) -> Path | None:
    """report.html over every finished cell (None when none finished)."""
    from distill.compare import load_runs, write_report

    done = [c.folder for c in cells if c.metrics_file.is_file()]
    if not done:
        return None
    return write_report(
        load_runs(done), out / "report.html", title=f"alpha x resolution sweep: {out.name}"
    )


def _fmt_metric(path: Path) -> str:
    from distill.tracking import MetricsFileError, read_metrics_json

    try:
        m = read_metrics_json(path)
    except (MetricsFileError, FileNotFoundError):
        return "-"
    key = m["primary_metric"]
    ma = m.get("mult_adds")
    cost = f"{ma / 1e6:.1f}M mult-adds" if ma else ""
    return f"{key} {m['metrics'][key]:.2f}  {cost}".rstrip()


def run_cells(
    script: Path,
    cells: Sequence[CellStatus],
    passthrough: Sequence[str],
    *,
    launcher: str,
    launch_args: Sequence[str],
    keep_going: bool,
    dry_run: bool,
    env: dict[str, str] | None = None,
) -> list[tuple[CellStatus, str]]:
    """Run what is left, in order; returns (cell, outcome) with outcome skipped/done/failed."""
    outcomes: list[tuple[CellStatus, str]] = []
    todo = [c for c in cells if c.state != "done"]
    for status in cells:
        if status.state == "done":
            print(f"[skip] {status.cell.name}: finished before ({status.metrics_file})")
            outcomes.append((status, "skipped"))
    for i, status in enumerate(todo, 1):
        cmd = cell_command(script, status, passthrough, launcher=launcher, launch_args=launch_args)
        verb = "resume" if status.state == "resume" else "run"
        print(f"[{verb} {i}/{len(todo)}] {status.cell.name}: {shlex.join(cmd)}", flush=True)
        if dry_run:
            outcomes.append((status, "planned"))
            continue
        start = time.perf_counter()
        code = subprocess.call(cmd, env=env)
        took = time.perf_counter() - start
        if code == 0 and status.metrics_file.is_file():
            outcomes.append((status, "done"))
            print(f"[done] {status.cell.name} in {took:.0f} s", flush=True)
            continue
        outcomes.append((status, "failed"))
        print(
            f"[fail] {status.cell.name}: exit code {code} after {took:.0f} s"
            + ("" if code else " but no metrics.json was written"),
            file=sys.stderr,
            flush=True,
        )
        if not keep_going:
            print(
                "stopping; fix the problem and run the same command again: finished cells "
                "are skipped and this one resumes from its last checkpoint "
                "(--keep-going runs the other cells anyway)",
                file=sys.stderr,
            )
            break
    return outcomes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="recipes/sweep.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--recipe", required=True, help="imagenet, face_attributes, facenet or a .py")
    p.add_argument("--method", help="the recipe's --method for every cell (kd, dkd, ce, ...)")
    p.add_argument("--output-dir", help="root of the cell folders (default runs/sweep-RECIPE)")
    p.add_argument("--alphas", type=float, nargs="+", default=list(PAPER_ALPHAS))
    p.add_argument("--resolutions", type=int, nargs="+", default=list(PAPER_RESOLUTIONS))
    p.add_argument("--alpha", type=float, help="run only this cell's alpha (W&B agent mode)")
    p.add_argument("--resolution", type=int, help="run only this cell's resolution")
    p.add_argument(
        "--launcher",
        choices=("accelerate", "python"),
        default="accelerate",
        help="accelerate launch (default) or the plain interpreter (one process)",
    )
    p.add_argument(
        "--launch-args",
        default="",
        help='arguments for accelerate launch, e.g. "--num_processes 8 --mixed_precision bf16"',
    )
    p.add_argument("--keep-going", action="store_true", help="run the other cells after a failure")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--no-compare", action="store_true", help="do not write report.html")
    p.add_argument(
        "--wandb-sweep",
        action="store_true",
        help="write OUT/sweep.yaml for `wandb sweep` and print how to start it; run nothing",
    )
    p.add_argument(
        "--wandb-create",
        action="store_true",
        help="with --wandb-sweep: also create the sweep on W&B (needs the network and a key)",
    )
    p.add_argument("--project", default="mobiledistill", help="W&B project for --wandb-create")
    p.add_argument("--entity", help="W&B entity for --wandb-create")
    p.add_argument("--metric", help="eval metric the W&B sweep reports (default: the recipe's)")
    return p


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(sweep args, recipe args): everything after the first `--` goes to the recipe."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    own, passthrough = split_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    try:
        return _main(args, passthrough)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace, passthrough: list[str]) -> int:
    script = recipe_script(args.recipe)
    check_passthrough(passthrough)
    launch_args = shlex.split(args.launch_args)
    out = Path(args.output_dir or f"runs/sweep-{Path(args.recipe).stem}")
    alphas = [args.alpha] if args.alpha is not None else args.alphas
    resolutions = [args.resolution] if args.resolution is not None else args.resolutions
    one_cell = args.alpha is not None or args.resolution is not None

    if args.wandb_sweep:
        config = wandb_sweep_config(
            args.recipe,
            out,
            passthrough,
            alphas=alphas,
            resolutions=resolutions,
            method=args.method,
            launcher=args.launcher,
            launch_args=launch_args,
            metric=args.metric,
        )
        path = out / "sweep.yaml"
        write_sweep_yaml(config, path)
        print(path.read_text())
        print(f"wrote {path}. Start it (needs the network and `wandb login`):")
        print(f"  wandb sweep --project {args.project} {path}")
        print("  wandb agent ENTITY/PROJECT/SWEEP_ID   # one or more machines")
        print(f"  python -m distill compare {out} -o {out / 'report.html'}   # when done")
        if args.wandb_create:
            import wandb

            try:
                sweep_id = wandb.sweep(config, project=args.project, entity=args.entity)
            except Exception as e:
                raise SweepError(
                    f"could not create the W&B sweep ({e}); check `wandb login` and the network, "
                    f"or run `wandb sweep {path}` later"
                ) from e
            print(f"created sweep {sweep_id}: wandb agent {args.entity or 'ENTITY'}/"
                  f"{args.project}/{sweep_id}")  # fmt: skip
        return 0

    cells = plan(alphas, resolutions, args.method, out)
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    print(f"sweep of {script.name}: {len(cells)} cells into {out} "
          f"({sum(c.state == 'done' for c in cells)} finished before, "
          f"{sum(c.state == 'resume' for c in cells)} to resume)")  # fmt: skip
    outcomes = run_cells(
        script,
        cells,
        passthrough,
        launcher=args.launcher,
        launch_args=launch_args,
        keep_going=args.keep_going,
        dry_run=args.dry_run,
        env=dict(os.environ),
    )
    if args.dry_run:
        return 0
    print("\ncell                 outcome   result")
    for status, outcome in outcomes:
        print(f"{status.cell.name:<20} {outcome:<9} {_fmt_metric(status.metrics_file)}")
    failed = [s for s, o in outcomes if o == "failed"]
    if not one_cell and not args.no_compare:
        report = compare(out, cells)
        if report is not None:
            print(f"wrote {report}")
    if failed or len(outcomes) < len(cells):
        left = len(cells) - sum(o in ("done", "skipped") for _, o in outcomes)
        print(f"{left} cell(s) not finished; run the same command again to continue",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
