"""The worker: one long-lived Python process per node, needing only the standard library and cloudpickle.

Started as ``python -m sky_jupyter.worker``; it reads its configuration (pool secret included, so the secret is
never on a command line) as one JSON line on stdin, listens on a localhost port, prints
``SKY-READY {"port": ..., "pid": ...}`` and, when asked to detach, moves its output to a log file so it survives
the SSH session that started it.

Tasks and cells run one at a time in the main thread, so an interrupt frame can raise KeyboardInterrupt in them
with a signal. Between tasks the main thread reads the client's connection itself, so a task starts with no
thread switch (each one costs tens of microseconds, several times what running a trivial cell costs). Once a task
has run for a tick (0.1 s), the connection's own thread reads instead: it answers heartbeats, delivers interrupts
and queues further tasks. A newer authenticated connection replaces the older one. Frames for the client go
through an outbox that holds them while no client is connected, so a result produced during a reconnect is
delivered afterwards instead of lost.

A connection is served only after the mutual handshake of :mod:`sky_jupyter.protocol`. Until then it is one of
a few (``max_unauthenticated``) with a few seconds each (``handshake_timeout``), reading small JSON frames whose
every field is checked; whatever goes wrong costs that connection and one log line. Frames over ``max_frame``
bytes or ``max_buffers`` buffers are refused from their header, before anything is allocated.
"""

from __future__ import annotations

import argparse
import builtins
import codecs
import collections
import faulthandler
import io
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import traceback
from contextlib import ExitStack
from typing import Any

from .. import protocol as P
from ..info import InstanceInfo, _set_current

_MAX_PENDING = 20000


_log_stream: Any = None  # where log() writes once OutputCapture has taken over file descriptor 2


def log(msg: str) -> None:
    stream = _log_stream or sys.__stderr__
    if stream is not None:
        stream.write(f"[sky worker {os.getpid()} {time.strftime('%H:%M:%S')}] {msg}\n")
        stream.flush()




def _free_port() -> int:
    """A TCP port free on this node now: what rank 0 offers torch.distributed (``MASTER_PORT``), told at connect
    so that starting a pool costs no extra round trip to ask."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]

class Outbox:
    """Frames for the client. Held while no client is connected; delivered to the newest connection.

    A result (or error) is kept even after it was sent, until the client acknowledges it: one written into a
    connection that was dropping would otherwise be lost, and the client could not tell a task that never arrived
    (safe to send again) from one whose answer went missing (which must not run twice).
    """

    def __init__(self, limits: tuple[int, int] = (P.MAX_FRAME, P.MAX_BUFFERS)) -> None:
        self.limits = limits  # (bytes, buffers) of a frame: a result over them goes back as an error instead
        self._conn: P.FrameIO | None = None
        self._pending: collections.deque[tuple[str, int, Any, list]] = collections.deque()
        self._unacked: dict[int, tuple[str, int, Any, list]] = {}  # sent results, by task id, until acknowledged
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

    def send(self, kind: str, task_id: int, meta: Any = None, payload: list | tuple = ()) -> None:
        if payload and kind in (P.RESULT, P.ERROR):
            try:
                P.check_frame(0, [memoryview(p).nbytes for p in payload], *self.limits)
            except P.FrameError as exc:  # the caller learns why, instead of waiting for an answer never sent
                what = "result" if kind == P.RESULT else "exception"
                kind, payload = P.ERROR, ()
                meta = {"type": "sky_jupyter.protocol.FrameError", "traceback": "",
                        "message": f"the task's {what} is too large to send back ({exc}); return less per call, "
                                   f"or write it to a file on the node and fetch that in parts."}
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

    def _try_send(self, kind: str, task_id: int, meta: Any, payload: Any) -> bool:
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


class TaskStream(io.TextIOBase):
    """Replaces sys.stdout/sys.stderr: text goes to the client tagged with the running task's id.

    Complete lines (and carriage-return updates, as progress bars write) are sent at once; a partial line waits
    for ``flush()``, the end of the task, or the worker's 0.1 s tick.
    """

    def __init__(self, worker: Worker, name: str) -> None:
        super().__init__()
        self._worker = worker
        self._name = name
        self._parts: list[str] = []
        self._size = 0
        self._lock = threading.RLock()
        self.fd: int | None = None  # set while OutputCapture forwards this descriptor to the running task

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

    def append(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            if "\n" in text or "\r" in text or self._size > 8192:
                self.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if not self._parts:
                return
            text = "".join(self._parts)
            self._parts.clear()
            self._size = 0
            self._worker.outbox.send(P.STREAM, self._worker.current_task, {"name": self._name, "text": text})


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
            if self.worker.current_task:
                stream.append(decoder.decode(data))
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


class _Deadline:
    """``readinto`` on a socket that fails once ``seconds`` have passed, however slowly the peer sends."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._end = time.monotonic() + seconds

    def readinto(self, buffer: memoryview, /) -> int:
        left = self._end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the handshake took too long")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


def _user_traceback(exc: BaseException) -> str:
    """The exception's traceback without the worker's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def error_frames(exc: BaseException) -> tuple[dict[str, Any], list]:
    """Meta (type name, message, traceback) and, when it round-trips, the pickled exception itself."""
    meta = {
        "type": f"{type(exc).__module__}.{type(exc).__qualname__}".removeprefix("builtins."),
        "message": str(exc),
        "traceback": _user_traceback(exc),
    }
    try:
        payload = P.dumps(exc)
        P.loads(payload)  # an exception that pickles but cannot be rebuilt travels as RemoteError instead
    except Exception:  # noqa: BLE001 - (un)pickling user objects can raise anything
        payload = []
    return meta, payload


class Worker:
    def __init__(self, config: dict[str, Any], listener: socket.socket, generation: int = 0) -> None:
        self.config = config
        self.secret: str = config["secret"]
        self.listener = listener
        self.generation = generation
        self.max_frame = int(config.get("max_frame", P.MAX_FRAME))
        self.max_buffers = int(config.get("max_buffers", P.MAX_BUFFERS))
        self.handshake_timeout = float(config.get("handshake_timeout", P.HANDSHAKE_TIMEOUT))
        # Connections not yet authenticated: few, small and short-lived; more at once are closed on arrival.
        self.max_unauthenticated = int(config.get("max_unauthenticated", P.MAX_UNAUTHENTICATED))
        self._unauthenticated = threading.BoundedSemaphore(self.max_unauthenticated)
        self._turned_away = 0  # connections closed on arrival since the last log line about them
        self._turned_away_logged = 0.0
        self.outbox = Outbox((self.max_frame, self.max_buffers))
        # SimpleQueue hands a job to the main thread faster than Queue; ``queued`` says what waits in it.
        self.jobs: queue.SimpleQueue[tuple[str, int, Any, list]] = queue.SimpleQueue()
        self.queued: set[int] = set()
        self._seen: set[int] = set()  # ids of the tasks received lately (a bounded window), to drop duplicates
        self._seen_order: collections.deque[int] = collections.deque(maxlen=100_000)
        self._seen_lock = threading.Lock()
        self.current_task = 0
        self.last_seen = time.monotonic()
        self.grace = float(config.get("grace", 600.0))
        self.interrupt_grace = float(config.get("interrupt_grace", 10.0))
        self._interrupt: tuple[int, float] | None = None
        self.main_ident = threading.get_ident()
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.decorators: list[Any] = []
        self.app_stack = ExitStack()
        self.setup_done = False
        self.stdout = TaskStream(self, "stdout")
        self.stderr = TaskStream(self, "stderr")
        self.capture: OutputCapture | None = None
        self._cells: Any = None
        self._shutdown_lock = threading.Lock()
        # The client's connection (the newest authenticated one), and whether a thread is reading it now: the main
        # thread while it has nothing to run, the connection's own thread while a task runs (under ``_reading``).
        # ``_help_wanted``: set by the tick while a task runs, cleared when it ends.
        self._reading = threading.Condition()
        self.conn: P.FrameIO | None = None
        self._read_taken = False
        self._help_wanted = False

    # -- connections -------------------------------------------------------------------------------------
    def accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError as exc:
                log(f"accept failed: {exc}")
                time.sleep(0.1)
                continue
            if not self._unauthenticated.acquire(blocking=False):
                sock.close()
                self._turned_away += 1
                if time.monotonic() - self._turned_away_logged > 10:  # a flood gets a line now and then, not each
                    log(f"{self._turned_away} connection(s) closed on arrival: {self.max_unauthenticated} others "
                        f"are still authenticating")
                    self._turned_away, self._turned_away_logged = 0, time.monotonic()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self.serve_connection, args=(sock,), daemon=True).start()

    def first_time(self, task_id: int) -> bool:
        """Whether this task is new here. A client sends a task again when the worker did not know it after a
        reconnect; should the first copy still arrive late (from a connection that was dying), it is dropped."""
        with self._seen_lock:
            if task_id in self._seen:
                log(f"task {task_id} arrived twice; the second copy is ignored")
                return False
            if len(self._seen_order) == self._seen_order.maxlen:
                self._seen.discard(self._seen_order[0])
            self._seen_order.append(task_id)
            self._seen.add(task_id)
            return True

    def known_tasks(self) -> tuple[list[int], list[int]]:
        """Tasks this worker will still answer: all of them (queued, running, or with a result not yet
        acknowledged), so a reconnecting client learns which of its calls never arrived; and those no client can
        have seen the end of (queued, running, or finished while none was connected), for one that attaches."""
        running = {self.current_task} - {0}
        unsent, unacked = self.outbox.held_tasks()
        undelivered = set(self.queued) | running | unsent
        return sorted(undelivered | unacked), sorted(undelivered)

    def handshake(self, sock: socket.socket) -> bool:
        """Mutual authentication (see :mod:`sky_jupyter.protocol`): the client proves it knows the pool secret, then
        this worker does, and only then says who it is. Whether the connection may carry frames."""
        wire = P.FrameIO(_Deadline(sock, self.handshake_timeout), sock.sendall)
        worker_nonce = P.new_nonce()
        wire.send_json({"sky": P.PROTOCOL_VERSION, "nonce": worker_nonce})
        answer = wire.recv_json(P.HELLO_LIMIT)
        P.check_fields(answer, {k: P.ANSWER_FIELDS[k] for k in ("nonce", "mac")}, "the client's answer")
        if not P.check_proof(self.secret, P.CLIENT, worker_nonce, answer["nonce"], answer["mac"]):
            wire.send_json({"ok": False, "error": "authentication failed: wrong pool secret"})
            log("refused a connection: the client did not prove it knows the pool secret")
            return False
        P.check_fields(answer, P.ANSWER_FIELDS, "the client's answer")
        mine = P.versions()
        ok = all(answer[k] == v for k, v in mine.items())
        tasks, undelivered = self.known_tasks()
        reply = {"ok": ok, "mac": P.proof(self.secret, P.WORKER, worker_nonce, answer["nonce"]), **mine,
                 "max_frame": self.max_frame, "max_buffers": self.max_buffers, "pid": os.getpid(),
                 "generation": self.generation, "setup": self.setup_done, "rank": int(self.config.get("rank", 0)),
                 "tasks": tasks, "undelivered": undelivered, "free_port": _free_port()}
        if not ok:
            reply["error"] = (f"version mismatch: worker has {mine}, client has "
                              f"{ {k: answer[k] for k in mine} }")
            log(f"refused a client: {reply['error']}")
        wire.send_json(reply)
        sock.settimeout(None)
        return ok

    def serve_connection(self, sock: socket.socket) -> None:
        def close() -> None:  # shut down first: that wakes a thread blocked reading it, which close() does not
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

        conn = P.FrameIO(sock.makefile("rb", buffering=256 * 1024), sock.sendall, close)
        conn.max_frame, conn.max_buffers = self.max_frame, self.max_buffers
        try:
            authenticated = self.handshake(sock)
        except Exception as exc:  # noqa: BLE001 - whatever an unauthenticated peer caused: one line, and it is gone
            log(f"refused a connection: {type(exc).__name__}: {exc}")
            authenticated = False
        finally:
            self._unauthenticated.release()
        if not authenticated:
            conn.close()
            return
        self.last_seen = time.monotonic()
        log("a client connected")
        with self._reading:  # the newest client is the one: an older connection is dropped
            old, self.conn = self.conn, conn
            self._reading.notify_all()
        if old is not None:
            old.close()
        self.outbox.attach(conn)
        try:
            self._read_while_busy(conn)
        finally:
            self.outbox.detach(conn)
            conn.close()
            log("the client's connection ended")

    def _read_while_busy(self, conn: P.FrameIO) -> None:
        """While a task runs (or its connection is not the main thread's to read), this connection's thread reads
        it: heartbeats are answered, interrupts delivered, tasks queued. The tick asks for it once a task has run
        a while, so short tasks cost no thread switch."""
        while True:
            with self._reading:
                while self.conn is conn and not (self._help_wanted and not self._read_taken):
                    self._reading.wait()
                if self.conn is not conn:
                    return
                self._read_taken = True
            job = self._read_one(conn)
            if job is not None:
                self.queued.add(job[1])
                self.jobs.put(job)
            with self._reading:  # a job is queued before the main thread may read on: tasks keep their order
                self._read_taken = False
                self._reading.notify_all()

    def _read_one(self, conn: P.FrameIO) -> tuple[str, int, Any, list] | None:
        """Read one frame and act on it; returns it when it is work for the main thread."""
        try:
            kind, task_id, meta, frames = conn.recv()
        except BaseException as exc:  # the connection ended, or a frame broke the protocol: either way it is done
            if isinstance(exc, Exception) and not isinstance(exc, (EOFError, OSError)):  # over the limits, or no frame
                log(f"dropped the client's connection: {type(exc).__name__}: {exc}")
            with self._reading:
                if self.conn is conn:
                    self.conn = None
                self._reading.notify_all()
            conn.close()
            if not isinstance(exc, Exception):
                raise
            return None
        self.last_seen = time.monotonic()
        match kind:
            case P.PING:
                conn.send(P.PONG, task_id, {"busy": self.current_task, "pid": os.getpid()})
            case P.ACK:
                self.outbox.ack(meta)
            case P.INTERRUPT:
                self.interrupt(task_id)
            case P.SHUTDOWN:
                self.shutdown("the client asked")
            case P.TASK | P.CELL | P.SETUP | P.PULL:
                if self.first_time(task_id):
                    return kind, task_id, meta, frames
            case _:
                log(f"unknown frame kind {kind!r} ignored")
        return None

    def next_job(self) -> tuple[str, int, Any, list] | None:
        """The main thread's next job: one queued while the last task ran, else one it reads from the client's
        connection itself (no thread switch between the frame arriving and the task starting)."""
        with self._reading:
            while True:
                try:
                    return self.jobs.get_nowait()
                except queue.Empty:
                    pass
                conn = self.conn
                if conn is not None and not self._read_taken:
                    self._read_taken = True
                    break
                self._reading.wait()
        try:
            return self._read_one(conn)
        finally:
            with self._reading:
                self._read_taken = False
                if self._help_wanted:  # only then may a connection thread be waiting for its turn
                    self._reading.notify_all()

    # -- interrupts, heartbeats, dead-man switch ------------------------------------------------------------
    def interrupt(self, task_id: int) -> None:
        running = self.current_task
        if running and task_id in (0, running):
            self._interrupt = (running, time.monotonic() + self.interrupt_grace)
            signal.pthread_kill(self.main_ident, signal.SIGINT)

    def tick_loop(self) -> None:
        """Flush partial output, enforce the interrupt deadline and the dead-man switch."""
        while True:
            time.sleep(0.1)
            self.stdout.flush()
            self.stderr.flush()
            with self._reading:  # a task running since before this tick: its connection thread reads meanwhile
                if self.current_task and not self._help_wanted:
                    self._help_wanted = True
                    self._reading.notify_all()
            pending = self._interrupt
            if pending and pending[0] == self.current_task and time.monotonic() > pending[1]:
                self.restart(pending[0])
            if time.monotonic() - self.last_seen > self.grace:
                self.shutdown(f"no word from the client for {self.grace:.0f} s (dead-man switch)")

    def restart(self, task_id: int) -> None:
        """The running code ignored KeyboardInterrupt: replace this process, keeping the port."""
        text = (f"the code did not stop within {self.interrupt_grace:.0f} s of the interrupt; the worker "
                f"was restarted and its namespace is lost")
        self.outbox.send(P.ERROR, task_id, {"type": "KeyboardInterrupt", "message": text, "traceback": "",
                                            "restarted": True}, [])
        log(text)
        read_fd, write_fd = os.pipe()
        os.write(write_fd, json.dumps(self.config).encode() + b"\n")
        os.close(write_fd)
        fd = self.listener.fileno()
        os.set_inheritable(fd, True)
        os.set_inheritable(read_fd, True)
        argv = [sys.executable, "-m", "sky_jupyter.worker", "--listen-fd", str(fd), "--config-fd", str(read_fd),
                "--generation", str(self.generation + 1)]
        if self.capture is not None:
            self.capture.restore()
        os.execv(sys.executable, argv)

    def shutdown(self, reason: str) -> None:
        self._shutdown_lock.acquire()  # a second trigger waits here for the first to finish and exit
        log(f"shutting down: {reason}")
        try:
            self.app_stack.close()
        except BaseException as exc:  # noqa: BLE001 - leaving anyway; say why
            log(f"plugin exit failed: {exc!r}")
        for path in self.config.get("cleanup", []):
            _remove(path)
        if self.config.get("on_orphan") == "poweroff" and "dead-man" in reason:
            os.system(self.config.get("poweroff_command") or "sudo -n shutdown -h now || shutdown -h now")
        os._exit(0)

    # -- running work ------------------------------------------------------------------------------------
    def serve(self) -> None:
        threading.Thread(target=self.accept_loop, daemon=True, name="sky-accept").start()
        threading.Thread(target=self.tick_loop, daemon=True, name="sky-tick").start()
        sys.stdout.flush()
        sys.stderr.flush()
        self.capture = OutputCapture(self)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        signal.signal(signal.SIGINT, self._on_sigint)
        while True:
            try:
                job = self.next_job()
                if job is not None:
                    self.run_job(*job)
            except KeyboardInterrupt:  # an interrupt that arrived just after its task ended
                continue

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """KeyboardInterrupt in the running task; none between tasks (when the main thread may be reading a
        frame), nor in a task other than the one an interrupt frame named (a signal delivered late)."""
        task, pending = self.current_task, self._interrupt
        if task and (pending is None or pending[0] == task):
            raise KeyboardInterrupt

    def run_job(self, kind: str, task_id: int, meta: Any, frames: list) -> None:
        self.current_task = task_id
        self.queued.discard(task_id)
        try:
            match kind:
                case P.TASK:
                    value = self.run_task(frames)
                case P.CELL:
                    value = self.cells.run(meta, frames)
                case P.SETUP:
                    value = self.setup(meta, frames)
                case P.PULL:
                    value = {name: self.namespace[name] for name in meta["names"]}
                case _:
                    raise ValueError(f"unknown job {kind!r}")
            self.flush_output()
            try:
                payload = P.dumps_reply(value)
            except Exception as exc:
                raise TypeError(f"the result ({type(value).__name__}) cannot be pickled: {exc}") from exc
            self.outbox.send(P.RESULT, task_id, None, payload)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            self.flush_output()
            meta_err, payload = error_frames(exc)
            self.outbox.send(P.ERROR, task_id, meta_err, payload)
        finally:
            self.current_task = 0  # the interrupt record stays: a late signal for this task must not hit the next
            with self._reading:
                self._help_wanted = False

    def flush_output(self) -> None:
        """Send everything the running task has written so far (descriptor-level output included)."""
        if self.capture is not None:
            self.capture.sync()
        self.stdout.flush()
        self.stderr.flush()

    def send_display(self, meta: dict[str, Any]) -> None:
        """A display frame (a Jupyter MIME bundle) for the running task, after the output written before it."""
        self.flush_output()
        self.outbox.send(P.DISPLAY, self.current_task, meta)

    def run_task(self, frames: list) -> Any:
        fn, args, kwargs = P.loads(frames)
        for decorate in reversed(self.decorators):
            fn = decorate(fn)
        return fn(*args, **kwargs)

    @property
    def cells(self) -> Any:
        if self._cells is None:
            from .cells import CellRunner

            self._cells = CellRunner(self.namespace, self.send_display)
        return self._cells

    def setup(self, meta: dict[str, Any], frames: list) -> dict[str, Any]:
        plugins = P.loads(frames) if frames else []
        os.environ.update(meta.get("env", {}))
        info = InstanceInfo(**meta["info"])
        _set_current(info)
        self.app_stack.close()
        self.app_stack = ExitStack()
        for plugin in plugins:
            if plugin.around_app is not None:
                self.app_stack.enter_context(plugin.around_app(info))
        self.decorators = [p.decorate for p in plugins if p.decorate is not None]
        self.setup_done = True
        return {"hostname": socket.gethostname(), "pid": os.getpid(), "python": sys.executable}


_PACKAGE_DIR = os.path.dirname(os.path.abspath(P.__file__)) + os.sep


def _remove(path: str) -> None:
    import shutil

    path = os.path.expanduser(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def _watch_stdin(worker: Worker) -> None:
    """Local workers: the client holds our stdin; when it closes, the client is gone."""
    try:
        while sys.__stdin__ is not None and sys.__stdin__.buffer.read(1024):
            pass
    finally:
        worker.shutdown("the client closed the worker's stdin")


def _leave_session() -> None:
    """Carry on in a child with a session of its own, so the worker outlives the SSH session that started it.

    Only after the config line has been read: sshd may close our stdin as soon as the process it started
    exits, and a ``setsid`` in front of Python (which forks when run by a session leader) could exit before
    sshd had written the line. The child inherits stdout, so the client still reads the READY line from it.
    """
    if os.fork():
        os._exit(0)
    os.setsid()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sky_jupyter.worker")
    parser.add_argument("--listen-fd", type=int)
    parser.add_argument("--config-fd", type=int)
    parser.add_argument("--generation", type=int, default=0)
    args = parser.parse_args(argv)
    if args.config_fd is not None:
        with os.fdopen(args.config_fd, "rb") as f:
            line = f.readline()
    else:
        line = sys.stdin.buffer.readline()
    config = json.loads(line)
    if config.get("detach") and args.generation == 0:
        _leave_session()
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(config.get("port", 0))))
        listener.listen(socket.SOMAXCONN)  # a burst of connections is turned away by the accept loop at once
    os.set_inheritable(listener.fileno(), False)
    if config.get("workdir"):
        os.makedirs(os.path.expanduser(config["workdir"]), exist_ok=True)
        os.chdir(os.path.expanduser(config["workdir"]))
    os.environ.update(config.get("env", {}))
    if args.generation == 0:
        port = listener.getsockname()[1]
        sys.stdout.write(f"{P.READY} {json.dumps({'port': port, 'pid': os.getpid()})}\n")
        sys.stdout.flush()
        if config.get("detach"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            logfd = os.open(os.path.expanduser(config.get("log", "worker.log")),
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
    log(f"worker generation {args.generation} serving rank {config.get('rank', 0)} "
        f"on 127.0.0.1:{listener.getsockname()[1]}")
    worker = Worker(config, listener, args.generation)
    if config.get("exit_with_stdin"):
        threading.Thread(target=_watch_stdin, args=(worker,), daemon=True).start()
    worker.serve()
