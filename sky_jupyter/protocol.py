"""The wire format between client and worker.

A frame is ``!II`` (length of the head, number of buffers), one ``!Q`` length per buffer, the head, then the
buffers. The head is a small standard pickle ``(kind, task_id, meta)``; the buffers, when present, hold one
cloudpickle payload: its main pickle first, then its protocol-5 out-of-band buffers, so large arrays travel
without being copied into one bytes object. Payloads are decoded by whoever needs the value (the task thread,
the caller), never by the reader thread, so a payload that fails to unpickle fails only its own task.

Before any pickle is read, both sides exchange JSON handshake frames: the worker announces its versions and a
nonce, the client answers with an HMAC of the nonce under the pool secret. Nothing is unpickled from a peer
that has not proven it knows the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import pickle
import platform
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import cloudpickle

PROTOCOL_VERSION = 1
READY = "SKY-READY"  # the line a starting worker prints, followed by {"port": ..., "pid": ...}
_HEAD = struct.Struct("!II")
_LEN = struct.Struct("!Q")
_SMALL = 64 * 1024

# Message kinds. Client -> worker:
TASK = "task"            # run a pickled (fn, args, kwargs)
CELL = "cell"            # run notebook cell code in the persistent namespace
SETUP = "setup"          # install plugins (around_app, decorate) and instance info, once per worker
PULL = "pull"            # send back named values from the namespace
INTERRUPT = "interrupt"  # raise KeyboardInterrupt in the running task
PING = "ping"            # heartbeat; answered with PONG
SHUTDOWN = "shutdown"    # exit (and clean up)
ACK = "ack"              # meta: ids of tasks whose result or error arrived; the worker stops holding them
# Worker -> client:
RESULT = "result"
ERROR = "error"
STREAM = "stream"        # meta: {"name": "stdout"|"stderr", "text": ...}
DISPLAY = "display"      # meta: a Jupyter MIME bundle message
PONG = "pong"
NOTICE = "notice"        # meta: {"text": ...} for the user, not tied to a task


class Reader(Protocol):
    def readinto(self, buffer: memoryview, /) -> int | None: ...


def versions() -> dict[str, str]:
    """What must match between client and worker for pickles to travel both ways."""
    return {"python": ".".join(platform.python_version_tuple()[:2]), "cloudpickle": cloudpickle.__version__}


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
    """Sends and receives frames over any byte stream (a socket, an SSH channel). Sending is thread-safe."""

    def __init__(self, reader: Reader, sendall: Callable[[bytes | memoryview], Any],
                 close: Callable[[], Any] = lambda: None) -> None:
        self._reader = reader
        self._sendall = sendall
        self._close = close
        self._lock = threading.Lock()
        self.closed = False

    def send(self, kind: str, task_id: int = 0, meta: Any = None,
             payload: Sequence[bytes | memoryview] = (), before: bytes = b"") -> None:
        """Send one frame; ``before`` (whole frames from :func:`frame`) goes out first, in the same write."""
        head = pickle.dumps((kind, task_id, meta), protocol=5)
        self._send_parts(head, payload, before)

    def send_json(self, obj: dict[str, Any]) -> None:
        self._send_parts(json.dumps(obj).encode(), ())

    def _send_parts(self, head: bytes, payload: Sequence[bytes | memoryview], before: bytes = b"") -> None:
        sizes = [memoryview(p).nbytes for p in payload]
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
        rest = read_exact(self._reader, nbufs * _LEN.size + head_len)  # the buffer sizes and the head, in one read
        sizes = struct.unpack_from(f"!{nbufs}Q", rest) if nbufs else ()
        head = bytes(memoryview(rest)[nbufs * _LEN.size:])
        return head, [read_exact(self._reader, s) for s in sizes]

    def recv(self) -> tuple[str, int, Any, list[bytearray]]:
        head, frames = self._recv_parts()
        kind, task_id, meta = pickle.loads(head)
        return kind, task_id, meta, frames

    def recv_json(self, limit: int = 64 * 1024) -> dict[str, Any]:
        head_len, nbufs = _HEAD.unpack(read_exact(self._reader, _HEAD.size))
        if nbufs or head_len > limit:
            raise ValueError("unexpected handshake frame")
        return json.loads(bytes(read_exact(self._reader, head_len)))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._close()
            except OSError:
                pass


def frame(kind: str, task_id: int = 0, meta: Any = None) -> bytes:
    """A whole frame without buffers, as bytes (to go out with another frame: ``FrameIO.send(before=...)``)."""
    head = pickle.dumps((kind, task_id, meta), protocol=5)
    return _HEAD.pack(len(head), 0) + head


def mac(secret: str, nonce: str) -> str:
    return hmac.new(secret.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def check_mac(secret: str, nonce: str, answer: str) -> bool:
    return hmac.compare_digest(mac(secret, nonce), str(answer))
