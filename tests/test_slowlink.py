"""Behaviour checks of the SlowLink fixture (user-space latency + bandwidth proxy) against local servers on
127.0.0.1: echo RTT, no per-chunk accumulation, bulk throughput, half-close both ways, counters, clean stop."""

from __future__ import annotations

import contextlib
import socket
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.fixtures.slowlink import SlowLink


class _Server:
    """A loopback TCP server that runs ``handler(conn)`` in a thread per connection."""

    def __init__(self, handler: Callable[[socket.socket], None]) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = self.sock.getsockname()[:2]
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._loop, daemon=True)
        self.acceptor.start()

    def _loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.acceptor.join(5)
        for t in self.threads:
            t.join(5)


@contextlib.contextmanager
def server(handler: Callable[[socket.socket], None]) -> Iterator[_Server]:
    s = _Server(handler)
    try:
        yield s
    finally:
        s.close()


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_all(sock: socket.socket) -> bytes:
    buf = bytearray()
    while chunk := sock.recv(65536):
        buf += chunk
    return bytes(buf)


def connect(link: SlowLink) -> socket.socket:
    s = socket.create_connection(link.addr, timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def slowlink_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("slowlink-")]


def test_echo_takes_one_rtt() -> None:
    rtt = 0.05
    with server(echo) as srv, SlowLink(srv.addr, rtt=rtt, rate_bps=200e6) as link, connect(link) as c:
        msg = bytes(range(100))
        times = []
        for _ in range(6):
            t0 = time.monotonic()
            c.sendall(msg)
            assert recv_exactly(c, 100) == msg
            times.append(time.monotonic() - t0)
        med = statistics.median(times)
        assert min(times) >= rtt - 0.0005, times  # never faster than the link
        assert abs(med - rtt) < 0.004, times


def test_back_to_back_writes_do_not_accumulate_delay() -> None:
    arrivals: list[tuple[float, int]] = []
    done = threading.Event()

    def sink(conn: socket.socket) -> None:
        got = 0
        while got < 100 and (data := conn.recv(4096)):
            got += len(data)
            arrivals.append((time.monotonic(), got))
        done.set()

    rtt = 0.05
    with server(sink) as srv, SlowLink(srv.addr, rtt=rtt) as link, connect(link) as c:
        time.sleep(0.02)  # the proxy has connected upstream
        t0 = time.monotonic()
        for i in range(10):
            c.sendall(bytes([i]) * 10)  # 10 writes, not waiting for anything
        assert done.wait(5)
        last = arrivals[-1][0] - t0
        assert arrivals[-1][1] == 100
        # stop-and-wait would take 10 * rtt/2; a pipeline delivers everything within one one-way delay
        assert rtt / 2 - 0.0005 <= last <= rtt / 2 + 0.010, arrivals

    # spacing survives: two writes 10 ms apart come out ~10 ms apart, each after rtt/2
    arrivals.clear()
    done.clear()
    with server(sink) as srv, SlowLink(srv.addr, rtt=rtt) as link, connect(link) as c:
        time.sleep(0.02)
        t0 = time.monotonic()
        c.sendall(b"a" * 50)
        time.sleep(0.010)
        t1 = time.monotonic()
        c.sendall(b"b" * 50)
        assert done.wait(5)
        (a1, n1), (a2, n2) = arrivals[0], arrivals[-1]
        assert (n1, n2) == (50, 100), arrivals
        assert abs((a1 - t0) - rtt / 2) < 0.006, arrivals
        assert abs((a2 - t1) - rtt / 2) < 0.006, arrivals
        assert abs((a2 - a1) - (t1 - t0)) < 0.006, arrivals


def _bulk_upload(link: SlowLink, n: int) -> float:
    """Send n bytes, half-close, wait for the server's byte count; returns the seconds it all took."""
    payload = b"x" * (1 << 20)
    with connect(link) as c:
        t0 = time.monotonic()
        left = n
        while left:
            k = min(left, len(payload))
            c.sendall(payload[:k])
            left -= k
        c.shutdown(socket.SHUT_WR)
        reply = recv_all(c)
        elapsed = time.monotonic() - t0
    assert int(reply) == n
    return elapsed


def count_then_reply(conn: socket.socket) -> None:
    got = 0
    while data := conn.recv(1 << 20):
        got += len(data)
    conn.sendall(str(got).encode())


def test_bulk_transfer_is_paced_at_the_rate() -> None:
    n, rate, rtt = 20_000_000, 100e6, 0.04
    with server(count_then_reply) as srv, SlowLink(srv.addr, rtt=rtt, rate_bps=rate) as link:
        elapsed = _bulk_upload(link, n)
        assert link.bytes_up == n
    ideal = n * 8 / rate + rtt  # serialisation + one-way up + the reply's one-way down
    assert 0.97 * ideal <= elapsed <= 1.6 * ideal, (elapsed, ideal)

    # the other direction is paced too: the server sends 5 MB as soon as the client connects
    m = 5_000_000
    data = b"y" * m  # built before the clock starts (allocating it takes milliseconds)

    def blast(conn: socket.socket) -> None:
        conn.sendall(data)

    with server(blast) as srv, SlowLink(srv.addr, rtt=rtt, rate_bps=rate) as link, connect(link) as c:
        t0 = time.monotonic()
        assert len(recv_all(c)) == m
        elapsed = time.monotonic() - t0
    ideal = m * 8 / rate + rtt / 2
    assert 0.97 * ideal <= elapsed <= 1.6 * ideal, (elapsed, ideal)


def test_half_close_client_side() -> None:
    """The client shuts down writing; the server sees EOF and still sends its reply, which the client reads."""
    with server(count_then_reply) as srv, SlowLink(srv.addr, rtt=0.02) as link, connect(link) as c:
        c.sendall(b"hello")
        c.shutdown(socket.SHUT_WR)
        assert recv_all(c) == b"5"


def test_half_close_server_side() -> None:
    """The server shuts down writing first; the client sees EOF but keeps sending, and the server reads it."""
    got = []

    def greet_then_read(conn: socket.socket) -> None:
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_all(conn))

    with server(greet_then_read) as srv:
        with SlowLink(srv.addr, rtt=0.02) as link, connect(link) as c:
            assert recv_all(c) == b"banner"  # EOF reached the client
            c.sendall(b"still talking")
            c.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
        assert got == [b"still talking"]


def test_counters() -> None:
    with server(echo) as srv:
        with SlowLink(srv.addr, rtt=0.01) as link:
            for k in (1, 2):
                with connect(link) as c:
                    for size in (100, 1000, 70_000):
                        c.sendall(b"z" * size * k)
                        recv_exactly(c, size * k)
        assert link.connections == 2
        assert link.bytes_up == link.bytes_down == 3 * 71_100


def test_stop_aborts_open_connections_without_leaking_threads() -> None:
    before = slowlink_threads()
    with server(echo) as srv:
        link = SlowLink(srv.addr, rtt=0.02)
        conns = [connect(link) for _ in range(3)]
        for c in conns:
            c.sendall(b"ping")
            assert recv_exactly(c, 4) == b"ping"
        assert len(slowlink_threads()) > len(before)
        link.stop()
        for c in conns:
            c.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                assert c.recv(10) == b""  # the proxy closed its side
            c.close()
        link.stop()  # idempotent
    assert slowlink_threads() == before


def test_unreachable_target_closes_the_client() -> None:
    before = slowlink_threads()
    probe = socket.create_server(("127.0.0.1", 0))
    dead = probe.getsockname()[:2]
    probe.close()  # nothing listens there now
    with SlowLink(dead, rtt=0.01) as link, connect(link) as c:
        c.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert c.recv(10) == b""
    assert link.connections == 1
    assert slowlink_threads() == before


def test_handshake_charges_connection_setup() -> None:
    """With handshake=True, connect + first echo costs 2 RTT as on a real link (SYN/SYN-ACK, then the data)."""
    rtt = 0.05
    with server(echo) as srv, SlowLink(srv.addr, rtt=rtt, handshake=True) as link:
        t0 = time.monotonic()
        with connect(link) as c:
            c.sendall(b"x" * 100)
            recv_exactly(c, 100)
            first = time.monotonic() - t0
            t1 = time.monotonic()
            c.sendall(b"x" * 100)
            recv_exactly(c, 100)
            second = time.monotonic() - t1
    assert 2 * rtt - 0.0005 <= first <= 2 * rtt + 0.012, first
    assert rtt - 0.0005 <= second <= rtt + 0.012, second


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        SlowLink(("127.0.0.1", 1), rtt=-1)
    with pytest.raises(ValueError):
        SlowLink(("127.0.0.1", 1), rate_bps=0)
