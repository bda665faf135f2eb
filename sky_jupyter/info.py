"""Where am I? ``sky.instance_info()`` for code running on a node, and ``sky.shard`` to split data by rank."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """The node's place in its pool. Also answers the Skyward names (``node``, ``total_nodes``, ...)."""

    rank: int
    world_size: int
    head_addr: str
    node_addrs: tuple[str, ...]
    accelerator: str | None
    pool_name: str | None
    head_port: int = 0
    local: bool = False

    @property
    def node(self) -> int:
        return self.rank

    @property
    def total_nodes(self) -> int:
        return self.world_size

    @property
    def is_head(self) -> bool:
        return self.rank == 0

    @property
    def hostname(self) -> str:
        return socket.gethostname()

    @property
    def addr(self) -> str:
        return self.node_addrs[self.rank] if self.node_addrs else self.head_addr


_current: InstanceInfo | None = None
_LOCAL = InstanceInfo(rank=0, world_size=1, head_addr="127.0.0.1", node_addrs=("127.0.0.1",),
                      accelerator=None, pool_name=None, local=True)


def instance_info() -> InstanceInfo:
    """This node's rank, world size, head and node addresses, accelerator and pool name.

    Outside a pool (``fn.local(...)``, plain scripts) it describes a one-node world with ``local=True``.
    """
    return _current or _LOCAL


def _set_current(info: InstanceInfo | None) -> None:
    global _current
    _current = info


def shard(seq: T, shuffle: bool = False, seed: int = 0, drop_last: bool = False,
          rank: int | None = None, world_size: int | None = None) -> T:
    """This node's strided part of ``seq`` (rank, rank + world, ...), keeping its type.

    Lists, tuples, strings, numpy arrays and tensors come back as the same kind of object (others: a list).
    ``shuffle`` permutes with ``seed`` first (the same on every node, so parts stay disjoint);
    ``drop_last`` makes every node's part the same length.
    """
    info = instance_info()
    rank = info.rank if rank is None else rank
    world = info.world_size if world_size is None else world_size
    n = len(seq)  # type: ignore[arg-type]
    indices = list(range(n))
    if shuffle:
        import random

        random.Random(seed).shuffle(indices)
    if drop_last:
        indices = indices[: n - n % world]
    mine = indices[rank::world]
    return _take(seq, mine)


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
