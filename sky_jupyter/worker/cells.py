"""Running notebook cells on a worker, in the node's persistent namespace (worker side).

A cell message carries the cell's code, the inputs that changed since this node last saw them (each its own
pickle, so one bad input fails alone), and which names the client wants back. Functions and classes defined in
the notebook arrive pickled by value with private globals; they are rebound to this namespace so that they see
the node's values and their ``global`` writes land here. After the code runs, the names the cell bound go back
while they fit the pull budget; the others stay here and the client binds a ``sky.Remote`` handle instead.

Remote cells are IPython cells: when the node has IPython (every notebook pool's image does), cells run in an
``InteractiveShell`` over the same namespace, so ``!cmd``, ``%timeit``, ``%pip install`` and ``get_ipython()`` act
on the node, and whatever the shell displays (``display()``, rich reprs, inline matplotlib figures) goes to the
notebook as Jupyter MIME bundles. Without IPython (plain ``@sky.compute`` nodes need only cloudpickle) cells run
with exec/eval of the source the client already transformed.
"""

from __future__ import annotations

import ast
import functools
import importlib
import linecache
import os
import pickle
import shlex
import shutil
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import protocol as P

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell


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


#: MIME types of ipywidgets views: their models live on the node, so the notebook could not render them.
WIDGET_MIME = ("application/vnd.jupyter.widget-view+json", "application/vnd.jupyter.widget-state+json")
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"

SendDisplay = Callable[[dict[str, Any]], None]


def portable_bundle(data: dict[str, Any], metadata: dict[str, Any] | None) -> dict[str, Any]:
    """A MIME bundle the notebook can show: without widget views, whose models stay on the node."""
    data = {mime: value for mime, value in data.items() if mime not in WIDGET_MIME}
    metadata = {key: value for key, value in (metadata or {}).items() if key not in WIDGET_MIME}
    return {"data": data, "metadata": metadata}


def display_bundle(value: Any) -> dict[str, Any]:
    """The value's rich representation (IPython's formatter when the node has IPython)."""
    try:
        from IPython.core.formatters import DisplayFormatter

        data, metadata = DisplayFormatter().format(value)
        return portable_bundle(data, metadata)
    except ImportError:
        return {"data": {"text/plain": repr(value)}, "metadata": {}}


def pip_command(line: str, python: str, uv: str | None) -> str:
    """What ``%pip LINE`` runs on the node: pip in this interpreter, or uv's pip aimed at it when the environment
    has no pip (venvs made by ``uv venv``)."""
    if uv is None:
        return f"{shlex.quote(python)} -m pip {line}".rstrip()
    command, _, rest = line.strip().partition(" ")
    return f"{shlex.quote(uv)} pip {command} --python {shlex.quote(python)} {rest}".rstrip()


def _find_uv() -> str | None:
    found = shutil.which("uv")
    if found:
        return found
    bootstrapped = os.path.expanduser("~/.sky_jupyter/bin/uv")
    return bootstrapped if os.access(bootstrapped, os.X_OK) else None


def _node_shell_class() -> type[InteractiveShell]:
    """IPython's InteractiveShell, adapted to run cells for a client far away. Raises ImportError without IPython."""
    from IPython.core.compilerop import CachingCompiler
    from IPython.core.displayhook import DisplayHook
    from IPython.core.displaypub import DisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets import Type

    class CellCompiler(CachingCompiler):
        """Compiles each cell under the file name the client chose: tracebacks name it and show its lines."""

        filename = "<sky-cell>"

        def get_code_name(self, raw_code: str, transformed_code: str, number: int) -> str:
            return self.filename

    class NodeDisplayPublisher(DisplayPublisher):
        """Everything the shell displays becomes a display frame for the running task."""

        def publish(self, data: dict[str, Any], metadata: dict[str, Any] | None = None, source: Any = None, *,
                    transient: dict[str, Any] | None = None, update: bool = False, **kwargs: Any) -> None:
            message = portable_bundle(data, metadata)
            if transient:
                message["transient"] = dict(transient)
            if update:
                message["update"] = True
            self.shell.send_display(message)

        def clear_output(self, wait: bool = False) -> None:
            self.shell.send_display({"clear": True, "wait": bool(wait)})

    class ValueHook(DisplayHook):
        """The last expression's value: formatted for the cell's result (rank 0 only), not printed."""

        def compute_format_data(self, result: Any) -> tuple[dict[str, Any], dict[str, Any]]:
            assert self.shell is not None  # a display hook is made by its shell
            if not self.shell.want_display:
                return {}, {}
            return super().compute_format_data(result)

        def quiet(self) -> bool:
            """A trailing semicolon hides the value; judged on this cell (the node keeps no input history)."""
            info = getattr(self.exec_result, "info", None)
            cell = getattr(info, "transformed_cell", None) or getattr(info, "raw_cell", None)
            return bool(cell) and self.semicolon_at_end_of_expression(cell)

        def write_output_prompt(self) -> None:
            pass

        def write_format_data(self, format_dict: dict[str, Any], md_dict: dict[str, Any] | None = None) -> None:
            assert self.shell is not None
            self.shell.value_bundle = portable_bundle(format_dict, md_dict)

        def log_output(self, format_dict: dict[str, Any]) -> None:
            pass  # no output history on the node: it would keep every rich repr in memory

        def finish_displayhook(self) -> None:
            self._is_active = False

    class NodeShell(InteractiveShell):
        compiler_class = Type(CellCompiler)
        displayhook_class = Type(ValueHook)
        display_pub_class = Type(NodeDisplayPublisher)

        def __init__(self, **kwargs: Any) -> None:
            self.send_display: SendDisplay = _print_display
            self.want_display = False
            self.value_bundle: dict[str, Any] | None = None
            self._code_depth = 0
            super().__init__(**kwargs)

        async def run_code(self, code_obj: Any, result: Any = None, *, async_: bool = False) -> bool:
            self._code_depth += 1
            try:
                return await super().run_code(code_obj, result, async_=async_)
            finally:
                self._code_depth -= 1

        def _is_cell_error(self, error: BaseException | None) -> bool:
            """The cell's own error goes back to the client as an exception; printing it here too would show it
            twice. Errors that magics handle themselves (``%run`` of a failing script) are printed as usual."""
            current = getattr(self.displayhook.exec_result, "error_in_exec", None)
            return self._code_depth == 0 or error is current

        def showtraceback(self, exc_tuple: Any = None, *args: Any, **kwargs: Any) -> None:
            if not self._is_cell_error((exc_tuple or sys.exc_info())[1]):
                super().showtraceback(exc_tuple, *args, **kwargs)

        def showsyntaxerror(self, *args: Any, **kwargs: Any) -> None:
            if self._code_depth > 0:
                super().showsyntaxerror(*args, **kwargs)

    return NodeShell


def _print_display(message: dict[str, Any]) -> None:
    text = message.get("data", {}).get("text/plain")
    if text is not None:
        print(text)


def make_shell(namespace: dict[str, Any], send_display: SendDisplay | None) -> Any:
    """The node's InteractiveShell over ``namespace`` (None without IPython): no history database, no output
    cache, no colours, matplotlib's inline backend as in a Jupyter kernel (figures shown when the cell ends)."""
    try:
        shell_class = _node_shell_class()
        from traitlets.config import Config
    except ImportError:
        return None
    if not os.environ.get("MPLBACKEND") and importlib.util.find_spec("matplotlib_inline") is not None:
        os.environ["MPLBACKEND"] = INLINE_BACKEND  # what ipykernel sets: the backend pyplot picks up on import
    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.colors = "nocolor"
    # No Out/_ cache on the node: the notebook keeps its own, and hidden references here would hold large values
    # (models, GPU tensors) after the user deleted them.
    config.InteractiveShell.cache_size = 0
    shell: Any = shell_class.instance(config=config, user_ns=namespace)  # a NodeShell, with its attributes
    # get_ipython() and friends stay in the builtins: this process exists to run cells (the trap nests, so the
    # shell's own ``with builtin_trap`` costs nothing more).
    shell.builtin_trap.activate()
    if send_display is not None:
        shell.send_display = send_display
    if "matplotlib" in sys.modules and os.environ.get("MPLBACKEND") == INLINE_BACKEND:
        try:  # matplotlib was imported (by a task) before the shell existed: switch it to the inline backend
            shell.enable_matplotlib("inline")
        except Exception as exc:  # noqa: BLE001 - figures then stay unshown; the cell says why
            print(f"sky: matplotlib's inline backend is unavailable on this node: {exc}", file=sys.stderr)
    if importlib.util.find_spec("pip") is None and (uv := _find_uv()) is not None:
        def pip(line: str) -> None:
            """Run uv's pip for this node's Python environment (which has no pip of its own)."""
            shell.system(pip_command(line, sys.executable, uv))

        shell.register_magic_function(pip, "line", "pip")
    return shell


def _without_ipython_frames(exc: BaseException) -> BaseException:
    """The exception with the shell's own frames dropped from the front of its traceback."""
    import IPython

    ipython_dir = os.path.dirname(os.path.abspath(IPython.__file__)) + os.sep
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(ipython_dir):
        tb = tb.tb_next
    return exc.with_traceback(tb)


@functools.lru_cache(maxsize=256)
def _compiled(source: str, filename: str) -> tuple[types.CodeType, types.CodeType | None]:
    """The cell's statements and its last expression (None when it ends with a statement), compiled once: the
    client names a cell's file after its content, so a re-run cell finds its code here."""
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(end := tree.body[-1], ast.Expr):
        tree.body.pop()
        last = compile(ast.Expression(end.value), filename, "eval")
    return compile(tree, filename, "exec"), last


_NO_SHELL = object()


class CellRunner:
    """Executes cell code like a notebook does: statements, then the last expression's value."""

    def __init__(self, namespace: dict[str, Any], send_display: SendDisplay | None = None) -> None:
        self.namespace = namespace
        self.send_display = send_display
        self._shell: Any = None
        self._installed = False

    @property
    def shell(self) -> Any:
        """The node's IPython shell, created on the first cell; None when the node has no IPython."""
        if self._shell is None:
            shell = make_shell(self.namespace, self.send_display)
            self._shell = _NO_SHELL if shell is None else shell
        return None if self._shell is _NO_SHELL else self._shell

    def load_inputs(self, meta: P.CellMeta, frames: list) -> None:
        pos = 0
        for name, count in meta.get("inputs", ()):
            part = frames[pos:pos + count]
            pos += count
            try:
                value = P.loads(part)
            except Exception as exc:  # noqa: BLE001 - (un)pickling user objects can raise anything
                raise ImportError(f"notebook variable {name!r} could not be rebuilt on this node: "
                                  f"{type(exc).__name__}: {exc}") from None
            self.namespace[name] = rebind(value, self.namespace)
        for alias, target in meta.get("refs", {}).items():
            if target not in self.namespace:
                raise NameError(f"{alias!r} refers to {target!r}, which this node no longer has "
                                f"(was its worker restarted?)")
            self.namespace[alias] = self.namespace[target]

    def execute(self, source: str, filename: str) -> tuple[bool, Any]:
        """Without IPython: exec the statements, eval the last expression."""
        # Tracebacks show the cell's own lines.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        body, last = _compiled(source, filename)
        exec(body, self.namespace)
        if last is None:
            return False, None
        return True, eval(last, self.namespace)

    def execute_ipython(self, shell: Any, raw: str, filename: str, display: bool) -> tuple[bool, Any]:
        """Run the raw cell in the shell; its error is raised here with its own type and the cell's frames."""
        shell.compile.filename = filename
        shell.want_display = display
        shell.value_bundle = None
        # No history: the notebook keeps it, and storing it here formats every error's traceback once more
        # (IPython 9), which costs seconds for deep ones and delays the error (and interrupts) reaching the client.
        result = shell.run_cell(raw, store_history=False)
        error = result.error_before_exec or result.error_in_exec
        if error is not None:
            raise _without_ipython_frames(error)
        value, result.result = result.result, None  # the shell keeps the result object; not the value
        return value is not None, value

    @staticmethod
    def _plain_python(shell: Any, meta: P.CellMeta) -> bool:
        """A cell with no IPython syntax (the client's transform left it unchanged), on a shell with no
        per-cell hooks beyond the execute events, needs none of the shell's cell machinery."""
        if meta.get("python") != meta["code"]:
            return False
        callbacks = shell.events.callbacks
        return not callbacks.get("pre_run_cell") and not callbacks.get("post_run_cell")

    def execute_fast(self, shell: Any, source: str, filename: str, display: bool) -> tuple[bool, Any]:
        """Plain Python in the shell's context (its builtins, kept active by make_shell, its display hook and
        execute events, so display(), get_ipython() and inline figures behave as in ``run_cell``) at a fifth of
        its cost."""
        shell.want_display = display
        shell.value_bundle = None
        with shell.display_trap:
            shell.events.trigger("pre_execute")
            try:
                has_value, value = self.execute(source, filename)
            finally:
                shell.events.trigger("post_execute")
        if has_value and value is not None and display and not shell.displayhook.semicolon_at_end_of_expression(
                source):
            shell.value_bundle = portable_bundle(*shell.display_formatter.format(value))
        return (False, None) if value is None else (has_value, value)

    def collect(self, meta: P.CellMeta) -> dict[str, Any]:
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
                frames = P.dumps_reply(value)
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

    def run(self, meta: P.CellMeta, frames: list) -> dict[str, Any]:
        """Run one cell. ``meta["display"]``: send the last value's rich repr back (the notebook shows rank 0's);
        without that key the raw value comes back, as for direct callers."""
        self.load_inputs(meta, frames)
        if self._installed:  # a package the previous cell installed (%pip, !pip, uv) is importable now
            importlib.invalidate_caches()
        self._installed = "install" in meta["code"]
        filename = meta.get("filename", "<sky-cell>")
        shell = self.shell
        if shell is not None and self._plain_python(shell, meta):
            has_value, value = self.execute_fast(shell, meta["code"], filename, bool(meta.get("display")))
        elif shell is not None:
            has_value, value = self.execute_ipython(shell, meta["code"], filename, bool(meta.get("display")))
        else:
            has_value, value = self.execute(meta.get("python") or meta["code"], filename)
        result = self.collect(meta) if "binds" in meta else {}
        result["has_value"] = has_value
        result["value"] = None
        if has_value and value is not None:
            if meta.get("display"):
                bundle = shell.value_bundle if shell is not None else display_bundle(value)
                if bundle is not None:
                    result["display"] = bundle
            elif "display" not in meta:
                result["value"] = value
        return result


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ in ("builtins", "__main__") else f"{cls.__module__}.{cls.__qualname__}"
