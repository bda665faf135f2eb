"""A task's terminal, on its worker: what it prints (its streams, and what reaches file descriptors 1 and 2) goes to
the client tagged with the task's id, coalesced into few frames; what it reads (``input()``, ``getpass.getpass()``,
``sys.stdin``) the client is asked for. The worker's own lines go to its log."""

from __future__ import annotations

import codecs
import faulthandler
import io
import itertools
import os
import select
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, Protocol

from .. import protocol as P

if TYPE_CHECKING:
    from .server import Worker

StreamName = Literal["stdout", "stderr"]

_log_stream: Any = None  # where log() writes once OutputCapture has taken over file descriptor 2


def log(msg: str) -> None:
    stream = _log_stream or sys.__stderr__
    if stream is not None:
        stream.write(f"[sky worker {os.getpid()} {time.strftime('%H:%M:%S')}] {msg}\n")
        stream.flush()


#: Text waits this long (seconds) after its first character, or until this many characters wait, before it goes to
#: the client: a loop printing 20,000 lines makes a few frames (and notebook messages), not 20,000.
COALESCE_SECONDS = 0.05
COALESCE_CHARS = 64 * 1024


class TaskOutput:
    """What the tasks have written and the client has not been sent yet, per task, in the order it was written
    across stdout and stderr (a frame per run of one stream).

    A complete line (or a carriage-return update) written after a quiet spell of :data:`COALESCE_SECONDS` goes at
    once; text written in a burst waits until that long after its first character (a thread of its own sends it),
    or until :data:`COALESCE_CHARS` wait, or until the worker sends everything before a result, a display, a
    yielded item or an input prompt (:meth:`send`). So a progress bar still updates live, a lone ``print`` shows at
    once, and a loop that prints thousands of lines costs a few frames.
    """

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._lock = threading.RLock()
        self._due = threading.Condition(self._lock)
        self._runs: dict[int, list[tuple[StreamName, list[str]]]] = {}  # task id -> [(stream name, texts)], in order
        self._size: dict[int, int] = {}
        self._since: float | None = None  # when the oldest text waiting here was written
        self._sent_at = 0.0
        self._sender: threading.Thread | None = None
        self._forked = False
        os.register_at_fork(after_in_child=self._after_fork)

    def _after_fork(self) -> None:
        """In a process forked from the worker (a fork Pool): its own locks, none of the parent's waiting text (the
        parent sends that), and no sending thread, so what it writes goes at once."""
        self._lock = threading.RLock()
        self._due = threading.Condition(self._lock)
        self._runs, self._size, self._since, self._sender, self._forked = {}, {}, None, None, True

    def append(self, name: StreamName, text: str, task: int) -> None:
        with self._lock:
            runs = self._runs.setdefault(task, [])
            if runs and runs[-1][0] == name:
                runs[-1][1].append(text)
            else:
                runs.append((name, [text]))
            size = self._size[task] = self._size.get(task, 0) + len(text)
            now = time.monotonic()
            if (size >= COALESCE_CHARS or self._forked
                    or (now - self._sent_at >= COALESCE_SECONDS and ("\n" in text or "\r" in text))):
                self.send(task)
            elif self._since is None:
                self._since = now
                if self._sender is None:
                    self._sender = threading.Thread(target=self._send_loop, daemon=True, name="sky-output")
                    self._sender.start()
                else:
                    self._due.notify()

    def flush(self) -> None:
        """A task's own ``flush()``: what waits goes now, unless text went less than :data:`COALESCE_SECONDS` ago
        (then it goes within that time anyway), so code that flushes after every line still makes few frames."""
        with self._lock:
            if self._runs and (self._forked or time.monotonic() - self._sent_at >= COALESCE_SECONDS):
                self.send()

    def send(self, task: int | None = None) -> None:
        """Send what ``task`` (None: every task) has written so far."""
        with self._lock:
            for one in list(self._runs) if task is None else [task]:
                runs = self._runs.pop(one, None)
                self._size.pop(one, None)
                for name, texts in runs or ():
                    meta: P.StreamMeta = {"name": name, "text": "".join(texts)}
                    self._worker.outbox.send(P.STREAM, one, meta)
                if runs:
                    self._sent_at = time.monotonic()
            if not self._runs:
                self._since = None

    def _send_loop(self) -> None:
        with self._lock:
            while True:
                if self._since is None:
                    self._due.wait()
                    continue
                left = self._since + COALESCE_SECONDS - time.monotonic()
                if left > 0:
                    self._due.wait(left)
                    continue
                self.send()


class TaskStream(io.TextIOBase):
    """Replaces sys.stdout/sys.stderr: text goes to the client tagged with the id of the task that wrote it (the
    main thread's, or that of the task slot thread writing: ``Worker.task_here``), each task's text apart, through
    the worker's :class:`TaskOutput`."""

    def __init__(self, worker: Worker, name: StreamName) -> None:
        super().__init__()
        self._worker = worker
        self._name: StreamName = name
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
        self._worker.output.append(self._name, text, self._worker.task_here() if task is None else task)
        return len(text)

    def flush(self) -> None:
        self._worker.output.flush()


class StdinNotImplementedError(NotImplementedError):
    """IPython's error of that name, for nodes without IPython: the front end has no input box."""


def refusal(error: str, message: str) -> BaseException:
    """What ``input()`` raises on the node when the client has no line for it (:class:`~sky_jupyter.protocol.
    InputReplyMeta` ``error``): EOFError, KeyboardInterrupt (the user stopped the cell), or StdinNotImplementedError
    (the front end has no input box; IPython's own class where the node has IPython, so ``except`` clauses match)."""
    if error == "KeyboardInterrupt":
        return KeyboardInterrupt(message)
    if error == "StdinNotImplementedError":
        try:
            from IPython.core.error import StdinNotImplementedError as IPythonError
        except ImportError:
            return StdinNotImplementedError(message)
        return IPythonError(message)
    return EOFError(message)


class _Ask:
    """One input request waiting for the client's reply."""

    __slots__ = ("event", "reply", "task")

    def __init__(self, task: int) -> None:
        self.task = task
        self.event = threading.Event()
        self.reply: dict[str, Any] = {}


class TaskInput:
    """``input()``, ``getpass.getpass()`` and ``sys.stdin`` of the worker's tasks: each read sends the client an
    :data:`~sky_jupyter.protocol.INPUT_REQUEST` for the task (after what the task printed before it) and waits for
    the reply, which the client gets from its user (the notebook's input box). A password travels only in that
    reply and is kept nowhere once returned. An interrupt stops the wait like any other (the task's thread gets
    KeyboardInterrupt; :meth:`cancel` for a forked task's asks)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._asks: dict[int, _Ask] = {}
        self._ids = itertools.count(1)

    def ask(self, prompt: str, password: bool = False, task: int | None = None) -> str:
        """The line the client's user typed (without its newline), for ``task`` (None: the calling thread's)."""
        worker = self._worker
        task = worker.task_here() if task is None else task
        if not task:
            raise EOFError("input() was called outside a task, where no notebook or caller waits to answer it")
        ident, ask = next(self._ids), _Ask(task)
        with self._lock:
            self._asks[ident] = ask
        try:
            worker.flush_task_output(task)  # what it printed before the prompt shows first
            worker.read_while_waiting()
            request: P.InputRequestMeta = {"ask": ident, "prompt": prompt, "password": password}
            worker.outbox.send(P.INPUT_REQUEST, task, request)
            while not ask.event.wait(0.1):  # in slices: an interrupt of a task slot thread lands between them
                pass
        finally:
            with self._lock:
                self._asks.pop(ident, None)
        reply, ask.reply = ask.reply, {}
        if isinstance(reply.get("value"), str):
            return reply["value"]
        raise refusal(str(reply.get("error", "EOFError")), str(reply.get("message", "no input")))

    def answer(self, meta: Any) -> None:
        """The client's :data:`~sky_jupyter.protocol.INPUT_REPLY` (on the thread reading its connection)."""
        if not isinstance(meta, dict):
            return
        with self._lock:
            ask = self._asks.get(meta.get("ask"))  # type: ignore[arg-type]
        if ask is not None and not ask.event.is_set():  # none: a late answer to an ask already given up
            ask.reply = meta
            ask.event.set()

    def cancel(self, task: int) -> None:
        """Give up ``task``'s waiting asks (it ended, or its forked process was interrupted)."""
        with self._lock:
            asks = [a for a in self._asks.values() if a.task == task and not a.event.is_set()]
        for ask in asks:
            ask.reply = {"error": "KeyboardInterrupt", "message": "the task ended while waiting for input"}
            ask.event.set()

    def input(self, prompt: object = "") -> str:
        """``builtins.input`` on the worker."""
        return self.ask(str(prompt))

    def getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        """``getpass.getpass`` on the worker: the client asks without echoing."""
        return self.ask(str(prompt), password=True)


class Asker(Protocol):
    def ask(self, prompt: str, password: bool = False, task: int | None = None) -> str: ...


class TaskStdin(io.TextIOBase):
    """Replaces sys.stdin: each line read is asked of the client (:class:`TaskInput`); an end of input (the user
    sent EOF, or nobody can answer) reads as an empty string."""

    def __init__(self, asker: Asker) -> None:
        super().__init__()
        self._asker = asker
        self._rest = ""  # what a short read left of the last line

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def readable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def readline(self, size: int | None = -1, /) -> str:  # type: ignore[override]  # typeshed: _IOBase's bytes
        if not self._rest:
            try:
                self._rest = self._asker.ask("") + "\n"
            except EOFError:
                return ""
        n = len(self._rest) if size is None or size < 0 else size
        line, self._rest = self._rest[:n], self._rest[n:]
        return line

    def read(self, size: int | None = -1, /) -> str:
        """One line: a node's stdin is a person typing into the notebook, one line at a time."""
        return self.readline(size)


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
