"""The wire format between client and worker.

A frame is ``!II`` (length of the head, number of buffers), one ``!Q`` length per buffer, the head, then the
buffers. The head is a small standard pickle ``(kind, task_id, meta)``; the buffers, when present, hold one
cloudpickle payload: its main pickle first, then its protocol-5 out-of-band buffers, so large arrays travel
without being copied into one bytes object. Payloads are decoded by whoever needs the value (the task thread,
the caller), never by the reader thread, so a payload that fails to unpickle fails only its own task.

Before any pickle is read, both sides prove they know the pool secret, in small JSON handshake frames (three, as
before mutual authentication: the worker speaks first, the client answers, the worker replies):

- worker (:class:`Hello`): ``{"sky": PROTOCOL_VERSION, "nonce": Nw}``, nothing else (no pid or versions before
  authentication);
- client (:class:`Answer`): ``{"nonce": Nc, "mac": proof("client", Nw, Nc), python, cloudpickle}``;
- worker (:class:`Reply`): ``{"ok": ..., "mac": proof("worker", Nw, Nc), python, cloudpickle, pid, generation,
  setup, rank, tasks, undelivered, max_frame, max_buffers, free_port}``, or (:class:`Refusal`)
  ``{"ok": false, "error": ...}`` alone to a client without the secret.

Each proof is HMAC-SHA256 under the pool secret over both nonces, with a label per direction, so an answer reflected
back to its sender fails. Each side checks every field's type and the frame's size; neither unpickles anything from a
peer that has not proven it knows the secret. Every frame's size is checked from its header before any of it is
allocated (:data:`MAX_FRAME`, :data:`MAX_BUFFERS`).

A payload several workers of one node need (a cell's changed globals, a broadcast task) crosses the link once per
node: the client sends it to one of them in a :data:`SHARED` frame that says how many siblings read it too (that
worker keeps a copy for each in the node's share folder before it queues the work), and the siblings get the same
frame without buffers, naming the copy to read (:class:`SharedMeta`).

Message kinds are :data:`ClientKind` and :data:`WorkerKind`; what each frame's meta holds is a TypedDict here
(:class:`CellMeta`, :class:`StreamMeta`, :class:`ErrorMeta`...): types for the checker, plain dicts on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import pickle
import platform
import secrets
import socket
import struct
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, NotRequired, Protocol, Required, TypedDict, cast

import cloudpickle

from .errors import SkyError

#: 4: a worker may ask the client for a line of input (INPUT_REQUEST), which a client must answer (INPUT_REPLY).
PROTOCOL_VERSION = 4
READY = "SKY-READY"  # the line a starting worker prints, followed by {"port": ..., "pid": ...}
_HEAD = struct.Struct("!II")
_LEN = struct.Struct("!Q")
_SMALL = 64 * 1024

#: The largest frame (head and buffers together, in bytes) either side accepts; checked from the header before
#: anything is allocated. A worker takes its own from its config (``max_frame``); a pool gives it this client's.
MAX_FRAME = 16 << 30
#: The most out-of-band buffers one frame may carry (a pickle holds one per array).
MAX_BUFFERS = 1 << 20
#: The largest head (kind, task id and meta: cell code, a display bundle); data travels in the buffers.
MAX_HEAD = 1 << 30
#: Handshake frames: the worker's hello and the client's answer are read before the peer is authenticated, so
#: they are small; the worker's reply (its held task ids) may be longer.
HELLO_LIMIT = 4096
REPLY_LIMIT = 8 << 20
#: Seconds a worker gives a new connection to authenticate, and how many may be authenticating at once.
HANDSHAKE_TIMEOUT = 5.0
MAX_UNAUTHENTICATED = 16

# Message kinds. Client -> worker:
TASK: Final = "task"            # run a pickled (fn, args, kwargs)
CELL: Final = "cell"            # run notebook cell code in the persistent namespace (meta: CellMeta)
SETUP: Final = "setup"          # install plugins (around_app, decorate) and instance info, once per worker
PULL: Final = "pull"            # send back named values from the namespace (meta: PullMeta)
INTERRUPT: Final = "interrupt"  # raise KeyboardInterrupt in the running task
PING: Final = "ping"            # heartbeat; answered with PONG
SHUTDOWN: Final = "shutdown"    # exit (and clean up)
ACK: Final = "ack"              # meta: ids of tasks whose result or error arrived; the worker stops holding them
SHARED: Final = "shared"        # a TASK, CELL, SETUP whose payload is read from the node's share folder (SharedMeta)
INPUT_REPLY: Final = "input_reply"  # the answer to an INPUT_REQUEST (meta: InputReplyMeta)
# Worker -> client:
RESULT: Final = "result"
ITEM: Final = "item"            # one value a task's generator yielded (its RESULT, the count, ends them)
ERROR: Final = "error"          # meta: ErrorMeta
STREAM: Final = "stream"        # meta: StreamMeta
DISPLAY: Final = "display"      # meta: a Jupyter MIME bundle message
PONG: Final = "pong"            # meta: PongMeta
NOTICE: Final = "notice"        # meta: NoticeMeta, for the user, not tied to a task
INPUT_REQUEST: Final = "input_request"  # the task waits in input()/getpass() for a line (meta: InputRequestMeta)

ClientKind = Literal["task", "cell", "setup", "pull", "interrupt", "ping", "shutdown", "ack", "shared", "input_reply"]
WorkerKind = Literal["result", "error", "stream", "display", "pong", "notice", "item", "input_request"]
Kind = ClientKind | WorkerKind
#: A received frame: (kind, task id, meta, buffers). Its kind is any string (unknown ones are ignored), not a Kind.
Frame = tuple[str, int, Any, list[bytearray]]


# What frames carry in their meta (plain dicts on the wire: these types cost nothing at run time).
class SetupMeta(TypedDict):
    info: dict[str, Any]  # InstanceInfo's fields
    env: NotRequired[dict[str, str]]
    store_port: NotRequired[int]  # where the head worker hosts the pool's shared collections


class SetupResult(TypedDict):
    hostname: str
    pid: int
    python: str


class CellMeta(TypedDict, total=False):
    code: Required[str]  # as the user wrote it (IPython syntax included)
    python: str  # the same as plain Python (IPython's transform), for nodes without IPython
    filename: str  # what tracebacks name (the client registers the cell's lines under it)
    inputs: list[tuple[str, int]]  # (name, number of buffers) of each input pickled into the frame, in order
    reads: list[str]  # every notebook value the cell reads, sent now or not: those it changed in place come back
    refs: dict[str, str]  # alias -> the name of a value the node already holds
    binds: list[str]  # the names the cell binds, to send back (or describe)
    budget: int  # bytes of values that may come back
    pull: bool  # whether values come back at all
    display: bool  # the last value's rich repr instead of the value itself


class PullMeta(TypedDict):
    names: list[str]


class StreamMeta(TypedDict):
    name: Literal["stdout", "stderr"]
    text: str


class ErrorMeta(TypedDict):
    type: str  # the exception's qualified name (builtins without their module)
    message: str
    traceback: str  # without the worker's own frames
    restarted: NotRequired[bool]  # the worker was restarted (the code ignored an interrupt): its namespace is lost


class PongMeta(TypedDict):
    busy: int  # the running task's id, 0 when idle
    pid: int
    rss: int  # the worker's resident memory in bytes (0 where it cannot tell)


class SharedMeta(TypedDict):
    """A :data:`SHARED` frame's meta: the work frame it stands for, and where its payload is on the node."""

    kind: Literal["task", "cell", "setup"]
    meta: Any  # the work frame's own meta
    key: str  # names the payload in the node's share folder (hex)
    copies: int  # carrier (the frame has the buffers): how many siblings read a copy; else 0
    copy: int  # a sibling (no buffers): which copy is its own, 1..copies; 0 for the carrier


class NoticeMeta(TypedDict):
    text: str
    kind: NotRequired[str]  # RECLAIM: EC2 takes the node back (a spot instance); the client fails its calls there
    action: NotRequired[str]  # what EC2 will do ("terminate", "stop", "hibernate")
    time: NotRequired[str]  # when, as EC2 says it (UTC, ISO 8601)


class InputRequestMeta(TypedDict):
    """A task asks for one line (``input()``, ``sys.stdin.readline()``) or a password (``getpass``)."""

    ask: int  # numbers the request on its worker; the reply names it
    prompt: str
    password: bool  # the answer is not echoed (the client asks with getpass)


class InputReplyMeta(TypedDict):
    """The client's answer to an :class:`InputRequestMeta`: the line, or why there is none."""

    ask: int
    value: NotRequired[str]  # the line, without its newline
    error: NotRequired[str]  # instead of a value: "EOFError", "KeyboardInterrupt", "StdinNotImplementedError"
    message: NotRequired[str]  # what the error says


#: :class:`NoticeMeta` ``kind`` of a spot reclaim notice.
RECLAIM: Final = "reclaim"


class Reader(Protocol):
    def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


def socket_reader(sock: socket.socket, buffering: int = 256 * 1024) -> io.BufferedReader:
    """A buffered reader of ``sock``, for :class:`FrameIO` (one ``recv`` brings a small frame whole)."""
    # typeshed types makefile("rb", buffering=n) as IOBase, which has no readinto; what it returns is this.
    return cast(io.BufferedReader, sock.makefile("rb", buffering=buffering))


class FrameError(SkyError, ValueError):
    """A frame that breaks the protocol (too large, or not a frame at all): the connection it came on is dropped."""


class HandshakeError(SkyError, ValueError):
    """A handshake frame that is not what the protocol says (not JSON, too large, a field missing or mistyped)."""


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def check_frame(head: int, sizes: Sequence[int], max_frame: int, max_buffers: int) -> None:
    """Raise :class:`FrameError` when a frame of this shape is over the limits."""
    if len(sizes) > max_buffers:
        raise FrameError(f"a frame of {len(sizes)} buffers is over the limit of {max_buffers} buffers")
    total = head + sum(sizes)
    if total > max_frame:
        raise FrameError(f"a frame of {_size(total)} is over the limit of {_size(max_frame)}")


def versions() -> Versions:
    """What must match between client and worker for pickles to travel both ways."""
    return {"python": ".".join(platform.python_version_tuple()[:2]), "cloudpickle": cloudpickle.__version__}


def content_hash(frames: Sequence[Any]) -> str:
    """A digest of a pickled value's frames: xxh3 where this Python has xxhash (about 9 GB/s on a 2-core VM), else
    sha256 (about 1 GB/s). Client and node compare only hashes they made themselves, so either may lack xxhash."""
    try:
        import xxhash

        digest: Any = xxhash.xxh3_128()
    except ImportError:
        digest = hashlib.sha256()
    for frame in frames:
        view = memoryview(frame)
        digest.update(view.nbytes.to_bytes(8, "little"))
        digest.update(view)
    return digest.hexdigest()


def dumps(obj: Any) -> list[bytes | memoryview]:
    """Cloudpickle ``obj`` with protocol-5 out-of-band buffers: ``[main, *buffers]``."""
    buffers: list[pickle.PickleBuffer] = []
    main = cloudpickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    return [main, *(b.raw() for b in buffers)]


def dumps_reply(obj: Any) -> list[bytes | memoryview]:
    """:func:`dumps` for what a worker sends back: the C pickler first (several times cheaper on the small replies
    every cell and task ends with), cloudpickle for what it cannot pickle (functions and classes defined in cells,
    which exist only by value). Not for what the client sends: in a notebook ``__main__`` holds the user's
    functions, which the C pickler would send by a reference that nodes cannot resolve."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        main = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    except Exception:  # noqa: BLE001 - whatever the C pickler refuses, cloudpickle gets a chance at
        return dumps(obj)
    return [main, *(b.raw() for b in buffers)]


def loads(frames: Sequence[bytes | bytearray | memoryview]) -> Any:
    return pickle.loads(frames[0], buffers=frames[1:])


def read_exact(reader: Reader, n: int) -> bytearray:
    buf = bytearray(n)
    got = reader.readinto(buf) if n else 0  # usually all of it at once
    if got == n:
        return buf
    if not got:
        raise EOFError("connection closed")
    view = memoryview(buf)
    while got < n:
        k = reader.readinto(view[got:])
        if not k:
            raise EOFError("connection closed")
        got += k
    return buf


class FrameIO:
    """Sends and receives frames over any byte stream (a socket, an SSH channel). Sending is thread-safe.

    ``max_frame`` and ``max_buffers`` bound every frame read (checked from its header, before allocating) and sent
    (checked before anything is written); None means the module's :data:`MAX_FRAME` and :data:`MAX_BUFFERS`.
    """

    def __init__(self, reader: Reader, sendall: Callable[[bytes | memoryview], Any],
                 close: Callable[[], Any] = lambda: None,
                 settimeout: Callable[[float | None], Any] | None = None) -> None:
        self._reader = reader
        self._sendall = sendall
        self._close = close
        #: Bounds each blocking read and write (None: no bound); a no-op for streams that cannot time out.
        self.settimeout: Callable[[float | None], Any] = settimeout or (lambda seconds: None)
        self._lock = threading.Lock()
        self.closed = False
        self.max_frame: int | None = None
        self.max_buffers: int | None = None

    @property
    def limits(self) -> tuple[int, int]:
        """(bytes, buffers) this stream's frames may have."""
        return (MAX_FRAME if self.max_frame is None else self.max_frame,
                MAX_BUFFERS if self.max_buffers is None else self.max_buffers)

    def send(self, kind: Kind, task_id: int = 0, meta: Any = None,
             payload: Sequence[bytes | memoryview] = (), before: bytes = b"") -> None:
        """Send one frame; ``before`` (whole frames from :func:`frame`) goes out first, in the same write."""
        head = pickle.dumps((kind, task_id, meta), protocol=5)
        self._send_parts(head, payload, before)

    def check_payload(self, payload: Sequence[bytes | memoryview]) -> None:
        """Raise :class:`FrameError` if a frame with this payload would be over the limits (before sending it)."""
        check_frame(0, [memoryview(p).nbytes for p in payload], *self.limits)

    def send_json(self, obj: Mapping[str, object]) -> None:
        self._send_parts(json.dumps(obj).encode(), ())

    def _send_parts(self, head: bytes, payload: Sequence[bytes | memoryview], before: bytes = b"") -> None:
        sizes = [memoryview(p).nbytes for p in payload]
        check_frame(len(head), sizes, *self.limits)
        prefix = _HEAD.pack(len(head), len(payload)) + b"".join(_LEN.pack(s) for s in sizes)
        with self._lock:
            if sum(sizes) + len(head) <= _SMALL:
                self._sendall(b"".join([before, prefix, head, *payload]))
            else:
                self._sendall(before + prefix + head)
                for part in payload:
                    self._sendall(part)

    def _recv_parts(self) -> tuple[bytes, list[bytearray]]:
        head_len, nbufs = _HEAD.unpack(read_exact(self._reader, _HEAD.size))
        max_frame, max_buffers = self.limits
        if nbufs > max_buffers:
            raise FrameError(f"a frame of {nbufs} buffers is over the limit of {max_buffers} buffers")
        if head_len > min(max_frame, MAX_HEAD):
            raise FrameError(f"a frame head of {_size(head_len)} is over the limit of "
                             f"{_size(min(max_frame, MAX_HEAD))}")
        rest = read_exact(self._reader, nbufs * _LEN.size + head_len)  # the buffer sizes and the head, in one read
        sizes = struct.unpack_from(f"!{nbufs}Q", rest) if nbufs else ()
        if nbufs and head_len + sum(sizes) > max_frame:
            check_frame(head_len, sizes, max_frame, max_buffers)
        head = bytes(memoryview(rest)[nbufs * _LEN.size:])
        return head, [read_exact(self._reader, s) for s in sizes]

    def recv(self) -> Frame:
        head, frames = self._recv_parts()
        try:
            kind, task_id, meta = pickle.loads(head)
        except Exception as exc:  # noqa: BLE001 - a head that is not one breaks the protocol, whatever it raised
            raise FrameError(f"a frame's head could not be read ({type(exc).__name__})") from None
        if type(kind) is not str or type(task_id) is not int:
            raise FrameError("a frame's head is not (kind, task id, meta)")
        return kind, task_id, meta, frames

    def recv_json(self, limit: int = HELLO_LIMIT) -> dict[str, Any]:
        """One handshake frame: a JSON object of at most ``limit`` bytes (:class:`HandshakeError` otherwise)."""
        head_len, nbufs = _HEAD.unpack(read_exact(self._reader, _HEAD.size))
        if nbufs or head_len > limit:
            raise HandshakeError(f"a handshake frame of {head_len} bytes and {nbufs} buffers, where one JSON object "
                                 f"of at most {limit} bytes belongs")
        try:
            obj = json.loads(bytes(read_exact(self._reader, head_len)))
        except (ValueError, RecursionError) as exc:  # RecursionError: deeply nested lists
            raise HandshakeError(f"a handshake frame that is not JSON ({type(exc).__name__})") from None
        if not isinstance(obj, dict):
            raise HandshakeError(f"a handshake frame holding a JSON {type(obj).__name__}, not an object")
        return obj

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._close()
            except OSError:
                pass


def frame(kind: Kind, task_id: int = 0, meta: Any = None) -> bytes:
    """A whole frame without buffers, as bytes (to go out with another frame: ``FrameIO.send(before=...)``)."""
    head = pickle.dumps((kind, task_id, meta), protocol=5)
    return _HEAD.pack(len(head), 0) + head


# -- the handshake ------------------------------------------------------------------------------------------
Side = Literal["client", "worker"]
CLIENT: Final = "client"  # who proves: each direction's proof has its own label
WORKER: Final = "worker"


class Versions(TypedDict):
    python: str  # major.minor
    cloudpickle: str


class Hello(TypedDict):
    """The worker's first frame: the protocol it speaks and its nonce, nothing about itself."""

    sky: int
    nonce: str


class Answer(Versions):
    """The client's answer: its nonce and its proof."""

    nonce: str
    mac: str


class WorkerState(TypedDict):
    """Who the worker is, told only to a client that has proven it knows the secret."""

    max_frame: int
    max_buffers: int
    pid: int
    generation: int  # restarts so far (a restarted worker lost its namespace)
    setup: bool  # whether a SETUP has run (a fresh worker needs one)
    rank: int
    tasks: list[int]  # every task it will still answer
    undelivered: list[int]  # those whose end no client can have seen
    free_port: int  # a free port on the node, for torch.distributed's MASTER_PORT
    store_port: int  # another, for the pool's shared collections (sky.dict...) when this worker is the head


class Reply(WorkerState, Versions):
    """The worker's reply to a client that proved itself: its own proof and state; ``ok`` False with ``error``
    when the versions differ."""

    ok: bool
    mac: str
    error: NotRequired[str]


class Refusal(TypedDict):
    """The worker's reply to a client without the secret: nothing else."""

    ok: Literal[False]
    error: str


def new_nonce() -> str:
    return secrets.token_hex(16)


def proof(secret: str, side: Side, worker_nonce: str, client_nonce: str) -> str:
    """What ``side`` sends to prove it knows ``secret``: an HMAC over both nonces, labelled with the side."""
    message = f"sky_jupyter/{PROTOCOL_VERSION} {side} proof\n{worker_nonce}\n{client_nonce}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def check_proof(secret: str, side: Side, worker_nonce: str, client_nonce: str, answer: object) -> bool:
    return isinstance(answer, str) and hmac.compare_digest(
        proof(secret, side, worker_nonce, client_nonce).encode(), answer.encode("utf-8", "replace"))


def _hex(n: int) -> Callable[[object], bool]:
    digits = frozenset("0123456789abcdef")
    return lambda v: isinstance(v, str) and len(v) == n and digits.issuperset(v)


def _short_text(v: object) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 64


def _count(v: object) -> bool:
    return type(v) is int and v >= 0


def _flag(v: object) -> bool:
    return type(v) is bool


def _task_ids(v: object) -> bool:
    return isinstance(v, list) and all(type(t) is int for t in v)


Check = Callable[[object], bool]
_VERSIONS: dict[str, Check] = {"python": _short_text, "cloudpickle": _short_text}
_LIMITS: dict[str, Check] = {"max_frame": _count, "max_buffers": _count}
#: Each handshake frame's fields and their checks (a frame may hold more fields; these must be there and valid):
#: the required keys of :class:`Hello`, :class:`Answer` and :class:`Reply`.
HELLO_FIELDS: dict[str, Check] = {"sky": _count, "nonce": _hex(32)}
ANSWER_FIELDS: dict[str, Check] = {"nonce": _hex(32), "mac": _hex(64), **_VERSIONS}
REPLY_FIELDS: dict[str, Check] = {
    "ok": _flag, "mac": _hex(64), **_VERSIONS, **_LIMITS, "pid": _count, "generation": _count, "setup": _flag,
    "rank": _count, "tasks": _task_ids, "undelivered": _task_ids, "free_port": _count, "store_port": _count}


def check_fields(obj: dict[str, Any], fields: dict[str, Check], what: str) -> dict[str, Any]:
    """``obj`` when each of ``fields`` is there and passes its check, else :class:`HandshakeError` naming it."""
    for key, valid in fields.items():
        if key not in obj:
            raise HandshakeError(f"{what} lacks {key!r}")
        if not valid(obj[key]):
            raise HandshakeError(f"{what} has an invalid {key!r} ({type(obj[key]).__name__})")
    return obj
