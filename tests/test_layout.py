"""The house: imports point down (stages -> trainer -> pipeline; in pipeline, wings -> cache -> base),
never sideways between pipeline's wings, and never in a circle (function-level imports included).

Reads the import statements with ``ast``, so it checks what the code says, not what a test run
happened to import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "trainer", "stages")
WINGS = ("pipeline.encoders", "pipeline.inputs", "pipeline.metrics")


def _modules() -> dict[str, Path]:
    mods = {}
    for top in PACKAGES:
        for f in sorted((ROOT / top).rglob("*.py")):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f
    return mods


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    """The project module an import names (``a.b.c`` may be a module or a name inside ``a.b``)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for me, path in mods.items():
        package = me if path.name == "__init__.py" else me.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                found = _resolve(t, mods)
                if found is not None and found != me:
                    graph[me].add(found)
    return graph


def layer(module: str) -> int:
    """Higher layers may import lower ones only."""
    if module.startswith("stages"):
        return 4
    if module.startswith("trainer"):
        return 3
    if module.startswith(WINGS):
        return 2
    if module.startswith("pipeline.cache"):
        return 1
    return 0  # pipeline's base modules (configs, dist) and the package docstring


def _wing(module: str) -> str | None:
    return next((w for w in WINGS if module == w or module.startswith(w + ".")), None)


def test_imports_only_point_down():
    graph = import_graph()
    up = [f"{a} -> {b}" for a, deps in graph.items() for b in deps if layer(b) > layer(a)]
    assert not up, "upward imports:\n" + "\n".join(sorted(up))


def test_pipeline_wings_do_not_import_each_other():
    graph = import_graph()
    sideways = [f"{a} -> {b}" for a, deps in graph.items() for b in deps
                if _wing(a) and _wing(b) and _wing(a) != _wing(b)]
    assert not sideways, "imports between pipeline wings:\n" + "\n".join(sorted(sideways))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
    state: dict[str, int] = {}
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path, state[start] = [start], 1
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
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_checker_sees_cycles_and_upward_imports():
    # the checks above cannot pass vacuously: the graph has the expected shape and the DFS finds cycles
    graph = import_graph()
    assert "pipeline.cache.schema" in graph["pipeline.cache.reader"]
    assert "trainer.models.archs" in graph["trainer.engine"] and "trainer.models.sit" in graph["trainer.models.archs"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("limit", [400])
def test_module_sizes(limit):
    # the style budget, with a little slack: split by responsibility when a module outgrows it
    long = {str(p.relative_to(ROOT)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > limit + 40}
    assert not long, f"modules over ~{limit} lines: {long}"
