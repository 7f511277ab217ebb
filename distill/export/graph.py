"""The two graph formats: ONNX through PyTorch's current exporter (`torch.onnx.export(...,
dynamo=True)`, which runs `torch.export` and translates the graph with onnxscript) and the
`torch.export` archive itself (.pt2, for ExecuTorch-style runtimes). Both have a dynamic batch
axis; both carry the preprocessing in their metadata (ONNX `metadata_props`; the .pt2's
extra file `mobiledistill.json`).

A forward that cannot be traced is an ExportError that names the op (an ATen op ONNX has no
translation for: try `--format pt2`) or the line of the forward (Python control flow on
tensor values: rewrite it with `torch.where`/`torch.cond`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distill.export.check import require
from distill.export.run import ExportError
from distill.files import atomic_path, atomic_write

__all__ = [
    "INPUT_NAME",
    "OUTPUT_NAME",
    "PT2_EXTRA_FILE",
    "explain_trace_failure",
    "export_onnx",
    "export_pt2",
    "onnx_metadata",
    "onnx_session",
    "run_onnx",
    "run_pt2",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PT2_EXTRA_FILE = "mobiledistill.json"
_OP = re.compile(r"\b(?:aten|prims)\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
_USER_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)\n\s+(.+)')


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export and the ONNX exporter print progress and graph dumps; keep them out of
    the user's terminal (failures are re-raised with their message)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)  # torch's loggers set their own levels: disable them all
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def _example(input_size: tuple[int, int, int]) -> Tensor:
    # batch 2: a batch of 1 would let the tracer specialise the batch axis to a constant
    return torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1)},)


def explain_trace_failure(err: BaseException, fmt: str) -> str:
    """A message that names what stopped the export and what to do about it."""
    text = f"{err}\n{err.__cause__ or ''}"
    op = _OP.search(text)
    if op is not None and fmt == "onnx" and "step 3/3" in text:
        return (
            f"the ONNX exporter has no translation for {op.group(0)}, which the student's forward "
            "uses. Export with --format pt2 (torch.export handles every ATen op), replace the op "
            "in the model, or pass a translation to torch.onnx.export(custom_translation_table=...)."
        )
    cause = err.__cause__ or err
    first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    where = _USER_LINE.search(text)
    at = ""
    if where is not None:
        file, line, func, code = where.groups()
        at = f" at {file}:{line} ({func}): `{code.strip()}`"
    hint = (
        " Python control flow on tensor values cannot be exported: use torch.where or torch.cond, "
        "or move the check out of forward()."
        if "data-dependent" in text
        else ""
    )
    other = " --format pt2 traces the same way, so it fails too." if fmt == "onnx" else ""
    return (
        f"torch.export could not trace the student's forward ({type(cause).__name__}: "
        f"{first}){at}.{hint}{other}"
    )


def onnx_metadata(model: Any) -> dict[str, str]:
    """{key: value} of an ONNX model's metadata_props (a ModelProto or a path)."""
    onnx = require("onnx")
    proto = (
        onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    )
    return {p.key: p.value for p in proto.metadata_props}


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int, int],
    metadata: Mapping[str, str],
    opset: int | None = None,
) -> Path:
    """Write `model` (eval mode) as ONNX with a dynamic batch axis and `metadata`."""
    onnx = require("onnx")
    require("onnxscript")
    model.eval()
    try:
        with _quiet():
            program = torch.onnx.export(
                model,
                (_example(input_size),),
                dynamo=True,
                dynamic_shapes=_dynamic_batch(),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                optimize=True,
                report=False,
                verbose=False,
            )
    except Exception as e:
        raise ExportError(explain_trace_failure(e, "onnx")) from e
    assert program is not None
    proto = program.model_proto
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), str(value)
    proto.doc_string = str(metadata.get("description", ""))
    target = Path(path)
    with atomic_path(target) as tmp:
        onnx.save(proto, str(tmp))
    return target


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session; `threads` intra-op threads (None: all cores)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 0 if threads is None else int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_onnx(session: Any, inputs: Tensor, batch_size: int = 64) -> np.ndarray:
    """Outputs (N, K) of an ONNX session on `inputs`, in batches (the batch axis is dynamic)."""
    name = session.get_inputs()[0].name
    x = inputs.float().numpy()
    outs = [
        session.run(None, {name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32, copy=False)


def export_pt2(
    model: nn.Module,
    path: str | Path,
    *,
    input_size: tuple[int, int, int],
    metadata: Mapping[str, str],
) -> Path:
    """Write `torch.export.export(model)` (eval mode, dynamic batch) as a .pt2 archive."""
    model.eval()
    try:
        with _quiet():
            program = torch.export.export(
                model, (_example(input_size),), dynamic_shapes=_dynamic_batch()
            )
    except Exception as e:
        raise ExportError(explain_trace_failure(e, "pt2")) from e
    buf = io.BytesIO()  # torch.export.save wants a name ending in .pt2, or a buffer
    torch.export.save(program, buf, extra_files={PT2_EXTRA_FILE: json.dumps(dict(metadata))})
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


@torch.no_grad()
def run_pt2(path: str | Path, inputs: Tensor, batch_size: int = 64) -> tuple[np.ndarray, dict]:
    """Load a .pt2 archive back and run it: (outputs (N, K), its metadata)."""
    extra = {PT2_EXTRA_FILE: ""}
    program = torch.export.load(str(path), extra_files=extra)
    module = program.module()
    outs = [module(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    meta = json.loads(extra[PT2_EXTRA_FILE]) if extra[PT2_EXTRA_FILE] else {}
    return torch.cat(outs).float().numpy(), meta
