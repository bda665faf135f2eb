"""Running notebook cells on a worker, in the node's persistent namespace (worker side).

A cell message carries the cell's code, the inputs that changed since this node last saw them (each its own
pickle, so one bad input fails alone), and which names the client wants back. Functions and classes defined in
the notebook arrive pickled by value with private globals; they are rebound to this namespace so that they see
the node's values and their ``global`` writes land here. After the code runs, the names the cell bound go back
while they fit the pull budget; the others stay here and the client binds a ``sky.Remote`` handle instead.
"""

from __future__ import annotations

import ast
import linecache
import pickle
import types
from typing import Any

from . import protocol as P


def rebind(value: Any, namespace: dict[str, Any]) -> Any:
    """Give a notebook-defined function (or the methods of a class) this namespace as globals."""
    if isinstance(value, types.FunctionType) and value.__module__ == "__main__":
        fn = types.FunctionType(value.__code__, namespace, value.__name__, value.__defaults__, value.__closure__)
        fn.__kwdefaults__ = value.__kwdefaults__
        fn.__qualname__ = value.__qualname__
        fn.__doc__ = value.__doc__
        fn.__annotations__ = value.__annotations__
        fn.__dict__.update(value.__dict__)
        return fn
    if isinstance(value, type) and value.__module__ == "__main__":
        for attr, member in list(vars(value).items()):
            if isinstance(member, types.FunctionType):
                setattr(value, attr, rebind(member, namespace))
            elif isinstance(member, (staticmethod, classmethod)) and isinstance(member.__func__, types.FunctionType):
                setattr(value, attr, type(member)(rebind(member.__func__, namespace)))
    return value


def display_bundle(value: Any) -> dict[str, Any]:
    """The value's rich representation (IPython's formatter when the node has IPython)."""
    try:
        from IPython.core.formatters import DisplayFormatter

        data, metadata = DisplayFormatter().format(value)
        return {"data": data, "metadata": metadata}
    except ImportError:
        return {"data": {"text/plain": repr(value)}, "metadata": {}}


class CellRunner:
    """Executes cell code like a notebook does: statements, then the last expression's value."""

    def __init__(self, namespace: dict[str, Any]) -> None:
        self.namespace = namespace

    def load_inputs(self, meta: dict[str, Any], frames: list) -> None:
        pos = 0
        for name, count in meta.get("inputs", ()):
            part = frames[pos:pos + count]
            pos += count
            try:
                value = P.loads(part)
            except Exception as exc:
                raise ImportError(f"notebook variable {name!r} could not be rebuilt on this node: "
                                  f"{type(exc).__name__}: {exc}") from None
            self.namespace[name] = rebind(value, self.namespace)
        for alias, target in meta.get("refs", {}).items():
            if target not in self.namespace:
                raise NameError(f"{alias!r} refers to {target!r}, which this node no longer has "
                                f"(was its worker restarted?)")
            self.namespace[alias] = self.namespace[target]

    def execute(self, source: str, filename: str) -> tuple[bool, Any]:
        # Tracebacks show the cell's own lines.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        tree = ast.parse(source, filename)
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, filename, "exec"), self.namespace)
        if last is None:
            return False, None
        return True, eval(compile(last, filename, "eval"), self.namespace)

    def collect(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Values of the names the cell bound: pickled while under budget, described otherwise."""
        out: dict[str, Any] = {"values": {}, "remote": {}, "modules": {}, "bound": [], "missing": []}
        budget = int(meta.get("budget", 64 << 20))
        for name in meta.get("binds", ()):
            if name not in self.namespace:
                out["missing"].append(name)
                continue
            value = self.namespace[name]
            out["bound"].append(name)
            if isinstance(value, types.ModuleType):
                out["modules"][name] = value.__name__
                continue
            if not meta.get("pull", True):
                continue
            try:
                frames = P.dumps(value)
            except Exception as exc:  # noqa: BLE001 - reported to the user as the reason it stayed here
                out["remote"][name] = {"type": _type_name(value), "size": None,
                                       "reason": f"not picklable ({type(exc).__name__})"}
                continue
            size = sum(memoryview(f).nbytes for f in frames)
            if size > budget:
                out["remote"][name] = {"type": _type_name(value), "size": size, "reason": "over the pull budget"}
                continue
            budget -= size
            out["values"][name] = [pickle.PickleBuffer(f) for f in frames]
        return out

    def run(self, meta: dict[str, Any], frames: list) -> dict[str, Any]:
        self.load_inputs(meta, frames)
        has_value, value = self.execute(meta.get("python") or meta["code"], meta.get("filename", "<sky-cell>"))
        result = self.collect(meta) if "binds" in meta else {}
        result["has_value"] = has_value
        result["value"] = None
        if has_value and value is not None:
            if meta.get("display"):
                result["display"] = display_bundle(value)
            else:
                result["value"] = value
        return result


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
