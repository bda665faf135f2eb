"""``sky.ComputePool``: provisions nodes through a provider, bootstraps them once, keeps a worker link to each,
and dispatches work: ``>>`` to the least busy node, ``@`` to every node in parallel."""

from __future__ import annotations

import atexit
import dataclasses
import functools
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any, TextIO

from . import protocol as P
from . import state
from .bootstrap import BootstrapPlan
from .compute import PendingCompute
from .errors import ConfigError, ConnectionLostError, SerializationError, SkyError
from .image import Image
from .node import Call, Node, Sink
from .plugin import Cluster, Plugin, bootstrap_ops, check_plugins, transform_image
from .providers.base import Cost, Host, PoolSpec, Provider, WorkerHandle, in_parallel
from .providers.local import Local
from .redaction import redact, register, register_environment
from .shipping import register_user_modules

DEFAULT_IDLE_TIMEOUT = 30 * 60.0
DEFAULT_GRACE = 10 * 60.0

_open_pools: set[ComputePool] = set()  # started and not closed: shut down at interpreter exit
_open_lock = threading.Lock()


def _close_open_pools() -> None:
    """At interpreter exit, shut down the pools a program started and never closed."""
    with _open_lock:
        pools = list(_open_pools)
    for pool in pools:
        try:
            pool.close()
        except Exception as exc:  # noqa: BLE001 - at exit, say what is left and go on with the others
            print(f"sky_jupyter: pool {pool.name!r} could not be shut down at exit ({exc}); the nodes' dead-man "
                  f"switch ends its workers, and `%sky gc` finds cloud machines left behind.", file=sys.stderr)


def _track(pool: ComputePool) -> None:
    with _open_lock:
        _open_pools.add(pool)
    # Exit handlers run newest first; paramiko's, registered when a pool first used SSH, stops every SSH
    # connection, so this one must be registered after it to run before it.
    atexit.unregister(_close_open_pools)
    atexit.register(_close_open_pools)


def _plain(value: object) -> bool:
    """Can this host detail go into the state file (a string, or a list of strings such as key files)?"""
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _detached_state(name: str) -> dict[str, Any]:
    recorded = state.load(name)
    if recorded is None:
        raise ConfigError(f"no pool named {name!r} is recorded in {state.pools_dir()}; `%sky status` lists the "
                          f"pools that are.")
    if not state.detached(recorded):
        raise ConfigError(f"pool {name!r} belongs to a client that is still running (pid "
                          f"{recorded.get('client_pid')}); use it there, or stop that client first.")
    return recorded


def _recorded_nodes(recorded: dict[str, Any]) -> tuple[list[Host], dict[int, tuple[int, int]]]:
    """A state file's hosts, and its workers' (port, pid) by rank."""
    hosts = [Host(**h) for h in recorded.get("hosts") or ()]
    workers = {w["rank"]: (w["port"], w["pid"]) for w in recorded.get("workers") or () if w.get("pid")}
    return hosts, workers


def provider_from_state(recorded: dict[str, Any]) -> Provider:
    """A provider able to reach a recorded pool's machines again (see ``ComputePool.attach``)."""
    kind = recorded.get("provider")
    if kind == "local":
        return Local()
    if kind == "ssh":
        from .providers.ssh import SSH

        hosts = recorded.get("hosts") or [{"addr": "unknown"}]
        return SSH([f"[{h['addr']}]" if ":" in h["addr"] else h["addr"] for h in hosts])
    if kind == "aws":
        from .providers.aws import AWS

        return AWS(region=(recorded.get("cloud") or {}).get("region"))
    raise ConfigError(f"pool {recorded.get('name')!r} was started by a provider this client does not know "
                      f"({kind!r}); pass provider=... to attach to it.")


def _why_unattached(node: Node, exc: Exception) -> str:
    """Why a node's worker could not be attached to, in a few words."""
    handle = node.handle
    try:
        alive = handle is not None and handle.alive()
    except Exception:  # noqa: BLE001 - the node cannot be asked: report the original failure
        alive = True
    if not alive:
        return f"node {node.rank}'s worker {handle.describe_exit() if handle else 'is gone'} (its namespace is lost)"
    return f"node {node.rank}: {type(exc).__name__}: {redact(str(exc))}"


def _no_new_worker(host: Host) -> WorkerHandle:
    """What a node that is only being shut down does when its worker is gone: nothing to start."""
    raise ConnectionLostError(f"node {host.rank}: its worker is gone, and none is started while the pool shuts down")


def check_nodes(nodes: object) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"nodes must be a whole number of at least 1, got {nodes!r}; e.g. nodes=2.")
    return nodes


class StreamPrinter:
    """Where a Python-API call's remote output goes: the stdout/stderr current when it was submitted,
    with a ``[node K]`` prefix on each line when the pool has several nodes."""

    def __init__(self, prefix: str = "", out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.prefix = prefix
        self.streams = {"stdout": out or sys.stdout, "stderr": err or sys.stderr}
        self.at_line_start = {"stdout": True, "stderr": True}

    def __call__(self, kind: str, meta: Any) -> None:
        if kind == P.STREAM:
            name, text = meta["name"], meta["text"]
        else:  # a display bundle: its plain-text form
            name, text = "stdout", str(meta.get("data", {}).get("text/plain", "")) + "\n"
        stream = self.streams.get(name, self.streams["stdout"])
        if self.prefix:
            pieces = []
            for line in text.splitlines(keepends=True):
                pieces.append(self.prefix + line if self.at_line_start[name] else line)
                self.at_line_start[name] = line.endswith(("\n", "\r"))
            text = "".join(pieces)
        stream.write(text)
        stream.flush()


class ComputePool:
    """A pool of nodes, used as a context manager that always tears down what it started.

    ``provider`` defaults to ``sky.Local()``. ``plugins`` shape the image, the bootstrap and every worker.
    """

    def __init__(self, provider: Provider | None = None, nodes: int = 1, accelerator: str | None = None,
                 image: Image | None = None, plugins: Sequence[Plugin] = (),
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT, name: str | None = None, *,
                 grace: float = DEFAULT_GRACE, interrupt_grace: float = 10.0,
                 progress: Callable[[int, str, str], None] | None = None) -> None:
        if provider is None:
            provider = Local()
        if not isinstance(provider, Provider):
            raise ConfigError(f"provider must be sky.Local(), sky.SSH(...) or sky.AWS(...), not "
                              f"{type(provider).__name__}; did you forget the parentheses?")
        if image is None:
            image = Image()
        if not isinstance(image, Image):
            raise ConfigError(f"image must be a sky.Image, not {type(image).__name__}")
        if name is not None and (not name or not all(c.isalnum() or c in "-_" for c in name)):
            raise ConfigError(f"pool name {name!r} may hold only letters, digits, '-' and '_'")
        self.provider = provider
        self.size = check_nodes(nodes)
        self.accelerator = accelerator or None
        self.base_image = image
        self.plugins = check_plugins(plugins)
        self.idle_timeout = idle_timeout
        self.name = name or f"pool-{secrets.token_hex(3)}"
        self.grace = grace
        self.interrupt_grace = interrupt_grace
        self.progress = progress or self._print_progress
        self.secret = secrets.token_urlsafe(32)
        register(self.secret)
        register_environment()  # tokens and cloud credentials set here never show in what comes back from nodes
        self.nodes: list[Node] = []
        self.hosts: list[Host] = []
        self.leftovers: list[Call] = []  # what a dead client left running on the nodes (see attach)
        self.image = image
        self.head_port = 0
        self.started_at: float | None = None
        self.last_used = time.monotonic()
        self._stack: ExitStack | None = None
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        state_ = "running" if self.started_at and not self._closed else ("closed" if self._closed else "new")
        return f"<ComputePool {self.name!r} {self.provider!r} nodes={self.size} {state_}>"

    @property
    def cluster(self) -> Cluster:
        return Cluster(nodes=self.size, accelerator=self.accelerator, provider=self.provider.name,
                       pool_name=self.name, gpu=bool(self.accelerator and self.accelerator.lower() != "cpu"))

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self._closed

    # -- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> ComputePool:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> ComputePool:
        """Provision, bootstrap and connect every node. Anything started is torn down if this fails or is
        interrupted."""
        if self.running:
            return self
        if self._closed:
            raise SkyError(f"pool {self.name!r} was shut down; create a new ComputePool to start again.")
        spec = PoolSpec(self.name, self.size, self.accelerator)
        self.provider.check(spec)
        self._stack = ExitStack()
        try:
            self._prepare_client()
            plan = self._plan()
            self._save_state(fresh=True)  # a record of an earlier pool of the same name is replaced, not merged
            self.hosts = self.provider.provision(spec)
            self._save_state()
            self.nodes = self._bring_up(self.hosts, plan)
            head = self.nodes[0].link
            assert head is not None  # every node is connected once brought up
            self.head_port = head.hello["free_port"]  # told when it connected
            self._setup_all()
            self.started_at = time.time()
            self._save_state()
            self._keeper = threading.Thread(target=self._keep, daemon=True, name=f"sky-keeper-{self.name}")
            self._keeper.start()
            _track(self)
        except BaseException:
            self.close()
            raise
        return self

    def _prepare_client(self) -> None:
        """The final image (its secret values known to the redactor) and the plugins' client hooks entered."""
        assert self._stack is not None
        self.image = transform_image(self.base_image, self.plugins, self.cluster)
        for plugin in self.plugins:
            for key in plugin.secrets:
                register(self.image.environ.get(key))
        for plugin in self.plugins:
            if plugin.around_client is not None:
                self._stack.enter_context(plugin.around_client(self))

    def grow(self, nodes: int) -> None:
        """Add nodes to a running pool; every node then learns the new world size (setup runs again)."""
        check_nodes(nodes)
        self._require_running()
        if nodes <= self.size:
            return
        old_size, old_hosts, old_nodes = self.size, list(self.hosts), list(self.nodes)
        self.size = nodes
        new_nodes: list[Node] = []
        try:
            hosts = self.provider.provision(PoolSpec(self.name, nodes, self.accelerator))
            new_hosts = hosts[old_size:]
            plan = self._plan()
            self.hosts = old_hosts + new_hosts
            new_nodes = self._bring_up(new_hosts, plan)
            self.nodes = old_nodes + new_nodes
            self._setup_all()
            self._save_state()
        except BaseException:
            self._parallel([node.close for node in new_nodes], raise_first=False)
            self.size, self.hosts, self.nodes = old_size, old_hosts, old_nodes
            raise

    def _plan(self) -> BootstrapPlan:
        """The provider's bootstrap plan for this pool's image, told which variables hold secrets."""
        plan = self.provider.plan(self.image, bootstrap_ops(self.plugins, self.cluster))
        return dataclasses.replace(plan, secrets=tuple(sorted({k for p in self.plugins for k in p.secrets})))

    def _bring_up(self, hosts: list[Host], plan: BootstrapPlan) -> list[Node]:
        """Bootstrap each host and start its worker, every node at its own pace (one waiting for the slowest
        bootstrap before starting its worker would add the stragglers' times up). On a failure, the workers that
        did start are stopped and the first failure in rank order is raised."""
        nodes = [Node(h.rank, h, self.secret, self._start_worker, self._setup_one, self.name) for h in hosts]

        def one(node: Node) -> None:
            node.start_worker(lambda host: self.provider.bring_up(host, plan, self._worker_config(host),
                                                                  self.progress))

        results = in_parallel([functools.partial(one, node) for node in nodes])
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            self._parallel([node.close for node in nodes], raise_first=False)
            raise failures[0]
        return nodes

    def close(self) -> None:
        """Shut down workers, give machines back, and forget the pool. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        with _open_lock:
            _open_pools.discard(self)
        errors: list[BaseException] = []
        try:
            self._parallel([node.close for node in self.nodes], raise_first=False)
        finally:
            try:
                self.provider.release(self.hosts)
            except BaseException as exc:  # noqa: BLE001 - still run the rest of teardown, then raise
                errors.append(exc)
            if self._stack is not None:
                self._stack.close()
            if not errors:
                state.remove(self.name)
        if errors:
            raise errors[0]

    def _save_state(self, fresh: bool = False) -> None:
        if fresh:
            state.remove(self.name)
        state.update(
            self.name, provider=self.provider.name, provider_repr=repr(self.provider), nodes=self.size,
            accelerator=self.accelerator, secret=self.secret, idle_timeout=self.idle_timeout, grace=self.grace,
            interrupt_grace=self.interrupt_grace, head_port=self.head_port,
            hosts=[{**dataclasses.asdict(h), "extra": {k: v for k, v in h.extra.items() if _plain(v)}}
                   for h in self.hosts],
            workers=[{"rank": n.rank, "port": getattr(n.handle, "port", None), "pid": getattr(n.handle, "pid", None)}
                     for n in self.nodes],
            cloud=self.provider.pool_state(self.name),
        )

    # -- attaching to a pool an earlier client left running ------------------------------------------------------
    @classmethod
    def attach(cls, name: str, provider: Provider | None = None, *, image: Image | None = None,
               plugins: Sequence[Plugin] = (), progress: Callable[[int, str, str], None] | None = None,
               leftover_sink: Callable[[int], Sink] | None = None) -> ComputePool:
        """Take over pool ``name`` from its state file after the client that started it died (a crashed or
        killed kernel): the same machines, the same workers, their namespaces intact.

        ``provider`` defaults to one rebuilt from the state file (SSH hosts, or the AWS region); ``plugins`` are
        only needed if a worker has to be set up again. What the dead client left running on a node (a task, or
        a result it never collected) is in ``pool.leftovers``, its output going to ``leftover_sink(rank)``
        (default: printed). If attaching fails, machines and workers are left as they were: attach again, or
        release them with :meth:`release_detached`.
        """
        recorded = _detached_state(name)
        provider = provider or provider_from_state(recorded)
        hosts, workers = _recorded_nodes(recorded)
        if not hosts or any(h.rank not in workers for h in hosts):
            raise ConfigError(f"pool {name!r} had not finished starting when its client stopped, so there are no "
                              f"workers to attach to; `%sky down {name}` (or ComputePool.release_detached("
                              f"{name!r})) releases what it started.")
        pool = cls(provider, nodes=len(hosts), accelerator=recorded.get("accelerator"), image=image,
                   plugins=plugins, idle_timeout=recorded.get("idle_timeout", DEFAULT_IDLE_TIMEOUT), name=name,
                   grace=recorded.get("grace", DEFAULT_GRACE), interrupt_grace=recorded.get("interrupt_grace", 10.0),
                   progress=progress)
        pool.secret = recorded["secret"]
        register(pool.secret)
        pool.head_port = int(recorded.get("head_port") or 0)
        pool._stack = ExitStack()
        nodes: list[Node] = []
        try:
            pool._prepare_client()
            pool.hosts = provider.reattach(name, hosts, recorded.get("cloud") or {})
            nodes = [Node(h.rank, h, pool.secret, pool._start_worker, pool._setup_one, name) for h in pool.hosts]
            sink_for = leftover_sink or (lambda rank: pool._sink(nodes[rank]))

            def attach(node: Node) -> list[Call]:
                return node.attach(provider.worker(node.host, *workers[node.rank]), sink_for(node.rank))

            found = in_parallel([functools.partial(attach, n) for n in nodes])
            failed = [(n, r) for n, r in zip(nodes, found) if isinstance(r, Exception)]
            if failed:
                raise ConnectionLostError(
                    f"pool {name!r}: " + "; ".join(_why_unattached(n, exc) for n, exc in failed)
                    + f". The nodes are left as they were: `%sky down {name}` (or ComputePool.release_detached("
                    f"{name!r})) stops what is left and releases the machines.")
            pool.nodes = nodes
            pool.leftovers = [call for calls in found if not isinstance(calls, Exception) for call in calls]
            for node in nodes:
                if node.state != "ready":  # a worker that restarted itself lost its setup: set it up again
                    pool._setup_one(node)
                    node.state = "ready"
            pool.started_at = time.time()
            pool._save_state()  # this client owns the pool now
            pool._keeper = threading.Thread(target=pool._keep, daemon=True, name=f"sky-keeper-{name}")
            pool._keeper.start()
            _track(pool)
        except BaseException:
            for node in nodes:
                node.detach()
            provider.disconnect(pool.hosts or hosts)
            pool._closed = True
            pool._stack.close()
            raise
        return pool

    @classmethod
    def release_detached(cls, name: str, provider: Provider | None = None, timeout: float = 5.0) -> None:
        """Shut down pool ``name`` that a dead client left behind: stop its workers where they still run, give
        its machines back (AWS: terminate), and forget it."""
        recorded = _detached_state(name)
        provider = provider or provider_from_state(recorded)
        hosts, workers = _recorded_nodes(recorded)
        try:
            try:
                hosts = provider.reattach(name, hosts, recorded.get("cloud") or {})
            except (SkyError, OSError):
                pass  # unreachable or gone: the workers' dead-man switch ends them; the machines go below
            else:
                def stop(host: Host) -> None:
                    node = Node(host.rank, host, recorded["secret"], _no_new_worker, lambda n: None, name)
                    handle = provider.worker(host, *workers[host.rank])
                    try:
                        node.attach(handle, lambda kind, meta: None)  # then asked to shut down: its plugins' exits run
                    except (SkyError, OSError, EOFError):
                        node.handle = handle
                    node.close(timeout)

                in_parallel([functools.partial(stop, h) for h in hosts if h.rank in workers])
            provider.release(hosts)
        finally:
            provider.disconnect(hosts)
        state.remove(name)

    @staticmethod
    def _parallel(fns: list[Callable[[], Any]], raise_first: bool = True) -> list[Any]:
        """One thread per node; the first failure (in order) is raised, or with ``raise_first=False`` None."""
        results = in_parallel(fns)
        for result in results:
            if isinstance(result, Exception) and raise_first:
                raise result
        return [None if isinstance(r, Exception) else r for r in results]

    def _print_progress(self, rank: int, phase: str, line: str) -> None:
        if not line:
            print(f"[{self.name} node {rank}] bootstrap: {phase}", file=sys.stderr)
        elif line.startswith("warning:"):  # phases flag what the user must know (e.g. an unchecked HF token)
            print(f"[{self.name} node {rank}] {phase}: {line}", file=sys.stderr)

    def _worker_config(self, host: Host) -> dict[str, Any]:
        return {**self.provider.worker_options(),
                "secret": self.secret, "rank": host.rank, "world_size": self.size, "pool": self.name,
                "grace": self.grace, "interrupt_grace": self.interrupt_grace, "env": self.image.environ,
                "max_frame": P.MAX_FRAME, "max_buffers": P.MAX_BUFFERS}

    def _start_worker(self, host: Host):  # -> WorkerHandle
        return self.provider.start_worker(host, self._worker_config(host))

    def _setup_meta(self, node: Node) -> dict[str, Any]:
        addrs = tuple(h.private_addr for h in self.hosts)
        info = {"rank": node.rank, "world_size": self.size, "head_addr": addrs[0], "node_addrs": addrs,
                "accelerator": self.accelerator, "pool_name": self.name, "head_port": self.head_port}
        return {"info": info}

    def _setup_payload(self) -> list:
        worker_side = [dataclasses.replace(p, transform=None, bootstrap=None, around_client=None)
                       for p in self.plugins if p.around_app is not None or p.decorate is not None]
        return P.dumps(worker_side)

    def _setup_all(self) -> None:
        payload = self._setup_payload()
        # What plugins print while setting up (a warning from torch.distributed, say) is shown like a task's output.
        calls = [n.submit(P.SETUP, self._setup_meta(n), payload, sink=self._sink(n)) for n in self.nodes]
        self._wait_all(calls, timeout=600)
        for node, call in zip(self.nodes, calls):
            node.hostname = call.wait()["hostname"]
            node.state = "ready"
        # The hosts' record learns their hostnames from the workers (what attach shows before reconnecting).
        names = {node.rank: node.hostname for node in self.nodes}
        self.hosts = [dataclasses.replace(h, hostname=names.get(h.rank) or h.hostname) for h in self.hosts]

    def _setup_one(self, node: Node) -> None:
        node.hostname = node.submit(P.SETUP, self._setup_meta(node), self._setup_payload(),
                                    sink=self._sink(node)).wait(600)["hostname"]

    def _keep(self) -> None:
        """Heartbeats keep the workers' dead-man switch quiet and find broken links early."""
        interval = max(1.0, min(30.0, self.grace / 4))
        while not self._stop.wait(interval):
            for node in self.nodes:
                if self._stop.is_set():
                    return
                try:
                    node.ping(timeout=10)
                except (SkyError, OSError, EOFError):
                    pass  # the node records its state; the next task reports or repairs it

    # -- dispatch ------------------------------------------------------------------------------------------
    def _require_running(self) -> None:
        if not self.running:
            raise SkyError(f"pool {self.name!r} is not running; use `with sky.ComputePool(...) as pool:` "
                           f"or call pool.start() first.")

    def _sink(self, node: Node) -> Sink:
        return StreamPrinter(f"[node {node.rank}] " if self.size > 1 else "")

    def _payload(self, pending: PendingCompute[Any]) -> list:
        register_user_modules()
        try:
            return P.dumps((pending.fn, pending.args, pending.kwargs))
        except Exception as exc:  # noqa: BLE001 - (un)pickling user objects can raise anything
            raise SerializationError(_explain_pickle_failure(pending, exc)) from None

    def ranked_nodes(self) -> list[Node]:
        """Nodes in the order ``>>`` tries them: reachable first, then least busy, then lowest rank."""
        return sorted(self.nodes, key=lambda n: (n.state == "unreachable", n.in_flight(), n.rank))

    def submit(self, pending: PendingCompute[Any], node: Node | None = None, sink: Sink | None = None) -> Call:
        """Send one task. Without a given node, a node that cannot be reached is skipped for the next one."""
        self._require_running()
        self.last_used = time.monotonic()
        payload = self._payload(pending)
        candidates = [node] if node is not None else self.ranked_nodes()
        first_error: ConnectionLostError | None = None
        for candidate in candidates:
            try:
                return candidate.submit(P.TASK, None, payload, sink or self._sink(candidate), (pending.fn,))
            except ConnectionLostError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def run(self, pending: PendingCompute[Any], rank: int | None = None) -> Any:
        """``pending >> pool``: run on one node (the least busy, or ``rank``) and return its value."""
        node = self.nodes[rank] if rank is not None else None
        return self.submit(pending, node).wait()

    def broadcast(self, pending: PendingCompute[Any]) -> list[Any]:
        """``pending @ pool``: run on every node at once; the values in rank order."""
        self._require_running()
        self.last_used = time.monotonic()
        payload = self._payload(pending)
        calls = [n.submit(P.TASK, None, payload, self._sink(n), (pending.fn,)) for n in self.nodes]
        return self._wait_all(calls)

    def gather(self, items: Sequence[PendingCompute[Any]]) -> tuple[Any, ...]:
        """Several computations at once, spread over the nodes; values in order."""
        self._require_running()
        load = {n.rank: n.in_flight() for n in self.nodes}
        calls = []
        for item in items:
            rank = min(load, key=lambda r: (load[r], r))
            load[rank] += 1
            calls.append(self.submit(item, self.nodes[rank]))
        return tuple(self._wait_all(calls))

    @staticmethod
    def _wait_all(calls: list[Call], timeout: float | None = None) -> list[Any]:
        """Wait for every call; raise the first failure (by position) naming every node that failed."""
        results: list[Any] = []
        failures: list[tuple[Call, BaseException]] = []
        try:
            for call in calls:
                try:
                    results.append(call.wait(timeout))
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:  # noqa: BLE001 - collected and re-raised below
                    failures.append((call, exc))
                    results.append(None)
        except KeyboardInterrupt:
            for call in calls:
                if not call.done():
                    call.interrupt()
            for call in calls:
                call.join(15)
            raise
        if failures:
            first = failures[0][1]
            if len(calls) > 1:
                ranks = ", ".join(str(c.node.rank) for c, _ in failures)
                first.add_note(f"failed on {len(failures)} of {len(calls)} nodes (ranks {ranks})")
            raise first
        return results

    def interrupt(self) -> None:
        for node in self.nodes:
            node.interrupt(0)

    def cost(self) -> Cost | None:
        """USD per hour and so far for this pool's machines (None for providers that bill nothing)."""
        return self.provider.cost(self.hosts)

    def status(self) -> list[dict[str, Any]]:
        return [{"rank": n.rank, "addr": n.host.display, "hostname": n.hostname, "state": n.state,
                 "in_flight": n.in_flight()} for n in self.nodes]


def _explain_pickle_failure(pending: PendingCompute[Any], exc: Exception) -> str:
    """Name the argument that cannot be pickled, with its type."""
    from .protocol import dumps

    named: list[tuple[str, Any]] = [("the function " + pending.name, pending.fn)]
    named += [(f"argument {i}", a) for i, a in enumerate(pending.args)]
    named += [(f"argument {k!r}", v) for k, v in pending.kwargs.items()]
    for label, value in named:
        try:
            dumps(value)
        except Exception as inner:  # noqa: BLE001 - we only need the message
            return (f"{label} ({type(value).__name__}) cannot be sent to a node: {inner}. "
                    f"Pass something picklable instead (a path, plain data), or create it on the node.")
    return f"the call to {pending.name} cannot be pickled: {exc}"
