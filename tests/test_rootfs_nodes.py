"""The rootfs test nodes and the package index themselves: bare Debian machines, not clones of this one."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from tests.fixtures.pkg_index import PackageIndex
    from tests.fixtures.sshd_cluster import Cluster

pytestmark = pytest.mark.ssh
ROOT = Path(__file__).resolve().parents[1]

# Fetch the index page for uv from a node with the stdlib only; print the file names and digests it links.
FETCH_UV_PAGE = """
import json, re, sys, urllib.request
page = urllib.request.urlopen(sys.argv[1] + "/uv/", timeout=10).read().decode()
print(json.dumps(re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"', page)))
"""


@pytest.fixture(params=["bookworm", "trixie"])
def rootfs_cluster(request: pytest.FixtureRequest) -> Cluster:
    return request.getfixturevalue(f"{request.param}_cluster")


def test_node_is_a_bare_debian_with_its_own_python(rootfs_cluster: Cluster) -> None:
    assert rootfs_cluster.rootfs is not None
    suite = rootfs_cluster.rootfs.name.split("-")[0]
    expected = {"bookworm": "3.11", "trixie": "3.13"}[suite]
    for node in rootfs_cluster.nodes:
        script = (
            "python3 -c 'import sys; print(sys.version)'; "
            "python3 -m pip --version >/dev/null 2>&1 && echo HAS-PIP; "
            "python3 -m venv /tmp/v >/dev/null 2>&1 && echo HAS-VENV; rm -rf /tmp/v; "
            "command -v uv >/dev/null && echo HAS-UV; "
            'hostname; whoami; echo "$HOME"; stat -c %a "$HOME"; sudo -n id -u; '
            'echo "written by $(hostname)" > "$HOME/marker"'
        )
        out = rootfs_cluster.ssh(node, script, check=True).stdout.split("\n")
        assert out[0].startswith(expected + "."), out
        assert not {"HAS-PIP", "HAS-VENV", "HAS-UV"} & set(out)
        assert out[1:6] == [node.hostname, node.user, f"/home/{node.user}", "700", "0"]
        # The node's HOME as this machine sees it, inside the node's tree.
        assert node.root is not None and node.home == node.root / "home" / node.user
        assert (node.home / "marker").read_text() == f"written by {node.name}\n"
        # Not this machine's /home (where cloned nodes' homes are).
        assert not Path("/home", node.user, "marker").exists()


def test_bookworm_nodes_reach_each_other_by_name(bookworm_cluster: Cluster) -> None:
    first, second = bookworm_cluster.nodes[:2]
    # node1 reads node0's sshd banner, found by name through the node's /etc/hosts.
    probe = (
        "import socket\n"
        f"with socket.create_connection(({first.name!r}, 22), timeout=5) as c:\n"
        "    print(c.getpeername()[0], c.recv(100).decode().strip())\n"
    )
    out = bookworm_cluster.ssh(second, f"python3 -c {shlex.quote(probe)}", check=True).stdout.split()
    assert out[0] == first.addr
    assert out[1].startswith("SSH-2.0-OpenSSH_")


def test_node_fetches_uv_from_the_index_over_the_bridge(rootfs_cluster: Cluster) -> None:
    index = rootfs_cluster.index
    assert index is not None and rootfs_cluster.index_url == f"http://{rootfs_cluster.bridge_addr}:{index.port}/simple"
    node = rootfs_cluster.nodes[-1]
    before = len(index.requests)
    result = rootfs_cluster.ssh(
        node, f"python3 -c {shlex.quote(FETCH_UV_PAGE)} {rootfs_cluster.index_url}", check=True
    )
    links = json.loads(result.stdout)
    names = [href.rsplit("/", 1)[1] for href, _ in links]
    assert any("manylinux" in n and n.endswith("x86_64.whl") for n in names), names
    assert any("manylinux_2_17_aarch64" in n for n in names), names
    assert all(href.startswith("/files/") for href, _ in links)
    # The digest in the fragment is the file's.
    href, digest = links[0]
    data = urllib.request.urlopen(f"http://127.0.0.1:{index.port}{href}", timeout=10).read()
    assert hashlib.sha256(data).hexdigest() == digest
    seen = [r for r in index.requests[before:] if r.path == "/simple/uv/"]
    assert seen and seen[0].client == node.addr and seen[0].status == 200


def test_reset_home_gives_a_cold_home(bookworm_cluster: Cluster) -> None:
    node = bookworm_cluster.nodes[0]
    bookworm_cluster.ssh(node, "mkdir -p ~/.cache/sky && touch ~/.cache/sky/state", check=True)
    assert (node.home / ".cache/sky/state").exists()
    home = bookworm_cluster.reset_home(node)
    assert home == node.home
    assert sorted(p.name for p in home.iterdir()) == [".bash_logout", ".bashrc", ".profile", ".ssh"]
    assert oct(home.stat().st_mode & 0o777) == "0o700"
    assert bookworm_cluster.ssh(node, "ls -A ~", check=True).stdout.split() == [
        ".bash_logout",
        ".bashrc",
        ".profile",
        ".ssh",
    ]


def test_remove_paths_takes_python_from_one_node_only(bookworm_cluster: Cluster) -> None:
    first, second = bookworm_cluster.nodes[:2]
    removed = bookworm_cluster.remove_paths(second, ["usr/bin/python3*"])
    try:
        assert "usr/bin/python3" in removed and "usr/bin/python3.11" in removed
        gone = bookworm_cluster.ssh(second, "command -v python3 python3.11; ls /usr/bin/python3*")
        assert gone.stdout == "" and gone.returncode != 0
        assert bookworm_cluster.ssh(first, "python3 -c 'print(1)'", check=True).stdout == "1\n"
        assert bookworm_cluster.rootfs is not None and (bookworm_cluster.rootfs / "usr/bin/python3").exists()
        with pytest.raises(FileNotFoundError):
            bookworm_cluster.remove_paths(second, ["usr/bin/no-such-thing"])
    finally:
        bookworm_cluster.restore_paths(second, ["usr/bin/python3*"])
    assert bookworm_cluster.ssh(second, "python3 -c 'print(2)'", check=True).stdout == "2\n"


def test_stopped_node_leaves_no_mounts_or_processes_and_restarts_with_its_disk(trixie_cluster: Cluster) -> None:
    from tests.fixtures.sshd_cluster import _netns_pids, mounts_under

    node = trixie_cluster.nodes[0]
    assert node.root is not None and node.netns is not None
    trixie_cluster.ssh(node, "echo kept > ~/disk", check=True)
    # A session that would outlive its connection if only sshd were killed.
    background = "nohup sleep 600 >/dev/null 2>&1 </dev/null & echo started"
    assert trixie_cluster.ssh(node, background, check=True).stdout.strip() == "started"
    trixie_cluster.stop_node(node)
    try:
        assert mounts_under(node.root) == []
        assert _netns_pids(node.netns) == []
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((node.addr, node.port), timeout=5).close()
    finally:
        node = trixie_cluster.restart_sshd(node)
    assert trixie_cluster.ssh(node, "cat ~/disk", check=True).stdout == "kept\n"


def test_kill_sessions_and_restart_with_new_host_key(trixie_cluster: Cluster) -> None:
    node = trixie_cluster.nodes[0]
    argv = trixie_cluster.ssh_argv(node, "echo up; sleep 60")
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True) as session:
        assert session.stdout is not None and session.stdout.readline() == "up\n"
        assert trixie_cluster.kill_sessions(node) >= 1
        assert session.wait(timeout=10) == 255
    assert trixie_cluster.ssh(node, "true").returncode == 0
    new = trixie_cluster.restart_sshd(node, new_host_key=True)
    assert new.host_key_line != node.host_key_line
    assert trixie_cluster.ssh(new, "whoami", check=True).stdout.strip() == new.user


def test_failed_logins_do_not_lock_the_client_out(trixie_cluster: Cluster, tmp_path: Path) -> None:
    """OpenSSH 10 penalises an address after failed logins unless told not to: every node shares one."""
    from tests.fixtures.sshd_cluster import _keygen

    node = trixie_cluster.nodes[0]
    _keygen(tmp_path / "stranger", "not authorized")
    argv = trixie_cluster.ssh_argv(node, "true")
    argv[argv.index("-i") + 1] = str(tmp_path / "stranger")
    for _ in range(3):
        assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 255
    assert trixie_cluster.ssh(node, "true").returncode == 0


def test_leftovers_of_a_killed_run_are_cleaned(tmp_path: Path) -> None:
    """A process holding a rootfs cluster is SIGKILLed; cleaning its slot unmounts and kills everything."""
    from tests.fixtures.rootfs import build_rootfs
    from tests.fixtures.sshd_cluster import STATE_DIR, _clean_slot, _netns_pids, _Slot, mounts_under

    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = build_rootfs("trixie")
    child = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tests.fixtures.sshd_cluster import start_cluster\n"
        f"c = start_cluster(1, Path({str(tmp_path)!r}), rootfs=Path({str(root)!r}))\n"
        "print(c._slot.number, c.nodes[0].netns, flush=True)\n"
        "time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if not line:
            pytest.skip("the child could not start a rootfs cluster")
        number, netns = int(line[0]), line[1]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    node_root = tmp_path / "node0" / "root"
    assert node_root.is_mount() and _netns_pids(netns)
    fd = os.open(STATE_DIR / f"slot{number}.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the next cluster on that slot would
        _clean_slot(_Slot(number))
    finally:
        os.close(fd)
    assert mounts_under(tmp_path) == []
    deadline = time.monotonic() + 5
    while _netns_pids(netns) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _netns_pids(netns) == []


def test_rootfs_build_is_cached() -> None:
    from tests.fixtures.rootfs import build_rootfs, rootfs_info

    if os.geteuid() != 0:
        pytest.skip("needs root")
    started = time.perf_counter()
    for suite, version in [("bookworm", "3.11"), ("trixie", "3.13")]:
        path = build_rootfs(suite)
        info = rootfs_info(path)
        assert info["python"] == version and info["suite"] == suite
        assert (path / "etc/ssl/certs/ca-certificates.crt").read_bytes() == Path(
            "/etc/ssl/certs/ca-certificates.crt"
        ).read_bytes()
    assert time.perf_counter() - started < 2


def _get(url: str, auth: tuple[str, str] | None = None) -> int:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_index_with_basic_auth_logs_whether_credentials_came(package_index_dir: Path) -> None:
    from tests.fixtures.pkg_index import PackageIndex

    with PackageIndex(package_index_dir, ["127.0.0.1"], user="tok", password="s3cr:et") as index:
        url = index.url_for("127.0.0.1")
        assert "s3cr" not in url
        assert index.url_for("127.0.0.1", credentials=True).startswith("http://tok:s3cr%3Aet@127.0.0.1:")
        assert _get(url + "/uv/") == 401
        assert _get(url + "/uv/", ("tok", "wrong")) == 401
        assert _get(url + "/uv/", ("tok", "s3cr:et")) == 200
        assert _get(url + "/no-such/", ("tok", "s3cr:et")) == 404
        assert [(r.path, r.status, r.auth) for r in index.requests] == [
            ("/simple/uv/", 401, False),
            ("/simple/uv/", 401, True),
            ("/simple/uv/", 200, True),
            ("/simple/no-such/", 404, True),
        ]
        with pytest.raises(ValueError):
            index.url_for("10.0.0.1")


def test_index_lists_the_dev_versions(package_index: PackageIndex) -> None:
    import importlib.metadata

    assert {"uv", "cloudpickle"} <= set(package_index.projects)
    uv = importlib.metadata.version("uv")
    assert sorted(f.split("-")[1] for f in package_index.files("uv")) == [uv, uv]
    assert package_index.files("CloudPickle") == [
        f"cloudpickle-{importlib.metadata.version('cloudpickle')}-py3-none-any.whl"
    ]
    root = urllib.request.urlopen(package_index.url_for("127.0.0.1") + "/", timeout=10).read().decode()
    assert 'href="/simple/uv/"' in root
