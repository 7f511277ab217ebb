"""tests/FAULTS.md stays in sync with the tests: every test it names exists, and every fault
test is named in it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

HERE = Path(__file__).parent
TABLE = HERE / "FAULTS.md"


def _tests_in(file: Path) -> set[str]:
    tree = ast.parse(file.read_text())
    return {
        n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    }


def test_every_named_test_exists() -> None:
    named = re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", TABLE.read_text())
    assert len(named) > 30
    missing = [f"{f}::{t}" for f, t in named if t not in _tests_in(HERE.parent / f)]
    assert not missing, f"FAULTS.md names tests that do not exist: {missing}"


def test_every_fault_test_is_in_the_table() -> None:
    text = TABLE.read_text()
    files = sorted(HERE.glob("test_faults_*.py"))
    assert len(files) >= 5
    absent = [
        f"tests/{f.name}::{t}"
        for f in files
        if f.name != Path(__file__).name
        for t in sorted(_tests_in(f))
        if f"tests/{f.name}::{t}" not in text
    ]
    assert not absent, f"add these to tests/FAULTS.md: {absent}"
