"""The import graph of ``src/semiseg``: no circle among modules, no import from a lower layer to a higher one.

The layer order is written down once, in the "Layers" section of ``docs/architecture.md``; this test reads it
from there. Imports are read from the AST at any depth (top level, inside functions, under
``if TYPE_CHECKING:``), so a deferred import cannot hide a dependency.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "semiseg"
ARCHITECTURE = REPO / "docs" / "architecture.md"
ROOT = "semiseg"


def read_layers(text: str) -> list[list[str]]:
    """The fenced ``layers`` block under ``## Layers``: one layer a line, ``name, name: description``, top first."""
    section = text.split("\n## Layers", 1)
    assert len(section) == 2, f"{ARCHITECTURE.name}: no '## Layers' section"
    block = re.search(r"^```layers\n(.*?)^```", section[1], flags=re.S | re.M)
    assert block, f"{ARCHITECTURE.name}: no ```layers block under '## Layers'"
    layers = []
    for line in block.group(1).splitlines():
        if line.strip():
            names, _, _ = line.partition(":")
            layers.append([n.strip() for n in names.split(",") if n.strip()])
    return layers


def module_files(package: Path) -> dict[str, Path]:
    """``semiseg.x.y`` -> its file (a package by its ``__init__.py``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module an imported dotted name lives in (``semiseg.a.b.func`` -> ``semiseg.a.b``), if ours."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of ours that ``module`` imports, wherever the import statement stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            names = [str(node.args[0].value)]
        for name in names:
            target = _known(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports."""
    modules = module_files(package)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def layer_of(module: str) -> str:
    """The layer name of a module: its first component under the package (``semiseg.data.cache`` -> data)."""
    return module.split(".")[1]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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


def shortest_circle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest loop through a component (what to read first), as ``[a, b, ..., a]``."""
    inside = set(component)
    best: list[str] = []
    for start in component:
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for v in frontier:
                for w in sorted(graph[v] & inside):
                    if w not in previous:
                        previous[w] = v
                        following.append(w)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(previous[path[-1]])
        if not best or len(path) < len(best):
            best = path[::-1]
    return best


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


@pytest.fixture(scope="module")
def rank() -> dict[str, int]:
    """Layer name -> height (0 = the bottom)."""
    layers = read_layers(ARCHITECTURE.read_text())
    names = [n for layer in layers for n in layer]
    assert len(names) == len(set(names)), f"a layer is named twice in {ARCHITECTURE.name}: {names}"
    return {name: len(layers) - 1 - i for i, layer in enumerate(layers) for name in layer}


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    # the reader itself, on a package of its own: a missed kind of import would hide an edge of the real one
    files = {
        "__init__.py": "",
        "low.py": "X = 1\n",
        "mid/__init__.py": "from semiseg.mid import sub  # noqa\n",
        "mid/sub.py": "from ..low import X\n",
        "top.py": ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from semiseg.mid.sub import Y\n"
                   "def f():\n    from semiseg import mid\n    import importlib\n"
                   "    return importlib.import_module('semiseg.low')\n"),
        "loop_a.py": "def f():\n    import semiseg.loop_b\n",
        "loop_b.py": "from semiseg.loop_a import f\n",
    }
    for name, text in files.items():
        (tmp_path / "semiseg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "semiseg" / name).write_text(text)
    graph = import_graph(tmp_path / "semiseg")
    assert graph["semiseg.top"] == {"semiseg.low", "semiseg.mid.sub", "semiseg.mid"}
    assert graph["semiseg.mid"] == {"semiseg.mid.sub"} and graph["semiseg.mid.sub"] == {"semiseg.low"}
    assert circles(graph) == [["semiseg.loop_a", "semiseg.loop_b"]]
    assert shortest_circle(graph, ["semiseg.loop_a", "semiseg.loop_b"]) == [
        "semiseg.loop_a", "semiseg.loop_b", "semiseg.loop_a"]


def test_no_circle_among_modules(graph: dict[str, set[str]]) -> None:
    found = circles(graph)
    detail = [f"  {' -> '.join(shortest_circle(graph, c))} ({len(c)} modules in all: {', '.join(c)})"
              for c in found]
    assert not found, "modules that import each other in a circle:\n" + "\n".join(detail)


def test_every_package_and_module_has_a_layer(rank: dict[str, int], graph: dict[str, set[str]]) -> None:
    present = {layer_of(m) for m in graph if m != ROOT}
    assert sorted(present - set(rank)) == [], f"add them to the Layers section of {ARCHITECTURE.name}"
    assert sorted(set(rank) - present) == [], f"gone from src/semiseg: drop them from {ARCHITECTURE.name}"


def test_the_package_root_imports_nothing(graph: dict[str, set[str]]) -> None:
    # every import of a submodule runs semiseg/__init__.py first: whatever it imported, everyone would
    assert graph[ROOT] == set()


def test_no_import_from_a_lower_layer_to_a_higher_one(rank: dict[str, int], graph: dict[str, set[str]]) -> None:
    def placed(module: str) -> bool:  # the root and unplaced layers: the two tests above
        return module != ROOT and layer_of(module) in rank

    upward = sorted(f"  {a} ({layer_of(a)}) -> {b} ({layer_of(b)})"
                    for a, targets in graph.items() if placed(a)
                    for b in targets if placed(b) and rank[layer_of(a)] < rank[layer_of(b)])
    assert not upward, (f"imports that run up the layers of {ARCHITECTURE.name} (move the code, or pass what it "
                        "needs down as an argument):\n" + "\n".join(upward))
