"""The SSH transport against real sshd nodes: commands, uploads, tunnels to node ports, host keys, reconnects."""

from __future__ import annotations

import contextlib
import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
import pytest

from sky_jupyter.transport import (
    Connection,
    HostKeyError,
    KnownHosts,
    RemoteCommandError,
    SSHAuthError,
    SSHConnectError,
    Target,
    host_id,
)

if TYPE_CHECKING:
    from tests.fixtures.sshd_cluster import Cluster, SshNode

pytest_plugins = ["tests.fixtures.sshd_cluster"]
pytestmark = pytest.mark.ssh

ECHO_SERVER = """
import socket, sys
s = socket.create_server(("127.0.0.1", 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
while data := c.recv(1 << 20):
    c.sendall(data)
"""


def connect(cluster: Cluster, node: SshNode, known: KnownHosts, **kw) -> Connection:
    target = Target(node.addr, node.port, kw.pop("user", node.user), (str(cluster.key_file),))
    return Connection(target, known, **kw).connect()


@pytest.fixture
def known(tmp_path: Path) -> KnownHosts:
    return KnownHosts(tmp_path / "pool.known_hosts", user_file=tmp_path / "user_known_hosts")


@pytest.fixture
def conn(sshd_cluster: Cluster, known: KnownHosts):
    c = connect(sshd_cluster, sshd_cluster.nodes[0], known)
    yield c
    c.close()


def test_connection_is_tuned_as_measured(conn: Connection) -> None:
    t = conn.transport()
    assert t.remote_cipher == "aes128-gcm@openssh.com"
    assert t.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert t.packetizer.REKEY_BYTES > 1 << 40  # client-side rekeying off (paramiko issue 822)


def test_run_returns_code_output_and_error(conn: Connection) -> None:
    code, out, err = conn.run("cat; echo oops >&2; exit 3", input="hello\n")
    assert (code, out, err) == (3, "hello\n", "oops\n")
    with pytest.raises(RemoteCommandError, match="exit code 3"):
        conn.run("exit 3", check=True)


def test_run_stream_yields_lines_as_they_come(conn: Connection) -> None:
    seen = []
    started = time.monotonic()
    for line in conn.run_stream("echo one; sleep 0.3; echo two >&2"):
        seen.append((line, time.monotonic() - started))
    assert [line for line, _ in seen] == ["one\n", "two\n"]
    assert seen[0][1] < 0.25 <= seen[1][1]
    with pytest.raises(RemoteCommandError, match="exit code 4"):
        list(conn.run_stream("echo last words; exit 4"))


def test_put_writes_bytes_and_files_with_their_mode(conn: Connection, sshd_cluster: Cluster, tmp_path) -> None:
    node = sshd_cluster.nodes[0]
    conn.put(b"secret\n", "~/sub dir/file.txt", 0o600)
    path = node.home / "sub dir" / "file.txt"
    assert path.read_bytes() == b"secret\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    local = tmp_path / "blob"
    local.write_bytes(os.urandom(9 << 20))
    conn.put(local, "~/blob.bin", 0o755)
    assert (node.home / "blob.bin").read_bytes() == local.read_bytes()
    assert stat.S_IMODE((node.home / "blob.bin").stat().st_mode) == 0o755


@pytest.mark.skipif(shutil.which("zstd") is None, reason="needs the zstd command")
def test_put_through_a_decompressor_and_a_failed_put_leaves_nothing(conn: Connection, sshd_cluster: Cluster,
                                                                     tmp_path) -> None:
    node = sshd_cluster.nodes[0]
    original = os.urandom(1 << 20) * 4  # compressible
    packed = subprocess.run(["zstd", "-q", "-c"], input=original, capture_output=True, check=True).stdout
    conn.put(packed, "~/unpacked.bin", 0o700, through="zstd -dqc")
    assert (node.home / "unpacked.bin").read_bytes() == original
    assert stat.S_IMODE((node.home / "unpacked.bin").stat().st_mode) == 0o700
    with pytest.raises(RemoteCommandError, match=r"writing ~/broken\.bin failed"):
        conn.put(b"not zstd at all", "~/broken.bin", through="zstd -dqc")
    assert not list(node.home.glob("broken.bin*")), "a failed put left a file behind"


def test_open_tcp_carries_frames_of_every_size(conn: Connection) -> None:
    with conn.start(f"/usr/bin/python3 -c {shlex.quote(ECHO_SERVER)}") as server:
        port = int(server.readline())
        io = conn.open_tcp(port)
        try:
            big = os.urandom(32 << 20)
            for payload in ([b"x"], [b"a" * 100, memoryview(big)], [], [big[:70000]]):
                # Send from a thread: an echo of 32 MiB needs reading while writing.
                sender = threading.Thread(target=io.send, args=("task", 7, {"n": len(payload)}, payload))
                sender.start()
                kind, task_id, meta, frames = io.recv()
                sender.join()
                assert (kind, task_id, meta) == ("task", 7, {"n": len(payload)})
                assert [bytes(f) for f in frames] == [bytes(p) for p in payload]
        finally:
            io.close()
    with pytest.raises(ConnectionRefusedError, match="127.0.0.1:1"):
        conn.open_tcp(1)


def test_first_connect_pins_the_host_key(sshd_cluster: Cluster, known: KnownHosts) -> None:
    node = sshd_cluster.nodes[0]
    first = connect(sshd_cluster, node, known)
    first.close()
    assert known.path.read_text().strip() == node.host_key_line
    assert stat.S_IMODE(known.path.stat().st_mode) == 0o600
    second = connect(sshd_cluster, node, known)  # the pinned key matches
    assert known.pinned(node.addr, node.port) == second.server_key()
    second.close()


def test_a_different_key_is_refused_naming_host_and_fingerprints(sshd_cluster: Cluster, tmp_path) -> None:
    node = sshd_cluster.nodes[0]
    impostor = paramiko.Ed25519Key.from_private_key_file(str(sshd_cluster.key_file))
    hid = host_id(node.addr, node.port)
    for pool_file, user_file in (("pool", None), (None, "user")):
        lines = f"{hid} {impostor.get_name()} {impostor.get_base64()}\n"
        known = KnownHosts(tmp_path / f"{pool_file}.kh", user_file=tmp_path / f"{user_file}.kh")
        (tmp_path / f"{pool_file or user_file}.kh").write_text(lines)
        with pytest.raises(HostKeyError) as info:
            connect(sshd_cluster, node, known)
        message = str(info.value)
        assert hid in message and impostor.fingerprint in message and "SHA256:" in message
    # A user known_hosts that agrees is fine, and nothing extra is needed to pin.
    agree = KnownHosts(tmp_path / "p2.kh", user_file=sshd_cluster.write_known_hosts(tmp_path / "agree.kh"))
    connect(sshd_cluster, node, agree).close()


def test_reconnects_after_the_session_is_killed(sshd_cluster: Cluster, known: KnownHosts) -> None:
    node = sshd_cluster.nodes[1]
    conn = connect(sshd_cluster, node, known)
    try:
        assert conn.run("echo up")[1] == "up\n"
        assert sshd_cluster.kill_sessions(node) >= 1
        deadline = time.monotonic() + 5
        while conn.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert conn.run("echo again")[1] == "again\n"
        assert conn.connects == 2
    finally:
        conn.close()


def _user_sshd(node: SshNode) -> list[int]:
    """The sshd processes serving ``node``'s user (the unprivileged half that holds each connection)."""
    uid = pwd.getpwnam(node.user).pw_uid
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid and (entry / "comm").read_text().startswith("sshd"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def test_a_silent_connection_is_closed_by_the_keepalive_and_rebuilt(sshd_cluster: Cluster, known) -> None:
    node = sshd_cluster.nodes[1]
    conn = connect(sshd_cluster, node, known, keepalive=0.3)
    assert conn.run("echo up")[1] == "up\n"
    stopped = _user_sshd(node)
    try:
        assert stopped
        for pid in stopped:  # the server goes silent: no reset, no answer
            os.kill(pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while conn.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not conn.active
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    try:
        assert conn.run("echo again")[1] == "again\n" and conn.connects == 2
    finally:
        conn.close()


def test_wrong_user_fails_fast_without_retrying(sshd_cluster: Cluster, known: KnownHosts) -> None:
    started = time.monotonic()
    with pytest.raises(SSHAuthError, match="refused the key"):
        connect(sshd_cluster, sshd_cluster.nodes[0], known, user="nobody")
    assert time.monotonic() - started < 5


def test_unreachable_port_is_a_clear_error(sshd_cluster: Cluster, known: KnownHosts) -> None:
    node = sshd_cluster.nodes[0]
    target = Target(node.addr, 1, node.user, (str(sshd_cluster.key_file),))
    with pytest.raises(SSHConnectError, match="cannot connect over SSH"):
        Connection(target, known, connect_timeout=1.0).connect()
