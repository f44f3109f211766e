"""The architecture's import rules, read from the source (docs/architecture.md draws them).

Layers, bottom up: ``core`` (what router and workers share) <- ``workers``, ``router`` (which
never import each other) <- ``cluster`` (starts them on Ray). ``bench`` and ``tests`` sit on
top. Nothing imports upward, no two modules import each other in a circle (lazy imports
count; imports under ``if TYPE_CHECKING`` do not), the router's wings (``router/<wing>/``)
form no circle either, and neither the base package nor the router import torch or Ray.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("core", "workers", "router", "cluster")
LAYER = {"core": 0, "workers": 1, "router": 1, "cluster": 2}
FORBIDDEN = {"core": {"torch", "ray"}, "router": {"torch", "ray"}, "cluster": {"torch"},
             "workers": set()}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(node) for branch in ast.walk(tree) if isinstance(branch, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(branch.test)
                   for node in ast.walk(branch)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> every module it imports (third-party ones by their dotted names)."""
    graph = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = _module_name(path)
            graph[name] = _imports(path, name) - {name}
    return graph


GRAPH = _graph()


def _top(module: str) -> str:
    return module.split(".")[0]


def _wing(module: str) -> str:
    """``router.<wing>`` for the router's modules, else the top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "router" and len(parts) > 2 else parts[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_covers_every_package():
    assert {_top(m) for m in GRAPH} == set(PACKAGES)
    assert len(GRAPH) > 80


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_from_a_higher_or_sibling_layer(package):
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items() if _top(module) == package
        for target in targets if _top(target) in LAYER and _top(target) != package
        and LAYER[_top(target)] >= LAYER[package])
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_forbidden_library(package):
    wrong = sorted(f"{module} imports {target}"
                   for module, targets in GRAPH.items() if _top(module) == package
                   for target in targets if _top(target) in FORBIDDEN[package])
    assert not wrong, "\n".join(wrong)


def test_no_module_circles():
    assert _cycles(GRAPH) == []


def test_no_circles_between_the_router_wings():
    wings: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        if _top(module) == "router":
            wings.setdefault(_wing(module), set()).update(
                _wing(t) for t in targets if _top(t) == "router" and _wing(t) != _wing(module))
    assert len(wings) >= 8
    assert _cycles(wings) == []


def test_the_rules_catch_a_violation():
    """The checks above see an upward import, a sibling import and a circle."""
    bad = {"core.a": {"router.x"}, "router.x": {"workers.y"}, "workers.y": {"core.a"}}
    assert _cycles(bad) == [["core.a", "router.x", "workers.y"]]
    assert LAYER[_top("router.x")] >= LAYER[_top("core.a")]
