"""The SSH transport against real sshd nodes: commands, uploads, tunnels to node ports, host keys, reconnects."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
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
from collections.abc import Iterator
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
    fingerprint,
    host_id,
    read_known_hosts,
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
    """A connection to ``node``; ``strict``, ``jump`` and ``user`` go to its Target, the rest to Connection."""
    fields = {name: kw.pop(name) for name in ("strict", "jump", "known_hosts") if name in kw}
    target = Target(node.addr, node.port, kw.pop("user", node.user), (str(cluster.key_file),), **fields)
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


# -- known_hosts as OpenSSH writes it: markers, hashed names, patterns ----------------------------------------------
def _hashed(name: str) -> str:
    salt = os.urandom(20)
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def _key_body(node: SshNode) -> str:
    return " ".join(node.host_key_line.split()[1:3])


def _other_key(cluster: Cluster) -> str:
    key = paramiko.Ed25519Key.from_private_key_file(str(cluster.key_file))
    return f"{key.get_name()} {key.get_base64()}"


def test_known_hosts_markers_hashes_and_patterns_are_read_not_choked_on(sshd_cluster: Cluster, tmp_path,
                                                                         capsys) -> None:
    node = sshd_cluster.nodes[0]
    hid = host_id(node.addr, node.port)
    path = tmp_path / "known_hosts"
    path.write_text(f"# a comment\n\n@cert-authority *.example.com {_other_key(sshd_cluster)}\n"
                    f"@revoked * {_other_key(sshd_cluster)}\n{_hashed(hid)} {_key_body(node)} a comment\n"
                    f"!{hid},10.213.* {_other_key(sshd_cluster)}\n@bogus x y z\nshort line\n"
                    f"host ssh-ed25519 not*base64\n")
    for _ in range(2):
        lines = read_known_hosts(path)
    assert [(line.marker, line.matches(hid)) for line in lines] == [("@revoked", True), ("", True), ("", False)]
    assert lines[1].fingerprint == fingerprint(paramiko.PKey.from_type_string("ssh-ed25519", lines[1].blob))
    notes = capsys.readouterr().err.splitlines()
    assert len(notes) == 4, notes  # each skipped line once, however often the file is read
    assert f"{path}:3: skipping an @cert-authority line" in notes[0]
    assert [n.split(": ")[1] for n in notes[1:]] == [f"{path}:{k}" for k in (7, 8, 9)]
    known = KnownHosts(tmp_path / "pool.kh", user_file=path)
    connect(sshd_cluster, node, known, strict="yes").close()  # the hashed line names the node
    assert known.pinned(node.addr, node.port) == _key_body(node)


@pytest.mark.parametrize("where", ["user", "pool"])
def test_a_revoked_key_is_refused_under_every_policy(sshd_cluster: Cluster, tmp_path, where) -> None:
    node = sshd_cluster.nodes[0]
    for policy in ("no", "accept-new", "yes"):
        lines = f"@revoked {node.addr},[{node.addr}]:* {_key_body(node)}\n{node.host_key_line}\n"
        known = KnownHosts(tmp_path / f"{policy}.pool", user_file=tmp_path / f"{policy}.user")
        (known.path if where == "pool" else known.user_file).write_text(lines)
        with pytest.raises(HostKeyError) as info:
            connect(sshd_cluster, node, known, strict=policy)
        message = str(info.value)
        assert "@revoked" in message and "SHA256:" in message and host_id(node.addr, node.port) in message
        assert "\n" not in message


def test_strict_yes_refuses_a_host_nobody_knows(sshd_cluster: Cluster, known: KnownHosts) -> None:
    node = sshd_cluster.nodes[0]
    with pytest.raises(HostKeyError) as info:
        connect(sshd_cluster, node, known, strict="yes")
    message = str(info.value)
    assert "StrictHostKeyChecking yes" in message and "SHA256:" in message and str(known.user_file) in message
    assert not known.path.exists(), "nothing is pinned for a refused host"
    sshd_cluster.write_known_hosts(known.user_file)
    connect(sshd_cluster, node, known, strict="yes").close()
    assert known.path.read_text().strip() == node.host_key_line


def test_strict_no_accepts_with_a_warning_each_time_and_records_nothing(sshd_cluster: Cluster, known: KnownHosts,
                                                                        capsys) -> None:
    node = sshd_cluster.nodes[0]
    for _ in range(2):
        connect(sshd_cluster, node, known, strict="no").close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unchecked" in line]
    assert len(warnings) == 2 and "StrictHostKeyChecking no" in warnings[0] and "SHA256:" in warnings[0]
    assert not known.path.exists() and not known.user_file.exists()
    known.user_file.write_text(f"{host_id(node.addr, node.port)} {_other_key(sshd_cluster)}\n")
    connect(sshd_cluster, node, known, strict="no").close()  # a changed key too, said as such
    warnings = [line for line in capsys.readouterr().err.splitlines() if "unchecked" in line]
    assert len(warnings) == 1 and "changed" in warnings[0]
    assert not known.path.exists()


# -- through jump hosts (ProxyJump) ---------------------------------------------------------------------------------
@contextlib.contextmanager
def only_reachable_through_other_nodes(cluster: Cluster, node: SshNode) -> Iterator[None]:
    """``node`` cannot answer this machine (its replies to the bridge address are dropped) but still talks to the
    other nodes: the client reaches it only through one of them."""
    if not cluster.netns:
        pytest.skip("needs the nodes in network namespaces")
    route = ["ip", "-n", node.netns, "route", "add", "blackhole", f"{cluster.bridge_addr}/32"]
    subprocess.run(route, check=True)
    try:
        yield
    finally:
        subprocess.run([*route[:4], "del", *route[5:]], check=True)


def _hop(cluster: Cluster, node: SshNode, **kw) -> Target:
    return Target(node.addr, node.port, node.user, (str(cluster.key_file),), label=node.name, **kw)


def test_a_node_behind_jump_hosts_is_reached_through_them(sshd_cluster: Cluster, known: KnownHosts) -> None:
    jump, target, second = sshd_cluster.nodes
    with only_reachable_through_other_nodes(sshd_cluster, target):
        with pytest.raises(SSHConnectError):
            connect(sshd_cluster, target, known, connect_timeout=1.0)
        conn = connect(sshd_cluster, target, known, jump=(_hop(sshd_cluster, jump),))
        try:
            code, out, _ = conn.run('echo "$SSH_CONNECTION"; hostname')
            seen_from, hostname = out.split()[0], out.split()[-1]
            assert code == 0 and seen_from == jump.addr
            assert hostname == target.hostname
            pinned = known.path.read_text().splitlines()
            assert sorted(pinned) == sorted([jump.host_key_line, target.host_key_line])
            # A dropped connection is rebuilt through the jump host too.
            assert sshd_cluster.kill_sessions(target) >= 1
            deadline = time.monotonic() + 5
            while conn.active and time.monotonic() < deadline:
                time.sleep(0.01)
            assert conn.run("echo again")[1] == "again\n" and conn.connects == 2
            jumps = list(conn._jumps)
        finally:
            conn.close()
        assert jumps and not any(t.is_active() for t in jumps), "the jump host's connection outlived the node's"

        chain = (_hop(sshd_cluster, jump), _hop(sshd_cluster, second))
        conn = connect(sshd_cluster, target, known, jump=chain)
        try:
            assert conn.run('echo "$SSH_CONNECTION"')[1].split()[0] == second.addr
        finally:
            conn.close()


def test_a_jump_hosts_key_is_checked_too(sshd_cluster: Cluster, known: KnownHosts) -> None:
    jump, target = sshd_cluster.nodes[:2]
    with pytest.raises(HostKeyError) as info:
        connect(sshd_cluster, target, known, jump=(_hop(sshd_cluster, jump, strict="yes"),))
    assert f"jump host {jump.name}" in str(info.value) and jump.addr in str(info.value)
    assert not known.path.exists(), "the node behind was not contacted"
    known.user_file.write_text(f"{host_id(jump.addr, jump.port)} {_other_key(sshd_cluster)}\n")
    with pytest.raises(HostKeyError, match="changed"):
        connect(sshd_cluster, target, known, jump=(_hop(sshd_cluster, jump),))
