"""``sky.Remote``: a notebook name whose value stayed on the nodes (too large to pull, or not picklable).

A handle used in a later ``%%sky`` cell resolves to the value on the node with no transfer; ``%sky pull NAME``
fetches it.
"""

from __future__ import annotations

from dataclasses import dataclass


def human_size(n: int | None) -> str:
    if n is None:
        return "size unknown"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


@dataclass(frozen=True, slots=True)
class Remote:
    """A value that lives in a node's namespace under ``name``."""

    name: str
    type_name: str
    size: int | None
    rank: int
    pool: str
    reason: str = ""

    def __repr__(self) -> str:
        why = f"; {self.reason}" if self.reason else ""
        return (f"<Remote {self.name}: {self.type_name}, {human_size(self.size)}, on node {self.rank} of pool "
                f"{self.pool!r}{why}; use it in a %%sky cell, or `%sky pull {self.name}`>")
