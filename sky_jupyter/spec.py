"""``sky.Spec``: one way to get a pool's machines (Skyward's name), for ``ComputePool(spec, spec, ...,
selection=...)``: the pool tries them in order (``"first"``) or cheapest first (``"cheapest"``) until one starts."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

ALLOCATIONS = ("spot", "on-demand", "spot-if-available")
ARCHITECTURES = ("x86_64", "arm64")
SELECTIONS = ("first", "cheapest")


def check_allocation(allocation: object) -> str | None:
    if allocation is None:
        return None
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {allocation!r}")
    return str(allocation)


def check_architecture(architecture: object) -> str | None:
    if architecture is None:
        return None
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"architecture must be 'x86_64' or 'arm64', got {architecture!r}")
    return str(architecture)


def check_positive(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    return float(value)


@dataclass(frozen=True, slots=True)
class Spec:
    """Where and what: a provider and the machines to ask it for. ``accelerator`` may be a name or a
    ``sky.accelerators`` value; ``vcpus``, ``memory_gb`` and ``architecture`` choose a CPU instance type where no
    accelerator is named (AWS); ``allocation`` is ``"spot"``, ``"on-demand"`` or ``"spot-if-available"``."""

    provider: object = None
    nodes: int = 1
    accelerator: str | None = None
    vcpus: float | None = None
    memory_gb: float | None = None
    architecture: str | None = None
    allocation: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.nodes, tuple):
            raise ConfigError(f"nodes={self.nodes!r}: a range of nodes (autoscaling) is not supported yet; give a "
                              f"number of nodes.")
        check_allocation(self.allocation)
        check_architecture(self.architecture)
        check_positive("vcpus", self.vcpus)
        check_positive("memory_gb", self.memory_gb)


@dataclass(frozen=True, slots=True)
class Worker:
    """How each worker process runs tasks (Skyward's ``sky.Worker``): ``concurrency`` tasks at once; ``>>`` then
    balances over every slot of every worker. ``executor="thread"`` runs them on threads of the worker (a task sees
    an interrupt at its next Python instruction: a long C call, ``time.sleep`` included, finishes first);
    ``executor="process"`` runs each in a process forked from the worker, for CPU-bound pure Python (it sees the
    worker's namespace and modules as they were at the fork; what it changes there stays in the child; an interrupt
    is a SIGINT to it; a generator's items come back as a list). Notebook cells still run one at a time."""

    concurrency: int = 1
    executor: str = "thread"

    def __post_init__(self) -> None:
        if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or not self.concurrency >= 1:
            raise ConfigError(f"sky.Worker(concurrency=...) takes a whole number from 1, got {self.concurrency!r}")
        if self.executor not in ("thread", "process"):
            raise ConfigError(f"sky.Worker(executor=...) takes 'thread' or 'process', got {self.executor!r}")

