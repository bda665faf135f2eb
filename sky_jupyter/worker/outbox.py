"""Frames for the client, held while none is connected and results until the client acknowledges them."""

from __future__ import annotations

import collections
import threading
from typing import Any

from .. import protocol as P
from .output import log

_MAX_PENDING = 20000
Outgoing = tuple[P.WorkerKind, int, Any, list]  # (kind, task id, meta, payload) of a frame for the client


class Outbox:
    """Frames for the client. Held while no client is connected; delivered to the newest connection.

    A result (or error) is kept even after it was sent, until the client acknowledges it: one written into a
    connection that was dropping would otherwise be lost, and the client could not tell a task that never arrived
    (safe to send again) from one whose answer went missing (which must not run twice).
    """

    def __init__(self, limits: tuple[int, int] = (P.MAX_FRAME, P.MAX_BUFFERS)) -> None:
        self.limits = limits  # (bytes, buffers) of a frame: a result over them goes back as an error instead
        self._conn: P.FrameIO | None = None
        self._pending: collections.deque[Outgoing] = collections.deque()
        self._unacked: dict[int, Outgoing] = {}  # sent results, by task id, until acknowledged
        self._lock = threading.Lock()

    def attach(self, conn: P.FrameIO) -> None:
        with self._lock:
            self._conn = conn
            for frame in list(self._unacked.values()):  # sent before, maybe lost on the way: again
                if not self._try_send(*frame):
                    return
            while self._pending and self._conn is not None:
                frame = self._pending[0]
                if not self._try_send(*frame):
                    break
                self._pending.popleft()
                if frame[0] in (P.RESULT, P.ERROR):
                    self._unacked[frame[1]] = frame

    def ack(self, task_ids: Any) -> None:
        if not isinstance(task_ids, list):
            return
        with self._lock:
            for task_id in task_ids:
                if type(task_id) is int:
                    self._unacked.pop(task_id, None)

    def held_tasks(self) -> tuple[set[int], set[int]]:
        """Tasks whose result or error waits here: (never sent, because no client was connected; sent, and not
        yet acknowledged)."""
        with self._lock:
            return {frame[1] for frame in self._pending if frame[0] in (P.RESULT, P.ERROR)}, set(self._unacked)

    def detach(self, conn: P.FrameIO) -> None:
        with self._lock:
            if self._conn is conn:
                self._conn = None

    def send(self, kind: P.WorkerKind, task_id: int, meta: Any = None, payload: list | tuple = ()) -> None:
        if payload and kind in (P.RESULT, P.ERROR):
            try:
                P.check_frame(0, [memoryview(p).nbytes for p in payload], *self.limits)
            except P.FrameError as exc:  # the caller learns why, instead of waiting for an answer never sent
                what = "result" if kind == P.RESULT else "exception"
                kind, payload = P.ERROR, ()
                too_large: P.ErrorMeta = {
                    "type": "sky_jupyter.protocol.FrameError", "traceback": "",
                    "message": f"the task's {what} is too large to send back ({exc}); return less per call, or "
                               f"write it to a file on the node and fetch that in parts."}
                meta = too_large
        with self._lock:
            if self._conn is not None and self._try_send(kind, task_id, meta, payload):
                if kind in (P.RESULT, P.ERROR):
                    self._unacked[task_id] = (kind, task_id, meta, list(payload))
            else:
                if len(self._pending) >= _MAX_PENDING:  # a client gone for long: keep results, drop old output
                    for i, frame in enumerate(self._pending):
                        if frame[0] == P.STREAM:
                            del self._pending[i]
                            break
                self._pending.append((kind, task_id, meta, list(payload)))

    def _try_send(self, kind: P.WorkerKind, task_id: int, meta: Any, payload: Any) -> bool:
        assert self._conn is not None
        try:
            self._conn.send(kind, task_id, meta, payload)
            return True
        except P.FrameError as exc:  # output or a display bundle over the frame limit: it cannot go, ever
            log(f"a {kind} frame of task {task_id} was dropped: {exc}")
            return True
        except OSError:
            self._conn = None
            return False
