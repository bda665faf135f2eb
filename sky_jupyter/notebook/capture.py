"""Which notebook names a ``%%sky`` cell reads before binding them, and which names it binds.

The client ships the *reads* to the node before the cell runs and pulls the *binds* back afterwards, so
both must be right on the cases a flat AST walk gets wrong: ``x = x + 1``, a name bound in one branch
only, a loop that reads a name before assigning it, ``del``, names used inside functions the cell
defines, and lines with ``%magics`` or ``!shell`` (the cell is run through IPython's transformer first).

How it works: a scope pass records, for every function, lambda, class and comprehension, which names it
binds and which it declares ``global``/``nonlocal`` (the same classification the compiler makes). A
flow pass then walks the module body in execution order with the set of names the cell has *surely*
bound so far; a module-namespace load of a name outside that set is a read. Branches meet by
intersection, loops iterate to a fixed point (a body may run zero times), handlers start from what the
``try`` body cannot have undone. The stdlib ``symtable`` module was evaluated for the scope pass: it
classifies names exactly, but it is not flow-sensitive and its tables cannot be matched reliably to AST
nodes (several lambdas on one line), so it serves as the cross-check in the tests instead.

Function bodies run later, so the module names a cell-defined function looks up are *pending* on its
name: they become reads where the function may first run, i.e. where its name is next loaded (called,
passed on, aliased), where a decorator receives it, or, if never, against what the cell surely binds at
its end (it may be called from a later cell). So ``def f(): return g`` then ``g = 1`` then ``f()`` does
not read ``g``, while ``f()`` before ``g = 1`` does. This is stricter than "free names are reads unless
the cell binds them unconditionally anywhere", which would miss that second case.

Everything errs towards more reads: ``reads`` is a superset that still contains builtins (``print``,
``len``) and IPython's own names (``get_ipython``, ``_``, ``In``); the caller ships only the reads that
exist in the notebook namespace, which also drops builtins unless the user shadowed them.
"""

from __future__ import annotations

import ast
import functools
import re
import string
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..errors import SkyError

__all__ = ["CellNames", "CellSyntaxError", "ImportRef", "analyze", "transform_cell"]

_FILENAME = "<sky cell>"
_PARSE_FLAGS = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


# ---------------------------------------------------------------------------------------------- public API


@dataclass(frozen=True, slots=True)
class ImportRef:
    """How a top-level import bound a name, so a module can be re-imported by name instead of pickled."""

    module: str  # as written after ``import`` / ``from``: "numpy", "os.path", "" for ``from . import x``
    name: str | None = None  # the imported attribute for ``from module import name``; "*" for a star import
    level: int = 0  # leading dots of a relative import
    asname: str | None = None

    @property
    def statement(self) -> str:
        """Python that re-creates the binding, e.g. ``import numpy as np`` or ``from os import path as p``."""
        alias = f" as {self.asname}" if self.asname else ""
        if self.name is None:
            return f"import {self.module}{alias}"
        return f"from {'.' * self.level}{self.module} import {self.name}{alias}"

    @property
    def target(self) -> str:
        """Dotted path of the object the local name refers to ("os" for ``import os.path``, "m.n" for
        ``from m import n``)."""
        if self.name is None:
            return self.module if self.asname else self.module.partition(".")[0]
        base = "." * self.level + self.module
        return f"{base}.{self.name}" if self.module else f"{base}{self.name}"


@dataclass(frozen=True, slots=True)
class CellNames:
    """What a cell does to the notebook namespace, as far as its source tells.

    ``reads`` is a superset: every name some execution path may look up in the module namespace before the
    cell binds it, builtins included; intersect it with the notebook namespace before shipping. ``binds``
    and ``deletes`` are "may" sets and can overlap (``x = 1; del x``, or ``except E as e``, which Python
    unbinds at the end of the handler): pull what exists remotely afterwards, drop what no longer does.
    """

    reads: frozenset[str]
    binds: frozenset[str]
    deletes: frozenset[str]
    # local name -> import, for names whose last top-level binding in source order is an import statement
    imports: dict[str, ImportRef]
    # ``from m import *`` binds names the source does not show: diff the remote namespace to find them
    star_import: bool = False
    star_imports: tuple[ImportRef, ...] = ()
    # exec/eval/globals()/locals()/vars(), %run, %store -r, get_ipython().user_ns ...: reads and binds are
    # incomplete (the caller may ship everything it can, or warn)
    dynamic: bool = False


class CellSyntaxError(SkyError, SyntaxError):
    """The cell is not valid Python even after IPython's transforms; raised before anything runs remotely."""

    def __init__(self, message: str, *, lineno: int | None = None, offset: int | None = None,
                 text: str | None = None) -> None:
        super().__init__(message)
        self.msg, self.filename, self.lineno, self.offset, self.text = message, _FILENAME, lineno, offset, text

    def __str__(self) -> str:
        return self.msg


def transform_cell(source: str) -> str:
    """Turn IPython syntax (``%magic``, ``!shell``, ``y = !cmd``, ``obj?``) into the Python IPython would run.

    Without IPython installed the source is returned unchanged, so plain Python cells still analyse.
    """
    try:
        manager = _transformer()
    except ImportError:
        return source
    return manager.transform_cell(source)


def analyze(source: str) -> CellNames:
    """Find the names a cell reads before binding them (to ship) and the names it binds (to pull back)."""
    tree = _parse(source, what="the %%sky cell")
    flow = _Flow()
    try:
        flow.run_module(tree)
    except RecursionError:  # an expression nested deeper than this walk can follow (a 1000-term sum)
        return _coarse(tree)
    return CellNames(
        reads=frozenset(flow.reads),
        binds=frozenset(flow.binds),
        deletes=frozenset(flow.deletes),
        imports=dict(flow.imports),
        star_import=bool(flow.star_imports),
        star_imports=tuple(flow.star_imports),
        dynamic=flow.dynamic,
    )


def _coarse(tree: ast.Module) -> CellNames:
    """Flat, flow-blind answer for cells too deep to walk recursively: every name any scope loads is a read,
    every name any scope binds is a bind. Still a superset of the truth, only less sharp."""
    reads: set[str] = set()
    binds: set[str] = set()
    deletes: set[str] = set()
    imports: dict[str, ImportRef] = {}
    stars: list[ImportRef] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (binds if isinstance(node.ctx, ast.Store) else reads).add(node.id)
            if isinstance(node.ctx, ast.Del):
                deletes.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            binds.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            binds.update(node.names)
        elif isinstance(node, ast.ExceptHandler | ast.MatchAs | ast.MatchStar) and node.name:
            binds.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            binds.add(node.rest)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    binds.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                _is_get_ipython_call(node.func.value):
            for arg in node.args:  # magic lines and shell commands: any identifier may be code or expanded
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found = set(_IDENTIFIER.findall(arg.value)) | _expanded_names(arg.value)
                    reads.update(found)
                    binds.update(found)
    for stmt in tree.body:
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                imports[alias.asname or alias.name.partition(".")[0]] = ImportRef(alias.name, None, 0, alias.asname)
        elif isinstance(stmt, ast.ImportFrom):
            for alias in stmt.names:
                ref = ImportRef(stmt.module or "", alias.name, stmt.level, alias.asname)
                if alias.name == "*":
                    stars.append(ref)
                else:
                    imports[alias.asname or alias.name] = ref
    return CellNames(frozenset(reads), frozenset(binds), frozenset(deletes), imports, bool(stars), tuple(stars),
                     dynamic=bool(reads & _DYNAMIC_NAMES))


@functools.cache
def _transformer() -> Any:
    from IPython.core.inputtransformer2 import TransformerManager

    return TransformerManager()


def _parse(source: str, *, what: str) -> ast.Module:
    """Parse (and compile, to catch ``break`` outside a loop and the like) transformed cell source."""
    code = transform_cell(source)
    try:
        with warnings.catch_warnings():  # SyntaxWarnings are the node's to show when the cell runs there
            warnings.simplefilter("ignore")
            tree = compile(code, _FILENAME, "exec", flags=_PARSE_FLAGS, dont_inherit=True)
            compile(code, _FILENAME, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except SyntaxError as err:
        lineno = err.lineno
        reason = " ".join(str(err.msg).split())
        where = f" at line {lineno}" if lineno else ""
        line = (err.text or "").strip()
        shown = f": {line[:80]!r}" if line else ""
        raise CellSyntaxError(
            f"{what} does not parse{where} ({reason}){shown}; fix {'that line' if lineno else 'it'} and run "
            f"the cell again",
            lineno=lineno, offset=err.offset, text=err.text,
        ) from err
    except RecursionError as err:
        raise CellSyntaxError(f"{what} is nested too deeply for Python to compile; split the expression "
                              f"and run the cell again", lineno=None) from err
    except ValueError as err:  # e.g. a NUL byte in the source
        raise CellSyntaxError(f"{what} does not parse ({err}); fix it and run the cell again",
                              lineno=None) from err
    assert isinstance(tree, ast.Module)
    return tree


# ---------------------------------------------------------------------------------------------- scopes

_ScopeKind = Literal["module", "function", "class", "comprehension"]


@dataclass(eq=False, slots=True)
class _Scope:
    """Names one scope binds and declares, as the compiler sees them."""

    kind: _ScopeKind
    parent: _Scope | None
    bound: set[str] = field(default_factory=set)
    globals: set[str] = field(default_factory=set)
    nonlocals: set[str] = field(default_factory=set)


_LOCAL, _CLASS, _GLOBAL = "local", "class", "global"


def _resolve_load(name: str, scope: _Scope) -> str:
    """Where a load of ``name`` in ``scope`` looks: a function's own cells, a class body then the module, or
    the module namespace."""
    s: _Scope | None = scope
    first = True
    while s is not None and s.kind != "module":
        if name in s.globals:
            return _GLOBAL
        if name in s.nonlocals:
            return _LOCAL
        if s.kind == "class":
            if first and name in s.bound:
                return _CLASS  # LOAD_NAME: the class namespace, then globals (not enclosing functions)
        elif name in s.bound:
            return _LOCAL  # a local of this scope or a free variable of an enclosing function
        s, first = s.parent, False
    return _GLOBAL


def _resolve_store(name: str, scope: _Scope) -> str:
    if scope.kind == "module" or name in scope.globals:
        return _GLOBAL
    if name in scope.nonlocals:
        return _LOCAL
    return _CLASS if scope.kind == "class" else _LOCAL


def _owner(scope: _Scope) -> _Scope:
    """The scope a walrus in a comprehension binds in."""
    while scope.kind == "comprehension" and scope.parent is not None:
        scope = scope.parent
    return scope


def _all_args(args: ast.arguments) -> list[ast.arg]:
    extra = [a for a in (args.vararg, args.kwarg) if a is not None]
    return [*args.posonlyargs, *args.args, *args.kwonlyargs, *extra]


class _ScopeBuilder(ast.NodeVisitor):
    """Fills ``scopes`` (AST node -> _Scope) for every function, lambda, class and comprehension."""

    def __init__(self, scopes: dict[ast.AST, _Scope], root: _Scope) -> None:
        self.scopes, self.cur = scopes, root

    def _enter(self, node: ast.AST, kind: _ScopeKind, visit: Callable[[], None]) -> _Scope:
        scope = _Scope(kind, self.cur)
        self.scopes[node] = scope
        outer, self.cur = self.cur, scope
        try:
            visit()
        finally:
            self.cur = outer
        return scope

    def _visit_all(self, nodes: Iterable[ast.AST | None]) -> None:
        for node in nodes:
            if node is not None:
                self.visit(node)

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Load):
            self.cur.bound.add(node.id)

    def visit_Global(self, node: ast.Global) -> None:
        self.cur.globals.update(node.names)

    def visit_Nonlocal(self, node: ast.Nonlocal) -> None:
        self.cur.nonlocals.update(node.names)

    def visit_Import(self, node: ast.Import) -> None:
        self.cur.bound.update(a.asname or a.name.partition(".")[0] for a in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.cur.bound.update(a.asname or a.name for a in node.names if a.name != "*")

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self.cur.bound.add(node.name)
        self.generic_visit(node)

    def visit_MatchAs(self, node: ast.MatchAs) -> None:
        if node.name:
            self.cur.bound.add(node.name)
        self.generic_visit(node)

    def visit_MatchStar(self, node: ast.MatchStar) -> None:
        if node.name:
            self.cur.bound.add(node.name)

    def visit_MatchMapping(self, node: ast.MatchMapping) -> None:
        if node.rest:
            self.cur.bound.add(node.rest)
        self.generic_visit(node)

    def _function(self, node: ast.AST, args: ast.arguments, body: list[ast.stmt] | list[ast.expr],
                  decorators: list[ast.expr], returns: ast.expr | None) -> None:
        # Decorators, defaults and annotations belong to the enclosing scope.
        self._visit_all(decorators)
        self._visit_all([*args.defaults, *args.kw_defaults])
        self._visit_all([a.annotation for a in _all_args(args)] + [returns])

        def inner() -> None:
            self.cur.bound.update(a.arg for a in _all_args(args))
            self._visit_all(body)

        self._enter(node, "function", inner)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.cur.bound.add(node.name)
        self._function(node, node.args, node.body, node.decorator_list, node.returns)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node, node.args, [node.body], [], None)

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.cur.bound.add(node.name)
        self._visit_all([*node.decorator_list, *node.bases, *node.keywords])
        self._enter(node, "class", lambda: self._visit_all(node.body))

    def _comprehension(self, node: ast.AST, generators: list[ast.comprehension], elts: list[ast.expr]) -> None:
        self.visit(generators[0].iter)  # evaluated in the enclosing scope

        def inner() -> None:
            for i, gen in enumerate(generators):
                self.visit(gen.target)
                if i:
                    self.visit(gen.iter)
                self._visit_all(gen.ifs)
            self._visit_all(elts)

        self._enter(node, "comprehension", inner)

    def visit_ListComp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp) -> None:
        self._comprehension(node, node.generators, [node.elt])

    visit_SetComp = visit_GeneratorExp = visit_ListComp

    def visit_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, node.generators, [node.key, node.value])

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self.visit(node.value)
        _owner(self.cur).bound.add(node.target.id)

    def visit_TypeAlias(self, node: Any) -> None:  # Python 3.12 ``type X = ...``: the value is lazy
        self.cur.bound.add(node.name.id)
        self._enter(node, "function", lambda: self.visit(node.value))


# ---------------------------------------------------------------------------------------------- flow

_Pending = Mapping[str, frozenset[str]]


@dataclass(frozen=True, slots=True)
class _State:
    """What holds at one point of the cell: names surely bound, and callables whose lookups are pending."""

    glob: frozenset[str] = frozenset()  # module names surely bound by this cell (or this function) so far
    pending: _Pending = field(default_factory=dict)  # cell-defined callable -> module names it reads
    cls: frozenset[str] | None = None  # inside a class body: names that body surely bound
    cls_pending: _Pending = field(default_factory=dict)  # methods of that class body, as ``pending``


def _union(a: _Pending, b: _Pending) -> _Pending:
    if not b:
        return a
    if not a:
        return b
    return {k: a.get(k, frozenset()) | b.get(k, frozenset()) for k in a.keys() | b.keys()}


def _without(p: _Pending, name: str) -> _Pending:
    return {k: v for k, v in p.items() if k != name} if name in p else p


def _meet(a: _State | None, b: _State | None) -> _State | None:
    """Where two paths join: only names bound on both stay bound. ``None`` is an unreachable path."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    cls = a.cls & b.cls if a.cls is not None and b.cls is not None else (a.cls if b.cls is None else b.cls)
    return _State(a.glob & b.glob, _union(a.pending, b.pending), cls, _union(a.cls_pending, b.cls_pending))


def _meet_all(states: Iterable[_State | None]) -> _State | None:
    return functools.reduce(_meet, states, None)


@dataclass(slots=True)
class _Loop:
    breaks: list[_State | None] = field(default_factory=list)
    continues: list[_State | None] = field(default_factory=list)


# Names whose use makes the namespace effects of a cell invisible to its source.
_DYNAMIC_NAMES = frozenset({"eval", "exec", "globals", "locals"})  # and ``vars()`` without an argument
# get_ipython() members that run code or touch the user namespace directly.
_DYNAMIC_SHELL_ATTRS = frozenset({
    "run_cell", "run_cell_async", "run_code", "run_source", "ex", "ev", "push", "drop_by_id", "del_var",
    "reset", "reset_selective", "user_ns", "user_global_ns", "ns_table", "magic", "safe_execfile",
    "safe_run_module", "safe_execfile_ipy",
})
_SHELL_COMMANDS = frozenset({"system", "getoutput", "system_piped", "system_raw"})
# Line magics that change the namespace in ways the line does not show.
_DYNAMIC_MAGICS = frozenset({
    "run", "store", "load", "loadpy", "reset", "reset_selective", "rerun", "recall", "macro", "aimport",
    "pylab", "edit", "paste", "cpaste",
})
# Magics whose argument is Python code: option letters that take a value, and how the code runs
# ("flow": in the notebook namespace, so it can bind names; "deferred": inside a function, as %timeit does).
_CODE_MAGICS: dict[str, tuple[str, Literal["flow", "deferred"]]] = {
    "time": ("", "flow"),
    "prun": ("DlsT", "flow"),
    "debug": ("b", "flow"),
    "timeit": ("nrpv", "deferred"),
}
_OBJECT_MAGICS = frozenset({"pinfo", "pinfo2", "pdoc", "pdef", "psource", "pfile"})
# Context managers that can swallow an exception, so their body may stop anywhere.
_SUPPRESSORS = frozenset({"suppress", "raises", "ExitStack", "AsyncExitStack"})
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_DOLLAR = re.compile(r"\$(\$?[\w.]+)(?=([^']*'[^']*')*[^']*$)")  # IPython's DollarFormatter pattern


class _Flow:
    """Walks a cell in execution order, tracking which module names are surely bound at each point."""

    def __init__(self) -> None:
        self.reads: set[str] = set()
        self.binds: set[str] = set()
        self.deletes: set[str] = set()
        self.imports: dict[str, ImportRef] = {}
        self.star_imports: list[ImportRef] = []
        self.dynamic = False
        self.scopes: dict[ast.AST, _Scope] = {}
        # The context being walked; function bodies swap all of it (see _deferred).
        self.scope = _Scope("module", None)
        self.function = False  # walking a body that runs later (function, lambda, %timeit code)
        self.sink: set[str] = self.reads  # where module-namespace reads go
        self.state: _State | None = _State()
        self.loops: list[_Loop] = []
        self.tries: list[_State | None] = []  # per enclosing try/suppressing with: meet of states seen inside

    # -- entry points

    def run_module(self, tree: ast.Module) -> None:
        _ScopeBuilder(self.scopes, self.scope).visit(tree)
        self.tries.append(self.state)  # the whole cell: where an exception may leave it
        self._block(tree.body)
        seen = self.tries.pop()
        if self.state is None:  # every path raises: functions defined on the way still exist afterwards
            self.state = seen
        self._run_pending()  # functions not called here may be called by a later cell

    def _snippet(self, source: str, mode: Literal["flow", "deferred"]) -> None:
        """Python code inside a magic's argument (``%time y = f(x)``, ``%timeit g(x)``)."""
        try:
            tree = ast.parse(source)
        except SyntaxError:
            for name in _IDENTIFIER.findall(source):  # it will fail there too; keep reads a superset
                self._load(name)
            return
        if mode == "flow":
            root = _Scope("module", None)
            _ScopeBuilder(self.scopes, root).visit(tree)
            outer, self.scope = self.scope, root
            try:
                self._block(tree.body)
            finally:
                self.scope = outer
        else:
            builder = _ScopeBuilder(self.scopes, _Scope("module", None))
            builder._enter(tree, "function", lambda: builder._visit_all(tree.body))
            self._require(self._deferred(tree, lambda: self._block(tree.body)))

    # -- names

    def _load(self, name: str) -> None:
        kind = _resolve_load(name, self.scope)
        st = self.state
        if kind == _LOCAL or st is None:
            return
        if kind == _CLASS and st.cls is not None and name in st.cls:
            if name in st.cls_pending:
                self.state = replace(st, cls_pending=_without(st.cls_pending, name))
                self._require(st.cls_pending[name])
            return
        self._require((name,))

    def _require(self, names: Iterable[str]) -> None:
        """Module names looked up now; a cell-defined callable among them may run, so its lookups count too."""
        st = self.state
        if st is None:
            return
        pending = dict(st.pending)
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in st.glob:
                self.sink.add(name)
                if name in _DYNAMIC_NAMES:  # code may now call anything the cell defined
                    self.dynamic = True
                    todo.extend(n for needs in pending.values() for n in needs)
                    pending.clear()
            if name in pending:
                todo.extend(pending.pop(name))
        if len(pending) != len(st.pending):
            self.state = replace(st, pending=pending)

    def _store(self, name: str) -> None:
        kind = _resolve_store(name, self.scope)
        st = self.state
        if kind == _LOCAL:
            return
        if kind == _CLASS:
            if st is not None and st.cls is not None:
                self.state = replace(st, cls=st.cls | {name}, cls_pending=_without(st.cls_pending, name))
            return
        self.binds.add(name)
        if not self.function and self.scope.kind == "module":
            self.imports.pop(name, None)  # re-added by an import statement right after this
        if st is not None:
            self.state = replace(st, glob=st.glob | {name}, pending=_without(st.pending, name))

    def _delete(self, name: str) -> None:
        kind = _resolve_store(name, self.scope)
        st = self.state
        if kind == _GLOBAL and st is not None and name not in st.glob:
            self.sink.add(name)  # ``del x`` needs x to exist
        self._unbind(name)

    def _unbind(self, name: str) -> None:
        kind = _resolve_store(name, self.scope)
        st = self.state
        if kind == _LOCAL:
            return
        if kind == _CLASS:
            if st is not None and st.cls is not None:
                self.state = replace(st, cls=st.cls - {name}, cls_pending=_without(st.cls_pending, name))
            return
        if not self.function:
            self.deletes.add(name)
            self.imports.pop(name, None)
        if st is not None:
            self.state = replace(st, glob=st.glob - {name}, pending=_without(st.pending, name))

    def _bind_callable(self, name: str, needs: frozenset[str], *, runs_now: bool) -> None:
        """Bind a def/class/lambda name; its module lookups wait until it may run (see module docstring)."""
        self._store(name)
        if runs_now or self.function:
            self._require(needs)
            return
        st = self.state
        if st is None or not needs:
            return
        kind = _resolve_store(name, self.scope)
        if kind == _GLOBAL:
            self.state = replace(st, pending={**st.pending, name: needs})
        elif kind == _CLASS:
            self.state = replace(st, cls_pending={**st.cls_pending, name: needs})
        else:
            self._require(needs)

    def _go_dynamic(self) -> None:
        self.dynamic = True
        if not self.function:
            self._run_pending()

    def _run_pending(self) -> None:
        """Every callable the cell defined may run from here on: their lookups are reads now."""
        st = self.state
        if st is not None and st.pending:
            self.state = replace(st, pending={})
            self._require(frozenset().union(*st.pending.values()))

    def _deferred(self, node: ast.AST, walk: Callable[[], None]) -> frozenset[str]:
        """Walk a body that runs later (at call time); return the module names it may read."""
        saved = (self.scope, self.function, self.sink, self.state, self.loops, self.tries)
        self.scope, self.function, self.sink = self.scopes[node], True, set()
        self.state, self.loops, self.tries = _State(), [], []
        try:
            walk()
            return frozenset(self.sink)
        finally:
            self.scope, self.function, self.sink, self.state, self.loops, self.tries = saved

    # -- statements

    def _block(self, body: Iterable[ast.stmt]) -> None:
        for stmt in body:
            self._stmt(stmt)

    def _observe(self) -> None:
        if self.state is not None:
            self.tries = [_meet(acc, self.state) for acc in self.tries]

    def _stmt(self, node: ast.stmt) -> None:
        self._observe()
        handler = getattr(self, "_s_" + type(node).__name__, None)
        if handler is not None:
            handler(node)
        else:  # syntax newer than this module: at least see its expressions and statements
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    self._stmt(child)
                else:
                    self._expr(child)
        self._observe()

    def _s_Expr(self, node: ast.Expr) -> None:
        self._expr(node.value)

    def _s_Assign(self, node: ast.Assign) -> None:
        target, value = node.targets[0], node.value
        if (isinstance(value, ast.Lambda) and len(node.targets) == 1 and isinstance(target, ast.Name)
                and not self.function):
            # ``f = lambda: g`` is a def by another name: its lookups wait until f is used
            self._defaults(value.args)
            needs = self._deferred(value, lambda: self._expr(value.body))
            self._bind_callable(target.id, needs, runs_now=False)
            return
        self._expr(node.value)
        for t in node.targets:
            self._expr(t)

    def _s_AugAssign(self, node: ast.AugAssign) -> None:
        if isinstance(node.target, ast.Name):
            self._load(node.target.id)
            self._expr(node.value)
            self._store(node.target.id)
        else:
            self._expr(node.target)
            self._expr(node.value)

    def _s_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._expr(node.value)
        if self.scope.kind in ("module", "class"):  # annotations of locals are never evaluated
            self._expr(node.annotation)
        if node.value is not None or not isinstance(node.target, ast.Name):
            self._expr(node.target)

    def _s_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            self._expr(target)

    def _s_Pass(self, node: ast.stmt) -> None:
        pass

    _s_Global = _s_Nonlocal = _s_Pass

    def _s_Return(self, node: ast.Return) -> None:
        if node.value is not None:
            self._expr(node.value)
        self.state = None

    def _s_Raise(self, node: ast.Raise) -> None:
        if node.exc is not None:
            self._expr(node.exc)
        if node.cause is not None:
            self._expr(node.cause)
        self.state = None

    def _s_Break(self, node: ast.Break) -> None:
        if self.loops:
            self.loops[-1].breaks.append(self.state)
        self.state = None

    def _s_Continue(self, node: ast.Continue) -> None:
        if self.loops:
            self.loops[-1].continues.append(self.state)
        self.state = None

    def _s_Assert(self, node: ast.Assert) -> None:
        self._expr(node.test)
        if node.msg is not None:
            after = self.state
            self._expr(node.msg)  # evaluated only on the failing path, which raises
            self.state = after

    def _s_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            local = alias.asname or alias.name.partition(".")[0]
            self._store(local)
            if self._at_top_level():
                self.imports[local] = ImportRef(alias.name, None, 0, alias.asname)

    def _s_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            ref = ImportRef(node.module or "", alias.name, node.level, alias.asname)
            if alias.name == "*":
                if self._at_top_level():
                    self.star_imports.append(ref)
                continue
            local = alias.asname or alias.name
            self._store(local)
            if self._at_top_level():
                self.imports[local] = ref

    def _at_top_level(self) -> bool:
        return not self.function and self.scope.kind == "module"

    def _s_If(self, node: ast.If) -> None:
        self._expr(node.test)
        after_test = self.state
        self._block(node.body)
        taken, self.state = self.state, after_test
        self._block(node.orelse)
        self.state = _meet(taken, self.state)

    def _s_For(self, node: ast.For | ast.AsyncFor) -> None:
        self._expr(node.iter)

        def body() -> None:
            self._expr(node.target)
            self._block(node.body)

        self._loop(lambda: None, body, node.orelse, infinite=False)

    _s_AsyncFor = _s_For

    def _s_While(self, node: ast.While) -> None:
        infinite = isinstance(node.test, ast.Constant) and bool(node.test.value)
        self._loop(lambda: self._expr(node.test), lambda: self._block(node.body), node.orelse,
                   infinite=infinite)

    def _loop(self, test: Callable[[], None], body: Callable[[], None], orelse: list[ast.stmt], *,
              infinite: bool) -> None:
        """Iterate the body from the loop head until the head state is stable (the body may run 0..n times)."""
        entry = head = exhausted = self.state
        loop = _Loop()
        for _ in range(100):  # the lattice is finite and the walk monotone: a few rounds at most
            loop = _Loop()
            self.loops.append(loop)
            self.state = head
            test()
            exhausted = self.state
            body()
            self.loops.pop()
            new_head = _meet_all([entry, self.state, *loop.continues])
            if new_head == head:
                break
            head = new_head
        self.state = None if infinite else exhausted
        self._block(orelse)
        self.state = _meet_all([self.state, *loop.breaks])

    def _s_Try(self, node: ast.Try) -> None:
        entry = self.state
        loop = self.loops[-1] if self.loops else None
        marks = (len(loop.breaks), len(loop.continues)) if loop else (0, 0)
        if node.finalbody:
            self.tries.append(entry)  # finally: reached from anywhere in body, handlers or else
        self.tries.append(entry)  # handlers: reached from anywhere in the body
        self._block(node.body)
        handler_entry = self.tries.pop()
        ends: list[_State | None] = []
        body_end = self.state
        for handler in node.handlers:
            self.state = handler_entry
            if handler.type is not None:
                self._expr(handler.type)
            if handler.name:
                self._store(handler.name)
            self._block(handler.body)
            if handler.name:
                self._unbind(handler.name)  # Python deletes the name when the handler ends
            ends.append(self.state)
        self.state = body_end
        self._block(node.orelse)
        normal = _meet_all([self.state, *ends])
        if not node.finalbody:
            self.state = normal
            return
        anywhere = self.tries.pop()
        self.state = _meet(anywhere, normal)  # for its reads: finally may start from an exception
        self._block(node.finalbody)
        self.state = normal  # for what follows: only the paths that complete normally continue
        if normal is not None:
            self._block(node.finalbody)
        if loop is not None:  # break/continue inside the try pass through finally, which may delete
            gone = {n.id for n in ast.walk(ast.Module(node.finalbody, [])) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Del)}
            gone |= {h.name for n in ast.walk(ast.Module(node.finalbody, []))
                     if isinstance(n, ast.Try) for h in n.handlers if h.name}
            if gone:
                for jumps, mark in ((loop.breaks, marks[0]), (loop.continues, marks[1])):
                    jumps[mark:] = [None if s is None else replace(s, glob=s.glob - gone) for s in jumps[mark:]]

    _s_TryStar = _s_Try

    def _s_With(self, node: ast.With | ast.AsyncWith) -> None:
        suppresses = any(_may_suppress(item.context_expr) for item in node.items)
        if suppresses:
            self.tries.append(self.state)
        for item in node.items:
            self._expr(item.context_expr)
            if item.optional_vars is not None:
                self._expr(item.optional_vars)
        self._block(node.body)
        if suppresses:
            self.state = _meet(self.tries.pop(), self.state)

    _s_AsyncWith = _s_With

    def _s_Match(self, node: ast.Match) -> None:
        self._expr(node.subject)
        subject = self.state
        ends: list[_State | None] = []
        exhaustive = False
        for case in node.cases:
            self.state = subject  # a failed earlier case may have bound some captures: assume it did not
            self._pattern(case.pattern)
            if case.guard is not None:
                self._expr(case.guard)
            self._block(case.body)
            ends.append(self.state)
            exhaustive = exhaustive or (case.guard is None and _irrefutable(case.pattern))
        if not exhaustive:
            ends.append(subject)
        self.state = _meet_all(ends)

    def _pattern(self, node: ast.pattern) -> None:
        if isinstance(node, ast.MatchValue):
            self._expr(node.value)
        elif isinstance(node, ast.MatchAs):
            if node.pattern is not None:
                self._pattern(node.pattern)
            if node.name:
                self._store(node.name)
        elif isinstance(node, ast.MatchStar):
            if node.name:
                self._store(node.name)
        elif isinstance(node, ast.MatchOr):
            before, ends = self.state, []
            for alternative in node.patterns:
                self.state = before
                self._pattern(alternative)
                ends.append(self.state)
            self.state = _meet_all(ends)
        elif isinstance(node, ast.MatchMapping):
            for key in node.keys:
                self._expr(key)
            for sub in node.patterns:
                self._pattern(sub)
            if node.rest:
                self._store(node.rest)
        elif isinstance(node, ast.MatchClass):
            self._expr(node.cls)
            for sub in [*node.patterns, *node.kwd_patterns]:
                self._pattern(sub)
        elif isinstance(node, ast.MatchSequence):
            for sub in node.patterns:
                self._pattern(sub)
        # MatchSingleton reads nothing

    def _defaults(self, args: ast.arguments) -> None:
        for default in [*args.defaults, *args.kw_defaults]:
            if default is not None:
                self._expr(default)

    def _s_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        for decorator in node.decorator_list:
            self._expr(decorator)
        self._defaults(node.args)
        for annotation in [a.annotation for a in _all_args(node.args)] + [node.returns]:
            if annotation is not None:
                self._expr(annotation)
        needs = self._deferred(node, lambda: self._block(node.body))
        self._bind_callable(node.name, needs, runs_now=bool(node.decorator_list))

    _s_AsyncFunctionDef = _s_FunctionDef

    def _s_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *node.keywords]:
            self._expr(expr)
        st = self.state
        if st is None:
            return
        saved = (self.scope, self.loops, self.tries)
        self.scope, self.loops, self.tries = self.scopes[node], [], []
        self.state = replace(st, cls=frozenset(), cls_pending={})
        try:
            self._block(node.body)  # runs now, in its own namespace that falls back to the module's
        finally:
            self.scope, self.loops, self.tries = saved
        end = self.state
        if end is None:
            return
        methods = frozenset().union(*end.cls_pending.values())
        self.state = replace(end, cls=st.cls, cls_pending=st.cls_pending)
        self._bind_callable(node.name, methods, runs_now=bool(node.decorator_list))

    def _s_TypeAlias(self, node: Any) -> None:  # Python 3.12 ``type X = ...``
        needs = self._deferred(node, lambda: self._expr(node.value))
        self._bind_callable(node.name.id, needs, runs_now=False)

    # -- expressions, in evaluation order where a walrus could tell the difference

    def _expr(self, node: ast.AST) -> None:
        handler = getattr(self, "_e_" + type(node).__name__, None)
        if handler is not None:
            handler(node)
        else:
            for child in ast.iter_child_nodes(node):
                self._expr(child)

    def _e_Name(self, node: ast.Name) -> None:
        if isinstance(node.ctx, ast.Load):
            self._load(node.id)
        elif isinstance(node.ctx, ast.Store):
            self._store(node.id)
        else:
            self._delete(node.id)

    def _e_NamedExpr(self, node: ast.NamedExpr) -> None:
        self._expr(node.value)
        outer, self.scope = self.scope, _owner(self.scope)
        try:
            self._store(node.target.id)
        finally:
            self.scope = outer

    def _e_BoolOp(self, node: ast.BoolOp) -> None:
        self._expr(node.values[0])
        first = self.state
        for value in node.values[1:]:  # may be skipped by short-circuiting
            self._expr(value)
        self.state = _meet(first, self.state)

    def _e_Compare(self, node: ast.Compare) -> None:
        self._expr(node.left)
        self._expr(node.comparators[0])
        first = self.state
        for value in node.comparators[1:]:
            self._expr(value)
        self.state = _meet(first, self.state)

    def _e_IfExp(self, node: ast.IfExp) -> None:
        self._expr(node.test)
        after_test = self.state
        self._expr(node.body)
        taken, self.state = self.state, after_test
        self._expr(node.orelse)
        self.state = _meet(taken, self.state)

    def _e_Dict(self, node: ast.Dict) -> None:
        for key, value in zip(node.keys, node.values):
            if key is not None:
                self._expr(key)
            self._expr(value)

    def _e_Lambda(self, node: ast.Lambda) -> None:
        self._defaults(node.args)
        self._require(self._deferred(node, lambda: self._expr(node.body)))  # assume it runs right away

    def _comprehension(self, node: ast.AST, generators: list[ast.comprehension], elts: list[ast.expr]) -> None:
        self._expr(generators[0].iter)
        before, outer = self.state, self.scope
        self.scope = self.scopes[node]
        try:
            for i, gen in enumerate(generators):
                if i:
                    self._expr(gen.iter)
                self._expr(gen.target)
                for cond in gen.ifs:
                    self._expr(cond)
            for elt in elts:
                self._expr(elt)
        finally:
            self.scope = outer
        self.state = _meet(before, self.state)  # zero iterations: a walrus inside may not have run

    def _e_ListComp(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp) -> None:
        # A generator runs lazily, but later states only bind more, so checking its reads now is safe.
        self._comprehension(node, node.generators, [node.elt])

    _e_SetComp = _e_GeneratorExp = _e_ListComp

    def _e_DictComp(self, node: ast.DictComp) -> None:
        self._comprehension(node, node.generators, [node.key, node.value])

    def _e_Attribute(self, node: ast.Attribute) -> None:
        self._expr(node.value)
        if _is_get_ipython_call(node.value) and node.attr in _DYNAMIC_SHELL_ATTRS:
            self._go_dynamic()

    def _e_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Attribute) and _is_get_ipython_call(func.value):
            self._expr(func.value)
            self._shell_call(func.attr, node)
        else:
            self._expr(func)
            if (isinstance(func, ast.Name) and func.id == "vars" and not node.args and self.state is not None
                    and _resolve_load("vars", self.scope) == _GLOBAL and "vars" not in self.state.glob):
                self._go_dynamic()
        for arg in node.args:
            self._expr(arg)
        for keyword in node.keywords:
            self._expr(keyword.value)

    # -- what IPython's transformer produced: get_ipython().run_line_magic(...), .system(...), ...

    def _shell_call(self, method: str, node: ast.Call) -> None:
        args = [a.value if isinstance(a, ast.Constant) and isinstance(a.value, str) else None
                for a in node.args]
        if method in _SHELL_COMMANDS and args and args[0] is not None:
            self._expand(args[0])
        elif method == "run_line_magic" and len(args) >= 2 and args[0] is not None and args[1] is not None:
            self._line_magic(args[0], args[1])
        elif method == "run_cell_magic" and len(args) >= 3 and None not in args[:3]:
            self._cell_magic(str(args[0]), str(args[1]), str(args[2]))
        elif method in _DYNAMIC_SHELL_ATTRS or method in ("run_line_magic", "run_cell_magic"):
            self._go_dynamic()

    def _expand(self, text: str) -> None:
        """IPython expands ``$name`` and ``{expr}`` in magic lines and shell commands from the namespace."""
        for name in _expanded_names(text):
            self._load(name)

    def _line_magic(self, magic: str, line: str) -> None:
        self._expand(line)
        if magic in _DYNAMIC_MAGICS:
            self._go_dynamic()
        elif magic == "xdel":
            for name in line.split():
                if name.isidentifier():
                    self._delete(name)
        elif magic in _OBJECT_MAGICS:
            try:
                expr = ast.parse(line.strip(), mode="eval")
            except SyntaxError:
                return
            self._expr(expr.body)
        elif magic in _CODE_MAGICS:
            takes_value, mode = _CODE_MAGICS[magic]
            options, code = _split_options(line, takes_value)
            self._snippet(code, mode)
            if magic == "timeit" and options.get("v"):
                self._store(options["v"])  # ``%timeit -v name`` stores the result in the namespace

    def _cell_magic(self, magic: str, line: str, body: str) -> None:
        self._expand(line)
        if magic in ("time", "prun", "capture"):
            _, rest = _split_options(line, _CODE_MAGICS.get(magic, ("", ""))[0])
            tree = _parse(body, what=f"the %%{magic} body")
            outer, self.scope = self.scope, _Scope("module", None)
            try:
                _ScopeBuilder(self.scopes, self.scope).visit(tree)
                self._block(tree.body)
            finally:
                self.scope = outer
            if magic == "capture" and rest.split() and rest.split()[0].isidentifier():
                self._store(rest.split()[0])  # ``%%capture out`` binds the captured output
        elif magic == "timeit":
            _, setup = _split_options(line, _CODE_MAGICS["timeit"][0])
            self._snippet(setup, "deferred")
            self._snippet(transform_cell(body), "deferred")


def _is_get_ipython_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "get_ipython"
            and not node.args and not node.keywords)


def _may_suppress(expr: ast.expr) -> bool:
    target = expr.func if isinstance(expr, ast.Call) else expr
    name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)
    return name in _SUPPRESSORS


def _irrefutable(pattern: ast.pattern) -> bool:
    if isinstance(pattern, ast.MatchAs):
        return pattern.pattern is None or _irrefutable(pattern.pattern)
    if isinstance(pattern, ast.MatchOr):
        return any(_irrefutable(p) for p in pattern.patterns)
    return False


def _expanded_names(text: str) -> set[str]:
    """Names IPython's ``var_expand`` may look up in ``text`` (``$name``, ``$obj.attr``, ``{expr}``)."""
    names: set[str] = set()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError:  # unbalanced braces: IPython leaves the text as it is
        parsed = [(text, None, None, None)]
    fields = [f for _, f, _, _ in parsed if f]
    literal = "".join(lit for lit, _, _, _ in parsed)
    for _, _, spec, _ in parsed:
        if spec and "{" in spec:  # "{x:>{width}}"
            names |= _expanded_names(spec)
    for expr in fields:
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError:
            continue
        names.update(n.id for n in ast.walk(tree) if isinstance(n, ast.Name))
    for match in _DOLLAR.finditer(literal):
        head = match.group(1).partition(".")[0]
        if head.isidentifier():  # "$$x" is an escaped dollar, "$1" is not a name
            names.add(head)
    return names


def _split_options(line: str, takes_value: str) -> tuple[dict[str, str], str]:
    """Split getopt-style leading options (``-n 10 -r3 -q --no-raise-error``) from a magic's code."""
    options: dict[str, str] = {}
    rest = line.lstrip()
    while rest.startswith("-") and len(rest) > 1 and not rest[1].isdigit() and not rest[1].isspace():
        token, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        if token.startswith("--"):
            options[token[2:]] = ""
            continue
        letters = token[1:]
        for i, letter in enumerate(letters):
            if letter in takes_value:
                value = letters[i + 1:]
                if not value:
                    value, _, rest = rest.partition(" ")
                    rest = rest.lstrip()
                options[letter] = value
                break
            options[letter] = ""
    return options, rest
