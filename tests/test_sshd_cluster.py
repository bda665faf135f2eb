"""The sshd test cluster itself: real OpenSSH nodes with their own hostname, user, HOME and address."""

from __future__ import annotations

import importlib.metadata
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko
import pytest

if TYPE_CHECKING:
    from tests.fixtures.sshd_cluster import Cluster, SshNode

# The fixture module is loaded as a plugin (a conftest naming the same plugin shares its one session cluster);
# importing it here at module level would come before pytest's import of it and cost its assertion rewriting.
pytest_plugins = ["tests.fixtures.sshd_cluster"]
pytestmark = pytest.mark.ssh
NODE_PYTHON = "/usr/bin/python3.11"


def _paramiko(cluster: Cluster, node: SshNode, tmp_path: Path) -> paramiko.SSHClient:
    """A paramiko client logged in to ``node`` that accepts only the host key the cluster reports."""
    client = paramiko.SSHClient()
    client.load_host_keys(str(cluster.write_known_hosts(tmp_path / "known_hosts")))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        node.addr,
        node.port,
        username=node.user,
        key_filename=str(node.key_file),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    return client


def test_each_node_has_its_own_hostname_user_and_private_home(sshd_cluster: Cluster) -> None:
    seen = []
    for node in sshd_cluster.nodes:
        result = sshd_cluster.ssh(node, 'hostname; whoami; echo "$HOME"; stat -c %a "$HOME"', check=True)
        hostname, user, home, mode = result.stdout.split()
        assert (hostname, user, home, mode) == (node.hostname, node.user, str(node.home), "700")
        if sshd_cluster.netns:
            assert hostname == node.name
        seen.append((node.addr, node.port, node.user))
    assert len(set(seen)) == len(seen)


def test_nodes_reach_each_other_over_tcp(sshd_cluster: Cluster) -> None:
    client_node, server_node = sshd_cluster.nodes[:2]
    server = (
        "import socket\n"
        f"s = socket.create_server(({server_node.addr!r}, 0))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "c, peer = s.accept()\n"
        "c.sendall(f'{socket.gethostname()} saw {peer[0]}'.encode())\n"
    )
    argv = sshd_cluster.ssh_argv(server_node, f"{NODE_PYTHON} -c {shlex.quote(server)}")
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True) as listener:
        assert listener.stdout is not None
        port = int(listener.stdout.readline())
        client = (
            "import socket\n"
            f"with socket.create_connection(({server_node.addr!r}, {port}), timeout=10) as c:\n"
            "    print(c.recv(100).decode())\n"
        )
        result = sshd_cluster.ssh(client_node, f"{NODE_PYTHON} -c {shlex.quote(client)}", check=True)
        assert listener.wait(timeout=10) == 0
    if sshd_cluster.netns:
        assert result.stdout.strip() == f"{server_node.name} saw {client_node.addr}"
        # GLOO_SOCKET_IFNAME=node.ifname must name the interface holding the node's address.
        shown = sshd_cluster.ssh(client_node, f"ip -o -4 addr show dev {client_node.ifname}", check=True)
        assert f" {client_node.addr}/" in shown.stdout


def test_node_python_has_the_clients_cloudpickle(sshd_cluster: Cluster) -> None:
    node = sshd_cluster.nodes[-1]
    result = sshd_cluster.ssh(node, f"{NODE_PYTHON} -c 'import cloudpickle; print(cloudpickle.__version__)'")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == importlib.metadata.version("cloudpickle")


def test_paramiko_logs_in_with_the_key_and_checks_the_host_key(sshd_cluster: Cluster, tmp_path: Path) -> None:
    node = sshd_cluster.nodes[0]
    with _paramiko(sshd_cluster, node, tmp_path) as client:
        _, stdout, _ = client.exec_command("echo $HOME")
        assert stdout.read().decode().strip() == str(node.home)


def test_kill_sessions_drops_connections_but_keeps_the_listener(
    sshd_cluster: Cluster, tmp_path: Path
) -> None:
    node = sshd_cluster.nodes[1]
    with _paramiko(sshd_cluster, node, tmp_path) as client:
        transport = client.get_transport()
        assert transport is not None and transport.is_active()
        assert sshd_cluster.kill_sessions(node) >= 1
        deadline = time.monotonic() + 5
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not transport.is_active()
    assert sshd_cluster.ssh(node, "true").returncode == 0


def test_restart_sshd_with_a_new_host_key(sshd_cluster: Cluster, tmp_path: Path) -> None:
    old = sshd_cluster.nodes[2]
    new = sshd_cluster.restart_sshd(old, new_host_key=True)
    assert new.host_key_line != old.host_key_line
    assert sshd_cluster.node(old.name) == new
    with _paramiko(sshd_cluster, new, tmp_path) as client:
        _, stdout, _ = client.exec_command("whoami")
        assert stdout.read().decode().strip() == new.user


def test_a_second_cluster_runs_beside_the_first_and_leaves_nothing(
    sshd_cluster: Cluster, tmp_path: Path
) -> None:
    from tests.fixtures.sshd_cluster import start_cluster

    with start_cluster(1, tmp_path) as other:
        node = other.nodes[0]
        assert node.addr not in {n.addr for n in sshd_cluster.nodes}
        assert node.user not in {n.user for n in sshd_cluster.nodes}
        assert other.ssh(node, "whoami", check=True).stdout.strip() == node.user
        other.stop_node(node)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((node.addr, node.port), timeout=5).close()
    if node.netns:
        listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
        assert node.netns not in listed.split()
    assert sshd_cluster.ssh(sshd_cluster.nodes[0], "true").returncode == 0
