"""The package's imports point one way: notebook -> api -> providers -> transport -> worker, all of them over the
common modules, and no module imports itself back through another.

Read from the source (an AST walk, no import): ``from . import x`` / ``from .x import y`` / ``import sky_jupyter.x``,
at module level or inside functions alike (a local import is still a dependency), except the names imported under
``if TYPE_CHECKING:`` (annotations only, never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`

PACKAGE = Path(__file__).resolve().parents[1] / "sky_jupyter"

#: Highest first. A module belongs to the first layer with a prefix of its name; it may import its own layer and
#: every layer below it. The package itself (``sky_jupyter/__init__.py``) is the public facade over all of them.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("notebook", ("sky_jupyter.notebook", "sky_jupyter.__main__")),
    ("api", ("sky_jupyter.pool", "sky_jupyter.compute", "sky_jupyter.plugins", "sky_jupyter.plugin",
             "sky_jupyter.spec")),
    ("providers", ("sky_jupyter.providers",)),
    ("transport", ("sky_jupyter.node", "sky_jupyter.transport", "sky_jupyter.bootstrap")),
    ("worker", ("sky_jupyter.worker",)),
    ("common", ("sky_jupyter.errors", "sky_jupyter.protocol", "sky_jupyter.redaction", "sky_jupyter.tracebacks",
                "sky_jupyter.info", "sky_jupyter.store", "sky_jupyter.shipping", "sky_jupyter.remote",
                "sky_jupyter.state", "sky_jupyter.accelerators", "sky_jupyter.image", "sky_jupyter.sync",
                "sky_jupyter.fetch_uv")),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Modules of this package that ``tree`` imports; ``from pkg import name`` counts ``pkg.name`` when that is a
    module, else ``pkg``."""
    found: set[str] = set()
    here = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] == "sky_jupyter":
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    found.add(candidate if _exists(candidate) else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sky_jupyter")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


def _exists(module: str) -> bool:
    path = PACKAGE.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = _imports(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py")
    return graph


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each a cycle's members."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def inner(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without the facade: ``sky_jupyter`` re-exports everything, and a package's ``__init__`` importing
    its own modules is how a package is made, not a dependency between layers."""
    return {m: {t for t in targets if t != "sky_jupyter" and not m.startswith(t + ".")}
            for m, targets in graph.items() if m != "sky_jupyter"}


def test_every_module_has_a_layer():
    for module in inner(import_graph()):
        layer_of(module)


def test_imports_point_down_the_layers():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
              for m, targets in inner(import_graph()).items() for t in sorted(targets)
              if layer_of(t) < layer_of(m)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_no_module_imports_itself_back():
    assert cycles(inner(import_graph())) == []


def test_the_notebook_layer_uses_the_providers_public_api():
    """``sky_jupyter.providers`` (what the package exports) only: never a provider's own modules."""
    reaching = [f"{m} imports {t}" for m, targets in import_graph().items() if m.startswith("sky_jupyter.notebook")
                for t in sorted(targets) if t.startswith("sky_jupyter.providers.")]
    assert not reaching, "\n".join(reaching)


def test_the_checks_fail_on_an_upward_import_and_a_cycle():
    """The walk sees what it must: a local import, a relative import of a sibling package, TYPE_CHECKING skipped."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..pool import ComputePool\n"
              "def f():\n    from ..notebook import magics\n")
    found = _imports(ast.parse(source), "sky_jupyter.providers.local", False)
    assert found == {"sky_jupyter.notebook.magics"}
    assert layer_of("sky_jupyter.notebook.magics") < layer_of("sky_jupyter.providers.local")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
