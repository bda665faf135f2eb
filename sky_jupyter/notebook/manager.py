"""The pool manager: one per kernel, module-level (ipykernel may drop context variables between cells).

It owns the notebook's pools across cells, the settings bare ``%%sky`` cells use (written by ``%sky config`` and
the panel), and a background thread that shuts idle pools down. Pools are torn down at kernel exit.
"""

from __future__ import annotations

import atexit
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .. import state
from ..errors import ConfigError, SkyError
from ..image import Image
from ..pool import ComputePool, check_nodes, check_workers_per_node
from ..providers import Provider
from ..redaction import register
from .session import DEFAULT_BUDGET, NotebookPool

PROVIDERS = ("local", "ssh", "aws")
#: Notebook cells run in an IPython shell on each node (magics, !cmd, rich output): every notebook pool has it. Nodes
#: hash the values a cell reads before and after it (changed ones come back): xxhash makes that ~7x faster than
#: sha256 (256 MB: 30 ms instead of 200 ms on a 2-core VM).
NOTEBOOK_IMAGE = Image(pip=["ipython", "xxhash"])


@dataclass(frozen=True, slots=True)
class Settings:
    """What a bare ``%%sky`` cell uses. The panel and ``%sky config KEY=VALUE`` change it."""

    provider: str = "local"
    nodes: int = 1
    workers_per_node: int | str = "auto"  # "auto": one per GPU with torch, else one
    accelerator: str | None = None
    hf: bool = False
    torch: bool | None = None  # None: on when nodes > 1
    idle_timeout: float = 30 * 60.0
    pool: str = "default"
    hosts: tuple[str, ...] = ()
    user: str | None = None
    key_file: str | None = None
    region: str | None = None
    spot: bool = False
    pull_budget: int = DEFAULT_BUDGET
    hf_token: str | None = field(default=None, repr=False)

    def public(self) -> dict[str, Any]:
        """The settings as shown to the user: the token only as set / not set."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "hf_token"}
        out["hf_token"] = "set" if self.hf_token else "not set"
        return out


def _coerce(key: str, text: str) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    if key not in kinds:
        raise ConfigError(f"unknown setting {key!r}; known: {', '.join(k for k in kinds)}")
    kind = str(kinds[key])
    text = text.strip()
    if key == "hf_token":  # typed into a cell, a token stays in the notebook, its history and its outputs
        raise ConfigError("%sky config does not take hf_token (the token would stay in the notebook); enter it in "
                          "the panel's token field (%sky panel), set the HF_TOKEN environment variable, or run "
                          "`hf auth login` on this machine.")
    if key == "provider":
        if text not in PROVIDERS:
            raise ConfigError(f"provider must be one of {', '.join(PROVIDERS)}, got {text!r}")
        return text
    if key == "hosts":
        return tuple(h.strip() for h in text.split(",") if h.strip())
    if key == "nodes":
        try:
            return check_nodes(int(text))
        except ValueError:
            raise ConfigError(f"nodes must be a whole number of at least 1, got {text!r}") from None
    if key == "workers_per_node":
        return parse_workers_per_node(text)
    if kind.startswith("bool"):
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        if lowered in ("none", "auto") and key == "torch":
            return None
        raise ConfigError(f"{key} must be true or false, got {text!r}")
    if key in ("idle_timeout", "pull_budget"):
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(f"{key} must be a number, got {text!r}") from None
        if value <= 0:
            raise ConfigError(f"{key} must be positive, got {text!r}")
        return int(value) if key == "pull_budget" else value
    return text or None


def parse_workers_per_node(text: str) -> int | str:
    """``auto`` or a whole number, as typed (``%sky config``, ``--workers-per-node``, the panel)."""
    text = text.strip().lower()
    try:
        return check_workers_per_node(text if text == "auto" else int(text))
    except ValueError:
        raise ConfigError(f"workers_per_node must be 'auto' or a whole number from 1, got {text!r}") from None


@dataclass(frozen=True, slots=True)
class PoolRequest:
    """What one cell asks of its pool."""

    name: str
    provider: str
    nodes: int
    accelerator: str | None
    hf: bool
    # None: as the default has it (on when nodes > 1, see torch_by_default), for a running pool too: one started so
    # gets torch when it grows to several nodes. True or False: what the cell asked for (a running pool turns
    # torch.distributed on or off, its workers and namespace kept).
    torch: bool | None
    workers_per_node: int | str = "auto"


def make_provider(settings: Settings, name: str) -> Provider:
    from .. import providers

    if name == "local":
        return providers.Local()
    if name == "ssh":
        if not settings.hosts:
            raise ConfigError("the ssh provider needs hosts: `%sky config hosts=user@host1,user@host2` "
                              "(or set them in the panel)")
        return providers.SSH(hosts=list(settings.hosts), user=settings.user, key_file=settings.key_file)
    if name == "aws":
        return providers.AWS(region=settings.region, spot=settings.spot)
    raise ConfigError(f"unknown provider {name!r}; use one of {', '.join(PROVIDERS)}")


def make_plugins(request: PoolRequest, settings: Settings) -> list[Any]:
    from .. import plugins

    chosen = []
    if request.torch:
        chosen.append(plugins.torch())
    if request.hf:
        chosen.append(plugins.huggingface(token=settings.hf_token))
    return chosen


def torch_by_default(provider: str, nodes: int) -> bool:
    """torch.distributed is on by default for several nodes; on the Local provider only when torch is
    installed here (Local nodes use this environment)."""
    if nodes <= 1:
        return False
    if provider != "local":
        return True
    import importlib.util

    return importlib.util.find_spec("torch") is not None


class PoolManager:
    def __init__(self) -> None:
        self.settings = Settings()
        self.pools: dict[str, NotebookPool] = {}
        self.requests: dict[str, PoolRequest] = {}
        self.notices: list[str] = []
        self.listeners: list[Any] = []  # callables(event: str, pool_name: str), e.g. the panel
        # Bootstrap progress of every pool this manager starts or grows, e.g. for the panel's node table.
        self.progress_listeners: list[Any] = []  # callables(pool_name: str, rank: int, phase: str, line: str)
        self.starting: dict[str, ComputePool] = {}  # pools being provisioned and bootstrapped right now
        self.default_torch: set[str] = set()  # pools whose torch follows the default (none was asked for)
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # the idle watcher looks again now (a setting changed, or shutting down)
        self._watcher: threading.Thread | None = None
        atexit.register(self.shutdown_all)

    # -- settings ------------------------------------------------------------------------------------------
    def configure(self, **changes: Any) -> Settings:
        if "hf_token" in changes:
            register(changes["hf_token"])
        if "nodes" in changes:
            check_nodes(changes["nodes"])
        if "provider" in changes and changes["provider"] not in PROVIDERS:
            raise ConfigError(f"provider must be one of {', '.join(PROVIDERS)}, got {changes['provider']!r}")
        self.settings = replace(self.settings, **changes)
        if "idle_timeout" in changes:  # running pools follow it too, not only the ones started from now on
            with self._lock:
                for name, npool in self.pools.items():
                    npool.pool.idle_timeout = self.settings.idle_timeout
                    state.update(name, idle_timeout=self.settings.idle_timeout)  # what an attach would take up
            self._wake.set()
        self._emit("settings", "")
        return self.settings

    def configure_text(self, assignments: list[str]) -> Settings:
        changes = {}
        for item in assignments:
            key, eq, value = item.partition("=")
            if not eq:
                raise ConfigError(f"expected KEY=VALUE, got {item!r}; e.g. `%sky config nodes=2`")
            changes[key.strip()] = _coerce(key.strip(), value)
        return self.configure(**changes)

    # -- pools ---------------------------------------------------------------------------------------------
    def ensure(self, request: PoolRequest, progress: Any = None) -> NotebookPool:
        """The live pool for ``request``: reused, grown, or started; a conflicting change is an error."""
        with self._lock:
            current = self.pools.get(request.name)
            if current is not None and not current.pool.running:
                self._forget(request.name)
                current = None
            if current is not None:
                have = self.requests[request.name]
                conflicts = [f"{key} {getattr(have, key)!r} (asked {getattr(request, key)!r})"
                             for key in ("provider", "accelerator", "hf", "workers_per_node")
                             if getattr(have, key) != getattr(request, key)]
                if conflicts:
                    raise ConfigError(
                        f"pool {request.name!r} is running with {', '.join(conflicts)}; run `%sky down "
                        f"{request.name}` to restart it (its remote namespace is lost), or use --pool NEWNAME.")
                return self._reshape(current, have, request)
            left = state.load(request.name)
            if left is not None and left.detached:
                if left.provider != "local":
                    raise ConfigError(
                        f"pool {request.name!r} was left running by a kernel that stopped (pid "
                        f"{left.client_pid}); `%sky attach {request.name}` takes it over with its remote "
                        f"namespace, `%sky down {request.name}` shuts it down, or use --pool NEWNAME.")
                state.remove(request.name)  # Local workers ended with their kernel: nothing is left of it
            by_default = request.torch is None
            if by_default:
                request = replace(request, torch=torch_by_default(request.provider, request.nodes))
            provider = make_provider(self.settings, request.provider)
            pool = ComputePool(provider=provider, nodes=request.nodes, accelerator=request.accelerator,
                               image=NOTEBOOK_IMAGE, workers_per_node=request.workers_per_node,
                               plugins=make_plugins(request, self.settings), idle_timeout=self.settings.idle_timeout,
                               name=request.name, progress=self._progress(request.name, progress))
            self.starting[request.name] = pool
            self._emit("starting", request.name)
            try:
                pool.start()
            except BaseException:
                self._emit("start-failed", request.name)
                raise
            finally:
                self.starting.pop(request.name, None)
            # What the cell asked for, so that a later kernel can attach to this pool as it was (no secrets here).
            state.update(request.name, request=asdict(request))
            if by_default:
                self.default_torch.add(request.name)
            return self._adopt(pool, request, "started")

    def _reshape(self, current: NotebookPool, have: PoolRequest, request: PoolRequest) -> NotebookPool:
        """A running pool as ``request`` wants it: grown to more nodes, torch.distributed turned on or off (its
        workers and their namespaces kept; a grown pool's group re-formed over all of them)."""
        pool, name = current.pool, request.name
        size = max(request.nodes, pool.size)
        if request.torch is None:  # a bare cell: the pool keeps what it has, or follows the default if it did
            torch = bool(have.torch) or (name in self.default_torch and torch_by_default(have.provider, size))
        else:  # asked for: from now on the pool's torch is the user's choice, not the default
            torch = request.torch
            if torch != have.torch:
                self.default_torch.discard(name)
        before = pool.size
        if size == before and torch == have.torch:
            return current
        plugins = None
        if torch != have.torch:
            from .. import plugins as known

            others = [p for p in pool.plugins if p.name != "torch"]
            plugins = [known.torch(), *others] if torch else others  # make_plugins' order
        pool.grow(size, plugins)
        changed = replace(have, nodes=pool.size, torch=torch)
        self.requests[name] = changed
        state.update(name, request=asdict(changed))
        if pool.size != before:
            self._emit("grown", name)
        if torch != have.torch:
            self._emit("torch-on" if torch else "torch-off", name)
        return current

    def _adopt(self, pool: ComputePool, request: PoolRequest, event: str) -> NotebookPool:
        npool = NotebookPool(pool, self.settings.public())
        self.pools[request.name] = npool
        self.requests[request.name] = request
        self._ensure_watcher()
        self._emit(event, request.name)
        return npool

    def attach(self, name: str, progress: Any = None, leftover_sink: Any = None) -> NotebookPool:
        """Take over pool ``name`` that a kernel which died left running (its workers and their namespaces)."""
        with self._lock:
            if name in self.pools and self.pools[name].pool.running:
                raise ConfigError(f"pool {name!r} is already running in this kernel; %%sky --pool {name} uses it.")
            recorded = state.load(name) or state.PoolRecord(name, provider="local")
            known = {f.name for f in fields(PoolRequest)}
            asked = {k: v for k, v in recorded.request.items() if k in known}
            request = PoolRequest(**{"provider": recorded.provider or "local", "hf": False, "torch": False,
                                     "nodes": len(recorded.hosts) or 1, "accelerator": recorded.accelerator,
                                     **asked, "name": name})
            try:
                plugins = make_plugins(request, self.settings)
            except ConfigError:  # no Hub token here: the nodes logged in when the pool started, and keep it
                plugins = make_plugins(replace(request, hf=False), self.settings)
            pool = ComputePool.attach(name, image=NOTEBOOK_IMAGE, plugins=plugins,
                                      progress=self._progress(name, progress), leftover_sink=leftover_sink)
            pool.idle_timeout = self.settings.idle_timeout
            return self._adopt(pool, request, "attached")

    def detached(self) -> list[state.PoolRecord]:
        """Pools recorded on disk whose kernel is gone: what ``%sky attach`` can take over. Not Local pools: their
        workers ended with their kernel (they exit when their input closes), so nothing is left to attach to."""
        return [p for p in self._left_behind() if p.provider != "local"]

    def _left_behind(self) -> list[state.PoolRecord]:
        return [p for p in state.all_pools() if p.name not in self.pools and p.detached]

    def _forget_dead_local_pools(self) -> None:
        """Remove the records of Local pools whose kernel died: there is nothing left of them to show or stop."""
        for recorded in self._left_behind():
            if recorded.provider == "local":
                state.remove(recorded.name)

    def get(self, name: str) -> NotebookPool:
        npool = self.pools.get(name)
        if npool is None or not npool.pool.running:
            known = ", ".join(self.pools) or "none"
            raise ConfigError(f"no running pool named {name!r} (running: {known}); run a %%sky cell first")
        return npool

    def down(self, name: str | None = None, everything: bool = False) -> list[str]:
        """Shut pools down; returns their names, each with what was lost beyond its nodes (a background cell that
        was still running there), as ``%sky down`` shows them."""
        with self._lock:
            names = list(self.pools) if everything else [name or self.settings.pool]
            stopped = []
            for n in names:
                npool = self.pools.get(n)
                if npool is None:
                    if everything:
                        continue
                    recorded = state.load(n)
                    if recorded is None or not recorded.detached:
                        raise ConfigError(f"no pool named {n!r}; running: {', '.join(self.pools) or 'none'}")
                    ComputePool.release_detached(n)  # left by a kernel that died
                    stopped.append(n)
                    self._emit("stopped", n)
                    continue
                job = npool.background
                what = n
                if job is not None and job.running:
                    what = (f"{n} (its background cell, running for {time.monotonic() - job.started:.0f} s, was "
                            f"stopped)")
                try:
                    npool.pool.close()
                finally:
                    self._forget(n)
                    stopped.append(what)
                    self._emit("stopped", n)
            return stopped

    def _forget(self, name: str) -> None:
        self.pools.pop(name, None)
        self.requests.pop(name, None)
        self.default_torch.discard(name)

    def shutdown_all(self) -> None:
        self._stop.set()
        self._wake.set()
        try:
            self.down(everything=True)
        except Exception:  # noqa: BLE001 - at exit, tear down as much as possible
            pass

    def status_rows(self) -> list[dict[str, Any]]:
        self._forget_dead_local_pools()
        rows: list[dict[str, Any]] = [{"pool": p.name, "provider": p.provider, "rank": "-",
                 "addr": ", ".join(h.get("addr", "") for h in p.hosts),
                 "state": f"left by a kernel that stopped (pid {p.client_pid}): %sky attach {p.name} "
                          f"or %sky down {p.name}"} for p in self.detached()]
        for name, npool in self.pools.items():
            pool = npool.pool
            idle = time.monotonic() - pool.last_used
            for worker in pool.status():
                rss = worker.pop("rss")
                rows.append({"pool": name, "provider": pool.provider.name, **worker,
                             "memory": "" if rss is None else f"{rss / (1 << 20):.0f} MiB",
                             "idle_s": round(idle), "busy": bool(npool.busy),
                             "cost": _node_cost(pool, worker["node"]) if worker["worker"] == 0 else ""})
        return rows

    def take_notices(self) -> list[str]:
        with self._lock:
            notices, self.notices = self.notices, []
        for npool in list(self.pools.values()):
            notices += _worker_notices(npool.pool)
        return notices

    def after_interrupt(self, npool: NotebookPool, limit: float = 15.0) -> list[str]:
        """What became of the pool's workers when a cell was stopped, to say in that cell rather than the next one:
        a worker whose code ignored the interrupt is restarted, its namespace lost. Each worker is asked once (a
        restart under way ends its old connection), then waited for while it is reconnected and set up again, for
        ``limit`` seconds at most: what is not known by then is said by the next cell."""
        def settle(worker: Any) -> None:
            try:
                worker.ping(timeout=2)
            except (SkyError, OSError, EOFError):
                pass  # its connection ended: ensure_link below waits for (or makes) the new one
            try:
                worker.ensure_link()
            except (SkyError, OSError, EOFError):
                pass  # unreachable or gone: the next cell says so, as for any cell

        threads = [threading.Thread(target=settle, args=(w,), daemon=True, name=f"sky-settle-{w.rank}")
                   for w in npool.pool.workers]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + limit
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return _worker_notices(npool.pool)

    # -- idle shutdown -------------------------------------------------------------------------------------
    def _ensure_watcher(self) -> None:
        if self._watcher is None or not self._watcher.is_alive():
            self._watcher = threading.Thread(target=self._watch, daemon=True, name="sky-pool-manager")
            self._watcher.start()

    def _watch(self) -> None:
        while True:
            self._wake.wait(self._interval())
            self._wake.clear()
            if self._stop.is_set():
                return
            for name, npool in list(self.pools.items()):
                pool = npool.pool
                timeout = pool.idle_timeout
                if timeout and not npool.busy and time.monotonic() - pool.last_used > timeout:
                    with self._lock:
                        if self.pools.get(name) is not npool or npool.busy:
                            continue
                        try:
                            pool.close()
                        finally:
                            self._forget(name)
                    self.notices.append(f"pool {name!r} was shut down after {timeout:g} s idle "
                                        f"(idle_timeout); the next %%sky cell starts it again.")
                    self._emit("idle-stopped", name)

    def _interval(self) -> float:
        timeouts = [p.pool.idle_timeout for p in self.pools.values() if p.pool.idle_timeout]
        return max(0.2, min([10.0, *[t / 4 for t in timeouts]]))

    def _progress(self, name: str, progress: Any) -> Any:
        """The pool's bootstrap progress callback: the caller's (the cell's), then every progress listener."""
        def report(rank: int, phase: str, line: str) -> None:
            if progress is not None:
                progress(rank, phase, line)
            for listener in list(self.progress_listeners):
                try:
                    listener(name, rank, phase, line)
                except Exception:  # noqa: BLE001 - a broken listener (panel) must not break a bootstrap
                    pass
        return report

    def _emit(self, event: str, name: str) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, name)
            except Exception:  # noqa: BLE001 - a broken listener (panel) must not break pools
                pass


def _worker_notices(pool: ComputePool) -> list[str]:
    """What the pool's workers have to say (a restart, a spot reclaim), each said once."""
    notices: list[str] = []
    for worker in pool.workers:
        taken = list(worker.notices)
        del worker.notices[:len(taken)]  # one appended meanwhile stays for the next time
        notices += taken
    return notices


def _node_cost(pool: ComputePool, node: int) -> str:
    """``$21.96/h, $0.37 so far`` for a billed node (AWS), else empty."""
    cost = pool.provider.cost([h for h in pool.hosts if h.rank == node])
    return "" if cost is None else f"${cost.per_hour:.2f}/h, ${cost.so_far:.2f} so far"


_manager: PoolManager | None = None
_manager_lock = threading.Lock()


def manager() -> PoolManager:
    """The kernel's pool manager, created on first use."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = PoolManager()
        return _manager
