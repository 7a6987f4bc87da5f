"""The package's import graph: `modules/` never imports `methods/`, and no module imports itself back, lazily or not.

Every `import` / `from … import` in src/dwakd counts — module level, inside functions and under TYPE_CHECKING —
because an import circle through a lazy import is still a circle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import dwakd

ROOT = Path(dwakd.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """dwakd module -> the dwakd modules it imports (a `from pkg import name` counts `pkg.name` if it is a module)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            graph[name].update(t for t in targets if t in files and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_the_graph_is_read() -> None:
    graph = import_graph()
    assert "dwakd.interface" in graph["dwakd.modules.cross_attention"]
    assert "dwakd.methods.registry" in graph["dwakd.methods.dskd"]


def test_modules_never_import_methods() -> None:
    upward = {(name, target) for name, targets in import_graph().items() if name.startswith("dwakd.modules")
              for target in targets if target.startswith("dwakd.methods")}
    assert not upward


@pytest.mark.xfail(strict=True, reason="demo/pipeline.py <-> demo/report.py: being removed on the demo branch")
def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
