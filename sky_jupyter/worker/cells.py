"""Running notebook cells on a worker, in the node's persistent namespace (worker side).

A cell message carries the cell's code, the inputs that changed since this node last saw them (each its own
pickle, so one bad input fails alone), and which names the client wants back. Functions and classes defined in
the notebook arrive pickled by value with private globals; they are rebound to this namespace so that they see
the node's values and their ``global`` writes land here. After the code runs, the names the cell bound go back
while they fit the pull budget; the others stay here and the client binds a ``sky.Remote`` handle instead.

What a cell defines (functions, classes, namedtuples, enums, dataclasses) goes back by value, and so do instances of
them: the notebook cannot import them by name. What the notebook sent goes back by reference, so the notebook gets
its own class or function back. A value the notebook holds a copy of (sent by it, brought back, pulled) is hashed
before a cell that reads it runs and again after: when the cell changed it in place (``cfg.lr *= 2``), it goes back
as well, so the notebook does not keep a stale copy.

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
import inspect
import io
import linecache
import os
import pickle
import shlex
import shutil
import sys
import time
import types
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import cloudpickle

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


def _defined_in_cells(value: Any) -> bool:
    """A function or class whose home is the cell namespace (``__main__``): defined by a cell, or sent by the
    notebook."""
    return isinstance(value, (type, types.FunctionType)) and getattr(value, "__module__", None) == "__main__"


class _ReplyPickler(cloudpickle.Pickler):
    """cloudpickle, which sends what the cells defined by value, except for the functions and classes the notebook
    sent: those go by reference, and the notebook resolves them to its own objects (not to copies)."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], None],
                 from_notebook: weakref.WeakSet[Any]) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)
        self.from_notebook = from_notebook

    def reducer_override(self, obj: Any) -> Any:
        if _defined_in_cells(obj) and obj in self.from_notebook:
            main = sys.modules.get("__main__")
            if main is not None and vars(main).get(obj.__qualname__) is obj:
                return NotImplemented  # the C pickler's reference, ``__main__.NAME``: the notebook has NAME
        return super().reducer_override(obj)


class _StatePickler(pickle.Pickler):
    """Pickles a value for its hash only: functions and classes stand for themselves (their identity), so the hash
    changes when the value does, not when a global that its class's methods read does."""

    def __init__(self, file: io.BytesIO, buffer_callback: Callable[[pickle.PickleBuffer], None]) -> None:
        super().__init__(file, protocol=5, buffer_callback=buffer_callback)

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.FunctionType) or (isinstance(obj, type) and obj.__module__ != "builtins"):
            return int, (id(obj),)
        return NotImplemented


def _c_pickle(value: Any) -> list | None:
    """The C pickler's frames, or None where they would name something of the cells' (``__main__``): the notebook
    has other objects under those names, or none."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        main = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:  # noqa: BLE001 - whatever the C pickler refuses, the caller's pickler gets a chance at
        return None
    if b"__main__" in main:  # rarely a false alarm (a string that says it): that costs the slower pickler only
        return None
    return [main, *(b.raw() for b in buffers)]


def _pickled(make: Callable[[io.BytesIO, Callable[[pickle.PickleBuffer], None]], pickle.Pickler],
             value: Any) -> list:
    """``value`` pickled by the pickler ``make`` returns: ``[main, *buffers]``."""
    buffers: list[pickle.PickleBuffer] = []
    file = io.BytesIO()
    make(file, buffers.append).dump(value)
    return [file.getbuffer(), *(b.raw() for b in buffers)]


def state_hash(value: Any) -> str | None:
    """A hash of the value's state, or None for a value that cannot be pickled (its changes go unseen)."""
    frames = _c_pickle(value)
    if frames is None:
        try:
            frames = _pickled(_StatePickler, value)
        except Exception:  # noqa: BLE001 - (un)pickling user objects can raise anything
            return None
    return P.content_hash(frames)


_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, range, types.ModuleType, type, types.FunctionType,
              types.BuiltinFunctionType)


def _may_change(value: Any, depth: int = 0) -> bool:
    """Whether a cell could change the value in place (functions and classes are not watched: the notebook keeps
    its own definitions)."""
    if isinstance(value, _IMMUTABLE):
        return False
    if type(value) in (tuple, frozenset) and len(value) <= 64 and depth < 3:
        return any(_may_change(item, depth + 1) for item in value)
    return True


def _unpicklable(value: Any, exc: BaseException) -> str:
    """Why a value cannot leave the node, in a few words."""
    if inspect.isgenerator(value) or inspect.isasyncgen(value):
        return "a generator cannot leave the process it runs in (a list of its items can)"
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return f"not picklable ({type(exc).__name__}{': ' + detail if detail else ''})"


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
    client names a cell's file after its content, so a re-run cell finds its code here. Top-level ``await`` is
    allowed: code that uses it evaluates to a coroutine."""
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(end := tree.body[-1], ast.Expr):
        tree.body.pop()
        last = compile(ast.Expression(end.value), filename, "eval", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    return compile(tree, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT), last


def _awaits(code: types.CodeType | None) -> bool:
    """Whether compiled cell code uses top-level ``await`` (evaluating it gives a coroutine to run)."""
    return code is not None and bool(code.co_flags & inspect.CO_COROUTINE)


_NO_SHELL = object()


class CellRunner:
    """Executes cell code like a notebook does: statements, then the last expression's value.

    ``held``: the names whose value the notebook holds a copy of, each with the hash of that value's state here
    (None until a cell that reads it is about to run); ``from_notebook``: the functions and classes the notebook
    sent, which go back by reference."""

    def __init__(self, namespace: dict[str, Any], send_display: SendDisplay | None = None) -> None:
        self.namespace = namespace
        self.send_display = send_display
        self._shell: Any = None
        self._installed = False
        self._loop: Any = None  # the event loop of cells with top-level await, on nodes without IPython
        self.held: dict[str, str | None] = {}
        self.from_notebook: weakref.WeakSet[Any] = weakref.WeakSet()

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
            value = self.namespace[name] = rebind(value, self.namespace)
            if _defined_in_cells(value):
                self.from_notebook.add(value)
            self._holds(name, value)
        for alias, target in meta.get("refs", {}).items():
            if target not in self.namespace:
                raise NameError(f"{alias!r} refers to {target!r}, which this node no longer has "
                                f"(was its worker restarted?)")
            self.namespace[alias] = self.namespace[target]
            self.held.pop(alias, None)  # the notebook has a handle to it, not a copy

    def _holds(self, name: str, value: Any) -> None:
        """The notebook now holds a copy of ``value`` under ``name``: watch it for changes, if it can have any."""
        if _may_change(value):
            self.held[name] = None
        else:
            self.held.pop(name, None)

    def reply_frames(self, value: Any) -> list:
        """``value`` pickled for the notebook: by the C pickler where it can (several times cheaper on small
        values), else by cloudpickle, so that what the cells defined travels by value."""
        frames = _c_pickle(value)
        if frames is None:
            frames = _pickled(functools.partial(_ReplyPickler, from_notebook=self.from_notebook), value)
        return frames

    def _watch(self, reads: list[str]) -> list[str]:
        """The names among ``reads`` that the notebook holds a copy of, each with its state hash taken now (before
        the cell runs) unless it has one."""
        watched = []
        for name in reads:
            if name not in self.held or name not in self.namespace:
                continue
            if self.held[name] is None:
                self.held[name] = state_hash(self.namespace[name])
            if self.held[name] is not None:
                watched.append(name)
            else:  # cannot be pickled: its changes cannot be seen
                del self.held[name]
        return watched

    def _changed(self, watched: list[str], binds: set[str]) -> list[str]:
        """The watched names whose value the cell changed in place (those it bound go back anyway)."""
        changed = []
        for name in watched:
            if name in binds or name not in self.namespace:
                continue
            now = state_hash(self.namespace[name])
            if now != self.held.get(name):
                changed.append(name)
                self.held[name] = now
        return changed

    def execute(self, source: str, filename: str) -> tuple[bool, Any]:
        """Without IPython: exec the statements, eval the last expression."""
        # Tracebacks show the cell's own lines.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        body, last = _compiled(source, filename)
        if _awaits(body):
            self._run_coroutine(eval(body, self.namespace))
        else:
            exec(body, self.namespace)
        if last is None:
            return False, None
        value = eval(last, self.namespace)
        return True, self._run_coroutine(value) if _awaits(last) else value

    def _run_coroutine(self, coroutine: Any) -> Any:
        """Run a cell's top-level ``await`` code to its end, on an event loop kept from cell to cell (what it
        created, a client session or a queue, stays usable in later cells)."""
        import asyncio

        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(coroutine)

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
        """A cell with no IPython syntax (the client's transform left it unchanged) and no top-level ``await`` (the
        shell runs that on its event loop), on a shell with no per-cell hooks beyond the execute events, needs none
        of the shell's cell machinery."""
        if meta.get("python") != meta["code"]:
            return False
        callbacks = shell.events.callbacks
        if callbacks.get("pre_run_cell") or callbacks.get("post_run_cell"):
            return False
        try:
            body, last = _compiled(meta["code"], meta.get("filename", "<sky-cell>"))
        except SyntaxError:
            return True  # raised again, as the cell's error, where the fast path compiles it
        return not (_awaits(body) or _awaits(last))

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

    def _give_back(self, name: str, out: dict[str, Any], budget: int) -> int:
        """Put ``name``'s value in the reply while it fits ``budget`` (what is left of it is returned), else
        describe why it stays here."""
        value = self.namespace[name]
        try:
            frames = self.reply_frames(value)
        except Exception as exc:  # noqa: BLE001 - reported to the user as the reason it stayed here
            out["remote"][name] = {"type": _type_name(value), "size": None, "reason": _unpicklable(value, exc)}
            self.held.pop(name, None)
            return budget
        size = sum(memoryview(f).nbytes for f in frames)
        if size > budget:
            out["remote"][name] = {"type": _type_name(value), "size": size, "reason": "over the pull budget"}
            self.held.pop(name, None)
            return budget
        out["values"][name] = [pickle.PickleBuffer(f) for f in frames]
        return budget - size

    def collect(self, meta: P.CellMeta, changed: Iterable[str] = ()) -> dict[str, Any]:
        """Values of the names the cell bound, then of those it changed in place: pickled while under budget,
        described otherwise."""
        out: dict[str, Any] = {"values": {}, "remote": {}, "modules": {}, "bound": [], "missing": [], "changed": []}
        budget = int(meta.get("budget", 64 << 20))
        pull = meta.get("pull", True)
        for name in meta.get("binds", ()):
            if name not in self.namespace:
                out["missing"].append(name)
                self.held.pop(name, None)
                continue
            value = self.namespace[name]
            out["bound"].append(name)
            if isinstance(value, types.ModuleType):
                out["modules"][name] = value.__name__
            elif pull:
                budget = self._give_back(name, out, budget)
            if name in out["values"]:
                self._holds(name, value)
            else:  # a module, or a value left here: the notebook holds no copy of it to watch
                self.held.pop(name, None)
        for name in changed:
            out["changed"].append(name)
            if pull:
                budget = self._give_back(name, out, budget)
            else:  # the notebook keeps its own copy: this one is the node's own from now on
                self.held.pop(name, None)
        return out

    def pull(self, names: list[str]) -> dict[str, Any]:
        """``%sky pull``: the named values (whatever their size), which names this node lacks, and why the
        others cannot leave it."""
        out: dict[str, Any] = {"values": {}, "remote": {}, "missing": []}
        for name in names:
            if name not in self.namespace:
                out["missing"].append(name)
                continue
            self._give_back(name, out, sys.maxsize)
            if name in out["values"]:
                self._holds(name, self.namespace[name])
        return out

    def run(self, meta: P.CellMeta, frames: list) -> dict[str, Any]:
        """Run one cell. ``meta["display"]``: send the last value's rich repr back (the notebook shows rank 0's);
        without that key the raw value comes back, as for direct callers."""
        self.load_inputs(meta, frames)
        if self._installed:  # a package the previous cell installed (%pip, !pip, uv) is importable now
            importlib.invalidate_caches()
        self._installed = "install" in meta["code"]
        started = time.perf_counter()
        watched = self._watch(list(meta.get("reads", ())))
        hashing = time.perf_counter() - started
        filename = meta.get("filename", "<sky-cell>")
        shell = self.shell
        if shell is not None and self._plain_python(shell, meta):
            has_value, value = self.execute_fast(shell, meta["code"], filename, bool(meta.get("display")))
        elif shell is not None:
            has_value, value = self.execute_ipython(shell, meta["code"], filename, bool(meta.get("display")))
        else:
            has_value, value = self.execute(meta.get("python") or meta["code"], filename)
        started = time.perf_counter()
        changed = self._changed(watched, set(meta.get("binds", ())))
        hashing += time.perf_counter() - started
        result = self.collect(meta, changed) if "binds" in meta or changed else {}
        if watched:
            result["rehash_s"] = hashing
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
