"""Trust both ways, probed with real parts: real Local workers on loopback, raw sockets, and impostor workers (plain
socket servers written here) that do or do not know the pool secret. Nothing from a peer that has not proven it
knows the secret is unpickled; malformed or oversized input closes one connection cleanly; secrets never come back
from nodes."""

from __future__ import annotations

import io
import json
import random
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import sky_jupyter as sky
from sky_jupyter import protocol as P
from sky_jupyter.node import RemoteWorker, WorkerLink
from sky_jupyter.providers.base import Host
from sky_jupyter.providers.local import LocalWorker
from sky_jupyter.redaction import redact, register

TOKEN = "hf_trustTESTtokenNEVERshown0123456789"
register(TOKEN)


class _Evil:
    """Unpickling this creates ``path``: the marker that something from an impostor was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# -- impostor workers ---------------------------------------------------------------------------------------------
class Impostor:
    """A plain socket server on loopback where a worker should be: ``script(sock, io)`` plays one connection."""

    def __init__(self, script: Callable[[socket.socket, P.FrameIO], None]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.script = script
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        with sock:
            try:
                self.script(sock, P.FrameIO(sock.makefile("rb"), sock.sendall, sock.close))
            except (OSError, EOFError):
                pass
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


def _until_closed(sock: socket.socket) -> None:
    """Keep the connection until the client closes it (at most 5 s)."""
    sock.settimeout(5)
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


@pytest.fixture
def impostor_node():
    """A client RemoteWorker whose worker handle (the Local provider's own) points at an impostor, not a worker."""
    made: list[tuple[Impostor, subprocess.Popen]] = []

    def make(script: Callable[[socket.socket, P.FrameIO], None], secret: str = "the-real-pool-secret") -> RemoteWorker:
        impostor = Impostor(script)
        stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "the worker runs"
        made.append((impostor, stand_in))
        handle = LocalWorker(stand_in, impostor.port, "node 0 (local)")
        return RemoteWorker(Host(0, "127.0.0.1", "127.0.0.1"), secret, lambda host, local: handle,
                            lambda worker: None, "trust-pool")

    yield make
    for impostor, stand_in in made:
        impostor.close()
        stand_in.kill()
        stand_in.wait()


def _full_reply(**fields: Any) -> dict[str, Any]:
    return {"ok": True, "mac": "0" * 64, **P.versions(), "max_frame": P.MAX_FRAME, "max_buffers": P.MAX_BUFFERS,
            "pid": 4242, "generation": 0, "setup": True, "rank": 0, "tasks": [], "undelivered": [], "free_port": 29500,
            "store_port": 29501, **fields}


def _evil_frame(marker: Path) -> bytes:
    head = __import__("pickle").dumps((P.RESULT, 1, _Evil(marker)), protocol=5)
    return struct.pack("!II", len(head), 0) + head


@pytest.mark.parametrize("proof", ["forged", "reflected"])
def test_a_worker_without_the_secret_is_refused_and_nothing_it_sends_is_unpickled(impostor_node, tmp_path, proof):
    marker = tmp_path / "unpickled"

    def script(sock: socket.socket, io: P.FrameIO) -> None:
        # What an older worker said, too, so any client version gets as far as the reply.
        io.send_json({"sky": P.PROTOCOL_VERSION, "nonce": secrets.token_hex(16), **P.versions(), "pid": 1,
                      "generation": 0, "setup": True, "rank": 0, "tasks": [], "undelivered": []})
        answer = io.recv_json()
        mac = answer["mac"] if proof == "reflected" else "0" * 64  # its own answer back, or made up
        sock.sendall(json_frame(_full_reply(mac=mac)) + _evil_frame(marker) + _evil_frame(marker))
        time.sleep(0.5)

    node = impostor_node(script)
    with pytest.raises(sky.AuthenticationError) as err:
        node.start_worker()
    assert "could not prove it belongs to pool 'trust-pool'" in str(err.value)
    assert "node 0 (127.0.0.1)" in str(err.value)
    time.sleep(0.3)
    assert not marker.exists()


def json_frame(obj: Any) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack("!II", len(body), 0) + body


@pytest.mark.parametrize("hello", [
    b"[1, 2, 3]",  # a list
    json.dumps({"sky": P.PROTOCOL_VERSION, "nonce": 12345}).encode(),  # a wrong type
    json.dumps({"sky": P.PROTOCOL_VERSION}).encode(),  # a missing key
    json.dumps({"sky": "2", "nonce": "ab" * 16}).encode(),
    b"\xff\xfe not json",
    b"[" * 3000,  # deep nesting
    None,  # a length of 2 GiB
])
def test_a_malformed_hello_is_a_clean_authentication_error(impostor_node, hello, capfd):
    def script(sock: socket.socket, io: P.FrameIO) -> None:
        sock.sendall(struct.pack("!II", 1 << 31, 0) if hello is None else struct.pack("!II", len(hello), 0) + hello)
        _until_closed(sock)

    node = impostor_node(script)
    with pytest.raises(sky.AuthenticationError, match="node 0 \\(127.0.0.1\\)"):
        node.start_worker()
    assert "Traceback" not in "".join(capfd.readouterr())


@pytest.mark.parametrize("change", [
    {"tasks": "all of them"}, {"pid": "4242"}, {"setup": 1}, {"undelivered": [1, "2"]}, {"max_frame": -1},
    {"python": ["3"]},
])
def test_a_proven_worker_with_a_malformed_reply_is_refused_too(impostor_node, change):
    """The reply is checked field by field even from a worker that knows the secret."""
    secret = "the-real-pool-secret"

    def script(sock: socket.socket, io: P.FrameIO) -> None:
        worker_nonce = P.new_nonce()
        io.send_json({"sky": P.PROTOCOL_VERSION, "nonce": worker_nonce})
        answer = io.recv_json()
        io.send_json(_full_reply(mac=P.proof(secret, P.WORKER, worker_nonce, answer["nonce"]), **change))
        _until_closed(sock)

    node = impostor_node(script, secret)
    with pytest.raises(sky.AuthenticationError, match="malformed"):
        node.start_worker()


# -- a real worker against malformed and idle connections -----------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    with sky.ComputePool(nodes=1, name="test-trust") as pool:
        yield pool


@pytest.fixture
def lone_worker():
    """A Local worker whose pool let go of it: the test's raw connections are its only clients."""
    with sky.ComputePool(nodes=1, name="trust-lone") as pool:
        pool.workers[0].detach()
        yield pool


def _raw(port: int) -> tuple[socket.socket, P.FrameIO]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, P.FrameIO(sock.makefile("rb"), sock.sendall, sock.close)


def _closed_by_peer(sock: socket.socket, within: float = 3.0) -> bool:
    """Whether the worker closes ``sock`` (reading past anything it sent first) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:  # reset
        pass
    return True


def _log(pool: sky.ComputePool) -> str:
    return pool.provider.read_log(pool.hosts[0])


@sky.compute
def double(x: int) -> int:
    return 2 * x


BAD_ANSWERS = {
    "a list": json_frame([1, 2, 3]),
    "wrong types": json_frame({"nonce": 5, "mac": ["x"], "python": 3, "cloudpickle": None}),
    "missing keys": json_frame({}),
    "a nonce too long": json_frame({"nonce": "ab" * 5000, "mac": "0" * 64}),
    "a huge length": struct.pack("!II", 0xFFFFFFFF, 0),
    "buffers": struct.pack("!II", 10, 5),
    "not JSON": struct.pack("!II", 9, 0) + b"\xff\x00abcdefg",
    "deep nesting": struct.pack("!II", 4000, 0) + b"[" * 4000,
    "a pickle": struct.pack("!II", 20, 0) + __import__("pickle").dumps(("task", 1, None))[:20],
    "a wrong mac": json_frame({"nonce": "ab" * 16, "mac": "0" * 64, **P.versions()}),
}


def test_malformed_answers_close_one_connection_each_and_the_worker_serves_on(pool, capfd):
    before = _log(pool).count("refused a connection")
    for name, data in BAD_ANSWERS.items():
        sock, io = _raw(pool.workers[0].handle.port)
        hello = io.recv_json()
        assert set(hello) == {"sky", "nonce"}, name  # no pid or versions before authentication
        sock.sendall(data)
        assert _closed_by_peer(sock), f"{name}: the worker kept the connection open"
        sock.close()
    assert double(21) >> pool == 42
    log = _log(pool)
    assert log.count("refused a connection") - before == len(BAD_ANSWERS)  # one line each
    assert "Traceback" not in log
    assert "Traceback" not in "".join(capfd.readouterr())


def test_idle_unauthenticated_connections_are_few_and_short_lived(pool, capfd):
    port = pool.workers[0].handle.port
    t0 = time.monotonic()
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    assert time.monotonic() - t0 < 1  # not one of them waited for the worker to accept it
    try:
        t0 = time.monotonic()
        assert [double(i) >> pool for i in range(5)] == [0, 2, 4, 6, 8]  # the real client is served meanwhile
        assert time.monotonic() - t0 < 2
        greeted = 0  # connections the worker took on (they got a hello); the rest it closed at once
        for sock in idle:
            sock.settimeout(3)
            data = sock.recv(4096)
            greeted += bool(data)
        assert greeted <= P.MAX_UNAUTHENTICATED
        # Those it took on, it closes once the handshake time is up.
        t0 = time.monotonic()
        assert all(_closed_by_peer(sock, P.HANDSHAKE_TIMEOUT + 3) for sock in idle)
        assert time.monotonic() - t0 < P.HANDSHAKE_TIMEOUT + 3
    finally:
        for sock in idle:
            sock.close()
    # A new connection authenticates as usual, and the pool's own link still works.
    sock, io = _raw(port)
    assert WorkerLink.handshake(io, pool.secret, "node 0", pool.name)["pid"] == pool.workers[0].handle.pid
    sock.close()
    assert double(4) >> pool == 8
    assert "Traceback" not in _log(pool)
    assert "Traceback" not in "".join(capfd.readouterr())


# -- frame limits ---------------------------------------------------------------------------------------------
def test_an_oversized_frame_from_the_client_is_refused_from_its_header(lone_worker):
    """An authenticated connection announcing a frame of 1 PiB is dropped with a log line naming the size and the
    limit; the worker lives on and serves the next connection."""
    port = lone_worker.workers[0].handle.port
    for header in (struct.pack("!II", 16, 1) + struct.pack("!Q", 1 << 50),  # one huge buffer
                   struct.pack("!II", 0xFFFFFFF0, 0),  # a huge head
                   struct.pack("!II", 16, 0xFFFFFFF0)):  # too many buffers
        sock, io = _raw(port)
        WorkerLink.handshake(io, lone_worker.secret, "node 0")
        sock.sendall(header + b"\x00" * 64)
        assert _closed_by_peer(sock)
        sock.close()
    assert lone_worker.workers[0].handle.alive()
    log = _log(lone_worker)
    assert f"bytes) is over the limit of 16.0 GiB ({16 << 30} bytes)" in log
    assert "a frame of 1024.0 TiB (" in log
    assert "a frame head of 4.0 GiB (4294967280 bytes) is over the limit of 1.0 GiB" in log
    assert f"a frame of {0xFFFFFFF0} buffers is over the limit of {P.MAX_BUFFERS} buffers" in log
    assert "Traceback" not in log
    sock, io = _raw(port)
    WorkerLink.handshake(io, lone_worker.secret, "node 0")
    io.send(P.TASK, 77, None, P.dumps((int, ("41",), {})))
    kind, task_id, _, frames = io.recv()
    while task_id != 77:  # the pool's own unacknowledged answers come first
        kind, task_id, _, frames = io.recv()
    assert (kind, P.loads(frames)) == (P.RESULT, 41)
    sock.close()


def _proven_worker(secret: str, then: Callable[[socket.socket, P.FrameIO, Any], None]):
    """An impostor that does know the secret (a worker gone wrong): it authenticates, then plays ``then`` with
    the first task it receives."""

    def script(sock: socket.socket, io: P.FrameIO) -> None:
        worker_nonce = P.new_nonce()
        io.send_json({"sky": P.PROTOCOL_VERSION, "nonce": worker_nonce})
        answer = io.recv_json()
        io.send_json(_full_reply(mac=P.proof(secret, P.WORKER, worker_nonce, answer["nonce"])))
        then(sock, io, io.recv())
        _until_closed(sock)

    return script


@pytest.mark.parametrize("limit", [None, 64 << 20])
def test_an_oversized_frame_from_the_worker_fails_the_call_with_size_and_limit(impostor_node, monkeypatch, limit):
    if limit is not None:
        monkeypatch.setattr(P, "MAX_FRAME", limit)
    claimed = (1 << 40) if limit is None else (1 << 30)
    secret = "the-real-pool-secret"

    def huge_result(sock: socket.socket, io: P.FrameIO, task: Any) -> None:
        head = __import__("pickle").dumps((P.RESULT, task[1], None), protocol=5)
        sock.sendall(struct.pack("!II", len(head), 1) + struct.pack("!Q", claimed) + head + b"\x00" * 1024)

    node = impostor_node(_proven_worker(secret, huge_result), secret)
    node.start_worker()
    tracemalloc.start()
    try:
        call = node.submit(P.TASK, None, P.dumps((int, ("1",), {})))
        t0 = time.monotonic()
        with pytest.raises(sky.ConnectionLostError) as err:
            call.wait(10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 5
    text = str(err.value)
    assert f"a frame of {'1.0 TiB' if limit is None else '1.0 GiB'} (" in text, text
    assert f"is over the limit of {P._size(P.MAX_FRAME)}" in text, text
    assert peak < 32 << 20  # the frame was never allocated
    node.closing = True


def test_the_client_refuses_to_send_a_frame_over_the_limit(pool, monkeypatch):
    """Checked before anything is sent: the worker never sees it, and the link stays up."""
    monkeypatch.setattr(pool.workers[0].link.io, "max_frame", 1 << 20)
    with pytest.raises(sky.SerializationError, match=r"over the limit of 1\.0 MiB \(1048576 bytes\)"):
        sky.compute(len)(b"x" * (2 << 20)) >> pool
    assert double(5) >> pool == 10


def test_a_result_over_the_limit_comes_back_as_an_error(monkeypatch):
    """A pool gives its workers this client's limit; a result over it goes back as an error saying so."""
    monkeypatch.setattr(P, "MAX_FRAME", 2 << 20)
    with sky.ComputePool(nodes=1, name="trust-small-frames") as small:
        with pytest.raises(sky.RemoteError, match=r"result is too large to send back.*2\.0 MiB") as err:
            sky.compute(bytes)(3 << 20) >> small
        assert err.value.type_name == "sky_jupyter.protocol.FrameError"
        assert sky.compute(len)(b"x" * (1 << 20)) >> small == 1 << 20


def test_a_failed_reader_fails_calls_at_once(impostor_node):
    """A frame the client cannot take (here: a head that is no frame head) drops the link with the reason; the
    waiting call fails at once instead of hanging."""
    secret = "the-real-pool-secret"

    def bad_head(sock: socket.socket, io: P.FrameIO, task: Any) -> None:
        head = __import__("pickle").dumps(["not", "a", "head", "tuple"], protocol=5)
        sock.sendall(struct.pack("!II", len(head), 0) + head)

    node = impostor_node(_proven_worker(secret, bad_head), secret)
    node.start_worker()
    call = node.submit(P.TASK, None, P.dumps((int, ("1",), {})))
    with pytest.raises(sky.ConnectionLostError, match="dropped.*head"):
        call.wait(5)
    node.closing = True


# -- fuzzing ----------------------------------------------------------------------------------------------------
def _mutations(rng: random.Random, valid: bytes, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            what = rng.random()
            if what < 0.4 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif what < 0.6:
                data[0:8] = struct.pack("!II", rng.choice([0, 1, 7, 4096, 4097, 1 << 20, 0xFFFFFFFF]),
                                        rng.choice([0, 0, 1, 3, 0xFFFFFFFF]))
            elif what < 0.8:
                data = data[:rng.randrange(len(data) + 1)]
            else:
                data += bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
        out.append(bytes(data))
    return out


def test_fuzzed_frames_raise_only_protocol_errors_in_process():
    """The parsers themselves: random and mutated bytes raise FrameError, HandshakeError or EOFError, nothing
    else (no MemoryError from a size, no RecursionError from nesting)."""
    rng = random.Random(1234)
    frame = P.frame(P.TASK, 5, {"code": "x = 1"})
    frame_with_buffer = struct.pack("!II", 20, 1) + struct.pack("!Q", 3) + P.frame(P.PING, 1)[8:28] + b"abc"
    answer = json_frame({"nonce": "ab" * 16, "mac": "0" * 64, **P.versions()})
    inputs = (_mutations(rng, frame, 700) + _mutations(rng, frame_with_buffer, 700) + _mutations(rng, answer, 700)
              + [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(300)])
    for data in inputs:
        for read in (lambda f: f.recv(), lambda f: P.check_fields(f.recv_json(), P.ANSWER_FIELDS, "fuzz")):
            stream = P.FrameIO(io.BytesIO(data), lambda b: None)
            stream.max_frame = 1 << 20  # sizes under the limit are allocated: keep those small here
            try:
                read(stream)
            except (P.FrameError, P.HandshakeError, EOFError):
                pass


def test_fuzzed_handshakes_and_frames_never_crash_the_worker(lone_worker, capfd):
    """A bounded fuzz (fixed seed, about two seconds) against a real worker: mutated handshake answers, then
    mutated frames on authenticated connections. Each costs at most its own connection."""
    rng = random.Random(20240611)
    port = lone_worker.workers[0].handle.port
    answer = json_frame({"nonce": "ab" * 16, "mac": "0" * 64, **P.versions()})
    task = P.frame(P.TASK, 3, None)
    end = time.monotonic() + 2.0
    tried = 0
    while time.monotonic() < end:
        sock, fio = _raw(port)
        try:
            if tried % 2:
                WorkerLink.handshake(fio, lone_worker.secret, "node 0")
                data = _mutations(rng, task, 1)[0]
            else:
                fio.recv_json()
                data = _mutations(rng, answer, 1)[0]
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # a frame cut short ends here, not at the handshake timeout
            _closed_by_peer(sock, 2)
        except (OSError, EOFError, sky.AuthenticationError):
            pass  # turned away while many were authenticating: fine
        finally:
            sock.close()
        tried += 1
    assert tried > 50
    assert lone_worker.workers[0].handle.alive()
    sock, fio = _raw(port)
    WorkerLink.handshake(fio, lone_worker.secret, "node 0")
    fio.send(P.TASK, 99, None, P.dumps((int, ("6",), {})))
    kind, task_id, _, frames = fio.recv()
    while task_id != 99:  # answers to fuzzed tasks that happened to be valid come first
        kind, task_id, _, frames = fio.recv()
    assert (kind, P.loads(frames)) == (P.RESULT, 6)
    sock.close()
    assert "Traceback" not in _log(lone_worker)
    assert "Traceback" not in "".join(capfd.readouterr())


# -- secrets never come back --------------------------------------------------------------------------------------
class LeakyError(Exception):
    def __init__(self, token: str) -> None:
        super().__init__(f"leaky {token}")
        self.token = token


class Unrebuildable(Exception):
    def __init__(self, a: str, b: str) -> None:  # pickles, but cannot be rebuilt from its args
        super().__init__(f"{a} {b}")


@sky.compute
def leak(token: str, how: str) -> None:
    print("token is", token)
    print(token[:9], end="", flush=True)  # a chunk that ends inside the secret...
    time.sleep(0.3)
    print(token[9:], "(split)")  # ...and the next one, 0.3 s later
    print(f"err {token}", file=sys.stderr)
    print("tail " + token[:4], end="")  # ends like the start of the secret: shown, at the end
    if how == "value":
        raise ValueError(f"bad token {token}")
    if how == "attribute":
        raise LeakyError(token)
    raise Unrebuildable("unrebuildable", token)


def _all_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(vars(exc)) + str(exc.__cause__)


@pytest.mark.parametrize("how", ["value", "attribute", "unrebuildable"])
def test_a_task_that_prints_and_raises_the_token_shows_neither(pool, capfd, how):
    with pytest.raises(Exception) as err:
        leak(TOKEN, how) >> pool
    out, errout = capfd.readouterr()
    assert TOKEN not in out + errout and TOKEN[9:] not in out + errout
    assert out == "token is ***\n*** (split)\ntail hf_t"
    assert "err ***" in errout
    text = _all_text(err.value)
    assert TOKEN not in text and "***" in text
    assert TOKEN not in "".join(getattr(err.value, "__notes__", ()))
    if how == "value":
        assert type(err.value) is ValueError and str(err.value) == "bad token ***"
        assert "ValueError: bad token ***" in err.value.__cause__.tb  # the remote traceback
    elif how == "attribute":
        assert type(err.value) is LeakyError and err.value.token == "***"
    else:
        assert isinstance(err.value, sky.RemoteError) and err.value.message == "unrebuildable ***"


def test_display_bundles_and_cell_values_are_scrubbed(pool):
    shown: list[tuple[str, Any]] = []
    code = (f"from IPython.display import HTML, Markdown, display\n"
            f"token = {TOKEN!r}\n"
            f"display(HTML('<b>' + token + '</b>'))\n"
            f"display(Markdown('*' + token + '*'))\n"
            f"token\n")
    call = pool.workers[0].submit(P.CELL, {"code": code, "python": code, "display": True, "filename": "<trust>"},
                                sink=lambda kind, meta: shown.append((kind, meta)))
    result = call.wait(60)
    displays = [meta for kind, meta in shown if kind == P.DISPLAY]
    assert [d["data"].get("text/html") for d in displays][:1] == ["<b>***</b>"]
    assert "*" + "***" + "*" in str(displays[1]["data"])
    assert TOKEN not in repr(shown) and TOKEN not in repr(result["display"])
    assert result["display"]["data"]["text/plain"] == "'***'"


def test_credentials_in_the_clients_environment_are_registered_when_a_pool_starts(monkeypatch, capfd):
    key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYtrustTESTkey"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key)
    with sky.ComputePool(nodes=1, name="trust-env") as env_pool:
        sky.compute(print)("the key:", key) >> env_pool
    out = capfd.readouterr().out
    assert key not in out and "the key: ***" in out


def test_the_stream_redactor_catches_a_secret_split_anywhere():
    from sky_jupyter.redaction import StreamRedactor

    secret = "sk_trustSPLIT0123456789"
    register(secret)
    text = f"a {secret} b {secret}\n c"
    for cut in range(1, len(text)):
        for cut2 in range(cut, len(text), 5):
            scrub = StreamRedactor()
            shown = scrub.feed("k", text[:cut]) + scrub.feed("k", text[cut:cut2]) + scrub.feed("k", text[cut2:])
            shown += scrub.flush("k")
            assert shown == redact(text) == "a *** b ***\n c", (cut, cut2)


def test_hf_token_cannot_be_set_with_sky_config(shell, capsys):
    from sky_jupyter.notebook.manager import manager

    before = manager().settings.hf_token
    shell.run_cell("%sky config hf_token=hf_typedIntoACellxxxxxxxxxxxx nodes=1", store_history=False)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "does not take hf_token" in text and "HF_TOKEN" in text and "hf auth login" in text
    assert "hf_typedIntoACell" not in text
    assert manager().settings.hf_token == before
    manager().configure(hf_token="hf_fromThePanelxxxxxxxxxxxx")  # the panel's way still works
    assert manager().settings.hf_token == "hf_fromThePanelxxxxxxxxxxxx"
    manager().configure(hf_token=before)


def test_a_peer_that_accepts_and_never_speaks_fails_the_connect_instead_of_hanging(monkeypatch):
    """Whatever holds a worker's port but never answers: the client gives up after its handshake timeout."""
    import socket as socket_module

    from sky_jupyter import node as node_module
    from sky_jupyter.errors import ConnectionLostError
    from sky_jupyter.providers.base import Host
    from sky_jupyter.providers.local import LocalWorker

    monkeypatch.setattr(node_module, "HANDSHAKE_TIMEOUT", 0.5)
    with socket_module.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        handle = LocalWorker.__new__(LocalWorker)
        handle.port = silent.getsockname()[1]
        node = node_module.RemoteWorker(Host(rank=0, addr="127.0.0.1", private_addr="127.0.0.1"), "s" * 32,
                                        lambda h, local: handle, lambda n: None, "silent-pool")
        node.handle = handle
        started = time.monotonic()
        with pytest.raises(ConnectionLostError, match="did not answer its handshake within"):
            node._connect()
        assert time.monotonic() - started < 5
