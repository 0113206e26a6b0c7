"""The layout shows the flow: no import cycle between kvlab's packages, the simulated engine knows
nothing of the load generator, and stage CLIs share `kvlab.clikit`, not the root CLI.

Every import is counted: at module level and inside functions (a lazy import is still a
dependency), `from kvlab import x` as an import of `kvlab.x`, relative imports resolved.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = SRC / "kvlab"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported kvlab module, line) for every import in the file."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from kvlab import hardware` imports the module kvlab.hardware
                sub = f"{target}.{a.name}"
                out.append((sub if _is_module(sub) else target, node.lineno))
    return [(t, line) for t, line in out if t == "kvlab" or t.startswith("kvlab.")]


def _package(module: str) -> str:
    """kvlab.sim.engine -> kvlab.sim; kvlab.io -> kvlab.io; kvlab -> kvlab."""
    return ".".join(module.split(".")[:2])


def _edges() -> dict[tuple[str, str], list[str]]:
    edges: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        for target, line in _imports(path):
            a, b = _package(module), _package(target)
            if a != b:
                edges[(a, b)].append(f"{path.relative_to(SRC)}:{line} imports {target}")
    return edges


def _cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one package (Tarjan)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
        graph[b]
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    edges = _edges()
    assert ("kvlab.plan", "kvlab.replay") in edges  # a function-level import (plan/probe.py)
    assert ("kvlab.models", "kvlab.hardware") in edges  # `from kvlab import hardware`
    assert _cycles({("a", "b"): [], ("b", "c"): [], ("c", "a"): [], ("c", "d"): []}) == [["a", "b", "c"]]


def test_no_import_cycle_between_packages():
    edges = _edges()
    cycles = _cycles(edges)
    why = [f"{' <-> '.join(c)}: " + "; ".join(site for (a, b), sites in edges.items() if a in c and b in c
                                               for site in sites) for c in cycles]
    assert not cycles, "import cycles between packages:\n" + "\n".join(why)


def test_the_simulated_engine_imports_nothing_of_the_load_generator():
    edges = _edges()
    assert ("kvlab.sim", "kvlab.loadtest") not in edges, edges.get(("kvlab.sim", "kvlab.loadtest"))
    assert ("kvlab.sim", "kvlab.replay") not in edges


def test_only_the_entry_point_imports_the_root_cli():
    users = {site for (a, b), sites in _edges().items() if b == "kvlab.cli" for site in sites}
    assert {s.split(":")[0] for s in users} == {"kvlab/__main__.py"}, users
