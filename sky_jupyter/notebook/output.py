"""Where a cell's remote output goes.

Frames arrive on link reader threads; they are queued and written by the thread that runs the cell, so output
lands in the cell that started the work (ipykernel ties output to the executing request). Stream frames are text
(what arrived together is written, and flushed, once per node and stream: in a kernel each flush is a message);
display frames are Jupyter MIME bundles (what the node's IPython shell displayed: rich reprs, figures, HTML), with
``transient``/``update`` for ``display_id`` updates, or a ``clear`` request. A node's ``input()`` or ``getpass()``
is asked there too, in order with the output (in a kernel: the notebook's input box, through ipykernel's own
``input``/``getpass``, which work only on the thread running the cell).

Interactive kernels see everything live, lines prefixed ``[node K]`` when several nodes run (``[rank R]`` when
nodes run several workers; a worker whose stdout is not shown, with ``--output head``, still shows its stderr); a
node clearing its output (``clear_output``) clears only its own: the others' is shown again after the clear.
Non-interactive runs (nbval, ``jupyter execute``, ``SKY_JUPYTER_PLAIN=1``) get each node's output in its final
state, grouped per node in rank order, so saved notebooks compare exactly: progress bars collapsed to their last
update, a display shown as its last update (nbval ignores ``update_display_data``), cleared output gone.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
from typing import Any

from .. import protocol as P
from ..node import Prompt, StdinNotImplementedError

_COMPACT_AT = 256 * 1024  # characters of held text per stream before carriage-return updates are folded


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


def _final_line(line: str) -> str:
    """What Jupyter shows of one line: the text after its last carriage return (a trailing one overwrites
    nothing yet)."""
    return line.rstrip("\r").rsplit("\r", 1)[-1]


def _collapse_carriage_returns(text: str) -> str:
    """Each line as it finally shows: progress-bar updates collapse to their last state."""
    return "\n".join(_final_line(line) for line in text.split("\n"))


def _fold(text: str) -> str:
    """``text`` with its finished lines collapsed and its unfinished last line cut to its latest update, so that
    ``_collapse_carriage_returns(_fold(a) + b) == _collapse_carriage_returns(a + b)`` for any later ``b``."""
    done, newline, partial = text.rpartition("\n")
    body = partial.rstrip("\r")
    if "\r" in body:
        partial = "\r" + body.rsplit("\r", 1)[-1] + partial[len(body):]
    return (_collapse_carriage_returns(done) + newline if newline else "") + partial


def _display_id(meta: dict[str, Any]) -> str | None:
    return (meta.get("transient") or {}).get("display_id")


class _Text:
    """Held stream text between two displays, per stream name, folded as it grows."""

    def __init__(self) -> None:
        self.parts: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.size: dict[str, int] = {"stdout": 0, "stderr": 0}

    def add(self, name: str, text: str) -> None:
        name = name if name in self.parts else "stdout"
        self.parts[name].append(text)
        self.size[name] += len(text)
        if self.size[name] > _COMPACT_AT:
            folded = _fold("".join(self.parts[name]))
            self.parts[name] = [folded]
            self.size[name] = len(folded)

    def final(self, name: str) -> str:
        return _collapse_carriage_returns("".join(self.parts[name]))


class _Transcript:
    """One node's output kept in its final state: in plain mode, and in live mode with several nodes."""

    def __init__(self) -> None:
        self.items: list[_Text | dict[str, Any]] = []
        self._shown: dict[str, dict[str, Any]] = {}  # display_id -> the display it names, updated in place

    def add(self, kind: str, meta: dict[str, Any]) -> None:
        if kind == P.STREAM:
            text = self.items[-1] if self.items else None
            if not isinstance(text, _Text):
                text = _Text()
                self.items.append(text)
            text.add(meta["name"], meta["text"])
            return
        if meta.get("clear"):
            self.items.clear()
            self._shown.clear()
            return
        display_id = _display_id(meta)
        if meta.get("update") and display_id in self._shown:
            self._shown[display_id].update(data=meta.get("data", {}), metadata=meta.get("metadata") or {})
            return
        message = dict(meta)
        if display_id is not None and not message.get("update"):
            self._shown[display_id] = message
        self.items.append(message)


class _RankSink:
    """Where one node's frames for a cell go: the cell's queue (stdout and displays dropped for a quiet node; its
    stderr and prompts kept). Takes prompts (see :class:`~sky_jupyter.node.Call`)."""

    takes_prompts = True

    def __init__(self, into: queue.SimpleQueue[tuple[int, str, Any]], rank: int, quiet: bool) -> None:
        self.into, self.rank, self.quiet = into, rank, quiet

    def __call__(self, kind: str, meta: Any) -> None:
        if not self.quiet or kind == P.INPUT_REQUEST or (kind == P.STREAM and meta.get("name") == "stderr"):
            self.into.put((self.rank, kind, meta))


class CellOutput:
    """Collects frames from every node of one cell run and writes them into the cell."""

    def __init__(self, ranks: list[int], plain: bool, labels: dict[int, str] | None = None,
                 quiet: set[int] | frozenset[int] = frozenset()) -> None:
        self.ranks = ranks
        self.plain = plain
        self.labels = labels or {}  # rank -> what its lines are prefixed with ("node K" by default)
        self.quiet = quiet  # ranks whose stdout and displays are not shown (stderr is)
        self.prefixed = len(ranks) > 1
        self.queue: queue.SimpleQueue[tuple[int, str, Any]] = queue.SimpleQueue()
        self._line_start: dict[tuple[int, str], bool] = {}
        self._held: dict[int, _Transcript] = {r: _Transcript() for r in ranks}
        self._running = len(ranks)
        self._lock = threading.Lock()

    def wake(self) -> None:
        """Called (on a reader thread) when a node's call ends; the last one wakes a waiting ``pump``."""
        with self._lock:
            self._running -= 1
            last = self._running <= 0
        if last:
            self.queue.put((-1, "", None))

    def sink(self, rank: int) -> _RankSink:
        return _RankSink(self.queue, rank, rank in self.quiet)

    def label(self, rank: int) -> str:
        return self.labels.get(rank, f"node {rank}")

    def pump(self, timeout: float | None = None) -> None:
        """Write what has arrived (waiting up to ``timeout`` for the first frame): the text of one node's stream
        that arrived together in one write, so a burst of frames costs one notebook message."""
        try:
            item = self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()
        except queue.Empty:
            return
        held: tuple[int, str, list[str]] | None = None  # (rank, stream name, texts) not written yet
        while True:
            rank, kind, meta = item
            if kind == P.STREAM and held is not None and held[:2] == (rank, meta["name"]):
                held[2].append(meta["text"])
            else:
                if held is not None:
                    self._handle(held[0], P.STREAM, {"name": held[1], "text": "".join(held[2])})
                    held = None
                if kind == P.STREAM:
                    held = (rank, meta["name"], [meta["text"]])
                else:
                    self._handle(rank, kind, meta)
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
        if held is not None:
            self._handle(held[0], P.STREAM, {"name": held[1], "text": "".join(held[2])})

    def _handle(self, rank: int, kind: str, meta: Any) -> None:
        if rank >= 0 and kind == P.INPUT_REQUEST:
            self._ask(rank, meta)
            return
        if rank < 0 or kind not in (P.STREAM, P.DISPLAY):
            return
        if self.plain or self.prefixed:  # live, several nodes: kept to redraw the others after one node clears
            self._held.setdefault(rank, _Transcript()).add(kind, meta)
        if self.plain:
            return
        if kind == P.STREAM:
            self._write(rank, meta["name"], meta["text"])
        else:
            self._show(rank, meta, live=True)

    def _ask(self, rank: int, prompt: Prompt) -> None:
        """A node's prompt, asked on this (the cell's) thread, labelled when several nodes run; refused on any other
        (a ``%%sky --bg`` cell's, or what ``%sky attach`` collects), where the notebook's ``input`` would hang or
        answer for another cell."""
        if threading.current_thread() is not threading.main_thread():
            prompt.refuse(StdinNotImplementedError(), "output shown in the background (a %%sky --bg cell, or what "
                                                      "%sky attach collects) has no input box")
            return
        sys.stdout.flush()
        sys.stderr.flush()
        prompt.answer(f"[{self.label(rank)}] " if self.prefixed else "")

    def _write(self, rank: int, name: str, text: str) -> None:
        stream = sys.stderr if name == "stderr" else sys.stdout
        if self.prefixed:
            prefix = f"[{self.label(rank)}] "
            pieces = []
            for line in text.splitlines(keepends=True):
                key = (rank, name)
                pieces.append(prefix + line if self._line_start.get(key, True) else line)
                self._line_start[key] = line.endswith(("\n", "\r"))
            text = "".join(pieces)
        stream.write(text)
        stream.flush()

    def _show(self, rank: int, meta: dict[str, Any], live: bool) -> None:
        """A display frame: shown (under a ``[node K]`` line when live and several nodes run), or cleared."""
        try:
            from IPython.display import clear_output, publish_display_data
        except ImportError:  # not in IPython: the bundle's plain text will do
            if "data" in meta:
                self._write(rank, "stdout", str(meta["data"].get("text/plain", "")) + "\n")
            return
        if meta.get("clear"):
            clear_output(wait=bool(meta.get("wait")))
            self._line_start.clear()
            if live and self.prefixed:
                self._redraw()  # the node cleared its own output, not the other nodes'
            return
        if live and self.prefixed and not meta.get("update"):
            if not self._line_start.get((rank, "stdout"), True):
                sys.stdout.write("\n")
            sys.stdout.write(f"[{self.label(rank)}]\n")
            sys.stdout.flush()
            self._line_start[(rank, "stdout")] = True
        kwargs: dict[str, Any] = {}
        if meta.get("transient"):
            kwargs["transient"] = meta["transient"]
        if meta.get("update"):
            kwargs["update"] = True
        publish_display_data(meta.get("data", {}), meta.get("metadata") or {}, **kwargs)

    def _redraw(self) -> None:
        """Show every node's output again as it now stands, in rank order (after a clear)."""
        for rank in sorted(self._held):
            for item in self._held[rank].items:
                if isinstance(item, _Text):
                    for name in ("stdout", "stderr"):
                        if final := item.final(name):
                            self._write(rank, name, final)
                else:
                    self._show(rank, item, live=True)

    def finish(self) -> None:
        """Drain the queue; in plain mode, write every node's final output grouped per node in rank order."""
        self.pump()
        if not self.plain:
            return
        for rank in sorted(self._held):
            transcript = self._held[rank]
            if not transcript.items:
                continue
            if self.prefixed:
                sys.stdout.write(f"[{self.label(rank)}]\n")
                sys.stdout.flush()
            for item in transcript.items:
                if isinstance(item, _Text):
                    self._write_plain(item)
                else:
                    self._show(rank, item, live=False)
            self._held[rank] = _Transcript()

    def _write_plain(self, text: _Text) -> None:
        for name in ("stdout", "stderr"):
            final = text.final(name)
            if final:
                stream = sys.stderr if name == "stderr" else sys.stdout
                stream.write(final)
                stream.flush()
