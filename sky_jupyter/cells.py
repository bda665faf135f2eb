"""Running notebook cell code on a worker, in the node's persistent namespace (worker side)."""

from __future__ import annotations

import ast
import linecache
from typing import Any

from . import protocol as P


class CellRunner:
    """Executes cell source like a notebook does: statements, then the last expression's value."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace

    def run(self, meta: dict[str, Any], frames: list) -> dict[str, Any]:
        if frames:
            self.namespace.update(P.loads(frames))
        source: str = meta["code"]
        filename: str = meta.get("filename", "<sky-cell>")
        # Tracebacks show the cell's own lines.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        tree = ast.parse(source, filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), self.namespace)
        result: dict[str, Any] = {"has_value": last is not None, "value": None}
        if last is not None:
            result["value"] = eval(compile(last, filename, "eval"), self.namespace)
        return result
