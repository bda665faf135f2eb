"""Collections every worker of a pool shares (Skyward's names): ``sky.dict(name)``, ``sky.set(name)``,
``sky.counter(name)``, ``sky.queue(name)``, ``sky.barrier(name, n)``, ``sky.lock(name)``.

The head worker (rank 0) hosts them: at pool setup it listens on a port its node found free (told to every worker
with the rest of the pool's layout), on every interface, since the other nodes reach it at the head's private
address as torch.distributed does. A connection proves it knows the pool secret first (an HMAC over a nonce the
head sends), and only then is a pickle read from it. Each process keeps one connection per thread.

Consistency: one copy of each collection, on the head, each operation applied whole under that collection's lock,
in the order the head receives them: every worker sees every completed operation (linearizable). There is no
caching: each operation is one round trip to the head (well under a millisecond inside a VPC). Values are pickled
(cloudpickle), so what a worker reads is a copy: ``d["k"].append(1)`` changes nothing on the head; write it back.
The collections live as long as the head worker: a restarted head starts empty.

Only the standard library and cloudpickle: this module runs on the nodes.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import pickle
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import cloudpickle

from .errors import ConfigError, SkyError

_LEN = struct.Struct("!I")
_MAX_MESSAGE = 1 << 30
_CONNECT_WAIT = 30.0  # seconds a worker retries reaching the head (it may still be starting its store)


class StoreError(SkyError):
    """A shared collection could not be reached or used (no pool, the head gone, a wrong type for a name)."""


def _proof(secret: str, nonce: bytes) -> bytes:
    return hmac.new(secret.encode(), b"sky-store\n" + nonce, hashlib.sha256).hexdigest().encode()


def _send(sock: socket.socket, obj: Any) -> None:
    data = cloudpickle.dumps(obj)
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the shared-collections connection closed")
        buf += chunk
    return bytes(buf)


def _recv(sock: socket.socket) -> Any:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    if n > _MAX_MESSAGE:
        raise StoreError(f"a shared-collections message of {n} bytes is over the limit")
    return pickle.loads(_recv_exact(sock, n))


# -- the head's side -------------------------------------------------------------------------------------------
class _Collections:
    """What the head holds: every collection by (kind, name), each with its own condition."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._items: dict[tuple[str, str], tuple[threading.Condition, Any]] = {}

    def get(self, kind: str, name: str, parties: int | None = None) -> tuple[threading.Condition, Any]:
        with self._guard:
            found = self._items.get((kind, name))
            if found is None:  # each kind has names of its own: sky.dict("x") and sky.lock("x") are two things
                makers: dict[str, Callable[[], Any]] = {
                    "dict": dict, "set": set, "counter": lambda: [0], "queue": collections.deque,
                    "lock": lambda: [None], "barrier": lambda: {"parties": parties, "count": 0, "generation": 0}}
                value = makers[kind]()
                found = self._items[(kind, name)] = (threading.Condition(), value)
            elif kind == "barrier" and found[1]["parties"] != parties:
                raise StoreError(f"barrier {name!r} was made for {found[1]['parties']} parties, not {parties}")
            return found

    def apply(self, kind: str, name: str, op: str, args: tuple[Any, ...]) -> Any:
        parties = args[0] if kind == "barrier" else None
        cond, value = self.get(kind, name, parties)
        with cond:
            return getattr(self, f"_{kind}")(cond, value, op, *args)

    @staticmethod
    def _dict(cond: threading.Condition, d: dict[Any, Any], op: str, *args: Any) -> Any:
        match op:
            case "get":
                return d.get(args[0], args[1])
            case "set":
                d[args[0]] = args[1]
            case "delete":
                return d.pop(args[0], _MISSING) is not _MISSING
            case "contains":
                return args[0] in d
            case "len":
                return len(d)
            case "items":
                return list(d.items())
            case "update":
                d.update(args[0])
            case "pop":
                return d.pop(args[0], args[1])
            case "setdefault":
                return d.setdefault(args[0], args[1])
            case "clear":
                d.clear()
        return None

    @staticmethod
    def _set(cond: threading.Condition, s: set[Any], op: str, *args: Any) -> Any:
        match op:
            case "add":
                new = args[0] not in s
                s.add(args[0])
                return new
            case "discard":
                old = args[0] in s
                s.discard(args[0])
                return old
            case "contains":
                return args[0] in s
            case "len":
                return len(s)
            case "members":
                return list(s)
            case "clear":
                s.clear()
        return None

    @staticmethod
    def _counter(cond: threading.Condition, box: list[int], op: str, *args: Any) -> Any:
        if op == "add":
            box[0] += args[0]
        elif op == "set":
            box[0] = args[0]
        return box[0]

    @staticmethod
    def _queue(cond: threading.Condition, q: collections.deque[Any], op: str, *args: Any) -> Any:
        match op:
            case "put":
                q.append(args[0])
                cond.notify()
            case "get":
                if not cond.wait_for(lambda: q, timeout=args[0]):
                    return _EMPTY
                return q.popleft()
            case "len":
                return len(q)
        return None

    @staticmethod
    def _barrier(cond: threading.Condition, b: dict[str, int], op: str, parties: int, timeout: float | None) -> Any:
        generation = b["generation"]
        b["count"] += 1
        arrived = b["count"]
        if arrived == parties:
            b["count"], b["generation"] = 0, generation + 1
            cond.notify_all()
            return arrived - 1
        if not cond.wait_for(lambda: b["generation"] != generation, timeout=timeout):
            b["count"] -= 1
            return _TIMED_OUT
        return arrived - 1

    @staticmethod
    def _lock(cond: threading.Condition, box: list[str | None], op: str, owner: str, timeout: float | None = None
              ) -> Any:
        if op == "acquire":
            if not cond.wait_for(lambda: box[0] is None, timeout=timeout):
                return False
            box[0] = owner
            return True
        if box[0] != owner:
            return False
        box[0] = None
        cond.notify()
        return True


_MISSING = object()
_EMPTY = "<sky-store: empty>"
_TIMED_OUT = "<sky-store: timed out>"


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        nonce = secrets.token_hex(16).encode()
        try:
            sock.settimeout(10)
            sock.sendall(nonce)
            if not hmac.compare_digest(_recv_exact(sock, 64), _proof(self.server.secret, nonce)):
                return  # not one of the pool's: it learns nothing, and nothing of it is unpickled
            sock.sendall(b"ok")
            sock.settimeout(None)
            while True:
                kind, name, op, args = _recv(sock)
                try:
                    answer: tuple[bool, Any] = (True, self.server.collections.apply(kind, name, op, args))
                except Exception as exc:  # noqa: BLE001 - goes back to the caller
                    answer = (False, exc)
                _send(sock, answer)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, secret: str) -> None:
        self.secret = secret
        self.collections = _Collections()
        super().__init__(("", port), _Handler)


_server: _Server | None = None


def serve(port: int, secret: str) -> int:
    """On the head worker: host the pool's collections on ``port`` (once per process); the port it listens on."""
    global _server
    if _server is None:
        _server = _Server(port, secret)
        threading.Thread(target=_server.serve_forever, daemon=True, name="sky-store").start()
    return int(_server.server_address[1])


# -- every worker's side ---------------------------------------------------------------------------------------
_where: tuple[str, int, str] | None = None  # (head address, port, secret), set at setup
_local = threading.local()


def configure(addr: str, port: int, secret: str) -> None:
    """At setup: where this worker reaches its pool's collections."""
    global _where
    _where = (addr, port, secret)
    _local.__dict__.clear()


def _connection() -> socket.socket:
    sock = getattr(_local, "sock", None)
    if sock is not None and getattr(_local, "pid", None) == os.getpid():
        return sock
    if _where is None:
        raise ConfigError("sky.dict, sky.set, sky.counter, sky.queue, sky.barrier and sky.lock are shared by the "
                          "workers of a pool: use them in code that runs on a pool (a @sky.compute task, a %%sky "
                          "cell).")
    addr, port, secret = _where
    deadline = time.monotonic() + _CONNECT_WAIT
    while True:
        try:
            sock = socket.create_connection((addr, port), timeout=10)
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise StoreError(f"the pool's shared collections on its head worker ({addr}:{port}) cannot be "
                                 f"reached ({exc}); every node must reach node 0 at that address and port") from None
            time.sleep(0.1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    nonce = _recv_exact(sock, 32)
    sock.sendall(_proof(secret, nonce))
    if _recv_exact(sock, 2) != b"ok":
        raise StoreError("the head worker refused this worker's proof of the pool secret")
    sock.settimeout(None)
    _local.sock, _local.pid = sock, os.getpid()
    return sock


def _call(kind: str, name: str, op: str, *args: Any) -> Any:
    sock = _connection()
    try:
        _send(sock, (kind, name, op, args))
        ok, value = _recv(sock)
    except (OSError, EOFError) as exc:
        _local.__dict__.clear()
        raise StoreError(f"shared {kind} {name!r}: the connection to the head worker broke ({exc})") from None
    if not ok:
        raise value
    return value


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"a shared collection needs a name (a non-empty string), got {name!r}")
    return name


class Dict(MutableMapping[Any, Any]):
    """``sky.dict(name)``: a dict every worker of the pool shares."""

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)

    def __getitem__(self, key: Any) -> Any:
        value = _call("dict", self.name, "get", key, _EMPTY)
        if isinstance(value, str) and value == _EMPTY:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        return _call("dict", self.name, "get", key, default)

    def __setitem__(self, key: Any, value: Any) -> None:
        _call("dict", self.name, "set", key, value)

    def __delitem__(self, key: Any) -> None:
        if not _call("dict", self.name, "delete", key):
            raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return bool(_call("dict", self.name, "contains", key))

    def __len__(self) -> int:
        return int(_call("dict", self.name, "len"))

    def __iter__(self) -> Iterator[Any]:
        return iter([k for k, _ in self.items()])

    def items(self) -> list[tuple[Any, Any]]:  # type: ignore[override]
        """A snapshot of the pairs."""
        return list(_call("dict", self.name, "items"))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:
        _call("dict", self.name, "update", {**dict(other), **kwargs})

    def pop(self, key: Any, default: Any = _EMPTY) -> Any:
        value = _call("dict", self.name, "pop", key, _EMPTY)
        if isinstance(value, str) and value == _EMPTY:
            if isinstance(default, str) and default == _EMPTY:
                raise KeyError(key)
            return default
        return value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        return _call("dict", self.name, "setdefault", key, default)

    def clear(self) -> None:
        _call("dict", self.name, "clear")

    def __repr__(self) -> str:
        return f"sky.dict({self.name!r})"


class Set:
    """``sky.set(name)``: a set every worker of the pool shares."""

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)

    def add(self, item: Any) -> bool:
        """Add ``item``; whether it was new (so exactly one worker sees True for each item)."""
        return bool(_call("set", self.name, "add", item))

    def discard(self, item: Any) -> bool:
        return bool(_call("set", self.name, "discard", item))

    def __contains__(self, item: object) -> bool:
        return bool(_call("set", self.name, "contains", item))

    def __len__(self) -> int:
        return int(_call("set", self.name, "len"))

    def __iter__(self) -> Iterator[Any]:
        return iter(_call("set", self.name, "members"))

    def clear(self) -> None:
        _call("set", self.name, "clear")

    def __repr__(self) -> str:
        return f"sky.set({self.name!r})"


class Counter:
    """``sky.counter(name)``: a number every worker of the pool adds to atomically."""

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)

    def add(self, n: int = 1) -> int:
        """Add ``n``; the new value."""
        return int(_call("counter", self.name, "add", n))

    def increment(self, n: int = 1) -> int:
        return self.add(n)

    def decrement(self, n: int = 1) -> int:
        return self.add(-n)

    @property
    def value(self) -> int:
        return int(_call("counter", self.name, "get"))

    def reset(self, value: int = 0) -> None:
        _call("counter", self.name, "set", value)

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"sky.counter({self.name!r})"


class Queue:
    """``sky.queue(name)``: a first-in first-out queue every worker of the pool shares."""

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)

    def put(self, item: Any) -> None:
        _call("queue", self.name, "put", item)

    def get(self, timeout: float | None = None) -> Any:
        """The oldest item, waiting up to ``timeout`` seconds (None: until one comes); ``queue.Empty`` after."""
        import queue

        value = _call("queue", self.name, "get", timeout)
        if isinstance(value, str) and value == _EMPTY:
            raise queue.Empty(f"sky.queue({self.name!r}) stayed empty for {timeout} s")
        return value

    def __len__(self) -> int:
        return int(_call("queue", self.name, "len"))

    def qsize(self) -> int:
        return len(self)

    def __repr__(self) -> str:
        return f"sky.queue({self.name!r})"


class Barrier:
    """``sky.barrier(name, n)``: ``wait()`` returns once ``n`` workers have called it (then it resets)."""

    def __init__(self, name: str, n: int) -> None:
        self.name = _check_name(name)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"sky.barrier({name!r}, n) needs n, a whole number of parties from 1, got {n!r}")
        self.parties = n

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the others; this worker's arrival index (0 .. n-1). TimeoutError after ``timeout`` s."""
        index = _call("barrier", self.name, "wait", self.parties, timeout)
        if isinstance(index, str) and index == _TIMED_OUT:
            raise TimeoutError(f"sky.barrier({self.name!r}, {self.parties}): not every party arrived within "
                               f"{timeout} s")
        return int(index)

    def __repr__(self) -> str:
        return f"sky.barrier({self.name!r}, {self.parties})"


class Lock:
    """``sky.lock(name)``: one holder at a time across the pool; a context manager."""

    def __init__(self, name: str) -> None:
        self.name = _check_name(name)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}:{secrets.token_hex(4)}"

    def acquire(self, timeout: float | None = None) -> bool:
        return bool(_call("lock", self.name, "acquire", self._owner, timeout))

    def release(self) -> None:
        if not _call("lock", self.name, "release", self._owner):
            raise RuntimeError(f"sky.lock({self.name!r}) is not held here")

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"sky.lock({self.name!r})"


def dict_(name: str) -> Dict:
    return Dict(name)


def set_(name: str) -> Set:
    return Set(name)


def counter(name: str) -> Counter:
    return Counter(name)


def queue(name: str) -> Queue:
    return Queue(name)


def barrier(name: str, n: int) -> Barrier:
    return Barrier(name, n)


def lock(name: str) -> Lock:
    return Lock(name)
