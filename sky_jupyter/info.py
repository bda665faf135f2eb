"""Where am I? ``sky.instance_info()`` for code running on a node, ``sky.shard`` to split data by rank, and the
``sky.stdout(only="head")`` and ``sky.silent`` decorators for what a function prints on the workers."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """This worker's place in its pool, with Skyward's names too.

    ``rank`` and ``world_size`` count workers over the whole pool (torch's RANK and WORLD_SIZE): node by node, then
    within a node. ``node`` is this node's index, ``worker`` this worker's index on it (LOCAL_RANK), of
    ``workers_per_node``; ``accelerators`` the GPUs this node has. With one worker per node, rank and node agree.
    """

    rank: int
    world_size: int
    head_addr: str
    node_addrs: tuple[str, ...]
    accelerator: str | None
    pool_name: str | None
    head_port: int = 0
    local: bool = False
    node: int = -1  # -1: the same as rank (one worker per node)
    worker: int = 0
    workers_per_node: int = 1
    accelerators: int = 0

    def __post_init__(self) -> None:
        if self.node < 0:
            object.__setattr__(self, "node", self.rank)

    @property
    def total_nodes(self) -> int:
        return len(self.node_addrs) or 1

    @property
    def global_worker_index(self) -> int:
        return self.rank

    @property
    def total_workers(self) -> int:
        return self.world_size

    @property
    def is_head(self) -> bool:
        return self.rank == 0

    @property
    def hostname(self) -> str:
        return socket.gethostname()

    @property
    def addr(self) -> str:
        return self.node_addrs[self.node] if self.node_addrs else self.head_addr


_current: InstanceInfo | None = None
_LOCAL = InstanceInfo(rank=0, world_size=1, head_addr="127.0.0.1", node_addrs=("127.0.0.1",),
                      accelerator=None, pool_name=None, local=True)


def instance_info() -> InstanceInfo:
    """This worker's rank, world size, node, local rank, head and node addresses, accelerator and pool name.

    Outside a pool (``fn.local(...)``, plain scripts) it describes a one-node world with ``local=True``.
    """
    return _current or _LOCAL


def _set_current(info: InstanceInfo | None) -> None:
    global _current
    _current = info


def shard(*data: Any, shuffle: bool = False, seed: int = 0, drop_last: bool = False, node: int | None = None,
          total_nodes: int | None = None, rank: int | None = None, world_size: int | None = None) -> Any:
    """This worker's contiguous block of each sequence in ``data`` (Skyward's ``shard``), keeping each one's type:
    split over every worker of the pool (by ``rank`` of ``world_size``) unless ``node``/``total_nodes`` say.

    Several sequences are cut at the same indices (``x_part, y_part = sky.shard(x, y)``: a tuple); one sequence
    gives its part alone. Blocks are contiguous and as even as possible (the first ``len % nodes`` nodes hold one
    more), as ``numpy.array_split`` cuts. ``shuffle`` permutes with ``seed`` first (the same on every node, so
    parts stay disjoint); ``drop_last`` gives every node exactly ``len // nodes`` items. ``node``/``total_nodes``
    (or ``rank``/``world_size``) override what :func:`instance_info` says. Lists, tuples, strings, numpy arrays
    and tensors come back as the same kind of object (others: a list).
    """
    if not data:
        raise TypeError("shard() needs at least one sequence: sky.shard(x) or sky.shard(x, y)")
    lengths = [len(seq) for seq in data]
    if len(set(lengths)) > 1:
        raise ValueError(f"shard() cuts its sequences at the same indices, so they must be equally long; got "
                         f"lengths {lengths}")
    node = rank if node is None else node
    total_nodes = world_size if total_nodes is None else total_nodes
    if node is None or total_nodes is None:
        info = instance_info()
        node = info.rank if node is None else node
        total_nodes = info.world_size if total_nodes is None else total_nodes
    if not 0 <= node < total_nodes:
        raise ValueError(f"shard(): node {node} is not one of the {total_nodes} nodes")
    n = lengths[0]
    indices = list(range(n))
    if shuffle:
        import random

        random.Random(seed).shuffle(indices)
    if drop_last:
        size = n // total_nodes
        mine = indices[node * size:(node + 1) * size]
    else:
        size, extra = divmod(n, total_nodes)
        start = node * size + min(node, extra)
        mine = indices[start:start + size + (node < extra)]
    parts = tuple(_take(seq, mine) for seq in data)
    return parts[0] if len(parts) == 1 else parts


def _take(seq: Any, idx: list[int]) -> Any:
    kind = type(seq).__module__.split(".")[0]
    if kind in ("numpy", "torch"):
        return seq[idx] if idx else seq[:0]
    items = [seq[i] for i in idx]
    if isinstance(seq, str):
        return "".join(items)
    if isinstance(seq, tuple):
        return tuple(items)
    if isinstance(seq, list):
        return items
    try:
        return type(seq)(items)
    except TypeError:
        return items


Only = str | Callable[[InstanceInfo], bool]


def is_head(info: InstanceInfo | None = None) -> bool:
    """Skyward's ``sky.is_head``: whether this worker (or ``info``'s) is the pool's head, global rank 0."""
    return (info or instance_info()).is_head


def _shows(only: Only, name: str) -> Callable[[], bool]:
    """Whether a worker shows its output under ``only``: "head", "all", or a predicate of its InstanceInfo."""
    if callable(only):
        return lambda: bool(only(instance_info()))
    if only not in ("head", "all"):
        raise ValueError(f"sky.{name}(only=...) takes 'head', 'all' or a function of sky.InstanceInfo, got {only!r}")
    return (lambda: True) if only == "all" else (lambda: instance_info().is_head)


def _quiet_unless(only: Only, name: str, redirect: Callable[[Any], Any]) -> Callable[[F], F]:
    shows = _shows(only, name)

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def quiet_unless(*args: Any, **kwargs: Any) -> Any:
            if shows():
                return fn(*args, **kwargs)
            with open(os.devnull, "w") as sink, redirect(sink):
                return fn(*args, **kwargs)

        return cast(F, quiet_unless)

    return decorate


def stdout(only: Only = "head") -> Callable[[F], F]:
    """Decorator (Skyward's ``sky.stdout``): what the function prints to stdout shows from the head worker alone
    (``only="head"``), from every worker (``"all"``), or from the workers for which ``only(info)`` is true (e.g.
    ``lambda info: info.worker == 0``: one per node). Python-level output: what C code writes to file descriptor 1
    still shows."""
    return _quiet_unless(only, "stdout", contextlib.redirect_stdout)


def stderr(only: Only = "head") -> Callable[[F], F]:
    """Decorator (Skyward's ``sky.stderr``): the same for what the function prints to stderr (errors still come
    back with their tracebacks)."""
    return _quiet_unless(only, "stderr", contextlib.redirect_stderr)


def silent(fn: F) -> F:
    """Decorator (Skyward's ``sky.silent``): the function prints nothing to stdout or stderr, on any worker
    (Python-level output; errors still come back)."""

    @functools.wraps(fn)
    def silenced(*args: Any, **kwargs: Any) -> Any:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            return fn(*args, **kwargs)

    return cast(F, silenced)
