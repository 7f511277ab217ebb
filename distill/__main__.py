"""`python -m distill COMMAND ...`: each command lives in its own module, imported on demand."""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). A module exposes `main(argv: list[str]) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "profile": ("distill.cli.profile", "mult-adds, parameters and latency of a student"),
    "table": ("distill.cli.table", "the paper's 16-model alpha x resolution grid next to ours"),
    "compare": ("distill.cli.compare", "local report.html from run folders' metrics.json"),
    "report": ("distill.cli.report", "build a W&B Report comparing runs"),
    "cache-teacher": ("distill.cli.cache_teacher", "run a teacher once and store its outputs"),
    "demo": ("distill.cli.demo", "the embedded digits demo: teacher, scratch, distilled"),
    "export": ("distill.cli.export", "ship a run's student: ONNX, INT8, pt2, hf folder, latency"),
}


def _usage() -> str:
    lines = ["usage: python -m distill COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<14} {text}" for name, (_, text) in COMMANDS.items()]
    lines.append("\n`python -m distill COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a command is required: say which there are, and fail like argparse does
        print(f"error: a command is required.\n\n{_usage()}", file=sys.stderr)
        return 2
    if argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}.\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
