"""The client's end of one worker process (a node runs one, or one per GPU): a link that routes frames to the calls
that sent them, and the :class:`RemoteWorker` that keeps that link alive (reconnecting, or restarting a dead
worker)."""

from __future__ import annotations

import builtins
import getpass
import itertools
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from . import protocol as P
from .errors import (
    AuthenticationError,
    ConfigError,
    ConnectionLostError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
    SkyError,
    SpotReclaimError,
    VersionMismatchError,
    WorkerLostError,
)
from .redaction import StreamRedactor, holds_secret, redact, redact_strings
from .tracebacks import localize

if TYPE_CHECKING:
    from .providers.base import Host, WorkerHandle

# (frame kind, meta) for STREAM and DISPLAY frames; a sink whose ``takes_prompts`` is true gets INPUT_REQUEST frames
# too, their meta a :class:`Prompt` (else the thread waiting for the call answers them).
Sink = Callable[[str, Any], None]
# Task ids continue from the clock (microseconds), so a client that attaches to workers an earlier client started
# never reuses an id those workers still hold a result for.
_task_ids = itertools.count(time.time_ns() // 1000)
_finishing = threading.Lock()  # a call ends once, whichever thread learns of it first
HANDSHAKE_TIMEOUT = 15.0  # seconds a worker has to prove itself once connected


class Prompt:
    """A node's task waits in ``input()``, ``getpass.getpass()`` or ``sys.stdin.readline()`` for a line: answer it
    once, with :meth:`answer` (asks this process's user) or :meth:`refuse`. The answer goes to the node and is kept
    nowhere here."""

    __slots__ = ("_link", "ask", "label", "password", "prompt", "task_id")

    def __init__(self, link: WorkerLink, task_id: int, ask: int, prompt: str, password: bool) -> None:
        self._link = link
        self.task_id = task_id
        self.ask = ask
        self.prompt = prompt
        self.password = password
        self.label = link.label

    def answer(self, prefix: str = "") -> None:
        """Ask with the ``input()`` or ``getpass.getpass()`` current now (in a kernel, while a cell runs: ipykernel's,
        the notebook's input box) on the calling thread, and send the line to the node. Where there is none (a
        front end without stdin, a closed terminal) the node's call raises instead; KeyboardInterrupt (Stop) is
        passed on to the node and raised here too."""
        try:
            value = getpass.getpass(prefix + self.prompt) if self.password else builtins.input(prefix + self.prompt)
        except BaseException as exc:
            self.refuse(exc)
            if not isinstance(exc, Exception):
                raise
            return
        reply: P.InputReplyMeta = {"ask": self.ask, "value": str(value)}
        self._link.send(P.INPUT_REPLY, self.task_id, reply)

    def refuse(self, exc: BaseException, why: str = "") -> None:
        """No line for the node: its ``input()`` raises EOFError, KeyboardInterrupt or StdinNotImplementedError
        (``why``: what that says instead of the front end having no input box)."""
        what = "getpass()" if self.password else "input()"
        if isinstance(exc, KeyboardInterrupt):
            error, message = "KeyboardInterrupt", f"{what} was interrupted"
        elif type(exc).__name__ == "StdinNotImplementedError":
            error, message = "StdinNotImplementedError", (
                f"{what} on {self.label} needs an answer, but "
                + (why or "this front end has no input box (it runs the notebook without stdin, as `jupyter "
                          "execute` and nbclient do)")
                + "; set the value in a notebook variable the cell reads instead")
        else:
            error, message = "EOFError", f"{what} on {self.label} got no line here: {type(exc).__name__}: {exc}"
        reply: P.InputReplyMeta = {"ask": self.ask, "error": error, "message": redact(message)}
        self._link.send(P.INPUT_REPLY, self.task_id, reply)


class StdinNotImplementedError(NotImplementedError):
    """Why a prompt is refused where no input box can show it (IPython's error of that name, without IPython)."""


class Call:
    """One task in flight on one node. ``wait()`` returns its decoded value or raises its error; a prompt of its task
    (``input()`` on the node) is answered by the thread that waits, in ``join()``/``wait()``, unless its sink takes
    prompts (``sink.takes_prompts``: a notebook cell's output answers them where it writes the cell)."""

    __slots__ = ("_error", "_finished", "_frames", "_gate", "_lost", "_poked", "_prompts", "code", "items", "kind",
                 "node", "on_done", "request", "sink", "task_id")

    def __init__(self, node: RemoteWorker, sink: Sink | None, code: tuple[Any, ...] = (),
                 on_done: Callable[[], None] | None = None, task_id: int | None = None, kind: str = "") -> None:
        self.task_id = next(_task_ids) if task_id is None else task_id
        self.kind = kind  # what was sent: a cell's result carries the display bundle of its last value
        self.node = node
        self.sink = sink
        self.on_done = on_done  # called on the reader thread when the result (or failure) arrives
        self.code = code  # what was shipped, to map remote tracebacks back to the user's lines
        # A bare lock, held until the call ends, is a cheaper latch than an Event (a Condition and its lock, made
        # for every call of every node of every cell).
        self._gate = threading.Lock()
        self._gate.acquire()
        self._finished = False
        # Prompts for the waiting thread; ``_poked``: the gate was opened (while running) to wake it for them.
        self._prompts: list[Prompt] = []
        self._poked = False
        self._frames: list | None = None
        self._error: dict[str, Any] | None = None
        self._lost: BaseException | None = None
        # What was sent (kind, meta, payload), kept until the call ends: sent again if the worker never got it.
        self.request: tuple[P.ClientKind, Any, list | tuple] | None = None
        # A streamed generator's items as they arrive (their frames), then None once the call has ended.
        self.items: queue.SimpleQueue[list | None] | None = None

    def done(self) -> bool:
        return self._finished

    def failed(self) -> bool:
        return self._finished and (self._error is not None or self._lost is not None)

    def _finish(self, frames: list | None = None, error: dict[str, Any] | None = None,
                lost: BaseException | None = None) -> None:
        with _finishing:
            if self._finished:  # the first outcome stands (a result, then the connection dropping)
                return
            self._frames, self._error, self._lost = frames, error, lost
            self._finished = True
            self.request = None
            poked, self._poked, self._prompts = self._poked, False, []  # prompts of an ended task: nobody waits
        if not poked:  # else it is open already, for a waiter that now finds the call finished
            self._gate.release()
        if self.items is not None:
            self.items.put(None)
        if self.on_done is not None:
            self.on_done()

    def prompt(self, prompt: Prompt) -> None:
        """A prompt of this call's task (on a link's reader thread): wakes the thread waiting in :meth:`join`."""
        with _finishing:
            if self._finished:
                return
            self._prompts.append(prompt)
            poke, self._poked = not self._poked, True
        if poke:
            self._gate.release()

    def join(self, timeout: float | None = None, prompts: bool = True) -> bool:
        """Wait until the call ends (at most ``timeout`` seconds); whether it has. Meanwhile its task's prompts are
        answered here (``prompts``), or refused."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            if not self._gate.acquire(timeout=-1 if end is None else max(end - time.monotonic(), 0)):
                return self._finished
            with _finishing:
                asked, self._prompts, self._poked = self._prompts, [], False
                finished = self._finished
            if finished:
                self._gate.release()  # open for every other waiter too
                return True
            # Woken for prompts: the gate is closed again (this thread took it) until the call ends or asks again.
            for i, prompt in enumerate(asked):
                if not prompts:
                    prompt.refuse(KeyboardInterrupt())
                    continue
                try:
                    prompt.answer()
                except BaseException as exc:
                    for rest in asked[i + 1:]:
                        rest.refuse(exc)
                    raise
        return True

    def wait(self, timeout: float | None = None) -> Any:
        """The task's value. A KeyboardInterrupt while waiting interrupts the remote code, then propagates."""
        try:
            if not self.join(timeout):
                raise TimeoutError(f"{self.node.label}: no result after {timeout} s")
        except KeyboardInterrupt:
            self.interrupt()
            self.join(15, prompts=False)
            raise
        if self._lost is not None:
            raise self._lost
        if self._error is not None:
            raise remote_exception(self._error, self._frames or [], self.node.label, self.code)
        try:
            value = P.loads(self._frames or [])
        except Exception as exc:  # noqa: BLE001 - (un)pickling user objects can raise anything
            raise SerializationError(f"the result from {self.node.label} could not be unpickled here: "
                                     f"{type(exc).__name__}: {exc}. Install the package that defines it locally, "
                                     f"or return plain Python types.") from None
        if self.kind == P.CELL and isinstance(value, dict) and value.get("display"):
            value["display"] = redact_strings(value["display"])  # shown like a display frame's bundle
        return value

    def interrupt(self) -> None:
        self.node.interrupt(self.task_id)


def remote_exception(meta: dict[str, Any], frames: list, label: str, code: tuple[Any, ...] = ()) -> BaseException:
    """The remote exception as its own type when it can be rebuilt here, else a RemoteError; either way with the
    known secrets masked in its message, its attributes and its traceback."""
    if meta.get("restarted"):
        return WorkerLostError(redact(f"{label}: {meta.get('message')}"))
    meta = {"type": redact(str(meta.get("type", "Exception"))), "message": redact(str(meta.get("message", ""))),
            "traceback": redact(localize(str(meta.get("traceback", "")), code))}
    exc: BaseException | None = None
    if frames:
        try:
            exc = _scrubbed(P.loads(frames))
        except Exception:  # noqa: BLE001 - (un)pickling user objects can raise anything
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(meta["type"], meta["message"], meta["traceback"], label)
    if meta["traceback"]:
        exc.__cause__ = RemoteTraceback(meta["traceback"])
    exc.add_note(f"(raised on {label})")
    return exc


def _scrubbed(exc: object) -> BaseException | None:
    """A rebuilt remote exception with the known secrets masked in its arguments, notes and string attributes;
    None (so it travels as a RemoteError with the masked message) if its text still shows one."""
    if not isinstance(exc, BaseException):
        return None
    exc.args = redact_strings(exc.args)
    for name, value in list(vars(exc).items()):
        if isinstance(value, (str, list, tuple, dict)):
            setattr(exc, name, redact_strings(value))
    try:
        text = f"{exc!s} {exc!r}"
    except Exception:  # noqa: BLE001 - a __str__ that fails here: the masked meta says it instead
        return None
    return None if holds_secret(text) else exc


class WorkerLink:
    """One authenticated connection to a worker. A reader thread routes each frame to its call."""

    #: A result this large is acknowledged at once, so the worker lets go of it now rather than at the next frame.
    ACK_AT_ONCE = 1 << 20
    KEEP_FOR_RESEND = 64 << 20

    def __init__(self, io: P.FrameIO, label: str, on_drop: Callable[[WorkerLink], None],
                 hello: P.Reply | None = None, on_notice: Callable[[WorkerLink, dict[str, Any]], None] | None = None
                 ) -> None:
        self.io = io
        self.label = label
        # What the worker said when this link connected (its pid and generation); empty for a link made without.
        self.hello: Mapping[str, Any] = hello or {}
        self.calls: dict[int, Call] = {}
        self._acks: list[int] = []  # tasks whose result arrived, to acknowledge with the next frame sent
        self.alive = True
        # Why the link was dropped when that was not the connection ending (a frame over the limits, a failure in
        # the reader): its calls fail with it rather than wait on a new connection for answers that may not come.
        self.failure: str | None = None
        self.scrub = StreamRedactor()  # task output, by (task id, stream name)
        self._on_drop = on_drop
        self._on_notice = on_notice  # NOTICE frames, when someone acts on them (a spot reclaim fails the calls)
        self._lock = threading.Lock()
        self.pongs = threading.Condition()
        self.last_pong: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._read_loop, daemon=True, name=f"sky-read-{label}")

    @staticmethod
    def handshake(io: P.FrameIO, secret: str, label: str, pool: str = "") -> P.Reply:
        """Mutual authentication (see :mod:`sky_jupyter.protocol`): we prove we know the pool secret, the worker
        proves it does too, and only then is anything it says believed (or any pickle from it read). Returns the
        worker's reply: its pid, generation, setup state, held tasks, versions and frame limits."""
        which = f"pool {pool!r}" if pool else "this pool"
        try:
            hello = io.recv_json(P.HELLO_LIMIT)
            if hello.get("sky") != P.PROTOCOL_VERSION:
                spoken = hello.get("sky")
                raise AuthenticationError(
                    f"{label} speaks sky_jupyter protocol {spoken}, this client {P.PROTOCOL_VERSION}: its worker "
                    f"comes from another version of sky_jupyter; restart the pool (`%sky down`, or a new "
                    f"ComputePool)." if type(spoken) is int else
                    f"{label} answered with something that is not a sky_jupyter worker; check the host and port.")
            P.check_fields(hello, P.HELLO_FIELDS, "the worker's hello")
            worker_nonce, client_nonce = hello["nonce"], P.new_nonce()
            answer: P.Answer = {"nonce": client_nonce, "mac": P.proof(secret, P.CLIENT, worker_nonce, client_nonce),
                                **P.versions()}
            io.send_json(answer)
            reply = io.recv_json(P.REPLY_LIMIT)
        except P.HandshakeError as exc:
            raise AuthenticationError(f"{label} answered with something that is not a sky_jupyter worker ({exc}); "
                                      f"check the host and port.") from None
        if not P.check_proof(secret, P.WORKER, worker_nonce, client_nonce, reply.get("mac")):
            if reply.get("ok") is False and "mac" not in reply:
                raise AuthenticationError(
                    f"{label} refused the connection: its worker does not know the secret of {which} (it belongs "
                    f"to another pool, or this pool's record is stale); restart the pool.")
            raise AuthenticationError(
                f"the worker at {label} could not prove it belongs to {which}: it answered our challenge without "
                f"the pool secret, so nothing it sent was trusted or unpickled. Something else may listen on its "
                f"port (another pool's worker, or another program); restart the pool (`%sky down`, or a new "
                f"ComputePool).")
        try:
            P.check_fields(reply, {k: P.REPLY_FIELDS[k] for k in ("python", "cloudpickle")}, "the worker's reply")
            mine = P.versions()
            if reply["python"] != mine["python"] or reply["cloudpickle"] != mine["cloudpickle"]:
                raise VersionMismatchError(
                    f"{label} runs Python {reply['python']} with cloudpickle {reply['cloudpickle']}, but this client "
                    f"runs Python {mine['python']} with cloudpickle {mine['cloudpickle']}; give the node the same "
                    f"versions (Image(python=...), or pip install cloudpickle=={mine['cloudpickle']} there).")
            P.check_fields(reply, P.REPLY_FIELDS, "the worker's reply")
        except P.HandshakeError as exc:
            raise AuthenticationError(f"{label}: the worker's handshake reply is malformed ({exc}); restart the "
                                      f"pool.") from None
        if not reply["ok"]:
            raise AuthenticationError(f"{label} refused the connection: {redact(str(reply.get('error')))[:300]}")
        io.max_frame = min(io.limits[0], reply["max_frame"])  # neither side sends what the other would refuse
        io.max_buffers = min(io.limits[1], reply["max_buffers"])
        return cast(P.Reply, reply)  # every field checked above

    def start(self) -> None:
        self._thread.start()

    def submit(self, call: Call, kind: P.ClientKind, meta: Any, payload: list | tuple) -> None:
        try:
            self.io.check_payload(payload)
        except P.FrameError as exc:
            raise SerializationError(f"this call's data cannot be sent to {self.label}: {exc} (the frame limit: "
                                     f"sky_jupyter.protocol.MAX_FRAME here, the worker's max_frame there). Send "
                                     f"less per call, or put large data where the node can read it.") from None
        with self._lock:
            if not self.alive:
                raise ConnectionLostError(f"{self.label}: connection lost"
                                          + (f" ({self.failure})" if self.failure else ""))
            self.calls[call.task_id] = call
            # Kept for a resend unless that would hold a large pickle here (buffers of the caller's own arrays
            # cost nothing to keep); without it, a task lost with its connection is reported, not sent again.
            if sum(len(p) for p in payload if isinstance(p, bytes)) <= self.KEEP_FOR_RESEND:
                call.request = (kind, meta, payload)
        self.send(kind, call.task_id, meta, payload)

    def adopt(self, calls: dict[int, Call]) -> None:
        """Take over calls from a dropped link to the same worker (its outbox resends their results)."""
        with self._lock:
            self.calls.update(calls)

    def resend(self, call: Call) -> None:
        """Send a call again that the worker never received (the frame was lost with a dropped connection)."""
        if call.request is not None:
            kind, meta, payload = call.request
            self.send(kind, call.task_id, meta, payload)

    def send(self, kind: P.ClientKind, task_id: int = 0, meta: Any = None, payload: list | tuple = ()) -> None:
        """Send a frame, with the acknowledgement of the results that arrived since the last one in front."""
        with self._lock:
            acks, self._acks = self._acks, []
        try:
            self.io.send(kind, task_id, meta, payload, before=P.frame(P.ACK, 0, acks) if acks else b"")
        except OSError as exc:
            self._drop(exc)

    def _read_loop(self) -> None:
        try:
            while True:
                kind, task_id, meta, frames = self.io.recv()
                if kind in (P.RESULT, P.ERROR):
                    if self.scrub.holding:  # the task's output is complete: what waited for more comes out now
                        for name in ("stdout", "stderr"):
                            self._show(P.STREAM, task_id, {"name": name, "text": self.scrub.flush((task_id, name))})
                    with self._lock:
                        call = self.calls.pop(task_id, None)
                        self._acks.append(task_id)  # even for no call of ours: a result sent again after a drop
                    if sum(len(f) for f in frames) >= self.ACK_AT_ONCE:
                        self.send(P.ACK)  # the acknowledgement travels in front of this empty one
                    if call is not None:
                        call._finish(frames=frames, error=meta if kind == P.ERROR else None)
                    if kind == P.ERROR and meta.get("restarted"):
                        raise EOFError("the worker is restarting")
                elif kind == P.STREAM:
                    meta["text"] = self.scrub.feed((task_id, meta["name"]), meta["text"])
                    self._show(kind, task_id, meta)
                elif kind == P.DISPLAY:
                    if self.scrub.holding:  # output written before the display comes before it
                        for name in ("stdout", "stderr"):
                            self._show(P.STREAM, task_id, {"name": name, "text": self.scrub.flush((task_id, name))})
                    self._show(kind, task_id, redact_strings(meta))
                elif kind == P.INPUT_REQUEST:
                    if self.scrub.holding:  # output written before the prompt comes before it
                        for name in ("stdout", "stderr"):
                            self._show(P.STREAM, task_id, {"name": name, "text": self.scrub.flush((task_id, name))})
                    self._prompt(task_id, meta)
                elif kind == P.ITEM:
                    item_call = self.calls.get(task_id)
                    if item_call is not None and item_call.items is not None:
                        item_call.items.put(frames)
                elif kind == P.PONG:
                    with self.pongs:
                        self.last_pong = {"seq": task_id, **(meta or {})}
                        self.pongs.notify_all()
                elif kind == P.NOTICE:
                    if self._on_notice is not None and isinstance(meta, dict):
                        self._on_notice(self, meta)
                    else:
                        print(f"[{self.label}] {redact(str(meta.get('text')))}", file=sys.__stderr__)
        except (EOFError, OSError) as exc:
            self._drop(exc)
        except BaseException as exc:  # noqa: BLE001 - a frame over the limits, or anything else: never hang calls
            if isinstance(exc, P.FrameError):
                why = f"the worker broke the protocol: {exc}"
            else:
                why = f"the connection's reader failed ({type(exc).__name__}: {exc})"
            self._drop(exc, failure=redact(why))

    def _prompt(self, task_id: int, meta: Any) -> None:
        """An INPUT_REQUEST: to the call's sink when it takes prompts (a notebook cell), else to the thread waiting
        for the call; refused when no call of ours runs that task."""
        if not (isinstance(meta, dict) and type(meta.get("ask")) is int):
            return
        prompt = Prompt(self, task_id, meta["ask"], redact(str(meta.get("prompt", ""))), bool(meta.get("password")))
        call = self.calls.get(task_id)
        if call is None:
            prompt.refuse(EOFError("no caller here waits for that task"))
        elif getattr(call.sink, "takes_prompts", False):
            assert call.sink is not None
            call.sink(P.INPUT_REQUEST, prompt)
        else:
            call.prompt(prompt)

    def _show(self, kind: str, task_id: int, meta: Any) -> None:
        """Hand a STREAM or DISPLAY frame to the sink of the call that started the task."""
        if kind == P.STREAM and not meta["text"]:
            return
        call = self.calls.get(task_id)
        if call is None or call.sink is None:
            if kind == P.STREAM:
                print(f"[{self.label}] {meta['text']}", end="", file=sys.__stderr__)
            return
        try:
            call.sink(kind, meta)
        except Exception as exc:  # noqa: BLE001 - where output goes failed; the call itself goes on
            call.sink = None
            print(f"[{self.label}] output of task {task_id} could not be shown ({type(exc).__name__}: {exc}); "
                  f"the rest of it goes here", file=sys.__stderr__)

    def _drop(self, exc: BaseException, failure: str | None = None) -> None:
        with self._lock:
            if not self.alive:
                return
            self.alive = False
            self.failure = failure
        self.io.close()
        self._on_drop(self)

    def take_calls(self) -> dict[int, Call]:
        with self._lock:
            calls, self.calls = self.calls, {}
        return calls

    def close(self) -> None:
        with self._lock:
            self.alive = False
        self.io.close()


class RemoteWorker:
    """One worker of a pool as the client sees it: its host, its place (``rank`` over the whole pool; ``node``, and
    ``local_rank`` among the ``per_node`` workers of that node), its process, and a live link to it.

    When the link drops, it reconnects if the worker still runs (the worker resends results it could not deliver)
    or, if the worker died, fails the calls in flight with WorkerLostError and starts a fresh worker (the same
    local rank) for the next task.
    """

    def __init__(self, host: Host, secret: str, start_worker: Callable[[Host, int], WorkerHandle],
                 setup: Callable[[RemoteWorker], None], pool: str = "", local_rank: int = 0, per_node: int = 1,
                 rank: int | None = None) -> None:
        self.node = host.rank
        self.local_rank = local_rank
        self.per_node = per_node
        self.rank = host.rank if rank is None else rank  # the pool numbers its workers once all have started
        self.host = host
        self.secret = secret
        self.pool = pool  # the pool's name, for messages
        self._start_worker = start_worker
        self._setup = setup
        self.handle: WorkerHandle | None = None
        self.link: WorkerLink | None = None
        #: Counts the worker processes (namespaces) behind this rank: a fresh one knows none of what was sent before.
        self.incarnation = 0
        self.state = "new"
        self.notices: list[str] = []
        self.reclaimed = ""  # EC2's reclaim notice for this spot node, as the message its calls fail with
        self.hostname = ""
        self._lock = threading.RLock()
        self.closing = False

    @property
    def label(self) -> str:
        if self.per_node == 1:
            return f"node {self.node} ({self.host.display})"
        return f"rank {self.rank} (node {self.node} worker {self.local_rank}, {self.host.display})"

    def in_flight(self) -> int:
        link = self.link
        return len(link.calls) if link is not None else 0

    # -- connecting ----------------------------------------------------------------------------------------
    def start_worker(self, handle: WorkerHandle | None = None) -> None:
        """Connect to ``handle`` (a worker its node's bring-up started), or start a worker and connect to it (the
        pool runs setup on all workers together afterwards)."""
        with self._lock:
            self.handle = handle if handle is not None else self._start_worker(self.host, self.local_rank)
            self._connect()
            self.state = "connected"

    def start(self) -> None:
        """Start the worker, connect, and run the pool's setup on it."""
        with self._lock:
            self.incarnation += 1
            self.start_worker()
            self._setup(self)
            self.state = "ready"

    def attach(self, handle: WorkerHandle, sink: Sink | None = None) -> list[Call]:
        """Connect to a worker that an earlier client started, its namespace intact. Returns calls for what that
        client left behind there (a task still running, or a result it never collected): their output goes to
        ``sink`` and their end can be waited for as usual."""
        with self._lock:
            self.handle = handle
            leftovers: list[Call] = []

            def adopt(task_id: int) -> Call:
                leftovers.append(Call(self, sink, task_id=task_id))
                return leftovers[-1]

            hello = self._connect(adopt)
            self.state = "ready" if hello.get("setup") else "connected"
            self.hostname = self.hostname or self.host.hostname
            return leftovers

    def _connect(self, adopt: Callable[[int], Call] | None = None) -> P.Reply:
        assert self.handle is not None
        io = self.handle.open()
        try:
            io.settimeout(HANDSHAKE_TIMEOUT)  # a peer that accepts and never speaks must not hang this client
            hello = WorkerLink.handshake(io, self.secret, self.label, self.pool)
            io.settimeout(None)
        except TimeoutError:
            io.close()
            raise ConnectionLostError(f"{self.label}: the worker did not answer its handshake within "
                                      f"{HANDSHAKE_TIMEOUT:.0f} s; is something else listening on its port?") from None
        except BaseException:
            io.close()
            raise
        link = WorkerLink(io, self.label, self._dropped, hello, self._noticed)
        old = self.link
        unsent: list[Call] = []
        if old is not None and old.failure is not None:
            self._fail_calls(old)
        if old is not None:
            link.scrub.take(old.scrub)
            calls = old.take_calls()
            # The worker holds every task it got until we acknowledge its answer, so one it does not know never
            # reached it: the same worker process gets it again. A different one (restarted, replaced) must not:
            # those calls fail, as the namespace they ran against is gone.
            same = all(old.hello.get(k) == hello.get(k) for k in ("pid", "generation"))
            known = set(hello.get("tasks", ()))
            for task_id in [t for t in calls if t not in known]:
                if same and calls[task_id].request is not None:
                    unsent.append(calls[task_id])
                else:
                    calls.pop(task_id)._finish(lost=ConnectionLostError(
                        f"{self.label}: the connection dropped while this task was on its way, and the worker "
                        f"never got it; it did not run. The node is reconnected: run it again."))
            link.adopt(calls)
        elif adopt is not None:  # before the link reads: the worker's held frames for them come first
            # Results the dead client was sent come again too; with no call here they are only acknowledged.
            link.adopt({task_id: adopt(task_id) for task_id in hello.get("undelivered", ())})
        self.link = link
        link.start()
        for call in unsent:
            link.resend(call)
        return hello

    def _dropped(self, link: WorkerLink) -> None:
        if self.closing or link is not self.link:
            return
        threading.Thread(target=self._recover, args=(link,), daemon=True, name=f"sky-recover-{self.rank}").start()

    def _fail_calls(self, link: WorkerLink) -> None:
        """The calls of a link dropped for a failure (not the connection ending) fail with its reason."""
        lost = ConnectionLostError(f"{self.label}: the connection to its worker was dropped: {link.failure}. The "
                                   f"calls in flight on it are lost; the next task connects again.")
        for call in link.take_calls().values():
            call._finish(lost=lost)

    def _noticed(self, link: WorkerLink, meta: dict[str, Any]) -> None:
        """A NOTICE frame from the worker. A spot reclaim notice (EC2 takes the instance back within minutes) fails
        the calls running there now, and every later one at once, with SpotReclaimError, instead of letting them
        wait for the instance to vanish; other notices are shown."""
        if meta.get("kind") != P.RECLAIM:
            print(f"[{self.label}] {redact(str(meta.get('text')))}", file=sys.__stderr__)
            return
        if self.reclaimed:
            return  # the worker says it again to each new connection; once is enough
        action, when = redact(str(meta.get("action") or "terminate")), redact(str(meta.get("time") or "soon"))
        self.reclaimed = (f"{self.label} is being reclaimed (spot) at {when}: EC2 will {action} the instance then; "
                          f"what ran there is lost, and it takes no more work. The other nodes keep working; start "
                          f"a new pool (or use on-demand nodes: sky.AWS(spot=False)) to replace it.")
        self.state = "reclaimed"
        self.notices.append(self.reclaimed)
        print(f"[{self.label}] {self.reclaimed}", file=sys.__stderr__)
        lost = SpotReclaimError(self.reclaimed)
        for call in link.take_calls().values():
            call._finish(lost=lost)

    def _recover(self, link: WorkerLink) -> None:
        with self._lock:
            if self.closing or link is not self.link:
                return
            if self.reclaimed:  # the instance went away as announced: no reconnecting
                for call in link.take_calls().values():
                    call._finish(lost=SpotReclaimError(self.reclaimed))
                self.link = None
                return
            if link.failure is not None:  # not the connection ending: reconnecting would not bring the answers
                self._fail_calls(link)
                self.link = None
                return
            self.state = "reconnecting"
            try:
                outcome = self._reconnect()
            except (AuthenticationError, ConfigError) as refused:
                for call in link.take_calls().values():
                    call._finish(lost=refused)
                self.link = None
                return
            if outcome == "connected":
                return
            if outcome == "unreachable":
                lost: ConnectionLostError = self._unreachable_error()
            else:
                why = self.handle.describe_exit() if self.handle is not None else "is gone"
                lost = WorkerLostError(f"{self.label}: its worker {why} while running this task; the node's "
                                       f"remote namespace is lost. The next task starts a fresh worker.")
                self.state = "lost"
            for call in link.take_calls().values():
                call._finish(lost=lost)
            self.link = None

    def _unreachable_error(self) -> ConnectionLostError:
        self.state = "unreachable"
        why = self.handle.describe_exit() if self.handle is not None else "cannot be reached"
        return ConnectionLostError(
            f"{self.label} cannot be reached (its worker {why}); the other nodes keep working. Restart the pool "
            f"to replace it (`%sky down`, or a new ComputePool).")

    def _reconnect(self, deadline: float = 10.0) -> str:
        """Reconnect to a worker that still runs, with backoff. Returns "connected", "gone" (the worker is not
        running) or "unreachable" (the node itself cannot be asked)."""
        delay, end = 0.05, time.monotonic() + deadline
        while not self.closing:
            try:
                alive = self.handle is not None and self.handle.alive()
            except (AuthenticationError, ConfigError):
                self.state = "refused"
                raise  # a changed host key or refused login is not "unreachable": say exactly what it is
            except Exception:  # noqa: BLE001 - any other failure to ask the node means we cannot reach it
                return "unreachable"
            if not alive:
                return "gone"
            try:
                hello = self._connect()
            except (OSError, EOFError, ValueError, SkyError):
                if time.monotonic() > end:
                    return "unreachable"
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if hello.get("generation", 0) and not hello.get("setup"):
                self._restarted()
            self.state = "ready"
            return "connected"
        return "gone"

    def _restarted(self) -> None:
        """The worker replaced itself after ignoring an interrupt: calls in flight are lost, setup runs again."""
        assert self.link is not None
        text = f"{self.label}: the worker was restarted; its remote namespace was lost."
        self.incarnation += 1
        self.notices.append(text)
        for call in self.link.take_calls().values():
            call._finish(lost=WorkerLostError(text))
        self._setup(self)

    def ensure_link(self) -> WorkerLink:
        if self.reclaimed:
            raise SpotReclaimError(self.reclaimed)
        with self._lock:
            link = self.link
            if link is not None and link.alive:
                return link
            if self.closing:
                raise ConnectionLostError(f"{self.label}: the pool is shut down; start it again.")
            outcome = self._reconnect()
            if outcome == "unreachable":
                raise self._unreachable_error()
            if outcome == "gone":
                if self.handle is not None:
                    try:
                        self.handle.stop()
                    except Exception:  # noqa: BLE001 - the node may be unreachable; starting says so below
                        pass
                    self.notices.append(f"{self.label}: the worker {self.handle.describe_exit()}; "
                                        f"starting a fresh one (remote namespace lost).")
                try:
                    self.start()
                except (AuthenticationError, VersionMismatchError, ConfigError):
                    self.state = "refused"
                    raise  # a changed host key or refused login is not "unreachable": say exactly what it is
                except (OSError, EOFError, SkyError) as exc:
                    self.state = "unreachable"
                    raise ConnectionLostError(
                        f"{self.label} cannot be reached ({type(exc).__name__}: {redact(str(exc))}); the other "
                        f"nodes keep working. Restart the pool to replace it (`%sky down`, or a new ComputePool)."
                    ) from None
            self.state = "ready"
            assert self.link is not None
            return self.link

    # -- work ----------------------------------------------------------------------------------------------
    def submit(self, kind: P.ClientKind, meta: Any = None, payload: list | tuple = (), sink: Sink | None = None,
               code: tuple[Any, ...] = (), on_done: Callable[[], None] | None = None,
               share: tuple[str, int, int] | None = None, items: queue.SimpleQueue[list | None] | None = None
               ) -> Call:
        """Send one job. ``share`` (key, copies, copy): its payload is shared with sibling workers of this node
        (see :data:`~sky_jupyter.protocol.SHARED`): this worker carries it for ``copies`` siblings, or (``copy``
        > 0, no payload here) reads the copy a sibling carried."""
        link = self.ensure_link()
        call = Call(self, sink, code, on_done, kind=kind)
        call.items = items  # before the first frame can arrive for it
        if share is None:
            link.submit(call, kind, meta, payload)
        else:
            key, copies, copy = share
            shared: P.SharedMeta = {"kind": cast(Any, kind), "meta": meta, "key": key, "copies": copies, "copy": copy}
            link.submit(call, P.SHARED, shared, payload)
        return call

    def interrupt(self, task_id: int = 0) -> None:
        link = self.link
        if link is not None and link.alive:
            link.send(P.INTERRUPT, task_id)

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        link = self.ensure_link()
        seq = next(_task_ids)
        with link.pongs:
            link.send(P.PING, seq)
            if not link.pongs.wait_for(lambda: link.last_pong.get("seq") == seq or not link.alive, timeout):
                raise ConnectionLostError(f"{self.label}: no heartbeat answer within {timeout} s")
        return link.last_pong

    def detach(self) -> None:
        """Let go of the worker, leaving it running (an attach that failed part way)."""
        self.closing = True
        link, self.link = self.link, None
        if link is not None:
            link.close()

    def close(self, timeout: float = 5.0) -> None:
        self.closing = True
        link, self.link = self.link, None
        if link is not None and link.alive:
            link.send(P.SHUTDOWN)
            link.close()
        if link is not None:  # whoever still waits for a call here (a background cell) is told, not left waiting
            for call in link.take_calls().values():
                call._finish(lost=ConnectionLostError(f"{self.label}: the pool was shut down while this ran; it "
                                                      f"did not finish"))
        if self.handle is not None and self.state != "unreachable":  # its dead-man switch cleans up instead
            try:
                self.handle.stop(timeout)
            except (OSError, EOFError, SkyError):
                pass
        self.state = "stopped"
