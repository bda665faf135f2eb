"""Bootstrap on machines that are not clones of this one: bare Debian root filesystems (bookworm: Python 3.11,
trixie: Python 3.13) with only ssh, python3, ca-certificates and sudo; no pip, no venv module, no uv. Their
packages come from a package index on the bridge address (tests/fixtures/pkg_index.py), never from outside."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import types
import urllib.request
import zipfile
from pathlib import Path

import pytest

import sky_jupyter as sky
from sky_jupyter import fetch_uv
from sky_jupyter.providers import ssh as ssh_module
from tests.fixtures.pkg_index import PackageIndex

pytestmark = [pytest.mark.ssh, pytest.mark.slow]

# A client process whose environment has no uv at all: no `uv` package importable, none on PATH.
CLIENT = r"""
import json, shutil, sys
sys.modules["uv"] = None
import sky_jupyter as sky

args = json.loads(sys.argv[1])
assert shutil.which("uv") is None, shutil.which("uv")
lines = []

@sky.compute
def where():
    import cloudpickle, socket, sys
    return {"version": sys.version.split()[0], "executable": sys.executable, "cloudpickle": cloudpickle.__file__,
            "hostname": socket.gethostname(), "rank": sky.instance_info().rank}

provider = sky.SSH(args["hosts"], key_file=args["key_file"])
image = sky.Image(index_url=args["index_url"])
with sky.ComputePool(provider=provider, nodes=len(args["hosts"]), image=image,
                     progress=lambda rank, phase, line: lines.append([rank, phase, line])) as pool:
    found = where() @ pool
print(json.dumps({"found": found, "progress": lines}))
"""


def _run_client(cluster, nodes, tmp_path: Path, index_url: str) -> dict:
    env = {**os.environ, "PATH": "/usr/bin:/bin", "SKY_JUPYTER_HOME": str(tmp_path / "client-home")}
    args = {"hosts": [n.host_string for n in nodes], "key_file": str(cluster.key_file), "index_url": index_url}
    done = subprocess.run([sys.executable, "-c", CLIENT, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def python_version(root: Path) -> str:
    """The full version of a rootfs's own python3 (3.11.2 on bookworm: not this machine's 3.11)."""
    done = subprocess.run(["chroot", str(root), "python3", "-c", "import platform; print(platform.python_version())"],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip()


def _fetches(index: PackageIndex, addr: str, suffix: str) -> list[str]:
    return [r.path for r in index.requests if r.client == addr and r.status == 200 and r.path.endswith(suffix)]


def test_a_client_without_uv_starts_a_pool_on_fresh_bookworm_nodes(bookworm_cluster, tmp_path):
    """The common real setup (a laptop with no uv -> fresh Debian/Ubuntu machines): each node fetches a uv for its
    own platform from the index with its python3 alone, makes a venv from its own Python 3.11, installs
    cloudpickle from the index, and runs the task."""
    cluster = bookworm_cluster
    for node in cluster.nodes:
        cluster.reset_home(node)
    cluster.index.clear_requests()
    result = _run_client(cluster, cluster.nodes, tmp_path, cluster.index_url)
    node_python = python_version(cluster.rootfs)
    assert node_python.startswith("3.11.") and node_python != platform.python_version()
    for rank, (node, found) in enumerate(zip(cluster.nodes, result["found"])):
        assert found["rank"] == rank and found["hostname"] == node.hostname
        assert found["version"] == node_python  # the node's own interpreter, not this machine's
        assert found["executable"].endswith("/.sky_jupyter/venv/bin/python")
        assert "/.sky_jupyter/venv/lib/python3.11/site-packages/cloudpickle" in found["cloudpickle"]
        assert (node.home / ".sky_jupyter" / "bin" / "uv").is_file()
        assert _fetches(cluster.index, node.addr, "_x86_64.whl"), "the node downloaded the x86_64 uv wheel itself"
        assert _fetches(cluster.index, node.addr, ".whl") and any("cloudpickle" in p for p in
                                                                  _fetches(cluster.index, node.addr, ".whl"))
        assert not _fetches(cluster.index, node.addr, "_aarch64.whl")
    uv_lines = [line for _, phase, line in result["progress"] if phase == "uv" and line.startswith("uv ")]
    assert any(f"for Linux x86_64 (manylinux x86_64) from {cluster.index_url}" in line for line in uv_lines), uv_lines


@pytest.fixture
def foreign_client(monkeypatch):
    """This client as a Mac would be: its own uv cannot run on Linux nodes, so it never uploads it."""
    fake = types.SimpleNamespace(system=lambda: "Darwin", machine=lambda: "arm64",
                                 python_version_tuple=platform.python_version_tuple)
    monkeypatch.setattr(ssh_module, "platform", fake)


def _pool(cluster, nodes, image, events=None):
    provider = sky.SSH([n.host_string for n in nodes], key_file=cluster.key_file)
    return sky.ComputePool(provider=provider, nodes=len(nodes), image=image,
                           progress=(lambda *e: events.append(e)) if events is not None else (lambda *e: None))


@sky.compute
def _python_version() -> str:
    import sys

    return sys.version.split()[0]


def test_a_client_of_another_platform_leaves_uv_to_the_node_and_a_second_pool_finds_it_ready(
        bookworm_cluster, foreign_client):
    cluster = bookworm_cluster
    node = cluster.nodes[1]
    cluster.reset_home(node)
    cluster.index.clear_requests()
    with _pool(cluster, [node], sky.Image(index_url=cluster.index_url)) as pool:
        assert (_python_version() >> pool) == python_version(cluster.rootfs)
    assert _fetches(cluster.index, node.addr, "_x86_64.whl")
    cluster.index.clear_requests()
    events: list[tuple] = []
    with _pool(cluster, [node], sky.Image(index_url=cluster.index_url), events) as pool:
        assert (_python_version() >> pool) == python_version(cluster.rootfs)
    assert [e[1] for e in events] == ["cached"] and cluster.index.requests == []


def test_an_aarch64_node_gets_the_aarch64_uv_from_the_index(bookworm_cluster, tmp_path):
    """Graviton nodes: the wheel is chosen by platform tag, downloaded, checked and unpacked to an arm64 binary."""
    index = bookworm_cluster.index
    url = index.url_for("127.0.0.1")
    with urllib.request.urlopen(f"{url}/uv/", timeout=30) as resp:
        files = fetch_uv.parse_page(resp.read(), resp.headers.get("Content-Type", ""), resp.geturl())
    chosen = fetch_uv.choose(files, "manylinux", "aarch64", (2, 36), None)
    assert chosen is not None and str(chosen["filename"]).endswith("_aarch64.whl") and chosen["sha256"]
    version = fetch_uv.fetch(url, str(tmp_path / "uv"), None, "manylinux", "aarch64", (2, 36))
    assert str(chosen["filename"]).startswith(f"uv-{version}-")
    header = (tmp_path / "uv").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64
    assert os.access(tmp_path / "uv", os.X_OK)


def test_a_trixie_node_without_the_clients_python_says_so_naming_the_mirror(trixie_cluster):
    """Client 3.11, node 3.13: uv is asked to install 3.11 from the pool's mirror; the loopback mirror has no
    build, so the bootstrap fails with one line naming both versions, the mirror and the ways out."""
    cluster = trixie_cluster
    node = cluster.nodes[0]
    cluster.reset_home(node)
    cluster.index.clear_requests()
    mirror = f"http://{cluster.bridge_addr}:{cluster.index.port}/python-builds"
    events: list[tuple] = []
    with pytest.raises(sky.BootstrapError) as info:
        with _pool(cluster, [node], sky.Image(index_url=cluster.index_url, python_mirror=mirror), events):
            pass
    error = info.value
    client = ".".join(platform.python_version_tuple()[:2])
    assert python_version(cluster.rootfs).startswith("3.13.")
    assert error.phase == "venv" and f"{node.user}@{node.addr}" in error.node
    assert "Fix the image or plugin" not in str(error)
    assert (f"the client runs Python {client} but this node has Python 3.13, and uv could not install Python "
            f"{client} from {mirror}") in error.tail
    assert "Image(python=...)" in error.tail and f"install python{client} there" in error.tail
    assert "run the notebook on Python 3.13" in error.tail
    progress = [line for _, phase, line in events if phase == "venv"]
    assert any(f"installing Python {client} with uv from {mirror} (torch and the other packages will then be "
               f"installed, not reused)" in line for line in progress), progress
    assert any(r.path.startswith("/python-builds/") for r in cluster.index.requests), "uv asked the mirror"


@pytest.fixture
def without_python3(bookworm_cluster):
    cluster = bookworm_cluster
    node = cluster.nodes[1]
    removed = cluster.remove_paths(node, ["usr/bin/python3*"])
    try:
        cluster.reset_home(node)
        yield node
    finally:
        cluster.restore_paths(node, removed)
        cluster.reset_home(node)


def test_a_node_without_python3_is_named_with_what_to_install(bookworm_cluster, without_python3, foreign_client):
    cluster = bookworm_cluster
    with pytest.raises(sky.BootstrapError) as info:
        with _pool(cluster, [without_python3], sky.Image(index_url=cluster.index_url)):
            pass
    node = without_python3
    assert info.value.phase == "uv" and f"{node.user}@{node.addr}" in info.value.node
    assert "this node has no uv, and no python3 to fetch one with: install python3 on it" in info.value.tail


def test_a_node_without_python3_but_with_uploaded_uv_tries_uv_python_install(bookworm_cluster, without_python3):
    cluster = bookworm_cluster
    mirror = f"http://{cluster.bridge_addr}:{cluster.index.port}/python-builds"
    with pytest.raises(sky.BootstrapError) as info:
        with _pool(cluster, [without_python3], sky.Image(index_url=cluster.index_url, python_mirror=mirror)):
            pass
    assert info.value.phase == "venv"
    assert "but this node has no python3, and uv could not install Python" in info.value.tail
    assert mirror in info.value.tail


def test_index_credentials_never_show(bookworm_cluster, package_index_dir, sky_home):
    """An index that needs a login: every install on the node uses it, and the password is in no progress line,
    error, node log, node script, state file, or process command line on the machine while the pool starts."""
    cluster = bookworm_cluster
    node = cluster.nodes[0]
    password = "idx-Pa55-word-7c41e"
    with PackageIndex(package_index_dir, [cluster.bridge_addr], user="sky-ci", password=password) as index:
        url = index.url_for(cluster.bridge_addr, credentials=True)
        cluster.reset_home(node)
        seen_in_ps: list[str] = []
        stop = threading.Event()

        def watch_command_lines() -> None:
            while not stop.is_set():
                for entry in os.scandir("/proc"):
                    try:
                        cmdline = Path(entry.path, "cmdline").read_bytes()
                    except OSError:
                        continue
                    if password.encode() in cmdline:
                        seen_in_ps.append(cmdline.decode(errors="replace"))
                stop.wait(0.01)

        watcher = threading.Thread(target=watch_command_lines, daemon=True)
        watcher.start()
        events: list[tuple] = []
        try:
            with _pool(cluster, [node], sky.Image(index_url=url), events) as pool:
                assert (_python_version() >> pool) == python_version(cluster.rootfs)
                shown = repr(pool.image) + json.dumps(
                    json.loads((sky_home / "pools" / f"{pool.name}.json").read_text()))
        finally:
            stop.set()
            watcher.join()
        wheels = [r for r in index.requests if r.path.endswith(".whl")]
        assert wheels and all(r.auth and r.status == 200 for r in wheels)
        assert not [r for r in index.requests if r.status == 401 and r.auth]
    sky_dir = node.home / ".sky_jupyter"
    assert not (sky_dir / "env.sh").exists(), "the env file (it holds the index password) left with the pool"
    texts = {"progress": json.dumps(events), "state and repr": shown, "bootstrap.log": (sky_dir / "bootstrap.log")
             .read_text()}
    texts.update({p.name: p.read_text() for p in sky_dir.glob("bootstrap-*.sh")})
    for where, text in texts.items():
        assert password not in text, where
    assert "sky-ci:***@" in shown or "sky-ci" not in shown
    assert not seen_in_ps


def test_wheels_in_the_index_hold_the_uv_binary(package_index_dir):
    """What the nodes rely on: the uv wheel carries the binary as uv-*.data/scripts/uv."""
    wheel = next(package_index_dir.glob("uv-*_x86_64.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert any(n.endswith(".data/scripts/uv") for n in zf.namelist())
