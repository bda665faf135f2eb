"""What each worker's namespace holds of the notebook's values, as the notebook knows it.

Per rank: name -> the content hash of the copy shipped there, or :data:`OWN` (the worker computed or changed it
itself). Per name: the hash of the notebook's copy when it last went to or came from a node. With the two, a cell
sends a value only to the workers that lack the notebook's current copy: re-reading an unchanged 1 GB dataset costs
a hash, and a value each rank computed for itself (``rank = ...``) is not overwritten by the first rank's copy that
came back to the notebook. A worker that was replaced (its incarnation changed) holds nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OWN = "<computed on the node>"


@dataclass
class SyncBook:
    held: dict[int, dict[str, str]] = field(default_factory=dict)  # rank -> name -> hash or OWN
    incarnations: dict[int, int] = field(default_factory=dict)  # rank -> its worker's incarnation when recorded
    notebook: dict[str, str] = field(default_factory=dict)  # name -> hash of the notebook's copy at last sync

    def holdings(self, rank: int, incarnation: int) -> dict[str, str]:
        """What the worker of ``rank`` holds; nothing when it is not the one the record was made for (a worker
        started since has an empty namespace)."""
        if self.incarnations.get(rank) != incarnation:
            self.held[rank] = {}
            self.incarnations[rank] = incarnation
        return self.held.setdefault(rank, {})

    def to_send(self, rank: int, incarnation: int, hashes: Mapping[str, str]) -> list[str]:
        """The inputs (name -> hash of the notebook's copy now) the worker lacks, sorted: those it never had, had
        in another version, or computed itself while the notebook's copy changed since."""
        have = self.holdings(rank, incarnation)
        return [name for name in sorted(hashes)
                if not (have.get(name) == hashes[name]
                        or (have.get(name) == OWN and self.notebook.get(name) == hashes[name]))]

    def cell_done(self, rank: int, sent: Iterable[str], hashes: Mapping[str, str],
                  result: Mapping[str, Any] | None) -> None:
        """Record a cell's end on ``rank``: it received ``sent``; ``result`` says what it bound, changed in place
        and lacks (None: the cell failed or was stopped, so what it holds of ``sent`` is unknown: sent again)."""
        have = self.held.setdefault(rank, {})
        if result is None:
            for name in sent:
                have.pop(name, None)
            return
        for name in sent:
            have[name] = hashes[name]
        # What the cell bound or changed in place: the first rank's copy comes to the notebook, each other rank keeps
        # its own. (A rank that left a value the first rank changed as it was still has the notebook's former copy:
        # it gets the notebook's when a cell reads it next.)
        for name in (*result.get("bound", ()), *result.get("changed", ())):
            have[name] = OWN
        for name in result.get("missing", ()):
            have.pop(name, None)

    def shipped(self, hashes: Mapping[str, str], names: Collection[str]) -> None:
        """The notebook's copies of ``names`` went to nodes as they are now."""
        for name in names:
            self.notebook[name] = hashes[name]

    def notebook_copy(self, name: str, digest: str | None) -> None:
        """The notebook now has its own copy of ``name`` (brought back or pulled), of hash ``digest``; None: it
        cannot be hashed (sent each time a cell reads it) or the notebook holds a handle instead of a copy."""
        if digest is None:
            self.notebook.pop(name, None)
        else:
            self.notebook[name] = digest

    def node_keeps(self, rank: int, incarnation: int, name: str) -> None:
        """The worker of ``rank`` holds the copy of ``name`` the notebook just received from it."""
        self.holdings(rank, incarnation)[name] = OWN
