"""No import circles between bonecluster's modules (issue 20).

The module graph is read from the source files with :mod:`ast` (nothing is imported, so this is
fast and needs no torch): every ``import`` and ``from ... import`` statement counts, including
those inside functions, since a lazy import is how a circle hides. Edges:

* ``import bonecluster.x.y`` and ``from bonecluster.x.y import name`` -> ``bonecluster.x.y``
  (for a package, its ``__init__``);
* ``from bonecluster.x import y`` where ``y`` is a submodule -> ``bonecluster.x.y`` (other
  names -> ``bonecluster.x``);
* relative imports are resolved against the importing module's package.

Importing ``bonecluster.x.y`` also runs the package ``bonecluster.x``; that implicit edge is not
counted (a package's ``__init__`` importing its own submodules would otherwise always be a
circle, and Python handles it). A circle is a strongly connected component of more than one
module.

Print the graph and its circles with ``python tests/unit/test_imports.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "bonecluster"


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every ``.py`` under ``src/<package>`` (``__init__.py`` is
    the package itself)."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(src: Path = SRC, package: str = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its file}."""
    files = module_files(src, package)
    return {name: _imports(name, path, files) for name, path in files.items()}


def _imports(name: str, path: Path, modules) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rpartition(".")[0]   # the package relative imports start from
    found: set[str] = set()

    def add(target: str) -> None:
        # the longest prefix that is one of our modules ("bonecluster.x.y.attr" -> "bonecluster.x.y")
        while target and target not in modules:
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                module = ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                add(sub if sub in modules else module)
    return found


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (edges to unknown nodes are ignored),
    each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
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
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One circle through the component's first module: [a, b, ..., a] (shortest, by BFS)."""
    start, members = component[0], set(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise ValueError(f"{component} is not strongly connected")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One named circle per strongly connected component of more than one module."""
    return [cycle_in(c, graph) for c in strongly_connected(graph) if len(c) > 1]


def _describe(cycles: list[list[str]]) -> str:
    return "\n".join(" -> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------- the tests


def test_no_import_circles_in_the_package():
    graph = import_graph()
    assert len(graph) > 20 and "bonecluster.cli" in graph   # the walk found the package
    cycles = find_cycles(graph)
    assert not cycles, "import circles (break each one; lazy imports inside functions count):\n" + _describe(cycles)


def test_the_cycle_finder_on_a_hand_made_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"a", "e"},
             "f": {"g"}, "g": {"f"}}
    assert strongly_connected(graph) == [["a", "b", "c"], ["d"], ["e"], ["f", "g"]]
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["f", "g", "f"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []
    assert find_cycles({}) == []


def test_the_walker_sees_lazy_relative_and_submodule_imports(tmp_path):
    files = {
        "pkg/__init__.py": "from pkg.sub import c\n",
        "pkg/a.py": "import os\n\ndef f():\n    from pkg.b import g   # lazy\n    return g\n",
        "pkg/b.py": "from .a import f\n\ndef g():\n    return f\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/c.py": "from .. import a\nfrom pkg.sub import d\nimport pkg.b as bee\n",
        "pkg/sub/d.py": "from pkg import sub\nfrom . import CONSTANT\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.sub.c"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.sub": set(),
                     "pkg.sub.c": {"pkg.a", "pkg.b", "pkg.sub.d"}, "pkg.sub.d": {"pkg.sub"}}
    assert find_cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]


def loaded_with(module: str, graph: dict[str, set[str]]) -> set[str]:
    """Every module that importing ``module`` loads: its imports, transitively, plus the package
    ``__init__`` above each (Python runs ``bonecluster.x`` before ``bonecluster.x.y``)."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m in seen or m not in graph:
            continue
        seen.add(m)
        todo.extend(graph[m])
        todo.extend(m.rsplit(".", n)[0] for n in range(1, m.count(".") + 1))   # its parent packages
    return seen


# Data flows one way (docs/DEVELOPING.md): what reads a finished run never loads the training code.
READS_A_RUN = ["bonecluster.predict", "bonecluster.evaluate", "bonecluster.report", "bonecluster.export",
               "bonecluster.serve.app", "bonecluster.names", "bonecluster.checkpoint"]
TRAINS = {"bonecluster.engine", "bonecluster.pipeline", "bonecluster.stage2.train", "bonecluster.demo"}


@pytest.mark.parametrize("module", READS_A_RUN)
def test_what_reads_a_run_never_loads_the_training_code(module):
    graph = import_graph()
    loaded = loaded_with(module, graph)
    training = sorted(m for m in loaded if m in TRAINS or m.startswith("bonecluster.methods"))
    assert module in graph and not training, f"{module} loads the training code: {', '.join(training)}"


def test_loaded_with_follows_imports_and_parent_packages():
    graph = {"p": {"p.x"}, "p.x": set(), "p.y": set(), "p.y.z": {"q"}, "q": set(), "r": {"p.y.z"}}
    assert loaded_with("r", graph) == {"r", "p.y.z", "p.y", "p", "p.x", "q"}   # p and p.y run before p.y.z
    assert loaded_with("q", graph) == {"q"}


if __name__ == "__main__":   # print the graph: python tests/unit/test_imports.py
    g = import_graph()
    for module in sorted(g):
        print(f"{module}: {', '.join(sorted(g[module])) or '-'}")
    found = find_cycles(g)
    print(f"\n{len(found)} circle(s)" + (":\n" + _describe(found) if found else ""))
    sys.exit(1 if found else 0)
