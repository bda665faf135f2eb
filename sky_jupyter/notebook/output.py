"""Where a cell's remote output goes.

Frames arrive on link reader threads; they are queued and written by the thread that runs the cell, so output
lands in the cell that started the work (ipykernel ties output to the executing request). Interactive kernels
see lines live, prefixed ``[node K]`` when several nodes run. Non-interactive runs (nbval, ``jupyter execute``,
``SKY_JUPYTER_PLAIN=1``) get plain output grouped per node in rank order, so saved notebooks compare exactly.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any

from .. import protocol as P


def plain_mode(shell: Any = None) -> bool:
    """True for non-interactive runs: SKY_JUPYTER_PLAIN=1, or a kernel driven without stdin (nbclient)."""
    flag = os.environ.get("SKY_JUPYTER_PLAIN", "").lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    if flag in ("0", "false", "no", "off"):
        return False
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return False
    return not getattr(kernel, "_allow_stdin", True)


def _collapse_carriage_returns(text: str) -> str:
    """What a terminal would finally show: for each line, the text after its last carriage return."""
    lines = []
    for line in text.split("\n"):
        lines.append(line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r"))
    return "\n".join(lines)


class CellOutput:
    """Collects frames from every node of one cell run and writes them into the cell."""

    def __init__(self, ranks: list[int], plain: bool) -> None:
        self.ranks = ranks
        self.plain = plain
        self.prefixed = len(ranks) > 1
        self.queue: queue.SimpleQueue[tuple[int, str, Any]] = queue.SimpleQueue()
        self._line_start: dict[tuple[int, str], bool] = {}
        self._held: dict[int, list[tuple[str, Any]]] = {r: [] for r in ranks}
        self._running = len(ranks)
        self._lock = threading.Lock()

    def wake(self) -> None:
        """Called (on a reader thread) when a node's call ends; the last one wakes a waiting ``pump``."""
        with self._lock:
            self._running -= 1
            last = self._running <= 0
        if last:
            self.queue.put((-1, "", None))

    def sink(self, rank: int):
        def put(kind: str, meta: Any) -> None:
            self.queue.put((rank, kind, meta))
        return put

    def pump(self, timeout: float | None = None) -> None:
        """Write what has arrived (waiting up to ``timeout`` for the first frame)."""
        try:
            item = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return

    def _handle(self, rank: int, kind: str, meta: Any) -> None:
        if rank < 0:
            return
        if self.plain:
            self._held.setdefault(rank, []).append((kind, meta))
            return
        if kind == P.STREAM:
            self._write(rank, meta["name"], meta["text"])
        elif kind == P.DISPLAY:
            self._display(rank, meta)

    def _write(self, rank: int, name: str, text: str) -> None:
        stream = sys.stderr if name == "stderr" else sys.stdout
        if self.prefixed:
            prefix = f"[node {rank}] "
            pieces = []
            for line in text.splitlines(keepends=True):
                key = (rank, name)
                pieces.append(prefix + line if self._line_start.get(key, True) else line)
                self._line_start[key] = line.endswith(("\n", "\r"))
            text = "".join(pieces)
        stream.write(text)
        stream.flush()

    def _display(self, rank: int, meta: dict[str, Any]) -> None:
        try:
            from IPython.display import publish_display_data
        except ImportError:
            self._write(rank, "stdout", str(meta.get("data", {}).get("text/plain", "")) + "\n")
            return
        publish_display_data(meta.get("data", {}), meta.get("metadata") or {})

    def finish(self) -> None:
        """Drain the queue; in plain mode, write everything grouped per node in rank order."""
        self.pump()
        if not self.plain:
            return
        for rank in sorted(self._held):
            frames = self._held[rank]
            if not frames:
                continue
            if self.prefixed:
                sys.stdout.write(f"[node {rank}]\n")
            # Merge consecutive text per stream so progress bars collapse to their final state.
            text: dict[str, list[str]] = {"stdout": [], "stderr": []}
            for kind, meta in frames:
                if kind == P.STREAM:
                    text[meta["name"] if meta["name"] in text else "stdout"].append(meta["text"])
                else:
                    self._flush_plain(text)
                    self._display(rank, meta)
            self._flush_plain(text)
        for held in self._held.values():
            held.clear()

    def _flush_plain(self, text: dict[str, list[str]]) -> None:
        for name in ("stdout", "stderr"):
            if text[name]:
                joined = _collapse_carriage_returns("".join(text[name]))
                stream = sys.stderr if name == "stderr" else sys.stdout
                stream.write(joined)
                stream.flush()
                text[name].clear()
