"""The code keeps the shape CONTRIBUTING.md promises: small files, short functions, no import
circles (imports inside functions count), and `distill` never imports `teachers` or `recipes`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("distill", "teachers", "recipes")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def _walk(tree: ast.AST) -> list[ast.AST]:
    """Every node, except the bodies of `if TYPE_CHECKING:` (imports that never run)."""
    out: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if not _type_checking(node):
            todo.extend(ast.iter_child_nodes(node))
    return out


def imports(path: Path) -> set[str]:
    """Project modules `path` imports, at any depth (module or function level)."""
    tree = ast.parse(path.read_text())
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    known = {module_name(p) for p in sources()}
    return {m for m in found if m in known and m != here}


def test_files_are_small() -> None:
    big = {
        str(p.relative_to(ROOT)): n
        for p in sources()
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not big, f"files over {MAX_FILE_LINES} lines: {big}"


def test_functions_are_short() -> None:
    long = {}
    for p in sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_import_circles() -> None:
    graph = {module_name(p): imports(p) for p in sources()}
    # a package's __init__ re-exporting its submodules is not a circle through the package
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (name.startswith(d + ".") and d in graph)}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("path", [p for p in sources() if module_name(p).startswith("distill")])
def test_distill_never_imports_teachers_or_recipes(path: Path) -> None:
    bad = {m for m in imports(path) if m.split(".")[0] in ("teachers", "recipes")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_shape_checks_can_fail(tmp_path: Path) -> None:
    """The checks above see what they are meant to see: a long function and a circle."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    tree = ast.parse(f"def f():\n{body}\n")
    fn = tree.body[0]
    assert isinstance(fn, ast.FunctionDef)
    assert (fn.end_lineno or 0) - fn.lineno + 1 > MAX_FUNCTION_LINES
    assert "distill.files" in imports(ROOT / "distill" / "checkpoint.py")
