"""What a ``%%sky`` cell does, client side (:func:`run_cell`): find its inputs, ship to each node only what it
lacks (:class:`~sky_jupyter.notebook.syncbook.SyncBook` knows what each holds), run it on its nodes, write its output
into the cell, and bring back the names it bound.

The nodes watch the values the notebook holds copies of: one a cell changed in place (``cfg.lr *= 2``) comes back
from the first rank like a name the cell bound, with a notice, and the other ranks keep their own copies.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import protocol as P
from ..errors import ConfigError, SerializationError
from ..node import Call
from ..pool import ComputePool, Request
from ..remote import Remote
from ..shipping import register_user_modules
from .capture import CellNames, analyze, transform_cell
from .output import CellOutput
from .syncbook import SyncBook

FAILURE_GRACE = 2.0  # seconds the other nodes may keep running after one node's cell failed
DEFAULT_BUDGET = 64 << 20
_SKIP = {"In", "Out", "get_ipython", "exit", "quit", "open", "_", "__", "___", "_i", "_ii", "_iii", "_oh", "_ih",
         "_dh", "__builtins__", "__builtin__", "__name__", "__doc__", "__spec__", "__loader__", "__package__"}


@dataclass
class CellOptions:
    ranks: list[int]
    pull: bool = True
    pull_names: tuple[str, ...] = ()
    timeout: float | None = None
    budget: int = DEFAULT_BUDGET
    show_all: bool = False  # display the last expression's value from every node, not only the first's
    output: str | None = None  # "head" or "all": whose stdout shows (None: the pool's default)


@dataclass
class BackgroundCell:
    """A ``%%sky --bg`` cell running on a thread of its own; ``error`` is what it raised, once ``done``."""

    ranks: list[int]
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None

    @property
    def running(self) -> bool:
        return not self.done.is_set()


@dataclass
class NotebookPool:
    """A running pool as the notebook sees it, with what each node's namespace holds."""

    pool: ComputePool
    settings: dict[str, Any]
    book: SyncBook = field(default_factory=SyncBook)  # what each worker's namespace holds of the notebook's values
    busy: int = 0
    last_sent: dict[int, list[str]] = field(default_factory=dict)  # rank -> input names the last cell shipped
    last_rehash: dict[int, float] = field(default_factory=dict)  # rank -> seconds it spent hashing the last cell's
    # inputs to see whether the cell changed them (ranks that watched none are absent)
    lock: threading.Lock = field(default_factory=threading.Lock)
    background: BackgroundCell | None = None  # the last ``%%sky --bg`` cell, until ``%sky wait`` collects it

    @property
    def name(self) -> str:
        return self.pool.name



def notebook_globals(values: dict[str, Any], user_ns: dict[str, Any]) -> set[str]:
    """Names in the notebook namespace that notebook functions and classes among ``values`` read as globals,
    transitively, so the node has them when those functions run there."""
    found: set[str] = set()
    todo = list(values.values())
    seen: set[int] = set()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        codes: list[types.CodeType] = []
        if isinstance(obj, types.FunctionType) and obj.__module__ == "__main__":
            codes.append(obj.__code__)
        elif isinstance(obj, type) and obj.__module__ == "__main__":
            for member in vars(obj).values():
                fn = getattr(member, "__func__", member)
                if isinstance(fn, types.FunctionType):
                    codes.append(fn.__code__)
        while codes:
            code = codes.pop()
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
            for name in code.co_names:
                if name in user_ns and name not in found and name not in _SKIP and not name.startswith("_"):
                    found.add(name)
                    todo.append(user_ns[name])
    return found


def select_inputs(names: CellNames, user_ns: dict[str, Any], hidden: set[str] | dict[str, Any]) -> dict[str, Any]:
    chosen = {n for n in names.reads if n in user_ns and n not in hidden and n not in _SKIP}
    values = {n: user_ns[n] for n in chosen}
    extra = notebook_globals(values, user_ns) - chosen - set(hidden)
    values.update({n: user_ns[n] for n in extra})
    return values


def pickle_inputs(values: dict[str, Any], pool_name: str) -> tuple[dict[str, list], dict[str, str], dict[str, str]]:
    """(frames by name, hash by name, remote refs by name). Every unpicklable input is reported at once."""
    register_user_modules()
    frames: dict[str, list] = {}
    hashes: dict[str, str] = {}
    refs: dict[str, str] = {}
    problems = []
    for name in sorted(values):
        value = values[name]
        if isinstance(value, Remote):
            if value.pool != pool_name:
                raise ConfigError(f"{name!r} is a handle to a value on pool {value.pool!r}, not {pool_name!r}; "
                                  f"run the cell with --pool {value.pool}, or `%sky pull {name}` first.")
            refs[name] = value.name
            continue
        try:
            frames[name] = P.dumps(value)
        except Exception as exc:  # noqa: BLE001 - reported below with the variable's name
            problems.append(f"{name!r} ({type(value).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r})")
            continue
        hashes[name] = P.content_hash(frames[name])
    if problems:
        raise SerializationError(
            f"cannot send notebook variable{'s' if len(problems) > 1 else ''} {', '.join(problems)} to the "
            f"node; nothing ran. Create {'them' if len(problems) > 1 else 'it'} inside the %%sky cell instead.")
    return frames, hashes, refs


class DisplayedValue:
    """The last expression's value, shown with the rich representation the node computed."""

    def __init__(self, bundle: dict[str, Any]) -> None:
        self.bundle = bundle

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return self.bundle.get("data", {}), self.bundle.get("metadata") or {}

    def __repr__(self) -> str:
        return str(self.bundle.get("data", {}).get("text/plain", ""))


class DisplayedValues:
    """The last expression's value of every node of a cell (``--show-all``), labelled with its rank."""

    def __init__(self, bundles: dict[int, dict[str, Any] | None]) -> None:
        self.bundles = bundles

    def _text(self, rank: int) -> str:
        bundle = self.bundles[rank]
        return str(bundle.get("data", {}).get("text/plain", "")) if bundle else "(no value)"

    def _repr_html_(self) -> str:
        import html

        rows = []
        for rank, bundle in sorted(self.bundles.items()):
            data = (bundle or {}).get("data", {})
            cell = data.get("text/html") or f"<pre>{html.escape(self._text(rank))}</pre>"
            rows.append(f"<tr><th style='vertical-align:top'>node {rank}</th><td>{cell}</td></tr>")
        return f"<table>{''.join(rows)}</table>"

    def __repr__(self) -> str:
        return "\n".join(f"[node {rank}] {self._text(rank)}" for rank in sorted(self.bundles))


def run_cell(npool: NotebookPool, source: str, user_ns: dict[str, Any], hidden: Any, options: CellOptions,
             plain: bool, on_sent: Callable[[], None] | None = None) -> Any:
    """Run ``source`` on ``options.ranks`` of the pool; returns what the cell should display (or None).
    ``on_sent`` is called once every node has the cell (its inputs taken from ``user_ns`` as they were then)."""
    names, python, filename = _analyzed(source)
    pool = npool.pool
    pool.sync()  # Image(includes=...) edited since the last cell: the nodes get the changed files first
    frames, hashes, refs = pickle_inputs(select_inputs(names, user_ns, hidden), pool.name)
    code: P.CellMeta = {"code": source, "python": python, "filename": filename, "reads": sorted(frames),
                        "refs": refs, "binds": sorted(names.binds | names.deletes | set(options.pull_names)),
                        "budget": options.budget}
    output = _output_for(pool, options, plain)
    with _in_use(npool):
        try:
            calls = _submit(npool, code, frames, hashes, options, output)
            if on_sent is not None:
                on_sent()
            results, failures = _wait(calls, output, options.timeout)
        finally:
            output.finish()
    _record(npool, calls, hashes, results)
    if failures:
        raise failures[0][1]
    first = options.ranks[0]
    shown = _bring_back(npool, results[first], names, user_ns, first, options)
    _tell(results[first], names, pool.tag(pool.workers[first]), options)
    if options.show_all and len(options.ranks) > 1:
        return DisplayedValues({rank: results[rank].get("display") for rank in options.ranks})
    return shown


def _output_for(pool: ComputePool, options: CellOptions, plain: bool) -> CellOutput:
    """Where the cell's ranks write: labelled as the pool labels them, stdout shown from the ranks that show it."""
    workers = pool.workers
    alone = len(options.ranks) == 1
    quiet = {r for r in options.ranks if not pool.shows_stdout(workers[r], options.output, alone)}
    return CellOutput(options.ranks, plain, {r: pool.tag(workers[r]) for r in options.ranks}, quiet)


@contextlib.contextmanager
def _in_use(npool: NotebookPool) -> Iterator[None]:
    """The pool runs a cell meanwhile: not idle (its idle shutdown waits), and busy in ``%sky status``."""
    with npool.lock:
        npool.busy += 1
    try:
        yield
    finally:
        with npool.lock:
            npool.busy -= 1
        npool.pool.last_used = time.monotonic()


def _submit(npool: NotebookPool, code: P.CellMeta, frames: dict[str, list], hashes: dict[str, str],
            options: CellOptions, output: CellOutput) -> list[tuple[int, Call, list[str]]]:
    """Send the cell to each of its ranks with the inputs that rank lacks; (rank, call, names sent) each."""
    pool = npool.pool
    workers = pool.workers
    first = options.ranks[0]
    # Everything prepared before the first frame leaves, so the frames go out back to back: a node that starts
    # working takes CPU time that a client on the same cores would otherwise lose mid-loop.
    requests = []
    payloads: dict[tuple[str, ...], list] = {}  # one list per distinct set of inputs: shared on a node
    for rank in options.ranks:
        worker = workers[rank]
        worker.ensure_link()  # a worker that died is replaced now, so its inputs are all sent again
        send = npool.book.to_send(rank, worker.incarnation, hashes)
        payload = payloads.setdefault(tuple(send), [f for n in send for f in frames[n]])
        meta: P.CellMeta = {**code, "inputs": [(n, len(frames[n])) for n in send],
                            "pull": options.pull and rank == first, "display": rank == first or options.show_all}
        requests.append((rank, send, Request(worker, P.CELL, meta, payload, output.sink(rank),
                                             on_done=output.wake)))
    # A node that cannot take the cell raises here, its siblings already stopped where they started.
    submitted = pool.submit_many([request for _, _, request in requests])
    pool.last_used = time.monotonic()
    return [(rank, call, send) for (rank, send, _), call in zip(requests, submitted)]


def _record(npool: NotebookPool, calls: list[tuple[int, Call, list[str]]], hashes: dict[str, str],
            results: dict[int, dict[str, Any]]) -> None:
    """What each rank holds after the cell (see :class:`SyncBook`), and what it sent, for ``%sky status``/tests."""
    npool.last_sent = {rank: sent for rank, _, sent in calls}
    npool.last_rehash = {rank: results[rank]["rehash_s"] for rank in results if "rehash_s" in results[rank]}
    for rank, _, sent in calls:
        npool.book.cell_done(rank, sent, hashes, results.get(rank))
    npool.book.shipped(hashes, {n for _, _, sent in calls for n in sent})


def _client_hash(value: Any) -> str | None:
    """The hash of the notebook's copy of a value, as a cell that reads it will compute it; None when it cannot be
    pickled (it is then sent each time it is read, and refused then)."""
    try:
        return P.content_hash(P.dumps(value))
    except Exception:  # noqa: BLE001 - pickling user objects can raise anything
        return None


@functools.lru_cache(maxsize=256)
def _analyzed(source: str) -> tuple[CellNames, str, str]:
    """The cell's names, its IPython-transformed source and the file name its code runs under on the nodes (named
    after the content, as ipykernel does, so a node compiles a re-run cell once); re-running a cell reuses them."""
    filename = f"<sky-cell-{hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()[:10]}>"
    return analyze(source), transform_cell(source), filename


def _wait(calls: list[tuple[int, Call, list[str]]], output: CellOutput, timeout: float | None
          ) -> tuple[dict[int, dict[str, Any]], list[tuple[int, BaseException]]]:
    deadline = None if timeout is None else time.monotonic() + timeout
    failed_at: float | None = None
    interrupted: set[int] = set()  # ranks this wait stopped because another failed
    try:
        while not all(call.done() for _, call, _ in calls):
            output.pump(0.1)
            if failed_at is None and any(call.failed() for _, call, _ in calls):
                failed_at = time.monotonic()
            elif failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE:
                # One node failed: the others would wait forever in collective operations. Stop them too.
                for rank, call, _ in calls:
                    if not call.done():
                        interrupted.add(rank)
                        call.interrupt()
                _drain(calls, output)
                break
            if deadline is not None and time.monotonic() > deadline:
                for _, call, _ in calls:
                    call.interrupt()
                _drain(calls, output)
                raise TimeoutError(f"the cell ran longer than --timeout {timeout:g} s and was interrupted on "
                                   f"every node")
    except KeyboardInterrupt:
        for _, call, _ in calls:
            if not call.done():
                call.interrupt()
        _drain(calls, output)
        raise
    results: dict[int, dict[str, Any]] = {}
    failures: list[tuple[int, BaseException]] = []
    stopped: list[int] = []
    for rank, call, _ in calls:
        try:
            results[rank] = call.wait(0)
        except KeyboardInterrupt as exc:
            if rank in interrupted:  # stopped here because another node failed
                stopped.append(rank)
            else:  # raised by the cell's own code on the node: a failure like any other
                failures.append((rank, exc))
        except BaseException as exc:  # noqa: BLE001 - gathered (SystemExit on a node too), the first re-raised
            failures.append((rank, exc))
    if failures and len(calls) > 1:
        ranks = ", ".join(str(r) for r, _ in failures)
        several = any(call.node.per_node > 1 for _, call, _ in calls)
        unit, first = ("workers", f"rank {failures[0][0]}") if several else ("nodes", f"node {failures[0][0]}")
        note = (f"failed on {len(failures)} of {len(calls)} {unit} (ranks {ranks}); the traceback shown is "
                f"{first}'s")
        if stopped and failed_at is not None:
            note += f"; stopped the others (ranks {', '.join(map(str, stopped))})"
        failures[0][1].add_note(note)
    return results, failures


def collect_leftovers(npool: NotebookPool, output: CellOutput) -> None:
    """Wait for what a kernel that died left running on the nodes of a pool this kernel attached to, its output
    written through ``output``; raises its error."""
    calls: list[tuple[int, Call, list[str]]] = [(call.node.rank, call, []) for call in npool.pool.leftovers]
    try:
        _, failures = _wait(calls, output, None)
    finally:
        output.finish()
        npool.pool.leftovers = []
    if failures:
        raise failures[0][1]


def _drain(calls: list[tuple[int, Call, list[str]]], output: CellOutput, limit: float = 15.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end and not all(call.done() for _, call, _ in calls):
        output.pump(0.05)


def _bring_back(npool: NotebookPool, result: dict[str, Any], names: CellNames, user_ns: dict[str, Any],
                rank: int, options: CellOptions) -> Any:
    import importlib

    pool = npool.pool
    for name, frames in result.get("values", {}).items():
        try:
            value = P.loads(frames)
        except Exception as exc:  # noqa: BLE001 - the value stays on the node; say why
            user_ns[name] = Remote(name, "?", sum(memoryview(f).nbytes for f in frames), rank, pool.name,
                                   f"cannot be unpickled here ({type(exc).__name__}: {exc})")
            continue
        user_ns[name] = value
        npool.book.notebook_copy(name, _client_hash(value))
    for name, info in result.get("remote", {}).items():
        user_ns[name] = Remote(name, info["type"], info["size"], rank, pool.name, info.get("reason", ""))
        npool.book.notebook_copy(name, None)
    for name, module in result.get("modules", {}).items():
        try:
            user_ns[name] = importlib.import_module(module)
        except ImportError:
            user_ns[name] = Remote(name, "module", None, rank, pool.name, f"module {module} is not installed here")
    for name in result.get("missing", ()):
        if name in names.deletes and name in user_ns:
            del user_ns[name]
            npool.book.notebook_copy(name, None)
    if "display" in result:
        return DisplayedValue(result["display"])
    return None


def _tell(result: dict[str, Any], names: CellNames, where: str, options: CellOptions) -> None:
    """One notice line each: the notebook values the cell changed in place (the notebook has the node's copies
    now, unless --no-pull), and the ``--pull`` names the node does not have."""
    changed = list(result.get("changed", ()))
    if changed:
        line = f"sky: the cell changed {', '.join(changed)} on {where}; "
        if not options.pull:
            line += (f"the notebook keeps its own cop{'ies' if len(changed) > 1 else 'y'} (--no-pull): "
                     f"`%sky pull {changed[0]}` fetches the node's")
        else:
            line += f"the notebook has the node's cop{'ies' if len(changed) > 1 else 'y'} now"
            stays = [f"{n}: {result['remote'][n].get('reason', '')}" for n in changed if n in result.get("remote", {})]
            if stays:
                line += f" (a sky.Remote handle for {'; '.join(stays)})"
        print(line, file=sys.stderr)
    missing = set(result.get("missing", ()))
    lacking = [n for n in options.pull_names if n in missing and n not in names.deletes]
    if lacking:
        several = len(lacking) > 1
        print(f"sky: --pull: {where} has no variable{'s' if several else ''} {', '.join(repr(n) for n in lacking)} "
              f"(the cell did not bind {'them' if several else 'it'}); nothing came back for "
              f"{'them' if several else 'it'}", file=sys.stderr)


def pull(npool: NotebookPool, name: str, user_ns: dict[str, Any], everything: bool = False) -> Any:
    """``%sky pull NAME [--all]``: fetch the value the nodes hold under NAME (or the one a ``sky.Remote`` handle
    bound to NAME stands for) from its node, or from every worker as a list ordered by rank; bind it to NAME and
    return it. Raises a one-line error, and binds nothing, when a node lacks the name or the value cannot travel."""
    handle = user_ns.get(name)
    remote = handle if isinstance(handle, Remote) else None
    if remote is not None and remote.pool != npool.name:
        raise ConfigError(f"{name!r} is a handle to a value on pool {remote.pool!r}, not {npool.name!r}; "
                          f"`%sky pull {name} --pool={remote.pool}` fetches it")
    source = remote.name if remote is not None else name
    workers = npool.pool.workers
    rank = remote.rank if remote is not None else 0
    if not everything and rank >= len(workers):
        raise ConfigError(f"{name!r} was on rank {rank}, which pool {npool.name!r} no longer has")
    chosen = list(workers) if everything else [workers[rank]]
    calls = [worker.submit(P.PULL, {"names": [source]}) for worker in chosen]
    replies = [call.wait() for call in calls]
    lacking = [worker.label for worker, reply in zip(chosen, replies) if source in reply["missing"]]
    if lacking:
        handle_note = f" (the handle {name!r} stands for it)" if source != name else ""
        raise ConfigError(f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} no variable {source!r}"
                          f"{handle_note}; nothing was pulled (check the name; a restarted worker lost its variables)")
    values = []
    for worker, reply in zip(chosen, replies):
        if source in reply["remote"]:
            raise SerializationError(f"{source!r} stays on {worker.label}: {reply['remote'][source]['reason']}; "
                                     f"use it in a %%sky cell")
        try:
            values.append(P.loads(reply["values"][source]))
        except Exception as exc:  # noqa: BLE001 - unpickling user objects can raise anything
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise SerializationError(f"{source!r} from {worker.label} cannot be rebuilt here ({type(exc).__name__}"
                                     f"{': ' + detail if detail else ''}); it stays on the node: use it in a %%sky "
                                     f"cell, or install here the package that defines its type") from None
    value = values if everything else values[0]
    user_ns[name] = value
    npool.book.notebook_copy(name, _client_hash(value))
    if source == name:  # the node holds the notebook's copy (--all: each rank its own): not sent back when read
        for worker in chosen:
            npool.book.node_keeps(worker.rank, worker.incarnation, name)
    print(f"pulled {name} from {'every worker' if everything else chosen[0].label}")
    return value
