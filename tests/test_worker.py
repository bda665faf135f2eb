"""The worker's guard rails, probed from outside with raw sockets: secret, no unpickling before auth,
localhost only, version check."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import struct
import time
from pathlib import Path

import cloudpickle
import pytest

import sky_jupyter as sky
from sky_jupyter import protocol as P
from tests.waiting import wait_for

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def _raw(port: int) -> tuple[socket.socket, P.FrameIO]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    return sock, P.FrameIO(sock.makefile("rb"), sock.sendall, sock.close)


def test_wrong_secret_is_refused_and_worker_keeps_serving(local_pool):
    node = local_pool.workers[0]
    sock, io = _raw(node.handle.port)
    hello = io.recv_json()
    assert set(hello) == {"sky", "nonce"}  # nothing about the worker before the client proves it knows the secret
    nonce = P.new_nonce()
    io.send_json({"nonce": nonce, "mac": P.proof("not-the-secret", P.CLIENT, hello["nonce"], nonce), **P.versions()})
    answer = io.recv_json()
    assert answer == {"ok": False, "error": "authentication failed: wrong pool secret"}
    sock.close()
    with pytest.raises(sky.AuthenticationError, match="refused"):
        sock, io = _raw(node.handle.port)
        sky.node.WorkerLink.handshake(io, "wrong", "node 0")
    assert sky.compute(lambda: 7)() >> local_pool == 7


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_nothing_is_unpickled_before_authentication(local_pool, tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.path = marker
    blob = pickle.dumps(("task", 1, None), protocol=5) + cloudpickle.dumps(evil)
    sock, io = _raw(local_pool.workers[0].handle.port)
    io.recv_json()
    # A pickle frame where the handshake answer belongs: the worker must reject it, not load it.
    sock.sendall(struct.pack("!II", len(blob), 0) + blob)
    try:
        sock.recv(100)
    except OSError:
        pass
    sock.close()
    assert not marker.exists()
    assert sky.compute(lambda: 8)() >> local_pool == 8


def test_worker_listens_on_localhost_only(local_pool):
    port = local_pool.workers[0].handle.port
    pid = local_pool.workers[0].handle.pid
    rows = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    listening = [r.split()[1] for r in rows if r.split()[3] == "0A" and int(r.split()[1].split(":")[1], 16) == port]
    assert listening == [f"0100007F:{port:04X}"]


def test_cloudpickle_version_mismatch_is_refused(tmp_path):
    """A worker whose cloudpickle differs (a real copy of the package with another version) is refused."""
    other = tmp_path / "site"
    shutil.copytree(Path(cloudpickle.__file__).parent, other / "cloudpickle")
    init = other / "cloudpickle" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{cloudpickle.__version__}"', '__version__ = "0.0.1"'))
    root = str(Path(sky.__file__).resolve().parents[1])
    image = sky.Image(env={"PYTHONPATH": f"{other}:{root}"})
    with pytest.raises(sky.VersionMismatchError, match=r"cloudpickle 0\.0\.1.*cloudpickle " + cloudpickle.__version__):
        with sky.ComputePool(nodes=1, image=image, name="test-mismatch"):
            pass


def test_worker_config_never_on_command_line(local_pool):
    pid = local_pool.workers[0].handle.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
    assert local_pool.secret not in cmdline
    assert local_pool.secret not in json.dumps(dict(os.environ))


@pytest.fixture
def lone_worker():
    """A Local worker whose pool let go of it: the test's raw connections are its only clients."""
    with sky.ComputePool(nodes=1, name="lone-worker") as pool:
        pool.workers[0].detach()
        yield pool


def _authenticated(pool: sky.ComputePool) -> tuple[dict, socket.socket, P.FrameIO]:
    sock, io = _raw(pool.workers[0].handle.port)
    hello = sky.node.WorkerLink.handshake(io, pool.secret, "node 0")
    return hello, sock, io


def _recv_for(io: P.FrameIO, task_id: int) -> tuple:
    """The next frame about ``task_id`` (the pool's own unacknowledged answers come first)."""
    while True:
        frame = io.recv()
        if frame[1] == task_id:
            return frame


def test_a_result_is_held_until_acknowledged_and_sent_again_to_the_next_connection(lone_worker):
    """An answer written into a connection that then drops is not lost: the worker sends it again to the next
    one, and names the task in its greeting, until the client acknowledges it."""
    task_id = 2 ** 62 + 1
    _, sock, io = _authenticated(lone_worker)
    io.send(P.TASK, task_id, None, P.dumps((int, ("41",), {})))
    assert _recv_for(io, task_id)[0] == P.RESULT
    sock.shutdown(socket.SHUT_RDWR)  # gone before acknowledging
    sock.close()
    hello, sock, io = _authenticated(lone_worker)
    assert task_id in hello["tasks"] and task_id not in hello["undelivered"]  # it was sent once
    kind, _, _, frames = _recv_for(io, task_id)
    assert (kind, P.loads(frames)) == (P.RESULT, 41)
    io.send(P.PING, 5, None, before=P.frame(P.ACK, 0, [task_id]))  # the acknowledgement rides in front
    assert _recv_for(io, 5)[0] == P.PONG
    sock.close()
    hello, sock, io = _authenticated(lone_worker)
    assert task_id not in hello["tasks"]
    sock.close()


def test_a_task_that_arrives_twice_runs_once(lone_worker, tmp_path):
    counter = tmp_path / "runs"
    task_id = 2 ** 62 + 2

    def count() -> int:
        with open(counter, "a") as f:
            f.write("x")
        return counter.stat().st_size

    _, sock, io = _authenticated(lone_worker)
    payload = P.dumps((count, (), {}))
    io.send(P.TASK, task_id, None, payload)
    io.send(P.TASK, task_id, None, payload)  # a late copy of a task the client sent again
    io.send(P.TASK, task_id + 1, None, payload)  # tasks run in order: had the copy run, this would count 3
    answers = []
    while len(answers) < 2:
        kind, got, _, frames = io.recv()
        if got in (task_id, task_id + 1):
            answers.append((kind, got, P.loads(frames)))
    assert answers == [(P.RESULT, task_id, 1), (P.RESULT, task_id + 1, 2)]
    sock.close()


def _answer(io: P.FrameIO, task_id: int, timeout: float = 10.0) -> tuple:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        frame = io.recv()
        if frame[1] == task_id and frame[0] in (P.RESULT, P.ERROR, P.PONG):
            return frame
    raise AssertionError(f"no answer for {task_id}")


def test_a_running_task_leaves_heartbeats_interrupts_and_queued_tasks_to_the_connection_thread(lone_worker):
    """Between tasks the main thread reads the connection itself; once a task runs, the connection's thread
    takes over: a heartbeat is answered and an interrupt stops the task while it runs, and a task sent meanwhile
    runs next."""
    _, sock, io = _authenticated(lone_worker)
    busy, after = 2 ** 62 + 10, 2 ** 62 + 11
    io.send(P.TASK, busy, None, P.dumps((time.sleep, (30,), {})))
    io.send(P.TASK, after, None, P.dumps((int, ("5",), {})))
    pings = iter(range(2 ** 62 + 100, 2 ** 62 + 200))

    def running() -> int:
        ping = next(pings)
        io.send(P.PING, ping)
        return _answer(io, ping)[2]["busy"]

    wait_for(lambda: running() == busy, what="the worker's heartbeat to name the sleeping task")
    started = time.monotonic()
    io.send(P.PING, 7)
    kind, _, meta, _ = _answer(io, 7)
    assert (kind, meta["busy"]) == (P.PONG, busy)
    io.send(P.INTERRUPT, busy)
    kind, _, meta, _ = _answer(io, busy)
    assert (kind, meta["type"]) == (P.ERROR, "KeyboardInterrupt")
    assert time.monotonic() - started < 5  # not the 30 s the task would have slept
    kind, _, _, frames = _answer(io, after)
    assert (kind, P.loads(frames)) == (P.RESULT, 5)
    sock.close()


def _signal_pending(pid: int) -> bool:
    """Whether a signal sent to the process has not been delivered yet (the kernel's pending set for it)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(status["ShdPnd"], 16) != 0 or int(status["SigPnd"], 16) != 0


def test_a_late_interrupt_or_stray_sigint_between_tasks_hits_nothing(lone_worker):
    """An interrupt for a task that already ended, and a SIGINT while the main thread waits for the next frame,
    neither break the connection nor stop the next task."""
    _, sock, io = _authenticated(lone_worker)
    first, second = 2 ** 62 + 20, 2 ** 62 + 21
    io.send(P.TASK, first, None, P.dumps((int, ("1",), {})))
    assert _answer(io, first)[0] == P.RESULT
    io.send(P.INTERRUPT, first)
    pid = lone_worker.workers[0].handle.pid
    os.kill(pid, signal.SIGINT)
    wait_for(lambda: not _signal_pending(pid), what="the worker to take the SIGINT")  # before the next task
    io.send(P.TASK, second, None, P.dumps((time.sleep, (0.3,), {})))
    kind, _, _, frames = _answer(io, second)
    assert (kind, P.loads(frames)) == (P.RESULT, None)
    sock.close()


def test_a_newer_connection_replaces_the_older_one(lone_worker):
    """The worker serves one client: once a second connection authenticates, the first is closed (a reader
    blocked on it learns at once), and the second gets the answers."""
    _, old_sock, old_io = _authenticated(lone_worker)
    old_sock.settimeout(10)
    _, sock, io = _authenticated(lone_worker)
    with pytest.raises(EOFError):
        while True:
            old_io.recv()
    task_id = 2 ** 62 + 30
    io.send(P.TASK, task_id, None, P.dumps((int, ("9",), {})))
    kind, _, _, frames = _answer(io, task_id)
    assert (kind, P.loads(frames)) == (P.RESULT, 9)
    sock.close()
