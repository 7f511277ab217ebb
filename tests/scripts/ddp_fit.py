"""Launched by tests with `accelerate launch`: a tiny distillation run on N gloo ranks.

--after-fit: evaluate after fit() and fit() once more (same Distiller, twice the steps), print
    one JSON line of what each returned (main process).
--poison-rank R --poison-step S: loss part "kd" is NaN at optimizer step S on rank R only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distill import Distiller, DistillerConfig
from distill.losses import KDLoss
from tests.scripts.faulty_recipe import PoisonedObjective
from tests.test_distiller import NoisyImages, tiny_student, tiny_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("output_dir")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--after-fit", action="store_true")
    ap.add_argument("--poison-rank", type=int, default=None)
    ap.add_argument("--poison-step", type=int, default=0)
    args = ap.parse_args()
    student = tiny_student()
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    cfg = DistillerConfig(
        output_dir=args.output_dir,
        epochs=args.epochs,
        resume=args.resume,
        progress=False,
        log_every=1,
    )
    objective: nn.Module = KDLoss(temperature=2.0, alpha=0.7)
    d = Distiller(student, tiny_teacher(), objective, opt, config=cfg)
    if args.poison_rank == d.accelerator.process_index:
        d.objective = d.step_module.objective = PoisonedObjective(objective, args.poison_step, "kd")
    evals = DataLoader(NoisyImages(16), batch_size=8)
    final = d.fit(DataLoader(NoisyImages(), batch_size=8, shuffle=True), evals)
    assert not isinstance(d.teacher, nn.parallel.DistributedDataParallel)
    if not args.after_fit:
        return
    record = Path(args.output_dir) / "metrics.json"
    first = {"steps": d.progress.step, "metrics": json.loads(record.read_text())["metrics"]}
    again = d.evaluate(evals)
    d.config.epochs *= 2  # the same Distiller trains on: its run goes on in its folder
    d.fit(DataLoader(NoisyImages(), batch_size=8, shuffle=True), evals)
    if d.accelerator.is_main_process:
        result = {
            "fit": final,
            "evaluate": again,
            "metrics_json": first["metrics"],
            "first_fit_steps": first["steps"],
            "second_fit_steps": json.loads(record.read_text())["steps"],
        }
        print(json.dumps(result))
    d.accelerator.end_training()


if __name__ == "__main__":
    main()
