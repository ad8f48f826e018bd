"""The import graph of vgpu_launch: no cycles, counting imports inside functions, and the
entry point imported by nobody.

Every module is parsed with ``ast`` (nothing is imported), so a lazy import that hides a cycle
from the interpreter is still an edge here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "vgpu_launch"


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".")
    if not is_package:
        base.pop()  # a module's own package is one level up; a package's is itself
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, *([target] if target else [])])


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its text.

    ``from X import name`` is an edge to ``X.name`` when that is a module, else to ``X``.
    Importing ``a.b`` also runs ``a/__init__``, but that is not counted as a dependency
    of the importer: only the module named is."""
    modules = _modules(root)
    top = root.name
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for t in targets:
                if t == top or t.startswith(top + "."):
                    while t not in modules:  # a name inside a module: the module
                        t = t.rpartition(".")[0]
                    if t != name:
                        graph[name].add(t)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Every strongly connected component of more than one module (Tarjan): the modules
    that import each other around one or more circles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _cycle_in(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """One cycle through a strongly connected component, start repeated at the end."""
    start = min(comp)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in comp)
        back = [w for w in nxt if w in seen]
        if back:
            return [*path[path.index(back[0]) :], back[0]]
        path.append(nxt[0])
        seen.add(nxt[0])


def test_no_import_cycle() -> None:
    """No two modules of vgpu_launch import each other, directly or around a circle, even
    through imports inside functions."""
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(
        f"{' -> '.join(_cycle_in(graph, c))} (all of {', '.join(sorted(c))})" for c in cycles
    )


def test_nothing_imports_the_entry_point() -> None:
    """cli is the top of the graph: only ``python -m vgpu_launch`` (__main__) imports it."""
    graph = import_graph()
    importers = sorted(m for m, deps in graph.items() if "vgpu_launch.cli" in deps)
    assert importers == ["vgpu_launch.__main__"]


def test_the_option_schema_is_a_leaf() -> None:
    """options imports nothing of vgpu_launch but the error types and deps (for --version),
    and deps nothing but the error types and the version: both can be imported by anything."""
    graph = import_graph()
    assert graph["vgpu_launch.options"] <= {"vgpu_launch.errors", "vgpu_launch.deps"}
    assert graph["vgpu_launch.deps"] <= {"vgpu_launch", "vgpu_launch.errors"}


def test_the_checker_sees_lazy_cycles(tmp_path: Path) -> None:
    """A cycle hidden by an import inside a function, through a relative import from a
    subpackage, is found (a control for the tests above)."""
    pkg = tmp_path / "vgpu_launch"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import a\n    return a\n")
    (pkg / "c.py").write_text("from .sub.b import f\n")
    graph = import_graph(pkg)
    assert graph["vgpu_launch.a"] == {"vgpu_launch.sub.b"}
    assert graph["vgpu_launch.sub.b"] == {"vgpu_launch.a"}
    assert graph["vgpu_launch.c"] == {"vgpu_launch.sub.b"}
    assert find_cycles(graph) == [{"vgpu_launch.a", "vgpu_launch.sub.b"}]
    assert _cycle_in(graph, {"vgpu_launch.a", "vgpu_launch.sub.b"}) == [
        "vgpu_launch.a",
        "vgpu_launch.sub.b",
        "vgpu_launch.a",
    ]
