"""kvtool's import graph has no cycle — read from every import statement, including those inside functions
(which import-linter also sees, but a lazy import is where a cycle would hide)."""

from __future__ import annotations

import ast
from pathlib import Path

import kvtool

ROOT = Path(kvtool.__file__).parent


def modules() -> dict[str, Path]:
    """Every module of kvtool by dotted name (a package by its ``__init__.py``)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The kvtool module ``name`` refers to (a name inside a module resolves to that module)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The kvtool modules ``module`` imports anywhere in its source. ``from a import b`` is an import of
    ``a.b`` when that is a module, else of ``a`` (as import-linter counts them)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "kvtool" and (hit := _resolve(target, known)) and hit != module:
                found.add(hit)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_graph_reads_imports_inside_functions() -> None:
    edges = graph()
    assert "kvtool.plan" in edges["kvtool.cli.plan"]  # imported inside the command function
    assert "kvtool.codecs.planfile" in edges["kvtool.compress"]
    assert "kvtool.measure" in edges["kvtool.sweep"] and "kvtool.compress" not in edges["kvtool.sweep"]


def test_cycles_are_found() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_kvtool_has_no_import_cycle() -> None:
    edges = graph()
    found = cycles(edges)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(edges[a] & set(c))}" for a in c) + ")"
                       for c in found)
    assert not found, f"import cycles: {detail}"


def test_runners_do_not_depend_on_the_planner() -> None:
    """The plan file is a low data type; only the CLI and nothing else reaches the planner."""
    edges = graph()
    users = sorted(m for m, targets in edges.items() if "kvtool.plan" in targets)
    assert users == ["kvtool.cli.plan"]
