"""``sky.ComputePool``: provisions nodes through a provider, bootstraps them once, starts their workers (one per
node, a given number, or one per GPU), keeps a link to each worker, and dispatches work: ``>>`` to the least busy
worker, ``@`` to every worker in parallel, with a payload that several workers of a node need sent to that node
once."""

from __future__ import annotations

import atexit
import contextvars
import dataclasses
import functools
import inspect
import queue
import secrets
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any, TextIO

from . import protocol as P
from . import state
from .bootstrap import BootstrapPlan
from .compute import PendingCompute, Target, enter, leave
from .errors import ConfigError, ConnectionLostError, ProvisionError, SerializationError, SkyError, SpotReclaimError
from .image import Image
from .node import Call, RemoteWorker, Sink
from .plugin import Cluster, Plugin, bootstrap_ops, check_plugins, transform_image
from .providers.base import PER_GPU, Cost, Host, PoolSpec, Provider, WorkerHandle, check_workers, in_parallel
from .providers.local import Local
from .redaction import redact, register, register_environment
from .shipping import register_user_modules
from .spec import SELECTIONS, Spec, Worker, check_positive
from .sync import local_manifest, node_apply, node_manifest, tar_of

DEFAULT_IDLE_TIMEOUT = 30 * 60.0
#: Bytes from which a payload that several workers of one node get crosses the link to that node once.
SHARE_AT = 256 * 1024
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


def _detached_state(name: str) -> state.PoolRecord:
    recorded = state.load(name)
    if recorded is None:
        raise ConfigError(f"no pool named {name!r} is recorded in {state.pools_dir()}; `%sky status` lists the "
                          f"pools that are.")
    if not recorded.detached:
        raise ConfigError(f"pool {name!r} belongs to a client that is still running (pid "
                          f"{recorded.client_pid}); use it there, or stop that client first.")
    return recorded


def _recorded_nodes(recorded: state.PoolRecord) -> tuple[list[Host], dict[int, list[tuple[int, int, int]]]]:
    """A state file's hosts, and each node's workers as (local rank, port, pid), in local rank order."""
    hosts = [Host(**h) for h in recorded.hosts]
    workers: dict[int, list[tuple[int, int, int]]] = {}
    for w in recorded.workers:
        if w.get("pid"):
            workers.setdefault(w.get("node", w["rank"]), []).append((w.get("local_rank", 0), w["port"], w["pid"]))
    return hosts, {node: sorted(found) for node, found in workers.items()}


def provider_from_state(recorded: state.PoolRecord) -> Provider:
    """A provider able to reach a recorded pool's machines again (see ``ComputePool.attach``)."""
    kind = recorded.provider
    if kind == "local":
        return Local()
    if kind == "ssh":
        from .providers.ssh import SSH

        hosts = recorded.hosts or [{"addr": "unknown"}]
        return SSH([f"[{h['addr']}]" if ":" in h["addr"] else h["addr"] for h in hosts])
    if kind == "aws":
        from .providers.aws import AWS

        return AWS(region=recorded.cloud.get("region"))
    raise ConfigError(f"pool {recorded.name!r} was started by a provider this client does not know "
                      f"({kind!r}); pass provider=... to attach to it.")


def _why_unattached(worker: RemoteWorker, exc: Exception) -> str:
    """Why a worker could not be attached to, in a few words."""
    handle = worker.handle
    try:
        alive = handle is not None and handle.alive()
    except Exception:  # noqa: BLE001 - the node cannot be asked: report the original failure
        alive = True
    who = f"node {worker.node}" if worker.per_node == 1 else f"rank {worker.rank} (node {worker.node} worker " \
                                                              f"{worker.local_rank})"
    if not alive:
        return f"{who}'s worker {handle.describe_exit() if handle else 'is gone'} (its namespace is lost)"
    return f"{who}: {type(exc).__name__}: {redact(str(exc))}"


def _no_new_worker(host: Host, local_rank: int) -> WorkerHandle:
    """What a worker that is only being shut down does when its process is gone: nothing to start."""
    raise ConnectionLostError(f"node {host.rank} worker {local_rank}: its process is gone, and none is started while "
                              f"the pool shuts down")


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One job for :meth:`ComputePool.submit_many`: what :meth:`RemoteWorker.submit` takes."""

    worker: RemoteWorker
    kind: P.ClientKind
    meta: Any
    payload: list | tuple
    sink: Sink | None = None
    code: tuple[Any, ...] = ()
    on_done: Callable[[], None] | None = None


def check_nodes(nodes: object) -> int:
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"nodes must be a whole number of at least 1, got {nodes!r}; e.g. nodes=2.")
    return nodes


def check_workers_per_node(value: object) -> int | str:
    """``workers_per_node``: "auto" (one per GPU when the torch plugin is in the chain, else one) or a whole number."""
    if value == "auto" or (type(value) is int and 1 <= value <= 1024):
        return value
    raise ConfigError(f"workers_per_node must be 'auto' (one per GPU with the torch plugin, else 1) or a whole "
                      f"number from 1 to 1024, got {value!r}; e.g. workers_per_node=8.")


OUTPUTS = ("head", "all")


class StreamPrinter:
    """Where a Python-API call's remote output goes: the stdout/stderr current when it was submitted,
    with a ``[node K]`` (or ``[rank R]``) prefix on each line when the pool has several workers; ``stdout=False``
    drops what goes to stdout (a worker other than the head, on a pool that shows the head's alone)."""

    def __init__(self, prefix: str = "", out: TextIO | None = None, err: TextIO | None = None,
                 stdout: bool = True) -> None:
        self.prefix = prefix
        self.streams = {"stdout": out or sys.stdout, "stderr": err or sys.stderr}
        self.at_line_start = {"stdout": True, "stderr": True}
        self.stdout = stdout

    def __call__(self, kind: str, meta: Any) -> None:
        if kind == P.STREAM:
            name, text = meta["name"], meta["text"]
        else:  # a display bundle: its plain-text form
            name, text = "stdout", str(meta.get("data", {}).get("text/plain", "")) + "\n"
        if name != "stderr" and not self.stdout:
            return
        stream = self.streams.get(name, self.streams["stdout"])
        if self.prefix:
            pieces = []
            for line in text.splitlines(keepends=True):
                pieces.append(self.prefix + line if self.at_line_start[name] else line)
                self.at_line_start[name] = line.endswith(("\n", "\r"))
            text = "".join(pieces)
        stream.write(text)
        stream.flush()


class ComputePool(Target):
    """A pool of nodes, used as a context manager that always tears down what it started.

    ``provider`` defaults to ``sky.Local()``. ``plugins`` shape the image, the bootstrap and every worker.
    ``workers_per_node``: worker processes per node, "auto" (one per GPU the node has when the torch plugin is in
    the chain, else one) or a number. Workers are numbered over the whole pool (``rank``: node by node, then
    within a node), as torchrun numbers its processes. ``output``: "head" shows only the head worker's stdout (every
    worker's stderr and errors still show, each line labelled), "all" every worker's; by default "head" on pools
    with several workers per node, else "all".
    """

    def __init__(self, provider: Provider | Spec | None = None, nodes: int | Spec = 1,
                 accelerator: str | Spec | None = None, image: Image | None = None, plugins: Sequence[Plugin] = (),
                 idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT, name: str | None = None, *more: Spec,
                 workers_per_node: int | str = "auto", output: str | None = None,
                 vcpus: float | None = None, memory_gb: float | None = None, architecture: str | None = None,
                 allocation: str | None = None, selection: str = "first", ttl: float | None = None,
                 max_hourly_cost: float | None = None, default_compute_timeout: float | None = None,
                 provision_timeout: float | None = None, worker: Worker | None = None,
                 grace: float = DEFAULT_GRACE, interrupt_grace: float = 10.0,
                 progress: Callable[[int, str, str], None] | None = None) -> None:
        # Skyward's fallback chains: ComputePool(sky.Spec(...), sky.Spec(...), selection="cheapest").
        if isinstance(provider, Spec):
            given = [provider, nodes, accelerator, *more]
            specs = [s for s in given if isinstance(s, Spec)]
            if len(specs) != len([g for g in given if g not in (1, None)]):
                raise ConfigError("ComputePool(sky.Spec(...), sky.Spec(...), ...): give the specs positionally and "
                                  "everything else by keyword (nodes and accelerator belong in each Spec).")
        else:
            if isinstance(nodes, tuple):
                raise ConfigError(f"nodes={nodes!r}: a range of nodes (autoscaling) is not supported yet; give a "
                                  f"number of nodes.")
            if isinstance(nodes, Spec) or isinstance(accelerator, Spec) or more:
                raise ConfigError("sky.Spec values go first: ComputePool(sky.Spec(...), sky.Spec(...), ...).")
            specs = [Spec(provider=provider, nodes=nodes, accelerator=accelerator, vcpus=vcpus, memory_gb=memory_gb,
                          architecture=architecture, allocation=allocation)]
        if selection not in SELECTIONS:
            raise ConfigError(f"selection must be 'first' or 'cheapest', got {selection!r}")
        for spec in specs:
            if spec.provider is not None and not isinstance(spec.provider, Provider):
                raise ConfigError(f"provider must be sky.Local(), sky.SSH(...) or sky.AWS(...), not "
                                  f"{type(spec.provider).__name__}; did you forget the parentheses?")
        self.specs = specs
        self.selection = selection
        self.ttl = check_positive("ttl", ttl)
        self.max_hourly_cost = check_positive("max_hourly_cost", max_hourly_cost)
        self.default_compute_timeout = check_positive("default_compute_timeout", default_compute_timeout)
        self.provision_timeout = check_positive("provision_timeout", provision_timeout)
        if worker is not None and not isinstance(worker, Worker):
            raise ConfigError(f"worker must be a sky.Worker(concurrency=...), not {type(worker).__name__}")
        self.worker = worker or Worker()
        first = specs[0]
        nodes, accelerator = first.nodes, first.accelerator
        provider = first.provider if isinstance(first.provider, Provider) else None
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
        if output is not None and output not in OUTPUTS:
            raise ConfigError(f"output must be 'head' or 'all', got {output!r}")
        self.provider = provider
        self.spec = first
        self.size = check_nodes(nodes)
        self._use(first)
        self.workers_per_node = check_workers_per_node(workers_per_node)
        self.output = output
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
        self.workers: list[RemoteWorker] = []
        self.hosts: list[Host] = []
        self.gpus: dict[int, int] = {}  # GPUs per node, as its bring-up counted them
        self._synced: dict[int, tuple[tuple[str, str], ...]] = {}  # node -> the includes it has (sync)
        self.leftovers: list[Call] = []  # what a dead client left running on the nodes (see attach)
        self.image = image
        self.head_port = 0
        self.store_port = 0  # where the head worker hosts sky.dict & co.
        self.started_at: float | None = None
        self.last_used = time.monotonic()
        self._stack: ExitStack | None = None
        self._client_hooks: list[tuple[Plugin, ExitStack]] = []  # each plugin's around_client, entered
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._entered: list[contextvars.Token[Target | None]] = []

    def __repr__(self) -> str:
        state_ = "running" if self.started_at and not self._closed else ("closed" if self._closed else "new")
        workers = f" workers={len(self.workers)}" if len(self.workers) > self.size else ""
        return f"<ComputePool {self.name!r} {self.provider!r} nodes={self.size}{workers} {state_}>"

    @property
    def cluster(self) -> Cluster:
        return Cluster(nodes=self.size, accelerator=self.accelerator, provider=self.provider.name,
                       pool_name=self.name, gpu=bool(self.accelerator and self.accelerator.lower() != "cpu"),
                       workers_per_node=self.workers_per_node)

    @property
    def several_per_node(self) -> bool:
        """Whether some node runs more than one worker."""
        return any(w.per_node > 1 for w in self.workers)

    def shows_stdout(self, worker: RemoteWorker, output: str | None = None, alone: bool = False) -> bool:
        """Whether ``worker``'s stdout is shown under ``output`` (else the pool's, else its default) for work sent
        to several workers at once; work that runs on one worker ``alone`` (``>>``, ``--rank K``) shows it."""
        chosen = output or self.output or ("head" if self.several_per_node else "all")
        return alone or chosen == "all" or worker.rank == 0

    def _node_workers(self) -> int | str:
        """What each node's bring-up is asked to start: a number, or one per GPU."""
        if self.workers_per_node != "auto":
            return check_workers(self.workers_per_node)
        return PER_GPU if any(p.name == "torch" for p in self.plugins) else 1

    @property
    def running(self) -> bool:
        return self.started_at is not None and not self._closed

    # -- lifecycle -----------------------------------------------------------------------------------------
    def __enter__(self) -> ComputePool:
        self.start()
        self._entered.append(enter(self))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._entered:
            try:
                leave(self._entered.pop())
            except ValueError:  # exited in another context than it was entered in: leave that context alone
                pass
        self.close()

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Skyward's ``@sky.pool(...)``: the decorated function runs with this pool started around it (and
        ``fn() >> sky`` inside it reaches the pool)."""
        @functools.wraps(fn)
        def within(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return within

    def start(self) -> ComputePool:
        """Provision, bootstrap and connect every node. Anything started is torn down if this fails or is
        interrupted. With several specs, each is tried in turn (in order, or cheapest first) until one starts:
        the next is tried when one cannot be provisioned (no capacity, a quota, an unreachable host)."""
        if self.running:
            return self
        if self._closed:
            raise SkyError(f"pool {self.name!r} was shut down; create a new ComputePool to start again.")
        candidates = self._candidates()
        failures: list[str] = []
        for i, spec in enumerate(candidates):
            self._use(spec)
            try:
                return self._start_once()
            except ProvisionError as exc:
                if i == len(candidates) - 1:
                    if failures:
                        exc.add_note("tried before: " + "; ".join(failures))
                    raise
                failures.append(f"{self.provider!r} ({exc})")
                print(f"[{self.name}] {self.provider!r} could not start the pool ({exc}); trying the next spec",
                      file=sys.stderr)
                self._closed, self._stop = False, threading.Event()  # that attempt is torn down; the pool goes on
                self.workers, self.hosts, self.gpus, self._synced = [], [], {}, {}
                self._client_hooks = []
        raise AssertionError("unreachable")

    def _candidates(self) -> list[Spec]:
        """The specs in the order to try them, each checked against ``max_hourly_cost`` before anything starts."""
        priced = [(spec, self._hourly_estimate(spec)) for spec in self.specs]
        if self.max_hourly_cost is not None:
            within = [(s, c) for s, c in priced if c is None or c <= self.max_hourly_cost]
            if not within:
                costs = ", ".join(f"${c:.2f}/h" for _, c in priced if c is not None)
                raise ConfigError(f"max_hourly_cost=${self.max_hourly_cost:g}/h: every spec costs more ({costs} at "
                                  f"list prices); raise it, ask for fewer nodes or a smaller accelerator.")
            priced = within
        if self.selection == "cheapest":
            priced.sort(key=lambda sc: (sc[1] is None, sc[1] or 0.0))
        return [s for s, _ in priced]

    @staticmethod
    def _hourly_estimate(spec: Spec) -> float | None:
        """USD per hour for the spec's nodes at list prices, where its provider bills (None: unknown or free)."""
        price_of = getattr(spec.provider, "accelerator", None)  # AWS: (instance type, list price per hour)
        if not callable(price_of):
            return None
        try:
            _, price = price_of(spec.accelerator)
        except ConfigError:
            raise
        except Exception:  # noqa: BLE001 - no estimate is not a reason to refuse
            return None
        return None if price is None else float(price) * spec.nodes

    def _use(self, spec: Spec) -> None:
        """Make ``spec`` the pool's provider and request."""
        provider = spec.provider if spec.provider is not None else Local()
        assert isinstance(provider, Provider)
        self.provider, self.spec = provider, spec
        self.size, self.accelerator = check_nodes(spec.nodes), spec.accelerator or None
        if spec.allocation is not None and hasattr(provider, "spot"):  # AWS: the market to launch in
            setattr(provider, "spot", spec.allocation != "on-demand")  # noqa: B010 - attributes of one provider
            setattr(provider, "on_demand_fallback", spec.allocation == "spot-if-available")  # noqa: B010
        if self.provision_timeout is not None and hasattr(provider, "boot_timeout"):
            setattr(provider, "boot_timeout", self.provision_timeout)  # noqa: B010

    def _start_once(self) -> ComputePool:
        spec = PoolSpec(self.name, self.size, self.accelerator, self.spec.vcpus, self.spec.memory_gb,
                        self.spec.architecture, self.spec.allocation)
        self.provider.check(spec)
        self._stack = ExitStack()
        try:
            self._prepare_client()
            plan = self._plan()
            self._save_state(fresh=True)  # a record of an earlier pool of the same name is replaced, not merged
            self.hosts = self.provider.provision(spec)
            self._save_state()
            self.workers = self._bring_up(self.hosts, plan)
            head = self.workers[0].link
            assert head is not None  # every node is connected once brought up
            self.head_port = head.hello["free_port"]  # told when it connected
            self.store_port = head.hello.get("store_port", 0)
            self._setup_all()
            self._go_live(sync=True)
        except BaseException:
            self.close()
            raise
        return self

    def _go_live(self, sync: bool) -> None:
        """Where start and attach end alike, their workers connected and set up: the pool runs from now on
        (``sync``: the image's includes are sent first), its record says this client owns it, its keeper watches
        idle time and links, and interpreter exit shuts it down."""
        self.started_at = time.time()
        if sync:
            self.sync()
        self._save_state()
        self._keeper = threading.Thread(target=self._keep, daemon=True, name=f"sky-keeper-{self.name}")
        self._keeper.start()
        _track(self)

    def _prepare_client(self) -> None:
        """The final image (its secret values known to the redactor) and the plugins' client hooks entered."""
        assert self._stack is not None
        self.image = transform_image(self.base_image, self.plugins, self.cluster)
        self._register_secrets(self.plugins)
        self._enter_client_hooks(self.plugins)

    def _register_secrets(self, plugins: Sequence[Plugin]) -> None:
        """The redactor learns the image's values of the secrets ``plugins`` declare (an HF token...)."""
        for plugin in plugins:
            for key in plugin.secrets:
                register(self.image.environ.get(key))

    def _enter_client_hooks(self, plugins: Sequence[Plugin]) -> None:
        """Enter the ``around_client`` hook of each of ``plugins``, each on a stack of its own (so that a plugin
        a running pool stops using can leave alone), closed with the pool in reverse order."""
        assert self._stack is not None
        for plugin in plugins:
            if plugin.around_client is not None:
                hook = ExitStack()
                hook.enter_context(plugin.around_client(self))
                self._client_hooks.append((plugin, hook))
                self._stack.callback(hook.close)

    def _exit_client_hooks(self, plugins: Sequence[Plugin]) -> None:
        """Leave the ``around_client`` hooks of ``plugins`` (ones the pool no longer uses), newest first."""
        for plugin, hook in reversed(list(self._client_hooks)):
            if any(plugin is p for p in plugins):
                self._client_hooks.remove((plugin, hook))
                hook.close()

    def grow(self, nodes: int, plugins: Sequence[Plugin] | None = None) -> None:
        """Add nodes to a running pool and, given ``plugins``, use that plugin chain from now on (the torch plugin
        turned on or off without a restart: see :meth:`use_plugins`). The running workers keep their namespaces;
        what the new chain adds to the image or the bootstrap is installed on their nodes first. Every worker is
        then set up again: torch.distributed is torn down and formed anew over all workers with the new world size
        (RANK, WORLD_SIZE... and ``sky.instance_info()`` follow). If anything fails, the pool is left as it was."""
        check_nodes(nodes)
        self._require_running()
        chain = self.plugins if plugins is None else check_plugins(plugins)
        changed = chain != self.plugins
        if nodes <= self.size and not changed:
            return
        if changed:
            self._check_layout(chain)
        old_size, old_hosts, old_workers = self.size, list(self.hosts), list(self.workers)
        old_plugins, old_image, old_gpus = self.plugins, self.image, dict(self.gpus)
        old_plan = self._plan()
        added = [p for p in chain if not any(p is q for q in old_plugins)]
        removed = [p for p in old_plugins if not any(p is q for q in chain)]
        new_workers: list[RemoteWorker] = []
        set_up = False
        try:
            self.size = max(nodes, old_size)
            if changed:
                self.plugins = chain
                self.image = transform_image(self.base_image, chain, self.cluster)
                self._register_secrets(added)
                self._enter_client_hooks(added)
            plan = self._plan()
            if plan.key != old_plan.key:  # the running nodes get what the new chain adds (torch, its phases)
                self._parallel([functools.partial(self.provider.bootstrap, host, plan, self.progress)
                                for host in old_hosts])
            if nodes > old_size:
                hosts = self.provider.provision(PoolSpec(self.name, nodes, self.accelerator))
                new_hosts = hosts[old_size:]
                self.hosts = old_hosts + new_hosts
                new_workers = self._bring_up(new_hosts, plan, first_rank=len(old_workers))
                self.workers = old_workers + new_workers
            env = {k: v for k, v in self.image.environ.items() if old_image.environ.get(k) != v}
            set_up = True
            self._set_up_again(env)
            self._exit_client_hooks(removed)
            self.sync()
            self._save_state()
        except BaseException as exc:
            self._parallel([worker.close for worker in new_workers], raise_first=False)
            self.size, self.hosts, self.workers, self.gpus = old_size, old_hosts, old_workers, old_gpus
            self.plugins, self.image = old_plugins, old_image
            self._exit_client_hooks(added)
            if set_up:  # the running workers were being set up for the new pool: back to the old one
                try:
                    self._set_up_again()
                except Exception as again:  # noqa: BLE001 - the first failure is what to raise; this one is noted
                    exc.add_note(f"setting the workers up again as they were failed too ({type(again).__name__}: "
                                 f"{redact(str(again))}); restart the pool")
            raise

    def use_plugins(self, plugins: Sequence[Plugin]) -> None:
        """Use this plugin chain on a running pool from now on, its workers and their namespaces kept: the torch
        plugin added brings torch.distributed up over every worker, removed tears it down. What the chain adds to
        the image or bootstrap is installed on the nodes first (a plugin that would change how many workers a node
        runs cannot be switched while running: see :meth:`_check_layout`)."""
        self.grow(self.size, plugins)

    def _check_layout(self, chain: Sequence[Plugin]) -> None:
        """Refuse a plugin chain under which the running nodes would run another number of workers
        (``workers_per_node="auto"``: one per GPU with the torch plugin, else one)."""
        per_gpu = any(p.name == "torch" for p in chain)
        if self.workers_per_node != "auto" or per_gpu == any(p.name == "torch" for p in self.plugins):
            return
        for node in sorted({w.node for w in self.workers}):
            have = sum(1 for w in self.workers if w.node == node)
            want = max(self.gpus.get(node, 0), 1) if per_gpu else 1
            if have != want:
                raise ConfigError(
                    f"pool {self.name!r} cannot turn torch {'on' if per_gpu else 'off'} while it runs: node {node} "
                    f"runs {have} worker(s) and would need {want} (workers_per_node='auto' is one per GPU with "
                    f"torch, else one); shut it down (`%sky down {self.name}`, or pool.close()) and start it "
                    f"again with torch {'on' if per_gpu else 'off'} (its remote namespace is lost).")

    def sync(self) -> dict[int, int]:
        """Bring every node's copy of ``Image(includes=...)`` up to date (:mod:`sky_jupyter.sync`): only files whose
        content changed travel. Returns the files written per node (nothing to do: an empty dict, no round trip)."""
        if not self.image.includes:
            return {}
        files = local_manifest(self.image.includes, self.image.excludes)
        stamp = tuple(sorted((name, digest) for name, (digest, _) in files.items()))
        heads = [w for w in self.workers if w.local_rank == 0 and self._synced.get(w.node) != stamp]

        def one(worker: RemoteWorker) -> int:
            have = self.submit(PendingCompute(node_manifest), node=worker).wait(120)
            send = {name: local for name, (digest, local) in files.items() if have.get(name) != digest}
            remove = sorted(set(have) - set(files))
            written = self.submit(PendingCompute(node_apply, (tar_of(send) if send else b"", remove,
                                                              {n: d for n, (d, _) in files.items()})),
                                  node=worker).wait(600)
            self._synced[worker.node] = stamp
            return int(written)

        results = in_parallel([functools.partial(one, w) for w in heads])
        for worker, result in zip(heads, results):
            if isinstance(result, Exception):
                raise ProvisionError(f"{worker.label}: Image(includes=...) could not be synced there "
                                     f"({type(result).__name__}: {redact(str(result))})") from result
        return {w.node: int(r) for w, r in zip(heads, results)}  # type: ignore[arg-type]

    def _plan(self) -> BootstrapPlan:
        """The provider's bootstrap plan for this pool's image, told which variables hold secrets."""
        plan = self.provider.plan(self.image, bootstrap_ops(self.plugins, self.cluster))
        return dataclasses.replace(plan, secrets=tuple(sorted({k for p in self.plugins for k in p.secrets})))

    def _bring_up(self, hosts: list[Host], plan: BootstrapPlan, first_rank: int = 0) -> list[RemoteWorker]:
        """Bootstrap each host, start its workers and connect to them, every node at its own pace (one waiting for
        the slowest bootstrap before starting its workers would add the stragglers' times up). Workers are numbered
        from ``first_rank``, node by node. On a failure, the workers that did start are stopped and the first
        failure in node order is raised. Interrupted (Ctrl-C, Stop), it stops what has started, and a node still
        bootstrapping stops its own workers as soon as they exist: nothing is left running."""
        started: list[list[RemoteWorker]] = [[] for _ in hosts]
        lock = threading.Lock()
        cancelled = False

        def one(i: int, host: Host) -> None:
            node = self.provider.bring_up(host, plan, self._worker_config(host, 0), self.progress)
            self.gpus[host.rank] = node.gpus
            mine = [RemoteWorker(host, self.secret, self._start_worker, self._setup_one, self.name, local_rank=local,
                                 per_node=len(node.workers)) for local in range(len(node.workers))]
            for worker, handle in zip(mine, node.workers):
                worker.handle = handle  # stopped with the others should a connection below fail
            with lock:
                if not cancelled:
                    started[i] = mine
            if cancelled:  # the start-up was interrupted while this node bootstrapped
                self._parallel([worker.close for worker in mine], raise_first=False)
                return
            failed = [r for r in in_parallel([functools.partial(w.start_worker, h)
                                               for w, h in zip(mine, node.workers)]) if isinstance(r, Exception)]
            if failed:
                raise failed[0]

        try:
            results = in_parallel([functools.partial(one, i, host) for i, host in enumerate(hosts)])
        except BaseException:
            with lock:
                cancelled = True
                begun = [worker for node in started for worker in node]
            self._parallel([worker.close for worker in begun], raise_first=False)
            raise
        workers = [worker for node in started for worker in node]
        failures = [r for r in results if isinstance(r, Exception)]
        if failures:
            self._parallel([worker.close for worker in workers], raise_first=False)
            raise failures[0]
        for rank, worker in enumerate(workers, start=first_rank):
            worker.rank = rank
        return workers

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
            self._parallel([worker.close for worker in self.workers], raise_first=False)
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
            interrupt_grace=self.interrupt_grace, head_port=self.head_port, store_port=self.store_port,
            hosts=[{**dataclasses.asdict(h), "extra": {k: v for k, v in h.extra.items() if _plain(v)}}
                   for h in self.hosts],
            workers=[{"rank": w.rank, "node": w.node, "local_rank": w.local_rank,
                      "port": getattr(w.handle, "port", None), "pid": getattr(w.handle, "pid", None)}
                     for w in self.workers],
            workers_per_node=self.workers_per_node, output=self.output, gpus={str(n): c for n, c in self.gpus.items()},
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
        if not hosts or any(not workers.get(h.rank) for h in hosts):
            raise ConfigError(f"pool {name!r} had not finished starting when its client stopped, so there are no "
                              f"workers to attach to; `%sky down {name}` (or ComputePool.release_detached("
                              f"{name!r})) releases what it started.")
        pool = cls(provider, nodes=len(hosts), accelerator=recorded.accelerator, image=image, plugins=plugins,
                   idle_timeout=recorded.idle_timeout or DEFAULT_IDLE_TIMEOUT, name=name,
                   grace=recorded.grace or DEFAULT_GRACE, interrupt_grace=recorded.interrupt_grace or 10.0,
                   progress=progress, workers_per_node=recorded.workers_per_node, output=recorded.output)
        pool.gpus = {int(node): count for node, count in recorded.gpus.items()}
        pool.secret = recorded.secret
        register(pool.secret)
        pool.head_port, pool.store_port = recorded.head_port, recorded.store_port
        pool._stack = ExitStack()
        attached: list[RemoteWorker] = []
        try:
            pool._prepare_client()
            pool.hosts = provider.reattach(name, hosts, recorded.cloud)
            for host in pool.hosts:
                found_here = workers[host.rank]
                attached += [RemoteWorker(host, pool.secret, pool._start_worker, pool._setup_one, name,
                                          local_rank=local, per_node=len(found_here)) for local, _, _ in found_here]
            for rank, worker in enumerate(attached):
                worker.rank = rank
            sink_for = leftover_sink or (lambda rank: pool._sink(attached[rank]))

            def attach(worker: RemoteWorker) -> list[Call]:
                _, port, pid = workers[worker.node][worker.local_rank]
                return worker.attach(provider.worker(worker.host, port, pid, worker.local_rank),
                                     sink_for(worker.rank))

            found = in_parallel([functools.partial(attach, w) for w in attached])
            failed = [(w, r) for w, r in zip(attached, found) if isinstance(r, Exception)]
            if failed:
                raise ConnectionLostError(
                    f"pool {name!r}: " + "; ".join(_why_unattached(w, exc) for w, exc in failed)
                    + f". The nodes are left as they were: `%sky down {name}` (or ComputePool.release_detached("
                    f"{name!r})) stops what is left and releases the machines.")
            pool.workers = attached
            pool.leftovers = [call for calls in found if not isinstance(calls, Exception) for call in calls]
            for worker in attached:
                if worker.state != "ready":  # a worker that restarted itself lost its setup: set it up again
                    pool._setup_one(worker)
                    worker.state = "ready"
            pool._go_live(sync=False)  # this client owns the pool now; its nodes keep the files they have
        except BaseException:
            for worker in attached:
                worker.detach()
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
                hosts = provider.reattach(name, hosts, recorded.cloud)
            except (SkyError, OSError):
                pass  # unreachable or gone: the workers' dead-man switch ends them; the machines go below
            else:
                def stop(host: Host, local: int, port: int, pid: int) -> None:
                    worker = RemoteWorker(host, recorded.secret, _no_new_worker, lambda w: None, name,
                                          local_rank=local)
                    handle = provider.worker(host, port, pid, local)
                    try:
                        worker.attach(handle, lambda kind, meta: None)  # asked to shut down next: plugins' exits run
                    except (SkyError, OSError, EOFError):
                        worker.handle = handle
                    worker.close(timeout)

                in_parallel([functools.partial(stop, h, *found) for h in hosts for found in workers.get(h.rank, ())])
            provider.release(hosts)
        finally:
            provider.disconnect(hosts)
        state.remove(name)

    @staticmethod
    def _parallel(fns: list[Callable[[], Any]], raise_first: bool = True) -> list[Any]:
        """One thread each; the first failure (in order) is raised, or with ``raise_first=False`` None."""
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

    def _worker_config(self, host: Host, local_rank: int) -> dict[str, Any]:
        options = self.provider.worker_options()
        if host.extra.get("market") != "spot":  # reclaim notices are for spot nodes (AWS tells each host's market)
            options.pop("spot", None)
        return {**options,
                "secret": self.secret, "rank": host.rank, "local_rank": local_rank,
                "concurrency": self.worker.concurrency, "executor": self.worker.executor,
                "workers_per_node": self._node_workers(), "world_size": self.size, "pool": self.name,
                "grace": self.grace, "interrupt_grace": self.interrupt_grace, "env": self.image.environ,
                "max_frame": P.MAX_FRAME, "max_buffers": P.MAX_BUFFERS}

    def _start_worker(self, host: Host, local_rank: int) -> WorkerHandle:
        return self.provider.start_worker(host, self._worker_config(host, local_rank))

    def _setup_meta(self, worker: RemoteWorker) -> dict[str, Any]:
        addrs = tuple(h.private_addr for h in self.hosts)
        info = {"rank": worker.rank, "world_size": len(self.workers), "head_addr": addrs[0], "node_addrs": addrs,
                "accelerator": self.accelerator, "pool_name": self.name, "head_port": self.head_port,
                "node": worker.node, "worker": worker.local_rank, "workers_per_node": worker.per_node,
                "accelerators": self.gpus.get(worker.node, 0)}
        return {"info": info, "store_port": self.store_port}

    def _setup_payload(self) -> list:
        worker_side = [dataclasses.replace(p, transform=None, bootstrap=None, around_client=None)
                       for p in self.plugins if p.around_app is not None or p.decorate is not None]
        return P.dumps(worker_side)

    def _setup_all(self, env: dict[str, str] | None = None) -> None:
        """Set every worker up (its plugins' ``around_app`` hooks: torch.distributed joins there), all at once;
        ``env``: variables to set in workers that started without them (a plugin added to a running pool)."""
        payload = self._setup_payload()
        # What plugins print while setting up (a warning from torch.distributed, say) is shown like a task's output.
        calls = [w.submit(P.SETUP, {**self._setup_meta(w), **({"env": env} if env else {})}, payload,
                          sink=self._sink(w, alone=False))
                 for w in self.workers]
        self._wait_all(calls, timeout=600)
        for worker, call in zip(self.workers, calls):
            worker.hostname = call.wait()["hostname"]
            worker.state = "ready"
        # The hosts' record learns their hostnames from the workers (what attach shows before reconnecting).
        names = {worker.node: worker.hostname for worker in self.workers}
        self.hosts = [dataclasses.replace(h, hostname=names.get(h.rank) or h.hostname) for h in self.hosts]

    def _set_up_again(self, env: dict[str, str] | None = None) -> None:
        """Set up every worker of a running pool again (grown, its plugins changed, a node replaced). The workers
        leave their old torch.distributed group at their own pace, so the new one meets on a port of node 0 found
        free now: at the old port, a worker quick to join again could reach the old group's store, still there."""
        from .worker.server import _free_port

        self.head_port = int(self.submit(PendingCompute(_free_port), node=self.workers[0]).wait(60))
        self._setup_all(env)

    def _setup_one(self, worker: RemoteWorker) -> None:
        worker.hostname = worker.submit(P.SETUP, self._setup_meta(worker), self._setup_payload(),
                                        sink=self._sink(worker)).wait(600)["hostname"]

    def _keep(self) -> None:
        """Heartbeats keep the workers' dead-man switch quiet and find broken links early."""
        interval = max(1.0, min(30.0, self.grace / 4))
        if self.ttl is not None:
            interval = min(interval, max(0.2, self.ttl / 20))
        while not self._stop.wait(interval):
            if self.ttl is not None and self.started_at is not None and time.time() - self.started_at > self.ttl:
                print(f"[{self.name}] shutting the pool down: it has run for its ttl of {self.ttl:g} s",
                      file=sys.stderr)
                threading.Thread(target=self.close, daemon=True, name=f"sky-ttl-{self.name}").start()
                return
            for worker in self.workers:
                if self._stop.is_set():
                    return
                try:
                    worker.ping(timeout=10)
                except (SkyError, OSError, EOFError):
                    pass  # the node records its state; the next task reports or repairs it

    # -- dispatch ------------------------------------------------------------------------------------------
    def _require_running(self) -> None:
        if not self.running:
            raise SkyError(f"pool {self.name!r} is not running; use `with sky.ComputePool(...) as pool:` "
                           f"or call pool.start() first.")

    def _sink(self, worker: RemoteWorker, alone: bool = True) -> Sink:
        return StreamPrinter(self.prefix(worker), stdout=self.shows_stdout(worker, alone=alone))

    def tag(self, worker: RemoteWorker) -> str:
        """How output and messages name ``worker``: its node with one worker per node, else its rank."""
        return f"rank {worker.rank}" if self.several_per_node else f"node {worker.node}"

    def prefix(self, worker: RemoteWorker) -> str:
        """What each line of ``worker``'s output starts with, when the pool has several workers."""
        return f"[{self.tag(worker)}] " if len(self.workers) > 1 else ""

    def _payload(self, pending: PendingCompute[Any]) -> list:
        register_user_modules()
        try:
            return P.dumps((pending.fn, pending.args, pending.kwargs))
        except Exception as exc:  # noqa: BLE001 - (un)pickling user objects can raise anything
            raise SerializationError(_explain_pickle_failure(pending, exc)) from None

    def ranked_workers(self) -> list[RemoteWorker]:
        """Workers in the order ``>>`` tries them: reachable first, then least busy, then lowest rank."""
        return sorted(self.workers, key=lambda w: (w.state in ("unreachable", "reclaimed"), w.in_flight(), w.rank))

    def submit(self, pending: PendingCompute[Any], node: RemoteWorker | None = None, sink: Sink | None = None,
               on_done: Callable[[], None] | None = None, items: queue.SimpleQueue[list | None] | None = None
               ) -> Call:
        """Send one task (to ``node``, a worker, when given). Otherwise a worker that cannot be reached is skipped
        for the next one. ``on_done`` is called (on a reader thread) when it ends."""
        self._require_running()
        self.last_used = time.monotonic()
        payload = self._payload(pending)
        candidates = [node] if node is not None else self.ranked_workers()
        first_error: ConnectionLostError | None = None
        for candidate in candidates:
            try:
                return candidate.submit(P.TASK, {"stream": True} if items is not None else None, payload,
                                        sink or self._sink(candidate), (pending.fn,), on_done, items=items)
            except ConnectionLostError as exc:
                first_error = first_error or exc
        assert first_error is not None
        raise first_error

    def run(self, pending: PendingCompute[Any], rank: int | None = None) -> Any:
        """``pending >> pool``: run on one worker (the least busy, or ``rank``) and return its value."""
        if inspect.isgeneratorfunction(pending.fn):
            return self._items(pending, self.workers[rank] if rank is not None else None)
        return self._retrying(lambda: self._wait_all(
            [self.submit(pending, self.workers[rank] if rank is not None else None)], [pending],
            self.default_compute_timeout)[0])

    def _retrying(self, attempt: Callable[[], Any]) -> Any:
        """``attempt()``; when the provider retries on interruption (AWS ``retry_on_interruption=True``) and it failed
        because EC2 reclaims a spot node, that node is replaced in its zone and ``attempt()`` runs once more."""
        try:
            return attempt()
        except SpotReclaimError:
            if not getattr(self.provider, "retry_on_interruption", False):
                raise
        for node in sorted({w.node for w in self.workers if w.reclaimed}):
            self.replace_node(node)
        return attempt()

    def replace_node(self, node: int) -> None:
        """A new machine for node ``node`` (a spot node being reclaimed), in its zone and groups: its workers start
        fresh there (their namespace is lost) and every worker is set up again (torch.distributed re-forms)."""
        self._require_running()
        old = [w for w in self.workers if w.node == node]
        self._parallel([functools.partial(w.close, 2.0) for w in old], raise_first=False)
        spec = PoolSpec(self.name, self.size, self.accelerator, self.spec.vcpus, self.spec.memory_gb,
                        self.spec.architecture, self.spec.allocation)
        host = self.provider.replace(spec, self.hosts[node])
        self.hosts[node] = host
        self._synced.pop(node, None)
        fresh = self._bring_up([host], self._plan(), first_rank=old[0].rank if old else 0)
        at = self.workers.index(old[0]) if old else len(self.workers)
        self.workers[at:at + len(old)] = fresh
        for rank, worker in enumerate(self.workers):
            worker.rank = rank
        if node == 0:  # the head moved: its port for the shared collections too
            head = self.workers[0].link
            assert head is not None
            self.store_port = head.hello.get("store_port", 0)
        self._set_up_again()
        self.sync()
        self._save_state()
        print(f"[{self.name}] node {node} was replaced ({host.display}); its workers start fresh", file=sys.stderr)

    def _items(self, pending: PendingCompute[Any], worker: RemoteWorker | None) -> Iterator[Any]:
        """A generator function's call, streamed: its items as the worker yields them. Leaving the loop early
        interrupts it there; its error is raised where the next item would be."""
        items: queue.SimpleQueue[list | None] = queue.SimpleQueue()
        call = self.submit(pending, worker, items=items)

        def values() -> Iterator[Any]:
            try:
                while (frames := items.get()) is not None:
                    yield P.loads(frames)
                call.wait()  # its error, if it ended with one
            finally:
                if not call.done():
                    call.interrupt()

        return values()

    def broadcast(self, pending: PendingCompute[Any]) -> list[Any]:
        """``pending @ pool``: run on every worker at once; the values in rank order."""
        self._require_running()
        self.last_used = time.monotonic()
        payload = self._payload(pending)

        def attempt() -> list[Any]:
            calls = self.submit_many([Request(w, P.TASK, None, payload, self._sink(w, alone=False), (pending.fn,))
                                      for w in self.workers])
            return self._wait_all(calls, [pending] * len(calls), self.default_compute_timeout)

        return self._retrying(attempt)

    def submit_many(self, requests: Sequence[Request]) -> list[Call]:
        """Send several jobs at once, a payload that several workers of one node get (the same buffers) crossing
        the link to that node once (:data:`~sky_jupyter.protocol.SHARED`): the worker that carries it is sent its
        job first, so it has the payload by the time its siblings look for it. If a job cannot be sent, the ones
        already sent are interrupted and the error raised."""
        carriers: dict[tuple[int, tuple[int, ...]], list[int]] = {}
        for i, request in enumerate(requests):
            size = sum(memoryview(p).nbytes for p in request.payload)
            if size >= SHARE_AT:
                carriers.setdefault((request.worker.node, tuple(map(id, request.payload))), []).append(i)
        shares: dict[int, tuple[str, int, int]] = {}
        for group in carriers.values():
            if len(group) > 1:
                key = secrets.token_hex(8)
                shares[group[0]] = (key, len(group) - 1, 0)
                shares.update({i: (key, 0, copy) for copy, i in enumerate(group[1:], start=1)})
        order = sorted(range(len(requests)), key=lambda i: shares.get(i, ("", 0, 0))[2] > 0)  # carriers first
        calls: dict[int, Call] = {}
        try:
            for i in order:
                r, share = requests[i], shares.get(i)
                payload = () if share is not None and share[2] else r.payload
                calls[i] = r.worker.submit(r.kind, r.meta, payload, r.sink, r.code, r.on_done, share=share)
        except BaseException:
            for call in calls.values():
                call.interrupt()
            for call in calls.values():
                call.join(15)
            raise
        return [calls[i] for i in range(len(requests))]

    def gather(self, items: Sequence[PendingCompute[Any]]) -> tuple[Any, ...]:
        """Several computations at once, spread over the workers; values in order."""
        return tuple(self._retrying(lambda: self._wait_all(self._spread(items), list(items),
                                                           self.default_compute_timeout)))

    def _spread(self, items: Sequence[PendingCompute[Any]], on_done: Callable[[int], None] | None = None
                ) -> list[Call]:
        """Send ``items``, each to the least loaded worker; ``on_done(i)`` when item i ends."""
        self._require_running()
        load = {w.rank: w.in_flight() for w in self.workers}
        calls: list[Call] = []
        try:
            for i, item in enumerate(items):
                rank = min(load, key=lambda r: (load[r], r))
                load[rank] += 1
                done = None if on_done is None else functools.partial(on_done, i)
                calls.append(self.submit(item, self.workers[rank], on_done=done))
        except BaseException:
            for call in calls:
                call.interrupt()
            raise
        return calls

    def stream(self, items: Sequence[PendingCompute[Any]], ordered: bool = True) -> Iterator[Any]:
        """``sky.gather(..., stream=True) >> pool``: all items sent now, their values yielded as they can be (in
        order, or as they finish). An error is raised where its value would be; closing the iterator early
        interrupts the tasks still running."""
        finished: queue.SimpleQueue[int] = queue.SimpleQueue()
        calls = self._spread(items, finished.put)
        started = time.monotonic()

        def values() -> Iterator[Any]:
            try:
                if ordered:
                    for call, item in zip(calls, items):
                        yield self._value(call, item, started, self.default_compute_timeout)
                else:
                    for _ in calls:
                        i = finished.get()
                        yield self._value(calls[i], items[i], started, self.default_compute_timeout)
            finally:
                for call in calls:
                    if not call.done():
                        call.interrupt()

        return values()

    @staticmethod
    def _value(call: Call, pending: PendingCompute[Any] | None, started: float, limit: float | None = None) -> Any:
        """``call``'s value. One running past its pending's ``timeout`` (or ``limit``), counted from ``started``,
        is interrupted and raises TimeoutError; Ctrl-C while waiting interrupts it too (:meth:`Call.wait`)."""
        if pending is not None and pending.timeout is not None:
            limit = pending.timeout
        if limit is None or call.join(max(0.0, started + limit - time.monotonic())):
            return call.wait()
        call.interrupt()
        call.join(15)
        what = pending.name if pending is not None else "the call"
        raise TimeoutError(f"{what} ran longer than its timeout of {limit:g} s on {call.node.label} and was "
                           f"interrupted there")

    @classmethod
    def _wait_all(cls, calls: list[Call], pendings: Sequence[PendingCompute[Any] | None] = (),
                  timeout: float | None = None) -> list[Any]:
        """Wait for every call (each within its pending's ``timeout``, else ``timeout``); raise the first failure
        (by position) naming every worker that failed."""
        results: list[Any] = []
        failures: list[tuple[Call, BaseException]] = []
        started = time.monotonic()
        limits = list(pendings) + [None] * (len(calls) - len(pendings))
        try:
            for call, pending in zip(calls, limits):
                try:
                    results.append(cls._value(call, pending, started, timeout))
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
                unit = "workers" if any(c.node.per_node > 1 for c in calls) else "nodes"
                first.add_note(f"failed on {len(failures)} of {len(calls)} {unit} (ranks {ranks})")
            raise first
        return results

    def interrupt(self) -> None:
        for worker in self.workers:
            worker.interrupt(0)

    def cost(self) -> Cost | None:
        """USD per hour and so far for this pool's machines (None for providers that bill nothing)."""
        return self.provider.cost(self.hosts)

    def status(self, memory: bool = True) -> list[dict[str, Any]]:
        """One row per worker, in rank order; ``memory``: ask each worker for its resident memory (``rss``, bytes;
        None when it does not answer within a few seconds)."""
        def rss(worker: RemoteWorker) -> int | None:
            link = worker.link
            if not memory or link is None or not link.alive:
                return None
            return worker.ping(timeout=5).get("rss")

        found = in_parallel([functools.partial(rss, w) for w in self.workers])
        return [{"rank": w.rank, "node": w.node, "worker": w.local_rank, "addr": w.host.display,
                 "hostname": w.hostname, "state": w.state, "in_flight": w.in_flight(),
                 "rss": None if isinstance(m, Exception) else m} for w, m in zip(self.workers, found)]


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


class _CallableModule(types.ModuleType):
    """``sky.pool(...)``, Skyward's name for ``sky.ComputePool(...)`` (a context manager, or ``@sky.pool(...)``
    around a function): importing this module binds ``sky_jupyter.pool`` to it, so the module itself is callable."""

    def __call__(self, *args: Any, **kwargs: Any) -> ComputePool:
        return ComputePool(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
