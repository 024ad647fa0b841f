"""The package's shape: imports only go one way, no module is too big or too tangled.

Every module under normcli/ is read as source (nothing is imported): the import graph
between normcli's own modules must have no cycle and nothing may import the entry point;
no file may pass 400 lines; radon must find no function of cyclomatic complexity over 15,
none over 60 lines, and every file in maintainability rank A.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from radon.complexity import cc_visit
from radon.metrics import mi_rank, mi_visit

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "normcli"


MAX_FILE_LINES = 400
MAX_COMPLEXITY = 15
MAX_FUNCTION_LINES = 60
ENTRY = "normcli.entry"
ENTRY_IMPORTERS = {"normcli.__main__"}  # `python -m normcli`: the entry point's other door


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
FILES = sorted(str(p.relative_to(ROOT)) for p in MODULES.values())


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> set[str]:
    """The normcli modules an import statement loads (a package's own modules by name)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    base = node.module or ""
    if node.level:  # relative: from the module's package, `level` steps up
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([base] if base else [])])
    found = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    if base in MODULES and len(found) < len(node.names):
        found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the normcli modules it imports anywhere in its source (functions included:
    a deferred import is still a dependency)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _targets(node, module, is_package)
        graph[module] = edges - {module, "normcli"}  # the top package holds the version only
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_import_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "normcli.checkpoint" in graph["normcli.train"]  # from normcli.x import y
    assert "normcli.parallel" in graph["normcli.cli.train"]  # from normcli import x
    assert "normcli.cli" in graph["normcli.entry"]  # inside a function
    assert "normcli.cli.options" in graph["normcli.cli"]  # a package's own modules


def test_the_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_nothing_imports_the_entry_point() -> None:
    importers = {m for m, edges in import_graph().items() if ENTRY in edges}
    assert importers <= ENTRY_IMPORTERS, f"{sorted(importers - ENTRY_IMPORTERS)} import {ENTRY}"


def test_runtime_is_a_leaf() -> None:
    assert import_graph()["normcli.runtime"] <= {"normcli.errors"}


@pytest.mark.parametrize("file", FILES)
def test_file_size(file: str) -> None:
    lines = len((ROOT / file).read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_FILE_LINES, f"{file}: {lines} lines"


def _functions(blocks: list) -> list:
    """Every function radon found: methods and closures included."""
    found = []
    for block in blocks:
        inner = [*getattr(block, "methods", []), *getattr(block, "closures", [])]
        inner += getattr(block, "inner_classes", [])
        if not hasattr(block, "methods"):  # a class's own score is its methods' average
            found.append(block)
        found += _functions(inner)
    return found


@pytest.mark.parametrize("file", FILES)
def test_functions_are_small_and_simple(file: str) -> None:
    problems = []
    for fn in _functions(cc_visit((ROOT / file).read_text(encoding="utf-8"))):
        length = fn.endline - fn.lineno + 1
        if fn.complexity > MAX_COMPLEXITY:
            problems.append(f"{fn.name} (line {fn.lineno}): complexity {fn.complexity}")
        if length > MAX_FUNCTION_LINES:
            problems.append(f"{fn.name} (line {fn.lineno}): {length} lines")
    assert not problems, f"{file}: " + "; ".join(problems)


@pytest.mark.parametrize("file", FILES)
def test_maintainability_rank_a(file: str) -> None:
    score = mi_visit((ROOT / file).read_text(encoding="utf-8"), multi=True)
    assert mi_rank(score) == "A", f"{file}: maintainability index {score:.1f}"
