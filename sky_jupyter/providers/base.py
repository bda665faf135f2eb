"""What every provider gives the pool: hosts, a bootstrap step, and workers reachable as byte streams."""

from __future__ import annotations

import abc
import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import protocol as P
from ..bootstrap import BootstrapPlan, Phase
from ..errors import ConfigError
from ..image import Image

Progress = Callable[[int, str, str], None]  # (rank, phase, line)
T = TypeVar("T")


def in_parallel(fns: Sequence[Callable[[], T]]) -> list[T | Exception]:
    """Run each function in its own thread (one node each); its value, or the exception it raised, in order.

    Plain threads, not a ``concurrent.futures`` pool: teardown at interpreter exit (a kernel shutting down or
    restarting) runs here too, and by then such pools refuse new work."""
    results: list[T | Exception] = [RuntimeError("not run")] * len(fns)

    def run(i: int) -> None:
        try:
            results[i] = fns[i]()
        except Exception as exc:  # noqa: BLE001 - returned to the caller
            results[i] = exc

    if len(fns) == 1:
        run(0)
        return results
    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"sky-parallel-{i}")
               for i in range(len(fns))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


@dataclass(frozen=True, slots=True)
class Host:
    """A machine a node runs on, as the client reaches it and as its peers reach it."""

    rank: int
    addr: str
    private_addr: str
    port: int = 22
    user: str | None = None
    hostname: str = ""
    instance_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def display(self) -> str:
        return f"{self.user}@{self.addr}" if self.user else self.addr


class WorkerHandle(abc.ABC):
    """A started worker: how to open a connection to it, whether it still runs, how to stop it."""

    port: int
    pid: int

    @abc.abstractmethod
    def open(self) -> P.FrameIO: ...

    @abc.abstractmethod
    def alive(self) -> bool: ...

    @abc.abstractmethod
    def stop(self, timeout: float = 5.0) -> None: ...

    def describe_exit(self) -> str:
        return "is gone"


@dataclass(frozen=True, slots=True)
class NodeStart:
    """A node's started workers, in local rank order, and the GPUs it has (0 on a CPU node)."""

    workers: list[WorkerHandle]
    gpus: int = 0


#: ``config["workers_per_node"]`` that asks for one worker per GPU the node has (at least one).
PER_GPU = "gpus"


def check_workers(value: object) -> int | str:
    """A worker count a node's bring-up understands: a whole number from 1, or :data:`PER_GPU`."""
    if value == PER_GPU or (type(value) is int and 1 <= value <= 1024):
        return value
    raise ConfigError(f"workers per node must be a whole number from 1 to 1024, or {PER_GPU!r}; got {value!r}")


@dataclass(frozen=True, slots=True)
class Cost:
    """What a pool's machines cost, in USD: per hour while they run, and since each was started."""

    per_hour: float
    so_far: float
    basis: str = ""  # where the prices come from, for the reader


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """What the pool asks a provider for."""

    name: str
    nodes: int
    accelerator: str | None
    vcpus: float | None = None  # for a CPU instance type, where no accelerator is named
    memory_gb: float | None = None
    architecture: str | None = None  # "x86_64" or "arm64"
    allocation: str | None = None  # "spot", "on-demand" or "spot-if-available"


class Provider(abc.ABC):
    name: str = "provider"

    @abc.abstractmethod
    def provision(self, spec: PoolSpec) -> list[Host]:
        """Make ``spec.nodes`` hosts exist (start machines, or take the given ones), in rank order."""

    @abc.abstractmethod
    def bootstrap(self, host: Host, plan: BootstrapPlan, progress: Progress) -> None:
        """Make the host match the plan, once (skipped when its marker shows it already does)."""

    @abc.abstractmethod
    def start_worker(self, host: Host, config: dict[str, Any]) -> WorkerHandle:
        """Start a worker on the host with ``config`` (which holds the pool secret: never on a command line)."""

    def bring_up(self, host: Host, plan: BootstrapPlan, config: dict[str, Any], progress: Progress) -> NodeStart:
        """Bootstrap the host, then start its workers (``config["workers_per_node"]`` of them, or one per GPU),
        each with its ``local_rank``: providers with slow links do all of it in fewer round trips."""
        self.bootstrap(host, plan, progress)
        gpus = self.gpu_count(host)
        wanted = check_workers(config.get("workers_per_node", 1))
        count = max(gpus, 1) if wanted == PER_GPU else int(wanted)
        started = in_parallel([functools.partial(self.start_worker, host, {**config, "local_rank": i})
                               for i in range(count)])
        failed = [r for r in started if isinstance(r, Exception)]
        handles = [r for r in started if not isinstance(r, Exception)]
        if failed:
            for handle in handles:
                try:
                    handle.stop(1.0)
                except Exception:  # noqa: BLE001 - the first failure is what to report
                    pass
            raise failed[0]
        return NodeStart(handles, gpus)

    def gpu_count(self, host: Host) -> int:
        """How many GPUs the host has (providers whose bring-up counts them on the node need not say)."""
        return 0

    def plan(self, image: Image, plugin_phases: list[tuple[str, str]]) -> BootstrapPlan:
        """The bootstrap for this provider's nodes: by default only the plugins' phases."""
        return BootstrapPlan(image, tuple(Phase(name, script) for name, script in plugin_phases))

    def replace(self, spec: PoolSpec, host: Host) -> Host:
        """A new machine in ``host``'s place (same rank; AWS: same zone and groups), the old one given back: what
        ``retry_on_interruption`` does with a spot node EC2 reclaims."""
        raise ConfigError(f"{self.name} nodes cannot be replaced; start a new pool.")

    def reattach(self, pool: str, hosts: list[Host], cloud: dict[str, Any]) -> list[Host]:
        """Reach again the hosts of a pool that an earlier client started (their state file's ``hosts`` and
        ``cloud``), so that its workers can be attached to; the hosts as this provider now reaches them."""
        raise ConfigError(f"{self.name} pools cannot be attached to from another client; start a new pool.")

    def worker(self, host: Host, port: int, pid: int, local_rank: int = 0) -> WorkerHandle:
        """A handle on the worker (``local_rank`` of its node) that an earlier client started on ``host`` (see
        :meth:`reattach`)."""
        raise ConfigError(f"{self.name} workers cannot be attached to from another client; start a new pool.")

    def disconnect(self, hosts: list[Host]) -> None:  # noqa: B027 - providers without connections have nothing to do
        """Let go of the hosts without giving them back: close connections, forget them (an attach that failed)."""

    def read_log(self, host: Host) -> str:
        """The node's worker and bootstrap logs, for ``%sky logs``."""
        return f"{self.name} nodes keep no logs this client can read"

    def release(self, hosts: list[Host]) -> None:  # noqa: B027 - providers without machines have nothing to do
        """Give back what provision started (terminate machines). Must be safe to call more than once."""

    def check(self, spec: PoolSpec) -> None:  # noqa: B027
        """Validate the request before anything is started; raise ConfigError naming the culprit."""

    def worker_options(self) -> dict[str, Any]:
        """Extra worker configuration for this provider's nodes (AWS: power the machine off when orphaned)."""
        return {}

    def pool_state(self, pool: str) -> dict[str, Any]:
        """Provider facts kept in the pool's state file (cloud ids), so teardown and gc know what exists."""
        return {}

    def cost(self, hosts: list[Host]) -> Cost | None:
        """What ``hosts`` cost so far and per hour; None where machines are not billed by this tool's provider."""
        return None
