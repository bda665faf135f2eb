"""The worker: runs tasks and cells for the client whose connection it serves, one at a time, in its namespace.

Tasks and cells run in the main thread, so an interrupt frame can raise KeyboardInterrupt in them
with a signal. Between tasks the main thread reads the client's connection itself, so a task starts with no
thread switch (each one costs tens of microseconds, several times what running a trivial cell costs). Once a task
has run for a tick (0.1 s), the connection's own thread reads instead: it answers heartbeats, delivers interrupts
and queues further tasks. A newer authenticated connection replaces the older one. Frames for the client go
through an outbox that holds them while no client is connected, so a result produced during a reconnect is
delivered afterwards instead of lost.

A connection is served only after the mutual handshake (:mod:`.handshake`). Until then it is one of
a few (``max_unauthenticated``) with a few seconds each (``handshake_timeout``), reading small JSON frames whose
every field is checked; whatever goes wrong costs that connection and one log line. Frames over ``max_frame``
bytes or ``max_buffers`` buffers are refused from their header, before anything is allocated.
"""

from __future__ import annotations

import builtins
import collections
import ctypes
import getpass
import inspect
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from .. import protocol as P
from ..info import InstanceInfo, _set_current
from .forked import run_forked
from .handshake import authenticate
from .outbox import Outbox
from .output import OutputCapture, TaskInput, TaskOutput, TaskStdin, TaskStream, log
from .share import ShareError, check, store, take
from .watchdog import POWEROFF, remove_path, touch

if TYPE_CHECKING:
    from .cells import CellRunner


def _free_port() -> int:
    """A TCP port free on this node now: what rank 0 offers torch.distributed (``MASTER_PORT``), told at connect
    so that starting a pool costs no extra round trip to ask."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _user_traceback(exc: BaseException) -> str:
    """The exception's traceback without the worker's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _rss() -> int:
    """This process's resident memory in bytes (Linux), 0 where it cannot tell."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class SharedCopy:
    """A job's payload that is this worker's copy in the node's share folder, read when the job starts."""

    __slots__ = ("copy", "key")

    def __init__(self, key: str, copy: int) -> None:
        self.key, self.copy = key, copy


#: Work for the main thread: a received frame, or one whose payload is a copy in the node's share folder.
Job = tuple[str, int, Any, "list[bytearray] | SharedCopy"]


def error_frames(exc: BaseException) -> tuple[P.ErrorMeta, list]:
    """Meta (type name, message, traceback) and, when it round-trips, the pickled exception itself."""
    meta: P.ErrorMeta = {
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
        self.local_rank = int(config.get("local_rank", 0))
        self.share_dir = os.path.expanduser(str(config.get("share_dir") or os.path.join("~", ".sky_jupyter", "share")))
        self.share_wait = float(config.get("share_wait", 600.0))
        # sky.Worker(concurrency=N): N tasks at once, on slot threads (cells, setup and pulls stay on the main thread).
        # With executor "process", each slot thread runs its task in a forked child (:mod:`.forked`).
        concurrency = int(config.get("concurrency", 1))
        self.forking = config.get("executor") == "process"
        self.slots = ThreadPoolExecutor(concurrency, "sky-slot") if concurrency > 1 or self.forking else None
        self.in_slots: dict[int, int] = {}  # task id -> the slot thread running it
        self.in_forks: dict[int, int] = {}  # task id -> the pid of the child running it
        self._slots_lock = threading.Lock()
        self._slot = threading.local()
        # SimpleQueue hands a job to the main thread faster than Queue; ``queued`` says what waits in it.
        self.jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.queued: set[int] = set()
        self._seen: set[int] = set()  # ids of the tasks received lately (a bounded window), to drop duplicates
        self._seen_order: collections.deque[int] = collections.deque(maxlen=100_000)
        self._seen_lock = threading.Lock()
        self.current_task = 0
        self.last_seen = time.monotonic()
        self.grace = float(config.get("grace", 600.0))
        # The node's watchdog (:mod:`.watchdog`) learns that the client still speaks from this file's times: touched
        # when a client frame came since the last touch, at most once a second.
        self.heartbeat = os.path.expanduser(str(config["heartbeat"])) if config.get("heartbeat") else None
        self._beat_every = min(1.0, self.grace / 10)
        self._beat_for, self._beat_at = -1.0, 0.0
        # Where the watchdog leaves a spot reclaim notice (spot nodes only), and the NOTICE frame made of it.
        self.spot_notice = os.path.expanduser(str(config["spot_notice"])) if config.get("spot_notice") else None
        self._spot_next = 0.0
        self.reclaim: P.NoticeMeta | None = None
        self.interrupt_grace = float(config.get("interrupt_grace", 10.0))
        self._interrupt: tuple[int, float] | None = None
        self.main_ident = threading.get_ident()
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins}
        self.decorators: list[Any] = []
        self.app_stack = ExitStack()
        self.setup_done = False
        self.output = TaskOutput(self)
        self.stdout = TaskStream(self, "stdout")
        self.stderr = TaskStream(self, "stderr")
        self.input = TaskInput(self)
        self.capture: OutputCapture | None = None
        self._cells: CellRunner | None = None
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
        with self._slots_lock:
            running = ({self.current_task} | set(self.in_slots)) - {0}
        unsent, unacked = self.outbox.held_tasks()
        undelivered = set(self.queued) | running | unsent
        return sorted(undelivered | unacked), sorted(undelivered)

    def state(self) -> P.WorkerState:
        """Who this worker is, for a client that has authenticated (the handshake's reply)."""
        tasks, undelivered = self.known_tasks()
        return {"max_frame": self.max_frame, "max_buffers": self.max_buffers, "pid": os.getpid(),
                "generation": self.generation, "setup": self.setup_done, "rank": int(self.config.get("rank", 0)),
                "tasks": tasks, "undelivered": undelivered, "free_port": _free_port(), "store_port": _free_port()}


    def serve_connection(self, sock: socket.socket) -> None:
        def close() -> None:  # shut down first: that wakes a thread blocked reading it, which close() does not
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

        conn = P.FrameIO(P.socket_reader(sock), sock.sendall, close)
        conn.max_frame, conn.max_buffers = self.max_frame, self.max_buffers
        try:
            authenticated = authenticate(sock, self.secret, self.handshake_timeout, self.state)
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
        if self.reclaim is not None:  # a client that connects after the notice learns of it too
            self.outbox.send(P.NOTICE, 0, self.reclaim)
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

    def _shared(self, task_id: int, meta: Any, frames: list[bytearray]) -> Job | None:
        """A work frame whose payload several workers of this node need: the carrier (the frame has the buffers)
        keeps a copy for each sibling before its own work is queued; a sibling's job reads its copy when it starts.
        A malformed one is answered with an error, as a task that failed."""
        try:
            inner, key, copies, copy = meta["kind"], meta["key"], meta["copies"], meta["copy"]
            check(key, copies, copy)
            if inner not in (P.TASK, P.CELL, P.SETUP) or (copy == 0) != bool(frames):
                raise ShareError(f"a shared frame for {inner!r} with copy {copy} and {len(frames)} buffers")
            if not self.first_time(task_id):
                return None
            if frames and copies:
                store(self.share_dir, key, frames, copies)
        except (ShareError, OSError, KeyError, TypeError) as exc:
            meta_err, payload = error_frames(exc)
            self.outbox.send(P.ERROR, task_id, meta_err, payload)
            return None
        return inner, task_id, meta["meta"], frames if frames else SharedCopy(key, copy)

    def _read_one(self, conn: P.FrameIO) -> Job | None:
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
                pong: P.PongMeta = {"busy": self.current_task or next(iter(self.in_slots), 0), "pid": os.getpid(),
                                    "rss": _rss()}
                conn.send(P.PONG, task_id, pong)
            case P.ACK:
                self.outbox.ack(meta)
            case P.INTERRUPT:
                self.interrupt(task_id)
            case P.INPUT_REPLY:
                self.input.answer(meta)
            case P.SHUTDOWN:
                self.shutdown("the client asked")
            case P.TASK | P.CELL | P.SETUP | P.PULL:
                if self.first_time(task_id):
                    return kind, task_id, meta, frames
            case P.SHARED:
                return self._shared(task_id, meta, frames)
            case _:
                log(f"unknown frame kind {kind!r} ignored")
        return None

    def next_job(self) -> Job | None:
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
        with self._slots_lock:
            threads = [t for task, t in self.in_slots.items() if task_id in (0, task) and task not in self.in_forks]
            children = [pid for task, pid in self.in_forks.items() if task_id in (0, task)]
        for pid in children:  # a task in a forked child: SIGINT, KeyboardInterrupt there
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass
        for ident in threads:  # a task on a slot thread: KeyboardInterrupt at its next Python instruction
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(KeyboardInterrupt))

    def task_here(self) -> int:
        """The task the calling thread runs: its slot's, else the main thread's (0: none)."""
        return getattr(self._slot, "task", 0) or self.current_task

    def fd_task(self) -> int:
        """Whose what reaches file descriptors 1 and 2 is: the main thread's task, else the one slot task running
        (several at once cannot be told apart: their descriptor-level output goes to the worker's log)."""
        if self.current_task:
            return self.current_task
        with self._slots_lock:
            return next(iter(self.in_slots)) if len(self.in_slots) == 1 else 0

    def _run_in_slot(self, task_id: int, meta: Any, frames: list | SharedCopy) -> None:
        """A task on one of the ``concurrency`` slot threads: its result or error goes back from here."""
        self._slot.task = task_id
        with self._slots_lock:
            self.in_slots[task_id] = threading.get_ident()
            self.queued.discard(task_id)
        try:
            frames = self._own(frames)
            if self.forking:
                self._run_forked(task_id, frames)
                return
            value = self.run_task(frames, task_id, bool(meta and meta.get("stream")))
            self.flush_task_output(task_id)
            payload = P.dumps_reply(value)
            self.outbox.send(P.RESULT, task_id, None, payload)
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            self.flush_task_output(task_id)
            meta_err, payload = error_frames(exc)
            self.outbox.send(P.ERROR, task_id, meta_err, payload)
        finally:
            with self._slots_lock:
                self.in_slots.pop(task_id, None)
                self.in_forks.pop(task_id, None)
            self._slot.task = 0

    def _run_forked(self, task_id: int, frames: list) -> None:
        """A slot's task in a forked child; its answer goes back from here."""
        def started(pid: int) -> None:
            with self._slots_lock:
                self.in_forks[task_id] = pid

        def output(name: str, text: str) -> None:
            (self.stderr if name == "stderr" else self.stdout).append(text, task_id)

        def ask(prompt: str, password: bool) -> str:
            return self.input.ask(prompt, password, task_id)

        try:
            error, payload = run_forked(frames, self.decorators, output, started, error_frames, ask)
        finally:
            self.input.cancel(task_id)  # a prompt the child no longer waits for
        self.flush_task_output(task_id)
        if error is None:
            self.outbox.send(P.RESULT, task_id, None, payload)
        else:
            self.outbox.send(P.ERROR, task_id, error, payload)

    def _own(self, frames: list | SharedCopy) -> list:
        """A job's payload: as received, or this worker's copy from the node's share folder."""
        if isinstance(frames, SharedCopy):
            return take(self.share_dir, frames.key, frames.copy, self.share_wait, "a sibling worker")
        return frames

    def tick_loop(self) -> None:
        """Hand the connection to its thread while a task runs, enforce the interrupt deadline and the dead-man
        switch (output has a thread of its own: :class:`~.output.TaskOutput`)."""
        while True:
            time.sleep(0.1)
            with self._reading:  # a task running since before this tick: its connection thread reads meanwhile
                if self.current_task and not self._help_wanted:
                    self._help_wanted = True
                    self._reading.notify_all()
            pending = self._interrupt
            if pending and pending[0] == self.current_task and time.monotonic() > pending[1]:
                self.restart(pending[0])
            self._heartbeat()
            self._check_spot()
            if time.monotonic() - self.last_seen > self.grace:
                self.shutdown(f"no word from the client for {self.grace:.0f} s (dead-man switch)")

    def _heartbeat(self) -> None:
        """Pass the client's word on to the node's watchdog (see :mod:`.watchdog`)."""
        seen, now = self.last_seen, time.monotonic()
        if self.heartbeat is not None and seen != self._beat_for and now - self._beat_at >= self._beat_every:
            self._beat_for, self._beat_at = seen, now
            touch(self.heartbeat)

    def _check_spot(self) -> None:
        """Twice a second on spot nodes: has the watchdog written EC2's reclaim notice? Then tell the client (once;
        again to a client that connects later), which fails the calls running here instead of waiting for the
        instance to vanish under them."""
        now = time.monotonic()
        if self.spot_notice is None or self.reclaim is not None or now < self._spot_next:
            return
        self._spot_next = now + 0.5
        try:
            with open(self.spot_notice) as f:
                notice = json.load(f)
        except (OSError, ValueError):
            return
        if not isinstance(notice, dict):
            return
        action, when = str(notice.get("action") or "terminate"), str(notice.get("time") or "")
        self.reclaim = {"kind": P.RECLAIM, "action": action, "time": when,
                        "text": f"EC2 reclaims this spot instance ({action}) at {when or 'any moment'}"}
        log(f"spot reclaim notice: {action} at {when}")
        self.outbox.send(P.NOTICE, 0, self.reclaim)

    def restart(self, task_id: int) -> None:
        """The running code ignored KeyboardInterrupt: replace this process, keeping the port."""
        text = (f"the code did not stop within {self.interrupt_grace:.0f} s of the interrupt; the worker "
                f"was restarted and its namespace is lost")
        lost: P.ErrorMeta = {"type": "KeyboardInterrupt", "message": text, "traceback": "", "restarted": True}
        self.outbox.send(P.ERROR, task_id, lost, [])
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
            remove_path(path)
        if self.config.get("on_orphan") == "poweroff" and "dead-man" in reason:
            os.system(self.config.get("poweroff_command") or POWEROFF)
        os._exit(0)

    # -- running work ------------------------------------------------------------------------------------
    def serve(self) -> None:
        threading.Thread(target=self.accept_loop, daemon=True, name="sky-accept").start()
        threading.Thread(target=self.tick_loop, daemon=True, name="sky-tick").start()
        sys.stdout.flush()
        sys.stderr.flush()
        self.capture = OutputCapture(self)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        # What tasks read is asked of the client (a notebook's input box), not of this process's stdin.
        sys.stdin = TaskStdin(self.input)
        builtins.input = self.input.input
        getpass.getpass = self.input.getpass
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

    def run_job(self, kind: str, task_id: int, meta: Any, frames: list | SharedCopy) -> None:
        if kind == P.TASK and self.slots is not None:  # concurrency > 1: tasks run on slot threads
            self.slots.submit(self._run_in_slot, task_id, meta, frames)
            return
        self.current_task = task_id
        self.queued.discard(task_id)
        try:
            frames = self._own(frames)
            match kind:
                case P.TASK:
                    value = self.run_task(frames, task_id, bool(meta and meta.get("stream")))
                case P.CELL:
                    value = self.cells.run(meta, frames)
                case P.SETUP:
                    value = self.setup(meta, frames)
                case P.PULL:  # by value what the cells defined, with a reason for each name that stays here
                    value = self.cells.pull(list(meta["names"]))
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
        """Send everything the running tasks have written so far (descriptor-level output included)."""
        if self.capture is not None:
            self.capture.sync()
        self.output.send()

    def flush_task_output(self, task_id: int) -> None:
        """Send everything ``task_id`` has written so far (descriptor-level output included)."""
        if self.capture is not None:
            self.capture.sync()
        self.output.send(task_id)

    def read_while_waiting(self) -> None:
        """The running task waits for a frame (an input reply): its connection's thread reads from now on, without
        waiting for the tick to ask it."""
        with self._reading:
            if self.current_task and not self._help_wanted:
                self._help_wanted = True
                self._reading.notify_all()

    def send_display(self, meta: dict[str, Any]) -> None:
        """A display frame (a Jupyter MIME bundle) for the running task, after the output written before it."""
        self.flush_output()
        self.outbox.send(P.DISPLAY, self.task_here(), meta)

    def run_task(self, frames: list, task_id: int = 0, stream: bool = False) -> Any:
        """Run a task. A generator it returns is drained here: each item goes back as it is yielded (``stream``:
        the client iterates them) or, for a caller that wants one value, the items come back as a list."""
        fn, args, kwargs = P.loads(frames)
        for decorate in reversed(self.decorators):
            fn = decorate(fn)
        value = fn(*args, **kwargs)
        if not inspect.isgenerator(value):
            return value
        if not stream:
            return list(value)
        count = 0
        for item in value:
            self.flush_output()  # what it printed before yielding comes first
            self.outbox.send(P.ITEM, task_id, None, P.dumps_reply(item))
            count += 1
        return count

    @property
    def cells(self) -> CellRunner:
        if self._cells is None:
            from .cells import CellRunner  # on the first cell: nodes that only run tasks never import it

            self._cells = CellRunner(self.namespace, self.send_display)
        return self._cells

    def setup(self, meta: P.SetupMeta, frames: list) -> P.SetupResult:
        plugins = P.loads(frames) if frames else []
        os.environ.update(meta.get("env", {}))
        info = InstanceInfo(**meta["info"])
        _set_current(info)
        if meta.get("store_port"):  # the pool's shared collections (sky.dict...), hosted by the head worker
            from .. import store

            if info.rank == 0:
                store.serve(int(meta["store_port"]), self.secret)
            store.configure(info.head_addr, int(meta["store_port"]), self.secret)
        self.app_stack.close()
        self.app_stack = ExitStack()
        for plugin in plugins:
            if plugin.around_app is not None:
                self.app_stack.enter_context(plugin.around_app(info))
        self.decorators = [p.decorate for p in plugins if p.decorate is not None]
        self.setup_done = True
        return {"hostname": socket.gethostname(), "pid": os.getpid(), "python": sys.executable}



_PACKAGE_DIR = os.path.dirname(os.path.abspath(P.__file__)) + os.sep

