"""``sky.SSH`` on the real sshd test cluster: bring-up, bootstrap once, env file, reconnects, host keys, teardown.

Host-string and key-file validation needs no cluster and runs everywhere; the rest is marked ``ssh``.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import sky_jupyter as sky
from sky_jupyter import protocol as P
from sky_jupyter.providers.base import PoolSpec
from sky_jupyter.providers.ssh import SSH, parse_host
from sky_jupyter.transport import HostKeyError, Target

if TYPE_CHECKING:
    from tests.fixtures.sshd_cluster import Cluster, SshNode

pytest_plugins = ["tests.fixtures.sshd_cluster"]

GREETING = "it's a 'quoted' $HOME `value` with spaces"
IMAGE = sky.Image(env={"SKY_TEST_GREETING": GREETING})


@sky.compute
def rank_and_hostname() -> tuple[int, str]:
    return sky.instance_info().rank, socket.gethostname()


@sky.compute
def greeting() -> str | None:
    import os

    return os.environ.get("SKY_TEST_GREETING")


@sky.compute
def boom() -> None:
    raise ValueError("boom on the node")


def provider(cluster: Cluster, nodes: list[SshNode] | None = None, **kw) -> SSH:
    return sky.SSH([n.host_string for n in (nodes or cluster.nodes)], key_file=cluster.key_file, **kw)


def workers_on(cluster: Cluster, node: SshNode) -> list[str]:
    """Pids of the node user's worker processes (read from /proc: fresh images have no pgrep)."""
    script = ("me=$(id -u); for p in /proc/[0-9]*; do [ \"$(stat -c %u \"$p\" 2>/dev/null)\" = \"$me\" ] && "
              "tr '\\0' ' ' < \"$p/cmdline\" 2>/dev/null | grep -q 'sky_jupyter[.]worker' && echo \"${p#/proc/}\"; "
              "done; true")
    return cluster.ssh(node, script, check=True).stdout.split()


def drop_user_sessions(node: SshNode) -> int:
    """Kill the sshd processes serving ``node``'s user (also those a restarted listener left behind)."""
    uid = pwd.getpwnam(node.user).pw_uid
    killed = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid and (entry / "comm").read_text().startswith("sshd"):
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


# -- configuration (no cluster) ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("10.0.0.5", (None, "10.0.0.5", None)),
    ("ubuntu@gpu-1.example", ("ubuntu", "gpu-1.example", None)),
    ("bob@10.0.0.7:2222", ("bob", "10.0.0.7", 2222)),
    ("[fe80::1]:22", (None, "fe80::1", 22)),
    ("my_alias", (None, "my_alias", None)),
])
def test_host_strings_parse(text, expected):
    assert parse_host(text) == expected


@pytest.mark.parametrize("bad", ["", "user@", "a b", "host:99999", "@host", "host:port", "user@host:22:33"])
def test_bad_host_strings_are_config_errors_naming_them(bad):
    with pytest.raises(sky.ConfigError) as info:
        SSH([bad])
    assert repr(bad) in str(info.value) and "\n" not in str(info.value)


def test_hosts_must_be_a_list():
    with pytest.raises(sky.ConfigError, match="list of hosts"):
        SSH("gpu1")


def test_ssh_config_aliases_are_honoured(tmp_path):
    key = tmp_path / "id_test"
    key.write_text("not used here")
    config = tmp_path / "config"
    config.write_text(f"Host gpu\n  HostName 10.1.2.3\n  User alice\n  Port 2200\n  IdentityFile {key}\n")
    ssh = SSH(["gpu", "bob@gpu", "other:23"], ssh_config=config)
    first, second, third = ssh.targets
    assert (first.addr, first.user, first.port, first.key_files) == ("10.1.2.3", "alice", 2200, (str(key),))
    assert (second.addr, second.user, second.port) == ("10.1.2.3", "bob", 2200)
    assert (third.addr, third.port) == ("other", 23)
    assert SSH(["gpu"], user="carol", ssh_config=config).targets[0].user == "carol"


def test_unreadable_or_bogus_key_files_are_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(sky.ConfigError, match=str(missing)):
        SSH(["10.0.0.5"], key_file=missing).check(PoolSpec("p", 1, None))
    bogus = tmp_path / "bogus"
    bogus.write_text("hello")
    with pytest.raises(sky.ConfigError, match=str(bogus)):
        SSH(["10.0.0.5"], key_file=bogus).check(PoolSpec("p", 1, None))


def test_more_nodes_than_hosts_is_refused_before_anything_starts(tmp_path):
    with pytest.raises(sky.ConfigError, match="asks for 3 nodes but SSH.* lists 2"):
        sky.ComputePool(provider=SSH(["a", "b"], key_file=tmp_path / "k"), nodes=3).start()


# -- on the cluster ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="class")
def pool(bookworm_cluster: Cluster):
    """One pool over three fresh Debian nodes (their own Python 3.11; no pip, no uv), bootstrapped cold (their
    homes reset first): packages come from the test index."""
    sshd_cluster = bookworm_cluster
    for node in sshd_cluster.nodes:
        sshd_cluster.reset_home(node)
    image = dataclasses.replace(IMAGE, index_url=sshd_cluster.index_url)
    events: list[tuple[int, str, str]] = []
    started = time.perf_counter()
    pool = sky.ComputePool(provider=provider(sshd_cluster), nodes=3, image=image, name="ssh-three",
                           progress=lambda *e: events.append(e))
    sshd_cluster.index.clear_requests()
    with pool:
        pool.cold_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
        pool.events = events  # type: ignore[attr-defined]
        pool.uv_wheels = {n.addr: [r.path for r in sshd_cluster.index.requests  # type: ignore[attr-defined]
                                   if r.client == n.addr and "/uv-" in r.path and r.status == 200]
                          for n in sshd_cluster.nodes}
        yield pool
    for node in sshd_cluster.nodes:
        assert workers_on(sshd_cluster, node) == [], f"a worker outlived the pool on {node.name}"
        assert not list((node.home / ".sky_jupyter" / "run").glob("ssh-three-*"))
        assert not (node.home / ".sky_jupyter" / "env.sh").exists(), "the env file outlived the pool"


@pytest.mark.ssh
class TestThreeNodes:
    def test_at_runs_on_every_node_in_rank_order(self, pool, bookworm_cluster):
        sshd_cluster = bookworm_cluster
        results = rank_and_hostname() @ pool
        assert [r for r, _ in results] == [0, 1, 2]
        hostnames = [h for _, h in results]
        if sshd_cluster.netns:
            assert hostnames == [n.hostname for n in sshd_cluster.nodes]
            assert len(set(hostnames)) == 3
        assert {e[1] for e in pool.events} >= {"env", "uv", "venv", "pip", "done"}

    def test_image_env_reaches_plain_ssh_commands_through_a_0600_file(self, pool, bookworm_cluster):
        sshd_cluster = bookworm_cluster
        for node in sshd_cluster.nodes:
            out = sshd_cluster.ssh(node, 'printf %s "$SKY_TEST_GREETING"', check=True).stdout
            assert out == GREETING
            mode = sshd_cluster.ssh(node, "stat -c %a ~/.sky_jupyter/env.sh", check=True).stdout.strip()
            assert mode == "600"
            folders = [node.home / ".sky_jupyter", *(p for p in (node.home / ".sky_jupyter").iterdir() if p.is_dir())]
            assert {p.name: oct(p.stat().st_mode & 0o777) for p in folders} == {p.name: "0o700" for p in folders}
            first = (node.home / ".bashrc").read_text().splitlines()[0]
            assert "sky_jupyter/env.sh" in first
            for rc in (".bashrc", ".profile"):
                assert (node.home / rc).read_text().count("sky_jupyter/env.sh") == 2  # one line, two mentions
            # The value travels only in the env file: not in the script, not on any command line.
            for script in (node.home / ".sky_jupyter").glob("bootstrap-*.sh"):
                assert GREETING not in script.read_text()
            cmdlines = sshd_cluster.ssh(node, "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '").stdout
            assert "quoted" not in cmdlines
        assert greeting() @ pool == [GREETING] * 3

    def test_bootstrap_runs_once(self, pool, bookworm_cluster):
        sshd_cluster = bookworm_cluster
        logs = [(n.home / ".sky_jupyter" / "bootstrap.log").read_text() for n in sshd_cluster.nodes]
        assert all(log.count(" phase pip") == 1 for log in logs)
        events: list[tuple[int, str, str]] = []
        started = time.perf_counter()
        with sky.ComputePool(provider=provider(sshd_cluster), nodes=3, image=pool.image,
                             progress=lambda *e: events.append(e)) as again:
            warm = time.perf_counter() - started
            assert greeting() @ again == [GREETING] * 3
        assert sorted(e[0] for e in events) == [0, 1, 2] and {e[1] for e in events} == {"cached"}
        assert [(n.home / ".sky_jupyter" / "bootstrap.log").read_text() for n in sshd_cluster.nodes] == logs
        # Closing a pool takes the env file off its nodes, even while another pool runs there: that pool's
        # workers keep their environment.
        assert not any((n.home / ".sky_jupyter" / "env.sh").exists() for n in sshd_cluster.nodes)
        assert greeting() @ pool == [GREETING] * 3
        assert warm < pool.cold_seconds, (warm, pool.cold_seconds)
        assert warm < 5.0

    def test_nodes_fetch_their_uv_from_the_index_and_get_this_clients_package_once(self, pool, bookworm_cluster):
        sshd_cluster = bookworm_cluster
        from sky_jupyter.providers.ssh import package_digest

        for node in sshd_cluster.nodes:
            home = node.home / ".sky_jupyter"
            assert (home / "bin" / "uv").is_file()
            assert pool.uv_wheels[node.addr], "the node downloaded its uv from the index: nothing crossed this uplink"
            pkg = home / "pkg"
            assert [p.name for p in pkg.iterdir()] == [f"sky_jupyter-{package_digest()}"]  # no half-unpacked copy
            assert (pkg / f"sky_jupyter-{package_digest()}" / "sky_jupyter" / "__pycache__").is_dir()

    def test_dropped_ssh_session_reconnects_to_the_same_namespace(self, pool, bookworm_cluster):
        sshd_cluster = bookworm_cluster
        node = pool.workers[1]
        assert node.submit(P.CELL, {"code": "x = 41"}).wait(30)["value"] is None
        pid, link = node.handle.pid, node.link
        assert sshd_cluster.kill_sessions(sshd_cluster.nodes[1]) >= 1
        deadline = time.monotonic() + 10
        while link.alive and time.monotonic() < deadline:  # idle: the drop is noticed, not caused by a task
            time.sleep(0.01)
        assert not link.alive
        assert node.submit(P.CELL, {"code": "x + 1"}).wait(30)["value"] == 42
        assert node.handle.pid == pid and node.link is not link
        assert node.handle.conn.connects >= 2

    def test_a_task_sent_as_the_connection_drops_is_delivered_once(self, pool, bookworm_cluster):
        sshd_cluster = bookworm_cluster
        node = pool.workers[2]
        assert node.submit(P.CELL, {"code": "y = 1"}).wait(30)["value"] is None
        sshd_cluster.kill_sessions(sshd_cluster.nodes[2])
        started = time.monotonic()
        # The frame may go into the dying connection: the worker did not get it, so it is sent again.
        assert node.submit(P.CELL, {"code": "y += 1\ny"}).wait(20)["value"] == 2
        assert time.monotonic() - started < 15
        assert node.submit(P.CELL, {"code": "y"}).wait(30)["value"] == 2  # it ran once

    def test_remote_errors_keep_their_type_and_only_the_users_frames(self, pool):
        with pytest.raises(ValueError, match="boom on the node") as info:
            boom() >> pool
        remote = str(info.value.__cause__)
        assert "in boom" in remote and "worker.py" not in remote, remote

    def test_read_log_shows_the_bootstrap_and_the_worker(self, pool):
        text = pool.provider.read_log(pool.hosts[0])
        assert "phase pip" in text and "worker generation 0" in text


@pytest.mark.ssh
def test_a_node_that_cannot_download_uv_gets_this_clients(bookworm_cluster, package_index_dir, tmp_path, sky_home):
    """An index without uv (a private mirror of only the project's packages): the node asks, this client (same
    platform) uploads its own uv, and the pool starts."""
    from sky_jupyter.providers.ssh import _client_uv
    from tests.fixtures.pkg_index import PackageIndex

    cluster = bookworm_cluster
    node = cluster.nodes[2]
    cluster.reset_home(node)
    (tmp_path / "wheels").mkdir()
    for wheel in package_index_dir.glob("cloudpickle-*.whl"):
        shutil.copy(wheel, tmp_path / "wheels")
    events: list[tuple[int, str, str]] = []
    with PackageIndex(tmp_path / "wheels", [cluster.bridge_addr]) as index:
        image = sky.Image(index_url=index.url_for(cluster.bridge_addr))
        with sky.ComputePool(provider=provider(cluster, [node]), nodes=1, image=image,
                             progress=lambda *e: events.append(e)) as pool:
            assert greeting() >> pool is None
    lines = [line for _, phase, line in events if phase == "uv"]
    assert any(line.startswith("could not download uv for this node (Linux x86_64)") and "HTTP 404" in line
               for line in lines), lines
    assert any(line.startswith("uv from the client (") for line in lines), lines
    assert (node.home / ".sky_jupyter" / "bin" / "uv").read_bytes() == Path(_client_uv()).read_bytes()
    if shutil.which("zstd") and (node.root / "usr/bin/zstd").exists():
        assert list((sky_home / "cache").glob("uv-*.zst")), "the compressed uv is made once and kept"


@pytest.mark.ssh
@pytest.mark.parametrize("image, phase, words", [
    (sky.Image(pip=["sky-jupyter-no-such-package-zz"], env={"UV_OFFLINE": "1"}), "pip",
     "sky-jupyter-no-such-package-zz"),
    (sky.Image(apt=["sky-jupyter-no-such-deb"]), "apt", "sky-jupyter-no-such-deb"),
])
def test_failing_phase_names_node_phase_and_output(sshd_cluster, image, phase, words):
    node = sshd_cluster.nodes[0]
    pool = sky.ComputePool(provider=provider(sshd_cluster, [node]), nodes=1, image=image, progress=lambda *e: None)
    with pytest.raises(sky.BootstrapError) as info:
        pool.start()
    err = info.value
    assert err.phase == phase and err.exit_code != 0 and words in err.tail
    assert node.host_string.split(":")[0] in str(err) and f"phase {phase!r}" in str(err)
    assert workers_on(sshd_cluster, node) == []


@pytest.mark.ssh
def test_dead_man_switch_removes_the_workers_files(sshd_cluster):
    node = sshd_cluster.nodes[2]
    ssh = provider(sshd_cluster, [node])
    spec = PoolSpec("deadman", 1, None)
    hosts = ssh.provision(spec)
    try:
        ssh.bootstrap(hosts[0], ssh.plan(sky.Image(), []), lambda *e: None)
        handle = ssh.start_worker(hosts[0], {"secret": "s" * 32, "rank": 0, "pool": "deadman", "grace": 0.5})
        assert (node.home / ".sky_jupyter" / "run" / "deadman-0").is_dir()
        deadline = time.monotonic() + 10
        while handle.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not handle.alive()
        assert not (node.home / ".sky_jupyter" / "run" / "deadman-0").exists()
    finally:
        ssh.release(hosts)


@pytest.mark.ssh
def test_changed_host_key_is_refused(sshd_cluster, tmp_path):
    node = sshd_cluster.nodes[0]
    # Through an ~/.ssh/config alias: HostName, User, Port and IdentityFile come from the file.
    config = tmp_path / "ssh_config"
    config.write_text(f"Host first-node\n  HostName {node.addr}\n  User {node.user}\n  Port {node.port}\n"
                      f"  IdentityFile {sshd_cluster.key_file}\n")
    pool = sky.ComputePool(provider=sky.SSH(["first-node"], ssh_config=config), nodes=1, name="ssh-hostkey",
                           progress=lambda *e: None).start()
    pid = pool.workers[0].handle.pid
    try:
        assert (rank_and_hostname() >> pool)[0] == 0
        pinned = pool.provider.known_hosts(pool.name).path.read_text()
        assert node.addr in pinned
        new = sshd_cluster.restart_sshd(node, new_host_key=True)
        # Sessions of the old listener survive its restart; drop them so the pool has to reconnect.
        assert drop_user_sessions(new) >= 1
        link = pool.workers[0].link
        deadline = time.monotonic() + 10
        while link.alive and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(HostKeyError) as info:
            rank_and_hostname() >> pool
        message = str(info.value)
        assert node.addr in message and "SHA256:" in message and "changed" in message
    finally:
        pool.close()
        sshd_cluster.ssh(sshd_cluster.node(node.name), f"kill {pid} 2>/dev/null; true")
    assert workers_on(sshd_cluster, sshd_cluster.node(node.name)) == []


@pytest.mark.ssh
def test_nodes_bootstrap_in_parallel(sshd_cluster):
    """Three nodes whose marker is missing run their scripts at the same time."""
    running: dict[int, tuple[float, float]] = {}
    lock = threading.Lock()

    def progress(rank: int, phase: str, line: str) -> None:
        with lock:
            start, _ = running.get(rank, (time.monotonic(), 0.0))
            running[rank] = (start, time.monotonic())

    image = sky.Image(env={"SKY_TEST_PARALLEL": "1"})  # a new script key: every node runs it
    ssh = provider(sshd_cluster)
    plan = ssh.plan(image, [("nap", "sleep 0.5")])
    hosts = ssh.provision(PoolSpec("parallel", 3, None))
    try:
        threads = [threading.Thread(target=ssh.bootstrap, args=(h, plan, progress)) for h in hosts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ssh.release(hosts)
    assert max(s for s, _ in running.values()) < min(e for _, e in running.values())


@sky.compute
def torch_and_venv() -> tuple[str, str]:
    import sys

    import torch

    return torch.__file__, sys.prefix


@pytest.mark.ssh
def test_the_venv_reuses_a_preinstalled_torch(sshd_cluster):
    """As on a Deep Learning AMI: an interpreter of the client's version with torch already installed is the
    venv's base, so torch is not downloaded again; one without torch is passed over."""
    import subprocess

    node = sshd_cluster.nodes[2]
    preinstalled, bare = node.home / "dlami", node.home / "bare"
    (preinstalled / "bin").mkdir(parents=True, exist_ok=True)
    target = preinstalled / "bin" / "python3"
    target.unlink(missing_ok=True)
    target.symlink_to("/usr/bin/python3.11")  # the node's Python, torch included
    subprocess.run(["/usr/bin/python3.11", "-m", "venv", "--without-pip", "--clear", str(bare)], check=True)
    shutil.rmtree(node.home / ".sky_jupyter", ignore_errors=True)
    lines: list[str] = []
    image = sky.Image(env={"SKY_PREINSTALLED_PYTHONS": f"{node.home}/missing/python3 {bare}/bin/python3 {target}"})
    try:
        with sky.ComputePool(provider=provider(sshd_cluster, [node]), image=image, name="dlami",
                             progress=lambda rank, phase, line: lines.append(line)) as pool:
            torch_file, prefix = torch_and_venv() >> pool
        assert f"basing the venv on {target}: its torch is reused" in lines
        cfg = (node.home / ".sky_jupyter" / "venv" / "pyvenv.cfg").read_text()
        assert f"home = {preinstalled / 'bin'}" in cfg and "include-system-site-packages = true" in cfg
        assert prefix == str(node.home / ".sky_jupyter" / "venv")
        assert torch_file.startswith("/usr/local/"), torch_file  # the preinstalled one, not a fresh download
        assert not list((node.home / ".sky_jupyter" / "venv").glob("lib/python3*/site-packages/torch"))
    finally:
        shutil.rmtree(node.home / ".sky_jupyter", ignore_errors=True)  # later pools build their own venv again
        shutil.rmtree(preinstalled, ignore_errors=True)
        shutil.rmtree(bare, ignore_errors=True)


def test_nodes_bootstrapping_at_once_all_find_this_clients_uv():
    """The first lookup of uv in a process, from several node threads at once (sysconfig's first use is not
    thread-safe: unguarded, some threads failed with a TypeError)."""
    code = f"""
import sys, threading
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from sky_jupyter.providers.ssh import _client_uv
found = []
threads = [threading.Thread(target=lambda: found.append(_client_uv())) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(len(found), len(set(found)))
"""
    for _ in range(3):  # a fresh process each time: only the first use races
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert done.stdout.split() == ["8", "1"], done.stderr


# -- ~/.ssh/config: host key policy, known_hosts files, jump hosts (no cluster) ------------------------------------
def test_host_key_options_and_jump_hosts_come_from_the_ssh_config(tmp_path):
    key = tmp_path / "id_test"
    key.write_text("not used here")
    bastion_key = tmp_path / "id_bastion"
    bastion_key.write_text("not used here either")
    config = tmp_path / "config"
    config.write_text(f"""\
Host behind
  HostName 10.9.0.5
  User alice
  ProxyJump bastion,ssh://carol@hop2:2200
  StrictHostKeyChecking yes
  UserKnownHostsFile ~/kh1 {tmp_path}/kh2
Host bastion
  HostName 10.9.0.1
  User bob
  Port 2022
  IdentityFile {bastion_key}
  StrictHostKeyChecking no
  ProxyJump elsewhere
Host loose
  StrictHostKeyChecking accept-new
Host asking
  StrictHostKeyChecking ask
Host nowhere
  UserKnownHostsFile none
""")
    ssh = SSH(["behind", "loose", "asking", "plain", "nowhere"], key_file=key, ssh_config=config)
    behind, loose, asking, plain, nowhere = ssh.targets
    assert (behind.strict, behind.known_hosts) == ("yes", (str(Path("~/kh1").expanduser()), f"{tmp_path}/kh2"))
    bastion, hop2 = behind.jump
    assert (bastion.addr, bastion.port, bastion.user, bastion.key_files, bastion.strict, bastion.jump) == (
        "10.9.0.1", 2022, "bob", (str(bastion_key),), "no", ())  # a jump host's own ProxyJump is not followed
    assert (hop2.addr, hop2.port, hop2.user, hop2.key_files, hop2.strict) == ("hop2", 2200, "carol", (str(key),),
                                                                             "accept-new")
    assert [t.strict for t in (loose, asking, plain)] == ["accept-new", "yes", "accept-new"]
    assert plain.jump == () and nowhere.known_hosts == (os.devnull,)
    assert Target.from_json(behind.to_json()) == behind
    for bad, words in ((["StrictHostKeyChecking maybe"], "StrictHostKeyChecking 'maybe'"),
                       (["ProxyJump a b"], "ProxyJump 'a b'")):
        config.write_text(f"Host x\n  {bad[0]}\n")
        with pytest.raises(sky.ConfigError, match=words) as info:
            SSH(["x"], ssh_config=config)
        assert str(config) in str(info.value) and "'x'" in str(info.value)


def test_the_clients_sky_jupyter_folders_are_private(tmp_path, monkeypatch):
    from sky_jupyter import state
    from sky_jupyter.providers.ssh import _client_uv, _compressed_uv

    home = tmp_path / "fresh" / ".sky_jupyter"
    monkeypatch.setenv("SKY_JUPYTER_HOME", str(home))
    state.save(state.PoolRecord("p", secret="x"))
    SSH(["10.0.0.5"]).known_hosts("p")
    assert oct(home.stat().st_mode & 0o777) == oct(0o700)
    assert oct((home / "pools").stat().st_mode & 0o777) == oct(0o700)
    home.chmod(0o755)  # as an earlier version left it
    (home / "pools").chmod(0o755)
    state.load("p")
    assert oct(home.stat().st_mode & 0o777) == oct((home / "pools").stat().st_mode & 0o777) == oct(0o700)
    if shutil.which("zstd") and _client_uv():
        assert _compressed_uv(_client_uv())
        assert oct((home / "cache").stat().st_mode & 0o777) == oct(0o700)


# -- trust on the cluster: jump hosts, host key policy, no secret left on a node --------------------------------------
@sky.compute
def seen_from() -> tuple[str, str]:
    import os
    import socket

    return socket.gethostname(), os.environ["SSH_CONNECTION"].split()[0]


@pytest.mark.ssh
def test_a_pool_reaches_a_node_only_through_its_jump_host(sshd_cluster, tmp_path, capsys):
    """ProxyJump and StrictHostKeyChecking yes from the SSH config: the node answers only its fellow nodes; the
    pool's bring-up, worker channel and tasks all pass through the jump host, both keys checked against the
    UserKnownHostsFile."""
    from tests.test_transport import only_reachable_through_other_nodes

    jump, target = sshd_cluster.nodes[:2]
    known = sshd_cluster.write_known_hosts(tmp_path / "known_hosts")
    config = tmp_path / "ssh_config"
    common = f"  IdentityFile {sshd_cluster.key_file}\n  StrictHostKeyChecking yes\n  UserKnownHostsFile {known}\n"
    config.write_text(f"Host behind\n  HostName {target.addr}\n  User {target.user}\n  ProxyJump bastion\n{common}"
                      f"Host bastion\n  HostName {jump.addr}\n  User {jump.user}\n{common}")
    with only_reachable_through_other_nodes(sshd_cluster, target):
        with sky.ComputePool(provider=sky.SSH(["behind"], ssh_config=config), name="behind-bastion",
                             progress=lambda *e: None) as pool:
            hostname, client = seen_from() >> pool
            assert (hostname, client) == (target.hostname, jump.addr)
            assert pool.provider.connection(pool.hosts[0]).target.jump[0].addr == jump.addr
            assert pool.hosts[0].extra["strict"] == "yes" and pool.hosts[0].extra["jump"]
    assert "unchecked" not in capsys.readouterr().err
    known.write_text(target.host_key_line + "\n")  # the bastion's key is no longer known: refused
    with pytest.raises(HostKeyError, match="jump host bastion"):
        sky.ComputePool(provider=sky.SSH(["behind"], ssh_config=config), name="behind-bastion-2",
                        progress=lambda *e: None).start()


@sky.compute
def hub_token_on_node() -> dict[str, object]:
    import os
    from pathlib import Path

    home = Path(os.path.expanduser(os.environ["HF_HOME"]))
    token = home / "token"
    return {"token": token.read_text() if token.exists() else None, "env": os.environ.get("HF_TOKEN"),
            "modes": [oct(p.stat().st_mode & 0o777) for p in (home, token) if p.exists()]}


def _files_holding(root: Path, secret: str) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and secret.encode() in path.read_bytes():
                found.append(path)
        except OSError:
            continue
    return found


@pytest.mark.ssh
def test_no_secret_stays_on_a_node_between_pools(sshd_cluster, hf_hub, monkeypatch):
    """A pool with the huggingface plugin and a secret in its image: while it runs, the node has its env file and
    the Hub token file; when it closes both are gone. A second pool on the same node skips the bootstrap (and the
    login) yet finds the token file again, written from its env file; closing it removes them again."""
    for name in ("HF_TOKEN", "HF_HOME", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    node = sshd_cluster.nodes[2]
    endpoint = hf_hub.listen(sshd_cluster.bridge_addr)
    secret = "sky-image-secret-0123456789"
    image = sky.Image(env={"HF_HOME": "~/hf-clean", "SKY_TEST_SECRET": secret})
    token_file = node.home / "hf-clean" / "token"
    env_file = node.home / ".sky_jupyter" / "env.sh"

    def start(events: list) -> sky.ComputePool:
        hf = sky.plugins.huggingface(token=hf_hub.token, endpoint=endpoint)
        return sky.ComputePool(provider=provider(sshd_cluster, [node]), image=image, plugins=[hf], name="clean",
                               progress=lambda *e: events.append(e))

    hf_hub.hub.clear_requests()
    first: list = []
    with start(first) as pool:
        assert hub_token_on_node() >> pool == {"token": hf_hub.token, "env": hf_hub.token,
                                               "modes": [oct(0o700), oct(0o600)]}
        assert env_file.exists() and secret in env_file.read_text()
    assert not env_file.exists() and not token_file.exists()
    assert _files_holding(node.home, hf_hub.token) == [] and _files_holding(node.home, secret) == []

    (node.home / ".sky_jupyter" / "pkg").chmod(0o755)  # as an earlier version left it
    hf_hub.hub.clear_requests()
    second: list = []
    with start(second) as pool:
        assert {phase for _, phase, _ in second} == {"cached"}  # no bootstrap script, no login
        assert hub_token_on_node() >> pool == {"token": hf_hub.token, "env": hf_hub.token,
                                               "modes": [oct(0o700), oct(0o600)]}
        assert oct((node.home / ".sky_jupyter" / "pkg").stat().st_mode & 0o777) == oct(0o700)
    assert [r for r in hf_hub.hub.requests if r.path == "/api/whoami-v2"] == []
    assert not env_file.exists() and not token_file.exists()
    assert _files_holding(node.home, hf_hub.token) == [] and _files_holding(node.home, secret) == []


@pytest.mark.ssh
def test_a_failed_bring_up_leaves_no_env_file(sshd_cluster):
    node = sshd_cluster.nodes[2]
    secret = "sky-failed-secret-0123456789"
    failing = sky.Plugin.create("failing").with_bootstrap(lambda cluster: ["exit 3"])
    pool = sky.ComputePool(provider=provider(sshd_cluster, [node]), image=sky.Image(env={"SKY_TEST_SECRET": secret}),
                           plugins=[failing], name="failing", progress=lambda *e: None)
    with pytest.raises(sky.BootstrapError):
        pool.start()
    assert not (node.home / ".sky_jupyter" / "env.sh").exists()
    assert _files_holding(node.home, secret) == []


@pytest.mark.ssh
def test_dead_man_switch_takes_the_secrets_with_it(sshd_cluster):
    """A worker whose client went silent removes the env file and the Hub token file along with its own files."""
    node = sshd_cluster.nodes[2]
    ssh = provider(sshd_cluster, [node])
    env = {"HF_TOKEN": "hf_deadManToken0123456789", "HF_HOME": "~/hf-deadman"}
    hosts = ssh.provision(PoolSpec("deadman-secrets", 1, None))
    try:
        ssh.bootstrap(hosts[0], ssh.plan(sky.Image(env=env), []), lambda *e: None)
        ssh.connection(hosts[0]).put(env["HF_TOKEN"].encode(), "~/hf-deadman/token")
        handle = ssh.start_worker(hosts[0], {"secret": "s" * 32, "rank": 0, "pool": "deadman-secrets", "grace": 0.5,
                                             "env": env})
        assert (node.home / ".sky_jupyter" / "env.sh").exists() and (node.home / "hf-deadman" / "token").exists()
        deadline = time.monotonic() + 10
        while handle.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not handle.alive()
        assert not (node.home / ".sky_jupyter" / "env.sh").exists()
        assert not (node.home / "hf-deadman" / "token").exists()
        assert not (node.home / ".sky_jupyter" / "run" / "deadman-secrets-0").exists()
    finally:
        ssh.release(hosts)
