"""The package's layers only point down: utils <- quant <- callbacks, ptq <- app.

Every ``import``/``from ... import`` of a ``flatq_lightning`` module in the package's source is an edge, at module
level or inside a function; a new upward edge (``quant`` importing ``callbacks``, ``ptq`` importing ``app``...) or
a cycle between two modules fails here, in CI.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "flatq_lightning"

#: part -> the parts it may import (besides itself); the package root may import anything
ALLOWED: dict[str, set[str]] = {
    "utils": set(),
    "quant": {"utils"},
    "callbacks": {"quant", "utils"},
    "ptq": {"quant", "utils"},
    "app": {"callbacks", "ptq", "quant", "utils"},
}
ROOT = {"flatq_lightning"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_edges() -> list[tuple[str, str, int]]:
    """``(importer, imported module, line)`` for every flatq_lightning import in the package."""
    edges = []
    for path in sorted(PKG.rglob("*.py")):
        mod = _module_name(path)
        pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
                if target.startswith("flatq_lightning"):
                    # "from . import x" imports the submodule x when there is one
                    subs = [n for n in names if (PKG.parent / Path(*n.split("."))).with_suffix(".py").exists()
                            or (PKG.parent / Path(*n.split("."))).is_dir()]
                    for t in subs or [target]:
                        edges.append((mod, t, node.lineno))
            elif isinstance(node, ast.Import):
                edges += [(mod, a.name, node.lineno) for a in node.names if a.name.startswith("flatq_lightning")]
    return edges


def _part(mod: str) -> str:
    if mod in ROOT:
        return "root"
    return mod.split(".")[1]


def test_the_parts_are_known():
    parts = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert parts == set(ALLOWED), "a new part needs its place in ALLOWED"
    loose = {p.name for p in PKG.glob("*.py")} - {"__init__.py"}
    assert not loose, f"modules outside every part: {sorted(loose)}"


def test_no_upward_import():
    bad = []
    for src, dst, line in import_edges():
        a, b = _part(src), _part(dst)
        if a == "root" or a == b:
            continue
        if b == "root" or b not in ALLOWED[a]:
            bad.append(f"{src}:{line} imports {dst} ({a} -> {b})")
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in import_edges():
        if src in ROOT or dst in ROOT or src == dst:
            continue
        if src.startswith(dst + "."):  # a module importing its own package's __init__ re-exports
            continue
        graph.setdefault(src, set()).add(dst)
    # a package imports its submodules in __init__; a submodule importing a sibling through the package is an
    # edge to the package, which then reaches the sibling: resolve packages to nothing further than that
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycles.append(stack[stack.index(m):] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)
