"""``%%sky`` and ``%sky``: IPython magics, options declared with IPython's magic argument tools."""

from __future__ import annotations

import argparse
import contextvars
import copy
import functools
import html
import shlex
import sys
import threading
import time
from typing import Any, NoReturn

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import MagicArgumentParser, argument, magic_arguments
from IPython.display import display

from ..accelerators import check as check_accelerator
from ..errors import ConfigError, RemoteError, SkyError
from ..remote import Remote
from .manager import PROVIDERS, PoolRequest, manager, parse_workers_per_node
from .output import CellOutput, plain_mode
from .session import BackgroundCell, CellOptions, NotebookPool, collect_leftovers, pull, run_cell

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


def _one_line(exc: BaseException, text: str | None = None, kind: str | None = None) -> BaseException:
    """Make IPython show ``exc`` as one line, its type (or ``kind``) and ``text`` (default: its message), with none
    of this extension's frames: for errors that say all there is to say (bad input, a timeout, the Stop button)."""
    line = f"{kind or type(exc).__name__}: {exc if text is None else text}"
    vars(exc)["_render_traceback_"] = lambda: [line]
    return exc


def _shown(exc: BaseException) -> BaseException:
    """``exc`` made ready for IPython to show: a remote error with the node's traceback, an error of this extension
    on one line, and a node's ``sys.exit()`` as the cell's error (as itself it would read as this kernel's exit)."""
    if isinstance(exc, SystemExit) and _is_remote(exc):
        notes = list(getattr(exc, "__notes__", ()))
        node = next((n[len("(raised on "):-1] for n in notes if n.startswith("(raised on ")), "a node")
        call = f"sys.exit({'' if exc.code is None else repr(exc.code)})"
        error = RemoteError("SystemExit", call, getattr(exc.__cause__, "tb", ""), node)
        rest = "".join(f"\n  {n}" for n in notes if not n.startswith("(raised on "))
        return _one_line(error, f"the cell called {call} on {node}: that node's worker goes on, with what the cell "
                                f"bound before the call in its namespace; nothing came back here, and this kernel "
                                f"keeps running{rest}", kind="SystemExit")
    if _is_remote(exc):
        _show_remote_traceback(exc)
        return exc
    if isinstance(exc, (SkyError, TimeoutError)):
        return _one_line(exc)
    return exc  # anything else is a fault of this extension: its frames are what a bug report needs


#: The extra that brings a library the client needs for a provider or the panel.
_EXTRAS = {"boto3": "aws", "botocore": "aws", "paramiko": "ssh", "ipywidgets": "notebook"}


def _missing_library(exc: ImportError, what: str) -> UsageError | None:
    """A one-line usage error for ``what`` (``%sky gc``, the aws provider) needing a library this kernel lacks."""
    name = (exc.name or "").split(".")[0]
    if name not in _EXTRAS:
        return None
    return UsageError(f"{what} needs {name}, which this kernel's Python does not have: run "
                      f"%pip install 'sky-jupyter[{_EXTRAS[name]}]' here, then try again")


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
        """The cell line's options, parsed once per distinct line (a re-run cell has the same line). Words are split
        as a shell splits them, quotes removed (``--pool 'my-pool'`` is my-pool), as for line commands."""
        parsed = _parsed_lines.get(line)
        if parsed is None:
            parsed = self.sky.parser.parse_args(_words(line))
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
            if args.accelerator is not None:
                check_accelerator(args.accelerator, "--accelerator")
            elif settings.accelerator:
                check_accelerator(settings.accelerator, "the accelerator set with %sky config")
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
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
                                  torch=args.torch,  # None: the pool keeps torch as it is, or as its default
                                  workers_per_node=per_node if args.workers_per_node is not None
                                  else have.workers_per_node)
        else:
            provider = args.provider or settings.provider
            torch = args.torch if args.torch is not None else settings.torch  # None: the manager's default
            request = PoolRequest(name=name, provider=provider, nodes=size,
                                  accelerator=args.accelerator or settings.accelerator,
                                  hf=bool(args.hf) or settings.hf, torch=torch, workers_per_node=per_node)
        try:
            npool = mgr.ensure(request, progress=_progress(plain_mode(self.shell)))
        except SkyError as exc:
            raise UsageError(str(exc)) from None
        except ImportError as exc:
            raise _missing_library(exc, f"the {request.provider} provider") or exc from None
        except KeyboardInterrupt as exc:
            if running_pool is None:
                raise _one_line(exc, f"interrupted while pool {name!r} was starting; nothing ran, run the cell "
                                     f"again to start it") from None
            if size > running_pool.size:
                raise _one_line(exc, f"interrupted while pool {name!r} was growing to {size} nodes: it keeps its "
                                     f"{running_pool.size} and their namespaces; the cell did not run") from None
            raise _one_line(exc, "interrupted before the cell reached the nodes; nothing ran") from None
        workers = npool.pool.workers
        if args.rank is not None and args.rank >= len(workers):
            raise UsageError(_no_such_rank(args.rank, name, len(workers)))
        ranks = [args.rank] if args.rank is not None else [w.rank for w in workers if w.node < nodes]
        pull_names = tuple(n.strip() for n in (args.pull or "").split(",") if n.strip())
        options = CellOptions(ranks=ranks, pull=not args.no_pull, pull_names=pull_names, timeout=args.timeout,
                              budget=settings.pull_budget, show_all=args.show_all, output=args.output)
        if args.bg and not plain_mode(self.shell):
            return self._in_background(npool, cell, options)
        reached = threading.Event()  # every node has the cell
        try:
            return run_cell(npool, cell, self.ipython.user_ns, self.ipython.user_ns_hidden, options,
                            plain_mode(self.shell), on_sent=reached.set)
        except (ConfigError, SyntaxError) as exc:
            raise UsageError(str(exc)) from None
        except KeyboardInterrupt as exc:
            if _is_remote(exc):  # raised by the cell's code on a node (not the Stop button here): shown like others
                raise _shown(exc).with_traceback(None) from exc.__cause__
            if not reached.is_set():
                raise _one_line(exc, "interrupted before the cell reached the nodes; nothing ran") from None
            for notice in mgr.after_interrupt(npool):  # a worker this Stop restarted: said in this cell
                print(f"sky: {notice}", file=sys.stderr)
            raise _one_line(exc, "interrupted on every node; what the cell had bound there stays in the nodes' "
                                 "namespaces, nothing came back here") from None
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - any error of the user's code is re-raised with context
            shown = _shown(exc)
            raise shown.with_traceback(None) from shown.__cause__

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
                    print("\n".join(_lines(exc)), file=sys.stderr)
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
            shown = _shown(error)  # as in the foreground: the message says it all
            raise shown.with_traceback(None) from shown.__cause__
        print(f"sky: running in the background on pool {npool.name!r}; its output comes here. "
              f"%sky wait {npool.name} waits for it.", file=sys.stderr)
        return None

    def _attach(self, name: str | None) -> None:
        """``%sky attach NAME``: take over a pool that a kernel which stopped left running. What that kernel's
        last cell still runs there keeps writing into this cell, as a background cell that ``%sky wait`` collects."""
        mgr = manager()
        detached = {p.name: p for p in mgr.detached()}
        if name is None:
            if len(detached) != 1:
                raise UsageError(f"usage: %sky attach NAME; pools left by kernels that stopped: "
                                 f"{', '.join(detached) or 'none'}")
            name = next(iter(detached))
        found = detached.get(name)
        size = len(found.hosts) if found is not None and found.hosts else 1
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
                print("\n".join(_lines(exc)), file=sys.stderr)
            finally:
                job.done.set()

        npool.background = job
        threading.Thread(target=contextvars.copy_context().run, args=(body,), daemon=True,
                         name=f"sky-leftovers-{name}").start()
        print(f"sky: node(s) {', '.join(map(str, ranks))} still run what the stopped kernel started; its output "
              f"comes here. %sky wait {name} waits for it.", file=sys.stderr)

    def _wait(self, pool: str | None) -> None:
        mgr = manager()
        name = pool or mgr.settings.pool
        npool = mgr.get(name)
        job = npool.background
        if job is None:
            print(f"pool {name!r} has no background cell")
            return
        try:
            while not job.done.wait(0.1):
                pass
        except KeyboardInterrupt as exc:
            # Stop it where it runs: the nodes' code gets KeyboardInterrupt, as for a foreground cell.
            for rank in job.ranks:
                npool.pool.workers[rank].interrupt()
            job.done.wait(15)
            raise _one_line(exc, f"interrupted the background cell on every node of pool {name!r}; what it had "
                                 f"bound there stays in the nodes' namespaces, nothing came back here") from None
        finally:
            if job.done.is_set():
                npool.background = None
        if job.error is not None:
            shown = _shown(job.error)
            raise shown.with_traceback(None) from shown.__cause__
        print(f"the background cell on pool {name!r} finished")

    # -- line commands -------------------------------------------------------------------------------------
    def _line(self, line: str) -> Any:
        words = _words(line)
        if not words:
            raise UsageError("%sky needs a command: status, down, config, pull, logs, wait, attach, panel or gc; "
                             "see %sky -h")
        if words[0] in ("-h", "--help"):
            print(COMMANDS.format_help())
            return None
        parser = SUBCOMMANDS.get(words[0])
        if parser is None:
            raise UsageError(f"unknown %sky command {words[0]!r}; use status, down, config, pull, logs, wait, attach, "
                             f"panel or gc (%sky -h lists them)")
        try:
            args = parser.parse_args(words[1:])
        except _HelpShown:
            return None
        mgr = manager()
        try:
            match args.command:
                case "status":
                    return StatusTable(mgr.status_rows())
                case "down":
                    if args.all and args.name:
                        raise UsageError("%sky down takes a pool name or --all, not both")
                    stopped = mgr.down(args.name, everything=args.all)
                    print(f"shut down: {', '.join(stopped) if stopped else 'nothing was running'}")
                    return None
                case "config":
                    if args.assignments:
                        mgr.configure_text(args.assignments)
                    return ConfigTable(mgr.settings.public())
                case "pull":
                    return self._pull(args.name, args.all, args.pool)
                case "logs":
                    return self._logs(args.node, args.pool)
                case "wait":
                    return self._wait(args.pool)
                case "attach":
                    return self._attach(args.name)
                case "panel":
                    try:
                        from .panel import panel
                    except ImportError as exc:
                        raise _missing_library(exc, "%sky panel") or exc from None
                    return panel()
                case "gc":
                    try:
                        from ..providers import AWS
                    except ImportError as exc:
                        raise _missing_library(exc, "%sky gc") or exc from None
                    return AWS.gc(interactive=True)
        except SkyError as exc:
            raise UsageError(str(exc)) from None
        raise AssertionError(f"unhandled %sky command {args.command!r}")

    def _pull(self, name: str, everything: bool, pool: str | None) -> Any:
        mgr = manager()
        handle = self.ipython.user_ns.get(name)
        npool = mgr.get(pool or (handle.pool if isinstance(handle, Remote) else mgr.settings.pool))
        # the value, so that `vals = %sky pull x --all` binds it too
        return pull(npool, name, self.ipython.user_ns, everything)

    def _logs(self, node: int, pool: str | None) -> None:
        mgr = manager()
        npool = mgr.get(pool or mgr.settings.pool)
        if not 0 <= node < len(npool.pool.hosts):
            raise UsageError(f"node {node} does not exist; the pool has {len(npool.pool.hosts)} nodes")
        print(npool.pool.provider.read_log(npool.pool.hosts[node]))


class _HelpShown(Exception):
    """``-h``: the help was printed; nothing else to do."""


class _CommandParser(MagicArgumentParser):
    """One ``%sky`` subcommand's parser: a bad line is one UsageError line ending with the command's usage; ``-h``
    prints the help and returns to the notebook (argparse would exit the process)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}; usage: {self.format_usage().strip().removeprefix('usage: ')}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            print(message, file=sys.stderr)
        raise _HelpShown()

    def print_help(self, file: Any = None) -> None:
        print(self.format_help(), file=file or sys.stdout)


def _node_number(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"%sky logs takes a node number, not {text!r}: e.g. %sky logs 1")
    return int(text)


def _command_parsers() -> tuple[argparse.ArgumentParser, dict[str, _CommandParser]]:
    """``%sky COMMAND ...``: one argparse subparser per command (``%sky -h``, ``%sky COMMAND -h``)."""
    top = argparse.ArgumentParser(prog="%sky", usage="%(prog)s COMMAND [-h] ...", add_help=False,
                                  description="Manage the notebook's pools (%%sky cells run on them). "
                                              "%sky COMMAND -h: one command's help.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_CommandParser)

    def command(name: str, arguments: str, help: str) -> _CommandParser:
        # argparse %-formats usage and help strings (a literal "%sky" would read as a format), not descriptions.
        parser = sub.add_parser(name, prog=f"%sky {name}", usage=f"%(prog)s {arguments}".rstrip(),
                                help=help.replace("%", "%%"), description=help, add_help=True,
                                formatter_class=argparse.HelpFormatter)
        parser.set_defaults(command=name)
        return parser

    command("status", "", "pools and their workers: state, memory, idle time, cost")
    down = command("down", "[NAME | --all]", "shut a pool down (default: the configured pool)")
    down.add_argument("name", nargs="?", metavar="NAME", help="the pool (default: the configured one)")
    down.add_argument("--all", action="store_true", help="every pool of this kernel")
    config = command("config", "[KEY=VALUE ...]",
                     "show or change what bare %%sky cells use (provider, nodes, workers_per_node, accelerator, hf, "
                     "torch, idle_timeout, pool, hosts, user, key_file, region, spot, pull_budget)")
    config.add_argument("assignments", nargs="*", metavar="KEY=VALUE")
    pull = command("pull", "NAME [--all] [--pool NAME]", "fetch a value left on the nodes")
    pull.add_argument("name", metavar="NAME", help="the notebook name (or Remote handle) to fetch")
    pull.add_argument("--all", action="store_true", help="a list with every worker's value, in rank order")
    pull.add_argument("--pool", metavar="NAME", help="the pool (default: the handle's, else the configured one)")
    logs = command("logs", "[NODE] [--pool NAME]", "the workers' and the bootstrap log of a node")
    logs.add_argument("node", nargs="?", type=_node_number, default=0, metavar="NODE", help="node number (default 0)")
    logs.add_argument("--pool", metavar="NAME", help="the pool (default: the configured one)")
    wait = command("wait", "[POOL]", "wait for the pool's background cell (%%sky --bg); raises its error")
    wait.add_argument("pool", nargs="?", metavar="POOL", help="the pool (default: the configured one)")
    attach = command("attach", "[NAME]",
                     "take over a pool that a kernel which stopped left running (SSH, AWS): same nodes, same remote "
                     "namespace")
    attach.add_argument("name", nargs="?", metavar="NAME", help="the pool (default: the only one left)")
    command("panel", "", "the widget panel: nodes, accelerator, HF token, pools")
    command("gc", "", "find and terminate cloud machines no live pool owns (AWS)")
    return top, dict(sub.choices)


COMMANDS, SUBCOMMANDS = _command_parsers()


def _words(line: str) -> list[str]:
    """A magic's line split as a shell splits it: quotes removed, a quoted word kept whole."""
    try:
        return shlex.split(line)
    except ValueError as exc:  # an unclosed quote
        raise UsageError(f"cannot read {line.strip()!r}: {exc}; close the quote") from None


def _lines(exc: BaseException) -> list[str]:
    """What a background cell's error looks like where it is printed rather than raised."""
    shown = _shown(exc)
    render = getattr(shown, "_render_traceback_", None)
    return list(render()) if render is not None else [f"{type(shown).__name__}: {shown}"]


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
