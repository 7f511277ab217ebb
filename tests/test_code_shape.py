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


def sources(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py"))


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
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


def imports(path: Path, root: Path = ROOT, known: set[str] | None = None) -> set[str]:
    """Project modules `path` imports, at any depth (module or function level)."""
    tree = ast.parse(path.read_text())
    here = module_name(path, root)
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
    if known is None:
        known = {module_name(p, root) for p in sources(root)}
    return {m for m in found if m in known and m != here}


def big_files(paths: list[Path], root: Path = ROOT) -> dict[str, int]:
    return {
        str(p.relative_to(root)): n
        for p in paths
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }


def long_functions(paths: list[Path], root: Path = ROOT) -> dict[str, int]:
    long = {}
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(root)}:{node.lineno} {node.name}"] = n
    return long


def circles(paths: list[Path], root: Path = ROOT) -> list[list[str]]:
    known = {module_name(p, root) for p in paths}
    graph = {module_name(p, root): imports(p, root, known) for p in paths}
    # a package's __init__ re-exporting its submodules is not a circle through the package
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not (name.startswith(d + ".") and d in graph)}
    found: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                found.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_files_are_small() -> None:
    big = big_files(sources())
    assert not big, f"files over {MAX_FILE_LINES} lines: {big}"


def test_functions_are_short() -> None:
    long = long_functions(sources())
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_import_circles() -> None:
    found = circles(sources())
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("path", [p for p in sources() if module_name(p).startswith("distill")])
def test_distill_never_imports_teachers_or_recipes(path: Path) -> None:
    bad = {m for m in imports(path) if m.split(".")[0] in ("teachers", "recipes")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_shape_checks_can_fail(tmp_path: Path) -> None:
    """The checks above, run on a planted package, find its long file and function and its
    circle through an import inside a function, and not one through TYPE_CHECKING."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FILE_LINES))
    (pkg / "a.py").write_text(f"def late():\n    from pkg import b\n{body}\n")
    (pkg / "b.py").write_text("import pkg.a\n")
    (pkg / "c.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import d\n"
    )
    (pkg / "d.py").write_text("from pkg import c\n")
    paths = sources(tmp_path, ("pkg",))
    assert list(big_files(paths, tmp_path)) == ["pkg/a.py"]
    assert list(long_functions(paths, tmp_path)) == ["pkg/a.py:1 late"]
    assert circles(paths, tmp_path) == [["pkg.a", "pkg.b", "pkg.a"]]
