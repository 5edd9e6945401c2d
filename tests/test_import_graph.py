"""The ``aahr_fast`` package has no import cycles (issue 15, item 6).

The graph is built from the source with :mod:`ast`, so it sees every ``import`` statement, including the
ones inside functions (a lazy import hides a cycle from the interpreter's import order, not from a
reader). A node is a module name (``aahr_fast.models.aahr``); an edge ``a -> b`` means the source of ``a``
imports ``b``:

* ``import aahr_fast.x.y`` and ``from aahr_fast.x import y``: an edge to ``aahr_fast.x.y`` where that is
  a module of the package, else to ``aahr_fast.x`` (``y`` is then an attribute of it);
* relative imports are resolved against the importing module's package;
* an import inside ``if TYPE_CHECKING:`` never runs and is left out;
* importing ``aahr_fast.x.y`` also runs the package ``aahr_fast/x/__init__.py`` first; that implicit
  parent edge is not counted (as in import-linter / pydeps), otherwise every package whose
  ``__init__`` re-exports its submodules would be a cycle.

The Triton kernels (top-level ``kernels/``, installed as ``aahr_fast.kernels``) are part of the graph.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "aahr_fast"


def package_modules(repo: Path = REPO) -> dict[str, Path]:
    """``{dotted module name: source file}`` for every ``.py`` file of the package (and ``kernels/``)."""
    out: dict[str, Path] = {}
    roots = [(repo / PACKAGE, PACKAGE)]
    if (repo / "kernels").is_dir() and not (repo / PACKAGE / "kernels").is_dir():
        roots.append((repo / "kernels", f"{PACKAGE}.kernels"))
    for root, prefix in roots:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST):
    """Every Import / ImportFrom node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, int]]:
    """``{module: {imported module of the package: line of the first such import}}``."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        edges: dict[str, int] = {}

        def add(target: str, line: int) -> None:
            if target in modules and target != name:
                edges.setdefault(target, line)

        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
                continue
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not (mod == PACKAGE or mod.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                add(sub if sub in modules else mod, node.lineno)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One concrete cycle ``[a, b, ..., a]`` per strongly connected component with more than one module
    (Tarjan's algorithm, iterative), sorted for a stable message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        sccs.append(sorted(comp))
    cycles = []
    for comp in sorted(sccs):
        members = set(comp)
        start = comp[0]
        # shortest path start -> ... -> start inside the component (BFS)
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt_frontier = []
            for node in frontier:
                for nxt in sorted(graph[node]):
                    if nxt not in members:
                        continue
                    if nxt == start:
                        found = node
                        break
                    if nxt not in prev:
                        prev[nxt] = node
                        nxt_frontier.append(nxt)
                if found is not None:
                    break
            frontier = nxt_frontier
        path = [start]
        node = found
        while node != start:
            path.append(node)
            node = prev[node]
        path.append(start)
        cycles.append([path[0], *reversed(path[1:-1]), start])
    return cycles


def describe_cycle(cycle: list[str], graph: dict[str, dict[str, int]], modules: dict[str, Path],
                   root: Path = REPO) -> str:
    """``a -> b -> a``, then one line per hop with the file (relative to ``root``) and line of the import,
    and, when more modules are tangled with these (same strongly connected component), their names."""
    hops = [f"{a} imports {b} ({modules[a].relative_to(root).as_posix()}:{graph[a][b]})"
            for a, b in zip(cycle, cycle[1:])]
    text = " -> ".join(cycle) + ":\n    " + "\n    ".join(hops)
    tangled = sorted(_reachable(graph, cycle[0]) & _reachable(_reverse(graph), cycle[0]) - set(cycle))
    if tangled:
        text += "\n    also in cycles with these modules: " + ", ".join(tangled)
    return text


def _reverse(graph: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    rev: dict[str, dict[str, int]] = {k: {} for k in graph}
    for a, edges in graph.items():
        for b, line in edges.items():
            rev[b][a] = line
    return rev


def _reachable(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_package_has_no_import_cycle():
    modules = package_modules()
    assert len(modules) > 30 and "aahr_fast.engine" in modules and "aahr_fast.models.aahr" in modules
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    assert not cycles, (f"{len(cycles)} import cycle(s) in the {PACKAGE} package (function-level imports "
                        f"included):\n  " + "\n  ".join(describe_cycle(c, graph, modules) for c in cycles))


# ------------------------------------------------------------------ the checker itself


def _fake_package(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_modules(tmp_path)


def test_the_checker_sees_function_level_relative_and_from_imports(tmp_path):
    modules = _fake_package(tmp_path, {
        "__init__.py": "",
        "a.py": "def f():\n    from aahr_fast import b\n",
        "b.py": "from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "import typing\nif typing.TYPE_CHECKING:\n    import aahr_fast.b\n"
                    "def g():\n    import aahr_fast.a as a\n",
        "d.py": "from aahr_fast.sub.c import g\nfrom aahr_fast import nothing_here\n",
    })
    graph = import_graph(modules)
    assert graph["aahr_fast.a"] == {"aahr_fast.b": 2}
    assert graph["aahr_fast.b"] == {"aahr_fast.sub.c": 1}
    assert graph["aahr_fast.sub.c"] == {"aahr_fast.a": 5}            # the TYPE_CHECKING import is left out
    # no edge to the parent package aahr_fast.sub; an attribute of the package is an edge to its __init__
    assert graph["aahr_fast.d"] == {"aahr_fast.sub.c": 1, "aahr_fast": 2}
    assert find_cycles(graph) == [["aahr_fast.a", "aahr_fast.b", "aahr_fast.sub.c", "aahr_fast.a"]]


def test_the_failure_message_names_the_cycle(tmp_path):
    modules = _fake_package(tmp_path, {"__init__.py": "", "x.py": "import aahr_fast.y\n",
                                       "y.py": "def f():\n    from aahr_fast.x import z\n", "z.py": ""})
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    assert cycles == [["aahr_fast.x", "aahr_fast.y", "aahr_fast.x"]]
    assert describe_cycle(cycles[0], graph, modules, tmp_path) == (
        "aahr_fast.x -> aahr_fast.y -> aahr_fast.x:\n"
        "    aahr_fast.x imports aahr_fast.y (aahr_fast/x.py:1)\n"
        "    aahr_fast.y imports aahr_fast.x (aahr_fast/y.py:2)")


def test_the_message_names_every_module_of_a_tangle(tmp_path):
    modules = _fake_package(tmp_path, {"__init__.py": "", "p.py": "import aahr_fast.q\n",
                                       "q.py": "import aahr_fast.p\nimport aahr_fast.r\n", "r.py": "import aahr_fast.q\n"})
    graph = import_graph(modules)
    cycles = find_cycles(graph)
    assert cycles == [["aahr_fast.p", "aahr_fast.q", "aahr_fast.p"]]
    assert describe_cycle(cycles[0], graph, modules, tmp_path).endswith(
        "also in cycles with these modules: aahr_fast.r")


def test_the_triton_glue_loads_a_kernel_module_it_was_not_given(tmp_path):
    """The glue no longer imports kernel modules; before a family registered, it loads it through the
    dispatcher's plugin import (fresh interpreter, Triton interpreter mode)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = ("import sys; from aahr_fast.ops._triton_glue import _kernels\n"
            "assert 'aahr_fast.kernels.correlation' not in sys.modules\n"
            "m = _kernels('correlation'); print(m.__name__, hasattr(m, 'assemble_correlation'))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["aahr_fast.kernels.correlation", "True"]
