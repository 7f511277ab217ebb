"""What a finished run leaves in its `output_dir`, written in one place:

output_dir/
    checkpoints/step_XXXXXXXX/   distill.checkpoint
    config.json                  the logged config (written when training starts)
    metrics.json                 the run record (distill.run_record)
    student.safetensors          the trained student's weights
    skipped.json                 the unreadable images met, when there were any
"""

from __future__ import annotations

import errno
import json
import sys
from pathlib import Path
from typing import Any

from torch import nn

from distill.data.skipping import SkipLog
from distill.files import write_json_atomic
from distill.run_record import RunRecord, write_run_record
from distill.tracking import log_run_summary

__all__ = ["export_student", "read_metrics", "write_outputs"]


def export_student(student: nn.Module, path: Path) -> None:
    """Write the student's weights as safetensors (atomically)."""
    from distill.serialization import save_safetensors

    save_safetensors(student.state_dict(), path)


def write_outputs(
    accelerator: Any,
    output_dir: Path,
    record: RunRecord,
    *,
    student: nn.Module | None,
    skipped: SkipLog,
) -> dict[str, Any]:
    """On the main process: the skip report (printed and skipped.json), student.safetensors
    (unless `student` is None), metrics.json, and the trackers' summary. Returns the record as
    written (every process gets the record's dict)."""
    if not accelerator.is_main_process:
        return record.to_dict()
    try:
        if skipped.total:
            print(skipped.report(), file=sys.stderr)
            write_json_atomic(output_dir / "skipped.json", skipped.to_dict())
        if student is not None:
            export_student(student, output_dir / "student.safetensors")
        written = write_run_record(output_dir / "metrics.json", record)
    except OSError as e:
        raise _outputs_failed(e, output_dir) from e
    if accelerator.log_with:
        log_run_summary(accelerator, written)
    return written


def _outputs_failed(err: OSError, output_dir: Path) -> Exception:
    """Training is done and checkpointed; only the outputs are missing: say how to get them."""
    from distill.checkpoint import CheckpointError, find_latest

    what = "the disk is full" if err.errno in (errno.ENOSPC, errno.EDQUOT) else str(err)
    last = find_latest(output_dir / "checkpoints")
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
    return CheckpointError(
        f"training finished, but its outputs (student.safetensors, metrics.json) could not be "
        f"written: {what}. Nothing written before was lost; {where}. Free some space and rerun "
        "with --resume latest (resume='latest'): it evaluates that checkpoint and writes them."
    )


def read_metrics(path: str | Path) -> dict[str, Any]:
    """Load a run's metrics.json as it is (`distill.run_record.read_metrics_json` validates)."""
    return dict(json.loads(Path(path).read_text()))
