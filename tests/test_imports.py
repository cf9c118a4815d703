"""The project's import graph: no cycles, and the layering of ARCHITECTURE.md.

The graph is read from the AST of every .py file of our packages, so an import hidden in a
function body counts as much as one at the top of a module: a function-level import does not
break a circle, it only delays it to the first call (``Engine.forward`` once measured a
hardware profile through one). Imports under ``if TYPE_CHECKING:`` never run and do not count.

Edges: ``import a.b`` -> ``a.b``; ``from a import b`` -> ``a.b`` when that is a module, else
``a``; relative imports are resolved against the importing module. A module does not depend on
its parent package by being inside it (Python runs the parent's ``__init__`` first, but that
edge is the package's own, from its ``__init__`` imports).
"""
from __future__ import annotations

import ast
import concurrent.futures as cf
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("offload", "storage", "planner", "gpu_kernels", "cpu_kernels")

# (package, top-level names it must never import, why): ARCHITECTURE.md, "who may import whom".
LAYERING = [
    ("planner", ("torch", "storage", "offload"), "the planner is plain data and an LP"),
    ("storage", ("offload", "planner"), "storage is mechanism; it exchanges plain data with the planner"),
    ("gpu_kernels", ("offload", "storage", "planner"), "kernels import none of our other packages"),
    ("cpu_kernels", ("offload", "storage", "planner"), "kernels import none of our other packages"),
]

Graph = Mapping[str, Mapping[str, int]]  # module -> {imported module: line of the first such import}


# ----- reading the graph ---------------------------------------------------------------------------------
def find_modules(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Every module of ``packages`` under ``root``: dotted name -> file (``pkg/__init__.py`` is ``pkg``)."""
    modules: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement under ``node``, at any depth, except the bodies of
    ``if TYPE_CHECKING:`` (their ``else`` branches do run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        elif isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield from _import_nodes(ast.Module(body=[stmt], type_ignores=[]))
        else:
            yield from _import_nodes(child)


def imported_names(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """What a module imports: (module named, name taken from it or None, line), with relative
    imports made absolute."""
    is_package = path.name == "__init__.py"
    out: list[tuple[str, str | None, int]] = []
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
            continue
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        out += [(base, alias.name, node.lineno) for alias in node.names]
    return out


def import_graph(root: Path, packages: Iterable[str]) -> dict[str, dict[str, int]]:
    """The import graph among the modules of ``packages`` (imports of anything else dropped)."""
    modules = find_modules(root, packages)
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        for base, name, line in imported_names(module, path):
            if name is not None and f"{base}.{name}" in modules:
                target = f"{base}.{name}"  # from package import submodule
            else:
                # `import a.b.c` names a module; `from a.b import f` depends on a.b. An unknown
                # dotted name falls back to its longest known prefix.
                parts = base.split(".")
                target = next((".".join(parts[:i]) for i in range(len(parts), 0, -1)
                               if ".".join(parts[:i]) in modules), "")
            if target and target != module:
                graph[module].setdefault(target, line)
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None when it is a DAG (depth-first search,
    modules and edges in sorted order so the cycle named is stable)."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = [start]
        on_path = {start}
        stack = [iter(sorted(graph.get(start, {})))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:  # every edge of path[-1] explored: no cycle through it
                finished = path.pop()
                on_path.discard(finished)
                done.add(finished)
                stack.pop()
                continue
            if nxt in on_path:
                return path[path.index(nxt):] + [nxt]
            if nxt in done:
                continue
            path.append(nxt)
            on_path.add(nxt)
            stack.append(iter(sorted(graph.get(nxt, {}))))
    return None


def describe_cycle(graph: Graph, cycle: list[str]) -> str:
    """``a -> b (a line 12) -> a (b line 3)``: each step with the line of its import."""
    steps = [cycle[0]] + [f"{b} ({a} line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps)


def layering_violations(root: Path, package: str, forbidden: Iterable[str]) -> list[str]:
    """``module line N imports X`` for every import of a forbidden top-level package."""
    bad = set(forbidden)
    found = []
    for module, path in find_modules(root, [package]).items():
        for base, _, line in imported_names(module, path):
            if base.split(".")[0] in bad:
                found.append(f"{module} line {line} imports {base}")
    return found


# ----- the project ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    return import_graph(ROOT, PACKAGES)


def test_the_project_has_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {describe_cycle(graph, cycle)}"


def test_the_graph_sees_function_level_imports(graph):
    """A sanity check that the reader is not blind: known edges are there, a function-level
    one included (cli imports the profile command inside ``main``)."""
    assert "offload.tuning.profile_store" in graph["offload.engine_admission"]
    assert "offload.engine" in graph["offload.tuning.engine_probe"]
    assert "offload.tuning.profile" in graph["offload.commands.cli"]
    assert "offload.engine" not in graph["offload.tuning.profile_store"]


@pytest.mark.parametrize("package, forbidden, why", LAYERING, ids=[p for p, _, _ in LAYERING])
def test_layering(package, forbidden, why):
    bad = layering_violations(ROOT, package, forbidden)
    assert not bad, f"{package} must not import {', '.join(forbidden)} ({why}): " + "; ".join(bad)


# ----- the checker itself -------------------------------------------------------------------------------------
SYNTHETIC = [
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {}}, None),
    ({"a": {"b": 1, "c": 1}, "b": {"d": 1}, "c": {"d": 1}, "d": {}}, None),  # a diamond is no cycle
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}, ["a", "b", "c", "a"]),
    ({"a": {"b": 1}, "b": {"c": 1}, "c": {"b": 1}}, ["b", "c", "b"]),
    ({"a": {"a": 1}}, ["a", "a"]),
    ({"x": {}, "a": {"z": 1}, "z": {"a": 1}}, ["a", "z", "a"]),
]


@pytest.mark.parametrize("graph_, cycle", SYNTHETIC)
def test_find_cycle_on_small_graphs(graph_, cycle):
    assert find_cycle(graph_) == cycle


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


PLANTED = {
    "pkg/__init__.py": "from pkg.a import f\n",
    "pkg/a.py": "def f():\n    from pkg import b  # function level: still an edge\n    return b\n",
    "pkg/b.py": ("from typing import TYPE_CHECKING\nimport os\nif TYPE_CHECKING:\n    import pkg.a\n"
                 "else:\n    from . import c\n"),
    "pkg/c.py": "from .sub import d\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/d.py": "from ..b import something\n",
}


def test_checker_finds_a_planted_cycle_through_function_and_relative_imports(tmp_path):
    _write(tmp_path, PLANTED)
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg"] == {"pkg.a": 1}  # the package's __init__ counts
    assert graph["pkg.a"] == {"pkg.b": 2}
    assert graph["pkg.b"] == {"pkg.c": 6}  # TYPE_CHECKING skipped, its else branch kept, os dropped
    assert graph["pkg.c"] == {"pkg.sub.d": 1}
    cycle = find_cycle(graph)
    assert cycle == ["pkg.b", "pkg.c", "pkg.sub.d", "pkg.b"]
    assert describe_cycle(graph, cycle) == ("pkg.b -> pkg.c (pkg.b line 6) -> pkg.sub.d (pkg.c line 1) "
                                            "-> pkg.b (pkg.sub.d line 1)")


def test_checker_passes_once_the_planted_cycle_is_under_type_checking(tmp_path):
    _write(tmp_path, {**PLANTED, "pkg/sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                                 "    from ..b import something\n"})
    assert find_cycle(import_graph(tmp_path, ["pkg"])) is None


def test_layering_check_sees_function_level_imports(tmp_path):
    _write(tmp_path, {"lower/__init__.py": "", "lower/x.py": "import math\ndef f():\n    import torch.nn\n"})
    assert layering_violations(tmp_path, "lower", ["torch"]) == ["lower.x line 3 imports torch.nn"]


# ----- every module on its own ----------------------------------------------------------------------------------
def _import_alone(module: str) -> tuple[str, int, str]:
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    return module, r.returncode, r.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_on_its_own():
    """Each module imports first in a fresh interpreter: an order-dependent import (a circle
    that works only when another module was imported first) fails here. ``__main__`` modules
    are left out: importing one runs the command."""
    modules = sorted(m for m in find_modules(ROOT, PACKAGES) if not m.endswith(".__main__"))
    with cf.ThreadPoolExecutor(2) as pool:  # two cores: one interpreter each
        results = list(pool.map(_import_alone, modules))
    failed = [f"{m} (exit {rc}):\n{err}" for m, rc, err in results if rc != 0]
    assert not failed, "\n\n".join(failed)
