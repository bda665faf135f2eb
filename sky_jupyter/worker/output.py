"""Where a worker's output goes: what a task prints (its streams, and what reaches file descriptors 1 and 2) to the
client, tagged with the task's id; the worker's own lines to its log."""

from __future__ import annotations

import codecs
import faulthandler
import io
import os
import select
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Literal

from .. import protocol as P

if TYPE_CHECKING:
    from .server import Worker

_log_stream: Any = None  # where log() writes once OutputCapture has taken over file descriptor 2


def log(msg: str) -> None:
    stream = _log_stream or sys.__stderr__
    if stream is not None:
        stream.write(f"[sky worker {os.getpid()} {time.strftime('%H:%M:%S')}] {msg}\n")
        stream.flush()


class TaskStream(io.TextIOBase):
    """Replaces sys.stdout/sys.stderr: text goes to the client tagged with the id of the task that wrote it (the
    main thread's, or that of the task slot thread writing: ``Worker.task_here``), each task's text apart.

    Complete lines (and carriage-return updates, as progress bars write) are sent at once; a partial line waits
    for ``flush()``, the end of the task, or the worker's 0.1 s tick.
    """

    def __init__(self, worker: Worker, name: Literal["stdout", "stderr"]) -> None:
        super().__init__()
        self._worker = worker
        self._name = name
        self._parts: dict[int, list[str]] = {}  # task id -> text not sent yet
        self._size: dict[int, int] = {}
        self._lock = threading.RLock()
        self.fd: int | None = None  # set while OutputCapture forwards this descriptor to the running task

    # typeshed declares TextIOBase.encoding a plain attribute; in CPython it is a read-only property, so a subclass
    # can only override it with another.
    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        if self.fd is None:
            raise io.UnsupportedOperation("fileno")
        return self.fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        capture = self._worker.capture
        if capture is not None:
            capture.sync()  # what subprocesses wrote to the descriptor before this text comes first
        return self.append(text)

    def append(self, text: str, task: int | None = None) -> int:
        if not text:
            return 0
        task = self._worker.task_here() if task is None else task
        with self._lock:
            self._parts.setdefault(task, []).append(text)
            self._size[task] = self._size.get(task, 0) + len(text)
            if "\n" in text or "\r" in text or self._size[task] > 8192:
                self.flush_task(task)
        return len(text)

    def flush(self) -> None:
        """Send what every task has written so far."""
        with self._lock:
            for task in list(self._parts):
                self.flush_task(task)

    def flush_task(self, task: int) -> None:
        with self._lock:
            parts = self._parts.pop(task, None)
            self._size.pop(task, None)
            if not parts:
                return
            meta: P.StreamMeta = {"name": self._name, "text": "".join(parts)}
            self._worker.outbox.send(P.STREAM, task, meta)


class OutputCapture:
    """What is written to file descriptors 1 and 2 (subprocesses, ``os.system``, C extensions) goes to the
    running task's streams, as in a Jupyter kernel; written while no task runs, it goes to the worker's log.

    Without this, such output would land in a detached worker's log, or fill the pipe that a Local worker's
    parent stops reading after start-up, blocking the writer. ``sync()`` forwards what is already written, so
    it arrives before the task's result or next display frame.
    """

    def __init__(self, worker: Worker) -> None:
        global _log_stream
        self.worker = worker
        self.saved = {fd: os.dup(fd) for fd in (1, 2)}
        _log_stream = open(self.saved[2], "w", buffering=1, closefd=False)  # noqa: SIM115 - lives with the worker
        faulthandler.enable(_log_stream, all_threads=True)  # a crash's traceback cannot wait for the forwarder
        self.lock = threading.RLock()  # re-entered when a write happens inside a drain (a __del__ that prints)
        self.pipes: dict[int, tuple[TaskStream, Any]] = {}
        for fd, stream in ((1, worker.stdout), (2, worker.stderr)):
            read_fd, write_fd = os.pipe()
            os.dup2(write_fd, fd)
            os.close(write_fd)
            os.set_blocking(read_fd, False)
            self.pipes[read_fd] = (stream, codecs.getincrementaldecoder("utf-8")("replace"))
            stream.fd = fd
        self.read_fds = list(self.pipes)
        self.busy = False
        threading.Thread(target=self._forward_loop, daemon=True, name="sky-fd-capture").start()

    def _forward_loop(self) -> None:
        while True:
            ready, _, _ = select.select(self.read_fds, [], [])
            with self.lock:
                self.busy = True  # data leaves the pipes only while set, so sync() knows to wait for it
                try:
                    for read_fd in ready:
                        self._drain(read_fd)
                finally:
                    self.busy = False

    def _drain(self, read_fd: int) -> None:
        stream, decoder = self.pipes[read_fd]
        while True:
            try:
                data = os.read(read_fd, 65536)
            except BlockingIOError:
                return
            if not data:
                return
            task = self.worker.fd_task()
            if task:
                stream.append(decoder.decode(data), task)
            else:
                os.write(self.saved[2], data)

    def sync(self) -> None:
        if not select.select(self.read_fds, [], [], 0)[0] and not self.busy:
            return  # nothing pending (a cheap check: it runs before every write to the task's streams)
        with self.lock:
            for read_fd in self.read_fds:
                self._drain(read_fd)

    def restore(self) -> None:
        """Give descriptors 1 and 2 back (before exec: the next process has no reader for our pipes)."""
        for fd, saved in self.saved.items():
            os.dup2(saved, fd)
