"""The layering of DESIGN.md, checked statically: no import cycles, clients/ and strategies/ never
import each other, and the library imports Flower only in its CLI.

Parses every module with :mod:`ast` (imports inside functions count too); runs no import.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedistill", "clients", "strategies", "protocol")

# Cycles still to break, each tracked as its own piece of work (none now: issue 16 broke
# the last, engines.teacher/evaluation/ranking/softlabel, with fedistill/training.py).
ALLOWED_CYCLES: list[set[str]] = []


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path, module: str) -> set[str]:
    """Every absolute module name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imports between project modules, all imported names) per project module."""
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    raw = {m: _imported(p, m) for m, p in files.items()}
    graph: dict[str, set[str]] = {}
    for m, names in raw.items():
        deps = set()
        for name in names:
            while name and name not in files:
                name = name.rpartition(".")[0]
            # a package's __init__ re-exporting its own submodules is no cycle
            own = files[m].name == "__init__.py" and name.startswith(m + ".")
            if name and name != m and not own:
                deps.add(name)
        graph[m] = deps
    return graph, raw


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(comp)
    return found


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [{"a", "b", "c"}]


def test_no_import_cycles():
    graph, _ = _graph()
    cycles = _cycles(graph)
    new = [sorted(c) for c in cycles if c not in ALLOWED_CYCLES]
    assert not new, "import cycles: " + "; ".join(" <-> ".join(c) for c in new)
    stale = [sorted(c) for c in ALLOWED_CYCLES if c not in cycles]
    assert not stale, f"allowed cycles that are gone (remove them from ALLOWED_CYCLES): {stale}"


def test_clients_and_strategies_never_import_each_other():
    graph, _ = _graph()
    bad = [
        f"{m} -> {d}"
        for m, deps in sorted(graph.items())
        for d in sorted(deps)
        if {m.split(".")[0], d.split(".")[0]} == {"clients", "strategies"}
    ]
    assert not bad, "client/server imports (share code through protocol/ or fedistill/): " + ", ".join(bad)


def test_the_library_never_imports_the_flower_layer_or_flower():
    graph, raw = _graph()
    up = [
        f"{m} -> {d}"
        for m, deps in sorted(graph.items())
        if m.startswith("fedistill") and m != "fedistill.cli"
        for d in sorted(deps)
        if d.split(".")[0] in ("clients", "strategies")
    ]
    assert not up, "the library imports the Flower layer: " + ", ".join(up)
    flwr = [
        m
        for m, names in sorted(raw.items())
        if (m == "fedistill" or m.startswith("fedistill.")) and m != "fedistill.cli"
        if any(n == "flwr" or n.startswith("flwr.") for n in names)
    ]
    assert not flwr, f"Flower imported in the library (only fedistill/cli.py may): {flwr}"


def test_the_protocol_depends_on_neither_side():
    graph, _ = _graph()
    bad = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("protocol") for d in deps]
    bad = [b for b in bad if b.split(" -> ")[1].split(".")[0] in ("clients", "strategies")]
    assert not bad, bad
