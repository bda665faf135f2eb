"""Where am I? ``sky.instance_info()`` for code running on a node, and ``sky.shard`` to split data by rank."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any


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


def shard(*data: Any, shuffle: bool = False, seed: int = 0, drop_last: bool = False, node: int | None = None,
          total_nodes: int | None = None, rank: int | None = None, world_size: int | None = None) -> Any:
    """This node's contiguous block of each sequence in ``data`` (Skyward's ``shard``), keeping each one's type.

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
