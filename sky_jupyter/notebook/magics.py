"""``%%sky`` and ``%sky``: IPython magics, options declared with IPython's magic argument tools."""

from __future__ import annotations

import contextvars
import copy
import functools
import html
import shlex
import sys
import threading
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import display

from ..errors import ConfigError, SkyError
from .manager import PROVIDERS, PoolRequest, manager, parse_workers_per_node, torch_by_default
from .output import CellOutput, plain_mode
from .session import BackgroundCell, CellOptions, NotebookPool, collect_leftovers, run_cell

_parsed_lines: dict[str, Any] = {}  # %%sky line -> its parsed options


def _render_remote_traceback(exc: BaseException) -> list[str]:
    """What IPython prints for a remote error: the node's traceback (pointing at the cell's lines), then the
    error itself, with none of this extension's frames."""
    cause = exc.__cause__
    tb = getattr(cause, "tb", None) or getattr(exc, "traceback", "") or ""
    lines = [line for line in tb.rstrip("\n").splitlines()]
    if not lines:
        lines = [f"{type(exc).__name__}: {exc}"]
    lines += [f"  {note}" if note.startswith("(") else f"  ({note})" for note in getattr(exc, "__notes__", ())]
    return lines


def _show_remote_traceback(exc: BaseException) -> None:
    """Make IPython print ``exc`` with :func:`_render_remote_traceback` (it calls an exception's
    ``_render_traceback_`` when there is one)."""
    vars(exc)["_render_traceback_"] = functools.partial(_render_remote_traceback, exc)


def _is_remote(exc: BaseException) -> bool:
    """An error raised by the user's code on a node (it carries the node's traceback)."""
    return exc.__cause__ is not None or hasattr(exc, "traceback")


@magics_class
class SkyMagics(Magics):
    @property
    def ipython(self) -> InteractiveShell:
        """The shell these magics were registered with (``Magics.shell`` is None only before that)."""
        assert self.shell is not None
        return self.shell

    @magic_arguments()
    @argument("--provider", choices=PROVIDERS, help="where nodes come from (default: the configured one, local)")
    @argument("--nodes", type=int, help="run on nodes 0..N-1 (the pool grows to N nodes if needed)")
    @argument("--workers-per-node", metavar="N|auto",
              help="worker processes per node: a number, or auto (one per GPU with torch, else one; the default)")
    @argument("--output", choices=("head", "all"),
              help="whose stdout shows: the head worker's alone, or every worker's (labelled); stderr and errors "
                   "always show. Default: head when nodes run several workers, else all")
    @argument("--accelerator", help="GPU kind, e.g. A100 (AWS)")
    @argument("--hf", action="store_true", default=None, help="HuggingFace libraries and login on the nodes")
    @argument("--torch", dest="torch", action="store_true", default=None,
              help="torch.distributed across the nodes (default: on when nodes > 1)")
    @argument("--no-torch", dest="torch", action="store_false", help="no torch.distributed")
    @argument("--rank", type=int, help="run on this one worker of the pool only (its rank: with one worker per "
                                        "node, the node's number)")
    @argument("--pull", metavar="NAMES", help="comma-separated extra names to bring back from rank 0")
    @argument("--no-pull", action="store_true", help="bring nothing back; values stay on the nodes")
    @argument("--show-all", action="store_true",
              help="display the last expression's value from every node (labelled), not only the first's")
    @argument("--timeout", type=float, help="interrupt the cell on every node after this many seconds")
    @argument("--pool", help="which pool (default: the configured one, 'default')")
    @argument("--bg", action="store_true",
              help="run in the background: the notebook stays usable and the output keeps coming to this cell; "
                   "names it binds arrive when it ends; %%sky wait [POOL] waits for it (and raises its error). "
                   "Non-interactive runs (nbval, jupyter execute) run it in the foreground")
    @argument("words", nargs="*", help="for %%sky as a line magic: status | down [NAME|--all] | config "
                                       "KEY=VALUE... | pull NAME [--all] | logs [NODE] | wait [POOL] | attach NAME | "
                                       "panel | gc")
    @line_cell_magic
    def sky(self, line: str, cell: str | None = None) -> Any:
        """Run this cell on remote nodes; or manage pools with ``%sky COMMAND``.

        ``%%sky --nodes 4 --hf`` runs the cell body on nodes 0..3 of the notebook's pool, starting (and
        bootstrapping) the pool first if needed. Notebook variables the cell reads are sent (only those that
        changed since the node last saw them); names the cell binds come back, up to a size budget, and larger
        values become ``sky.Remote`` handles that later cells use in place. Output streams into the cell;
        errors come back with their type and the cell's lines; the Stop button interrupts every node.

        Line commands::

            %sky status                 pools and nodes
            %sky down [NAME | --all]    shut a pool down (default pool if no name)
            %sky config [KEY=VALUE ...] show or change what bare %%sky cells use
                                        (provider, nodes, workers_per_node, accelerator, hf, torch,
                                        idle_timeout, pool, hosts, user, key_file, region, spot, pull_budget)
            %sky pull NAME [--all]      fetch a value left on the nodes (--all: a list, one per rank)
            %sky logs [NODE]            the workers' and bootstrap log of a node
            %sky wait [POOL]            wait for the pool's background cell (%%sky --bg); raises its error
            %sky attach NAME            take over a pool that a kernel which died left running (SSH, AWS):
                                        same nodes, same remote namespace
            %sky panel                  the widget panel
            %sky gc                     find and terminate orphaned cloud machines (AWS)
        """
        for notice in manager().take_notices():
            print(f"sky: {notice}", file=sys.stderr)
        if cell is None:
            return self._line(line)
        args = self._cell_options(line)
        if args.words:
            raise UsageError(f"%%sky takes only options, not {' '.join(args.words)!r}; see %%sky?")
        return self._cell(args, cell)

    # -- cells ---------------------------------------------------------------------------------------------
    def _cell_options(self, line: str) -> Any:
        """The cell line's options, parsed once per distinct line (a re-run cell has the same line)."""
        parsed = _parsed_lines.get(line)
        if parsed is None:
            parsed = parse_argstring(self.sky, line)
            if len(_parsed_lines) >= 256:
                _parsed_lines.clear()
            _parsed_lines[line] = parsed
        return copy.copy(parsed)

    def _cell(self, args: Any, cell: str) -> Any:
        mgr = manager()
        settings = mgr.settings
        nodes = args.nodes if args.nodes is not None else settings.nodes
        if nodes < 1:
            raise UsageError(f"--nodes must be at least 1, got {nodes}")
        if args.rank is not None and args.rank < 0:
            raise UsageError(f"--rank must be 0 or more, got {args.rank}")
        if args.timeout is not None and args.timeout <= 0:
            raise UsageError(f"--timeout must be positive, got {args.timeout:g}")
        try:
            per_node = (parse_workers_per_node(args.workers_per_node) if args.workers_per_node is not None
                        else settings.workers_per_node)
        except ConfigError as exc:
            raise UsageError(f"--workers-per-node: {exc}") from None
        name = args.pool or settings.pool
        existing = mgr.pools.get(name)
        if existing is not None and existing.background is not None and existing.background.running:
            raise UsageError(f"pool {name!r} is still running a background cell (started "
                             f"{time.monotonic() - existing.background.started:.0f} s ago); %sky wait {name} waits "
                             f"for it, or give this cell another --pool")
        running_pool = existing.pool if existing is not None and existing.pool.running else None
        running = running_pool is not None
        size = max(nodes, running_pool.size if running_pool is not None else 0)
        # Never grow a pool for --rank alone: on AWS a typo would start machines. Where a pool's worker count is
        # not known before it starts (one per GPU), the rank is checked once it has.
        known = (len(running_pool.workers) if running_pool is not None and size == running_pool.size
                 else size * per_node if isinstance(per_node, int) else None)
        if args.rank is not None and known is not None and args.rank >= known:
            raise UsageError(_no_such_rank(args.rank, name, known))
        if running:
            # A running pool serves every cell that does not ask for something it lacks.
            have = mgr.requests[name]
            request = PoolRequest(name=name, provider=args.provider or have.provider, nodes=size,
                                  accelerator=args.accelerator or have.accelerator, hf=have.hf or bool(args.hf),
                                  torch=have.torch or bool(args.torch),
                                  workers_per_node=per_node if args.workers_per_node is not None
                                  else have.workers_per_node)
        else:
            provider = args.provider or settings.provider
            torch = args.torch if args.torch is not None else settings.torch
            if torch is None:
                torch = torch_by_default(provider, size)
            request = PoolRequest(name=name, provider=provider, nodes=size,
                                  accelerator=args.accelerator or settings.accelerator,
                                  hf=bool(args.hf) or settings.hf, torch=bool(torch), workers_per_node=per_node)
        try:
            npool = mgr.ensure(request, progress=_progress(plain_mode(self.shell)))
        except SkyError as exc:
            raise UsageError(str(exc)) from None
        workers = npool.pool.workers
        if args.rank is not None and args.rank >= len(workers):
            raise UsageError(_no_such_rank(args.rank, name, len(workers)))
        ranks = [args.rank] if args.rank is not None else [w.rank for w in workers if w.node < nodes]
        pull_names = tuple(n.strip() for n in (args.pull or "").split(",") if n.strip())
        options = CellOptions(ranks=ranks, pull=not args.no_pull, pull_names=pull_names, timeout=args.timeout,
                              budget=settings.pull_budget, show_all=args.show_all, output=args.output)
        if args.bg and not plain_mode(self.shell):
            return self._in_background(npool, cell, options)
        try:
            return run_cell(npool, cell, self.ipython.user_ns, self.ipython.user_ns_hidden, options,
                            plain_mode(self.shell))
        except (ConfigError, SyntaxError) as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt as exc:
            if _is_remote(exc):  # raised by the cell's code on a node (not the Stop button here): shown like others
                _show_remote_traceback(exc)
                raise exc.with_traceback(None) from exc.__cause__
            raise
        except Exception as exc:  # noqa: BLE001 - any error of the user's code is re-raised with context
            if _is_remote(exc):
                _show_remote_traceback(exc)
            raise exc.with_traceback(None) from exc.__cause__

    def _in_background(self, npool: NotebookPool, cell: str, options: CellOptions) -> None:
        """Run the cell on a thread of its own; return once every node has it (its inputs as they are now).

        The thread runs in a copy of this cell's context: ipykernel keeps the executing cell there, so what the
        thread prints and displays still goes to this cell while later cells run."""
        job = BackgroundCell(ranks=list(options.ranks))
        reached = threading.Event()  # every node has the cell
        settled = threading.Event()  # reached, or failed before

        def sent() -> None:
            reached.set()
            settled.set()

        def body() -> None:
            try:
                value = run_cell(npool, cell, self.ipython.user_ns, self.ipython.user_ns_hidden, options, False,
                                 on_sent=sent)
                if value is not None:
                    display(value)
            except BaseException as exc:  # noqa: BLE001 - kept for %sky wait
                job.error = exc
                if reached.is_set():  # it failed while running in the background: say so in its cell now
                    lines = _render_remote_traceback(exc) if _is_remote(exc) else [f"{type(exc).__name__}: {exc}"]
                    print("\n".join(lines), file=sys.stderr)
            finally:
                job.done.set()
                settled.set()

        npool.background = job
        thread = threading.Thread(target=contextvars.copy_context().run, args=(body,), daemon=True,
                                  name=f"sky-background-{npool.name}")
        thread.start()
        settled.wait()
        if not reached.is_set():  # bad input (a variable that cannot travel, a syntax error): nothing ran
            npool.background = None
            error = job.error
            assert error is not None
            if isinstance(error, (ConfigError, SyntaxError)):
                raise UsageError(str(error)) from None
            raise error.with_traceback(None) from error.__cause__  # as in the foreground: the message says it all
        print(f"sky: running in the background on pool {npool.name!r}; its output comes here. "
              f"%sky wait {npool.name} waits for it.", file=sys.stderr)
        return None

    def _attach(self, rest: list[str]) -> None:
        """``%sky attach NAME``: take over a pool that a kernel which stopped left running. What that kernel's
        last cell still runs there keeps writing into this cell, as a background cell that ``%sky wait`` collects."""
        mgr = manager()
        detached = {p["name"]: p for p in mgr.detached()}
        if len(rest) > 1 or (not rest and len(detached) != 1):
            raise UsageError(f"usage: %sky attach NAME; pools left by kernels that stopped: "
                             f"{', '.join(detached) or 'none'}")
        name = rest[0] if rest else next(iter(detached))
        size = len((detached.get(name) or {}).get("hosts") or ()) or 1
        plain = plain_mode(self.shell)
        output = CellOutput(list(range(size)), plain)
        npool = mgr.attach(name, progress=_progress(plain), leftover_sink=output.sink)
        print(f"attached to pool {name!r}: {npool.pool.size} node(s), their namespaces as the stopped kernel left "
              f"them; %%sky --pool {name} runs cells there.")
        ranks = sorted({call.node.rank for call in npool.pool.leftovers})
        if not ranks:
            return
        if plain:
            collect_leftovers(npool, output)
            return
        job = BackgroundCell(ranks=ranks)

        def body() -> None:
            try:
                collect_leftovers(npool, output)
            except BaseException as exc:  # noqa: BLE001 - kept for %sky wait, and said here now
                job.error = exc
                lines = _render_remote_traceback(exc) if _is_remote(exc) else [f"{type(exc).__name__}: {exc}"]
                print("\n".join(lines), file=sys.stderr)
            finally:
                job.done.set()

        npool.background = job
        threading.Thread(target=contextvars.copy_context().run, args=(body,), daemon=True,
                         name=f"sky-leftovers-{name}").start()
        print(f"sky: node(s) {', '.join(map(str, ranks))} still run what the stopped kernel started; its output "
              f"comes here. %sky wait {name} waits for it.", file=sys.stderr)

    def _wait(self, rest: list[str]) -> None:
        mgr = manager()
        name = rest[0] if rest else mgr.settings.pool
        npool = mgr.get(name)
        job = npool.background
        if job is None:
            print(f"pool {name!r} has no background cell")
            return
        try:
            while not job.done.wait(0.1):
                pass
        except KeyboardInterrupt:
            # Stop it where it runs: the nodes' code gets KeyboardInterrupt, as for a foreground cell.
            for rank in job.ranks:
                npool.pool.workers[rank].interrupt()
            job.done.wait(15)
            raise
        finally:
            if job.done.is_set():
                npool.background = None
        if job.error is not None:
            exc = job.error
            if _is_remote(exc):
                _show_remote_traceback(exc)
            raise exc.with_traceback(None) from exc.__cause__
        print(f"the background cell on pool {name!r} finished")

    # -- line commands -------------------------------------------------------------------------------------
    def _line(self, line: str) -> Any:
        words = shlex.split(line)
        if not words:
            raise UsageError("%sky needs a command: status, down, config, pull, logs, wait, attach, panel or gc; "
                             "see %sky?")
        command, rest = words[0], words[1:]
        mgr = manager()
        try:
            match command:
                case "status":
                    return StatusTable(mgr.status_rows())
                case "down":
                    everything = "--all" in rest
                    names = [w for w in rest if w != "--all"]
                    stopped = mgr.down(names[0] if names else None, everything=everything)
                    print(f"shut down: {', '.join(stopped) if stopped else 'nothing was running'}")
                    return None
                case "config":
                    if rest:
                        mgr.configure_text(rest)
                    return ConfigTable(mgr.settings.public())
                case "pull":
                    return self._pull(rest)
                case "logs":
                    return self._logs(rest)
                case "wait":
                    return self._wait(rest)
                case "attach":
                    return self._attach(rest)
                case "panel":
                    from .panel import panel

                    return panel()
                case "gc":
                    from ..providers.aws import gc

                    return gc(interactive=True)
                case _:
                    raise UsageError(f"unknown %sky command {command!r}; use status, down, config, pull, logs, "
                                     f"wait, attach, panel or gc")
        except SkyError as exc:
            raise UsageError(str(exc)) from None

    def _pull(self, rest: list[str]) -> Any:
        from .. import protocol as P

        everything = "--all" in rest
        names = [w for w in rest if not w.startswith("--")]
        pool_name = next((w.split("=", 1)[1] for w in rest if w.startswith("--pool=")), None)
        if len(names) != 1:
            raise UsageError("usage: %sky pull NAME [--all] [--pool=NAME]")
        name = names[0]
        mgr = manager()
        npool = mgr.get(pool_name or mgr.settings.pool)
        handle = self.ipython.user_ns.get(name)
        remote_name = getattr(handle, "name", name)
        workers = npool.pool.workers if everything else [npool.pool.workers[getattr(handle, "rank", 0)]]
        calls = [w.submit(P.PULL, {"names": [remote_name]}) for w in workers]
        values = [c.wait()[remote_name] for c in calls]
        value = values if everything else values[0]
        self.ipython.user_ns[name] = value
        print(f"pulled {name} from {'every worker' if everything else workers[0].label}")
        return value  # so that `vals = %sky pull x --all` binds it too

    def _logs(self, rest: list[str]) -> None:
        mgr = manager()
        npool = mgr.get(mgr.settings.pool)
        if rest and not rest[0].isdigit():
            raise UsageError(f"%sky logs takes a node number, not {rest[0]!r}: e.g. %sky logs 1")
        node = int(rest[0]) if rest else 0
        if not 0 <= node < len(npool.pool.hosts):
            raise UsageError(f"node {node} does not exist; the pool has {len(npool.pool.hosts)} nodes")
        print(npool.pool.provider.read_log(npool.pool.hosts[node]))


def _no_such_rank(rank: int, pool: str, workers: int) -> str:
    return (f"--rank {rank} is not a worker of pool {pool!r} ({workers} worker{'s' if workers > 1 else ''}: ranks "
            f"0-{workers - 1}); add --nodes to grow it, or pick one of those")


def _progress(plain: bool):
    """A bootstrap progress callback: phase lines on stderr (the panel hooks in here too). Non-interactive runs
    show only warnings: whether a node was bootstrapped or found ready must not change a saved notebook."""
    def show(rank: int, phase: str, line: str) -> None:
        if not line and not plain:
            print(f"[node {rank}] bootstrap: {phase}", file=sys.stderr)
        elif line.startswith("warning:"):  # phases flag what the user must know (e.g. an unchecked HF token)
            print(f"[node {rank}] {phase}: {line}", file=sys.stderr)
    return show


class StatusTable:
    """``%sky status``: an HTML table in notebooks, text elsewhere."""

    columns = ("pool", "provider", "rank", "node", "worker", "addr", "hostname", "state", "in_flight", "memory",
               "idle_s", "cost")

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows

    def __repr__(self) -> str:
        if not self.rows:
            return "no pools running"
        table = [self.columns] + [tuple(str(r.get(c, "")) for c in self.columns) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.columns))]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<p>no pools running</p>"
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in self.columns) + "</tr>"
                       for r in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class ConfigTable:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings

    def __repr__(self) -> str:
        return "\n".join(f"{k} = {v!r}" for k, v in self.settings.items())
