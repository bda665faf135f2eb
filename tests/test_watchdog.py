"""The node's watchdog (sky_jupyter/worker/watchdog.py): a dead-man switch outside the workers, and spot reclaim
notices from the instance metadata service.

The watchdog's command is always a stand-in that writes a marker file: nothing here shuts a machine down. The
metadata service is a stand-in HTTP server on 127.0.0.1 (for processes on this machine) or on the test cluster's
bridge address (for the nodes, which reach nothing else); the real 169.254.169.254 is never contacted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import sky_jupyter as sky
from sky_jupyter import state
from sky_jupyter.providers.base import Host, PoolSpec
from sky_jupyter.worker import watchdog

if TYPE_CHECKING:
    from tests.fixtures.sshd_cluster import Cluster, SshNode

ROOT = Path(__file__).resolve().parents[1]
FIRED = "sky-watchdog-fired"  # the stand-in poweroff writes this file in the node user's HOME
STAND_IN = f'echo fired >> "$HOME/{FIRED}"'
NOTICE_TIME = "2031-05-06T07:08:09Z"


# -- a stand-in instance metadata service ------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    client: str
    status: int


class StandInIMDS:
    """IMDSv2 as EC2 serves it, for spot notices: a token from PUT /latest/api/token (with the TTL header), then GET
    /latest/meta-data/spot/instance-action with it: 404 until :meth:`arm`, then the notice; 401 without the token."""

    def __init__(self, addr: str) -> None:
        self.token = "stand-in-token-" + os.urandom(4).hex()
        self.notice: dict[str, str] | None = None
        self.requests: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"") -> None:
                outer.requests.append(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()},
                                           self.client_address[0], status))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_PUT(self) -> None:
                ttl = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds", "")
                ok = self.path == "/latest/api/token" and ttl.isdigit() and 1 <= int(ttl) <= 21600
                self._answer(200 if ok else 400, outer.token.encode() if ok else b"")

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != outer.token:
                    self._answer(401)
                elif self.path != "/latest/meta-data/spot/instance-action" or outer.notice is None:
                    self._answer(404)
                else:
                    self._answer(200, json.dumps(outer.notice).encode())

        self.server = ThreadingHTTPServer((addr, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{addr}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def arm(self, action: str = "terminate") -> None:
        self.notice = {"action": action, "time": NOTICE_TIME}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def local_imds() -> Iterator[StandInIMDS]:
    imds = StandInIMDS("127.0.0.1")
    yield imds
    imds.stop()


# -- the watchdog as a process on this machine -------------------------------------------------------------------
class LocalWatchdogs:
    """Watchdogs started here (each detaches itself), killed at the end should one still run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.run_dirs: list[Path] = []

    def start(self, run_dir: Path, **spec: Any) -> int:
        """Start one for ``run_dir``; the pid of the one watching it."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dirs.append(run_dir)
        with open(self.tmp / "watchdog.log", "ab") as log:
            subprocess.run([sys.executable, "-m", "sky_jupyter.worker.watchdog",
                            json.dumps({"run_dir": str(run_dir), **spec})],
                           cwd=ROOT, stdout=log, stderr=log, check=True, timeout=30)
        lock = run_dir / watchdog.LOCK_FILE
        _wait_for(lambda: lock.exists() and lock.read_text().strip(), 10)
        return int(lock.read_text())

    def running(self, run_dir: Path) -> list[int]:
        """The watchdog processes watching ``run_dir``."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
            except OSError:
                continue
            if argv[1:3] == [b"-m", b"sky_jupyter.worker.watchdog"] and json.loads(argv[3])["run_dir"] == str(
                    run_dir) and _alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def stop(self) -> None:
        for run_dir in self.run_dirs:
            for pid in self.running(run_dir):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(what: Any, timeout: float, step: float = 0.05) -> float:
    """Seconds until ``what()`` held; AssertionError after ``timeout``."""
    started = time.monotonic()
    while not what():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - started


@pytest.fixture
def watchdogs(tmp_path: Path) -> Iterator[LocalWatchdogs]:
    started = LocalWatchdogs(tmp_path)
    yield started
    started.stop()


def test_fires_once_the_heartbeat_stops_for_the_grace_removing_the_secrets_first(watchdogs, tmp_path):
    run, marker, secret = tmp_path / "run" / "p-0", tmp_path / "fired", tmp_path / "env.sh"
    secret.write_text("export HF_TOKEN=x\n")
    pid = watchdogs.start(run, grace=1.5, command=f"test ! -e {secret} && echo fired >> {marker}",
                          cleanup=[str(secret), str(run)])
    fired = _wait_for(marker.exists, 8)  # counted from its start, which counts as a heartbeat
    assert 1.4 < fired < 4.0, fired
    assert marker.read_text() == "fired\n"  # the secret was gone before the command ran, and it ran once
    assert not secret.exists() and not run.exists()
    _wait_for(lambda: not _alive(pid), 3)


def test_heartbeats_hold_it_and_a_closed_pool_ends_it_quietly(watchdogs, tmp_path):
    run, marker = tmp_path / "run" / "p-0", tmp_path / "fired"
    pid = watchdogs.start(run, grace=1.0, command=f"echo fired >> {marker}")
    assert watchdogs.start(run, grace=1.0, command=f"echo fired >> {marker}") == pid
    time.sleep(0.3)
    assert watchdogs.running(run) == [pid]  # one per run folder: the second one left
    end = time.monotonic() + 3.5
    while time.monotonic() < end:  # a client speaking, as the workers pass it on
        watchdog.touch(str(run / watchdog.HEARTBEAT))
        time.sleep(0.2)
    assert _alive(pid) and not marker.exists()
    subprocess.run(["rm", "-rf", str(run)], check=True)  # the pool closes
    _wait_for(lambda: not _alive(pid), 3)
    time.sleep(1.5)
    assert not marker.exists()
    assert "run folder is gone" in (tmp_path / "watchdog.log").read_text()


def test_imdsv2_client_and_the_notice_file(watchdogs, local_imds, tmp_path):
    metadata = watchdog.Metadata(local_imds.url)
    assert metadata.instance_action() is None
    local_imds.token = "rotated"  # the service forgot the token: refused once, a fresh one
    assert metadata.instance_action() is None
    assert [(r.method, r.status) for r in local_imds.requests] == [("PUT", 200), ("GET", 404), ("GET", 401),
                                                                   ("PUT", 200), ("GET", 404)]
    put = local_imds.requests[0]
    assert put.headers["x-aws-ec2-metadata-token-ttl-seconds"] == str(watchdog.TOKEN_TTL)
    local_imds.requests.clear()
    run = tmp_path / "run" / "p-0"
    watchdogs.start(run, spot={"endpoint": local_imds.url, "interval": 0.2})  # no command: notices only
    time.sleep(0.6)
    assert not (run / watchdog.NOTICE_FILE).exists()
    local_imds.arm("stop")
    _wait_for((run / watchdog.NOTICE_FILE).exists, 3)
    assert json.loads((run / watchdog.NOTICE_FILE).read_text()) == {"action": "stop", "time": NOTICE_TIME}
    gets = [r for r in local_imds.requests if r.method == "GET"]
    assert gets and all(r.headers.get("x-aws-ec2-metadata-token") == "rotated" for r in gets)


# -- pools on fresh Debian nodes ---------------------------------------------------------------------------------
class Watched(sky.SSH):
    """SSH nodes whose provider asks for a watchdog (as AWS does) with a stand-in poweroff ``command``, and marks
    the nodes ``spot`` (rank numbers) as spot instances polling ``metadata`` for reclaim notices."""

    def __init__(self, hosts: list[str], key_file: str, command: str | None = STAND_IN, metadata: str = "",
                 spot: tuple[int, ...] = ()) -> None:
        super().__init__(hosts, key_file=key_file)
        self.command, self.metadata, self.spot_ranks = command, metadata, spot

    def worker_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"spot": {"endpoint": self.metadata, "interval": 0.5}}
        if self.command is not None:
            options["watchdog"] = {"command": self.command}
        return options

    def provision(self, spec: PoolSpec) -> list[Host]:
        hosts = super().provision(spec)
        return [replace(h, extra={**h.extra, "market": "spot" if h.rank in self.spot_ranks else "on-demand"})
                for h in hosts]


def node_watchdogs(node: SshNode, pool: str) -> list[int]:
    """The pool's watchdog processes on a node (its network namespace's processes, read from /proc here)."""
    from tests.fixtures.sshd_cluster import _netns_pids

    assert node.netns is not None
    found = []
    for pid in _netns_pids(node.netns):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"sky_jupyter.worker.watchdog" in argv and f"/run/{pool}-".encode() in argv and _alive(pid):
            found.append(pid)
    return found


@pytest.fixture
def fresh(bookworm_cluster: Cluster) -> Iterator[Cluster]:
    for node in bookworm_cluster.nodes:
        (node.home / FIRED).unlink(missing_ok=True)
    yield bookworm_cluster


def _image(cluster: Cluster) -> sky.Image:
    return sky.Image(index_url=cluster.index_url)


@sky.compute
def nap(seconds: float) -> str:
    import socket
    import time

    time.sleep(seconds)
    return socket.gethostname()


@pytest.mark.ssh
def test_dead_workers_and_a_dead_client_power_the_node_off_after_the_grace(fresh, tmp_path):
    """The client is SIGKILLed (its SSH connections end with it) and so is the node's worker: nothing is left to
    run the workers' own switch. The watchdog runs the (stand-in) poweroff once the grace has passed."""
    from tests.test_attach import abandon

    cluster, node, grace = fresh, fresh.nodes[0], 4.0
    abandon(f"""
        import sky_jupyter as sky
        from sky_jupyter import protocol as P
        from tests.test_watchdog import Watched
        provider = Watched([{node.host_string!r}], key_file={str(cluster.key_file)!r})
        pool = sky.ComputePool(provider=provider, nodes=1, name="wd-deadman", grace={grace},
                               image=sky.Image(index_url={cluster.index_url!r})).start()
        pool.workers[0].submit(P.CELL, {{"code": "x = 1"}}).wait(60)
    """, tmp_path)
    cut = time.monotonic()
    try:
        (dog,) = node_watchdogs(node, "wd-deadman")
        (worker,) = [w["pid"] for w in state.load("wd-deadman").workers]
        assert b"sky_jupyter.worker" in Path(f"/proc/{worker}/cmdline").read_bytes()
        os.kill(worker, signal.SIGKILL)
        _wait_for(lambda: not _alive(worker), 5)
        marker = node.home / FIRED
        fired = _wait_for(marker.exists, grace + 4, step=0.05)
        after = time.monotonic() - cut
        # The last heartbeat came about a ping interval (1 s) and a touch (0.4 s) before the cut, or a little more
        # on a busy machine.
        assert grace - 2.5 < after < grace + 3.0, (after, fired)
        _wait_for(lambda: not _alive(dog), 5)
        assert marker.read_text() == "fired\n"
        assert not (node.home / ".sky_jupyter" / "run" / "wd-deadman-0").exists()  # folder and secrets removed
        assert not (node.home / ".sky_jupyter" / "env.sh").exists()
    finally:
        state.remove("wd-deadman")


@pytest.mark.ssh
def test_a_heartbeating_pool_does_not_fire_even_across_a_worker_restart_and_closing_leaves_no_watchdog(fresh):
    cluster, node, grace = fresh, fresh.nodes[1], 4.0
    provider = Watched([node.host_string], key_file=str(cluster.key_file))
    with sky.ComputePool(provider=provider, nodes=1, name="wd-control", grace=grace, image=_image(cluster),
                         progress=lambda *_: None) as pool:
        assert nap(0) >> pool == node.hostname
        (first,) = node_watchdogs(node, "wd-control")
        handle = pool.workers[0].handle
        assert handle is not None
        os.kill(handle.pid, signal.SIGKILL)  # the worker dies; the client starts a fresh one (and a watchdog)
        for attempt in range(2):
            try:
                assert nap(0) >> pool == node.hostname
                break
            except sky.WorkerLostError:  # sent before the client saw the worker go
                assert attempt == 0
        _wait_for(lambda: not _alive(first), 3)
        (second,) = node_watchdogs(node, "wd-control")
        assert second != first
        assert nap(2 * grace) >> pool == node.hostname  # one task outlasting the grace, heartbeats go on
        time.sleep(grace + 0.5)  # and an idle pool
        assert node_watchdogs(node, "wd-control") == [second]
        assert not (node.home / FIRED).exists()
    _wait_for(lambda: not _alive(second), 3)  # gone within a tick of the run folder
    time.sleep(1)
    assert not (node.home / FIRED).exists()
    assert not (node.home / ".sky_jupyter" / "run" / "wd-control-0").exists()
    assert node_watchdogs(node, "wd-control") == []


@pytest.mark.ssh
def test_a_spot_reclaim_fails_the_running_task_at_once_and_the_node_takes_no_more(fresh):
    cluster = fresh
    imds = StandInIMDS(cluster.bridge_addr)  # on the test network: the nodes reach nothing else
    spot, steady = cluster.nodes[0], cluster.nodes[1]
    provider = Watched([spot.host_string, steady.host_string], key_file=str(cluster.key_file), command=None,
                       metadata=imds.url, spot=(0,))
    try:
        with sky.ComputePool(provider=provider, nodes=2, name="wd-spot", image=_image(cluster),
                             progress=lambda *_: None) as pool:
            doomed = pool.submit(nap(120), pool.workers[0])
            other = pool.submit(nap(3), pool.workers[1])
            time.sleep(1.5)
            assert not doomed.done() and [r.client for r in imds.requests] and not (spot.home / FIRED).exists()
            imds.arm()
            armed = time.monotonic()
            with pytest.raises(sky.SpotReclaimError) as info:
                doomed.wait(15)
            assert time.monotonic() - armed < 4.0  # polled every 0.5 s, the worker looks twice a second
            assert str(info.value).startswith(f"node 0 ({spot.host_string.rsplit(':', 1)[0]}) is being reclaimed "
                                              f"(spot) at {NOTICE_TIME}")
            assert isinstance(info.value, sky.ConnectionLostError)
            assert other.wait(15) == steady.hostname  # the on-demand node goes on
            with pytest.raises(sky.SpotReclaimError):
                pool.run(nap(0), rank=0)  # refused at once
            assert nap(0) >> pool == steady.hostname  # `>>` goes elsewhere
            assert pool.workers[0].state == "reclaimed"
            assert node_watchdogs(steady, "wd-spot") == []  # on-demand: nothing polls
    finally:
        imds.stop()
    _wait_for(lambda: node_watchdogs(spot, "wd-spot") == [], 3)
    assert {r.client for r in imds.requests} == {spot.addr}
    assert imds.requests[0].method == "PUT" and imds.requests[0].status == 200
    gets = [r for r in imds.requests if r.method == "GET"]
    assert gets and all(r.headers.get("x-aws-ec2-metadata-token") == imds.token for r in gets)


@pytest.mark.ssh
def test_an_aws_spot_node_polls_the_metadata_service_and_its_task_fails_on_the_notice(moto_ec2, fresh, monkeypatch):
    """Through the AWS provider (moto's EC2, the instance played by a fresh Debian node): the instance's market is
    spot, so its node polls the metadata service the provider names; it also gets the dead-man watchdog."""
    from tests.test_aws import HARMLESS, _only, on_cluster

    _only(monkeypatch, fresh)
    imds = StandInIMDS(fresh.bridge_addr)
    node = fresh.nodes[0]
    # The nodes print no host keys on a console: trusted on first use after a short look.
    provider = on_cluster(moto_ec2, fresh, spot=True, metadata_endpoint=imds.url, console_timeout=0.5)
    assert provider.worker_options()["watchdog"] == {"command": HARMLESS}
    try:
        with sky.ComputePool(provider=provider, nodes=1, accelerator="T4", name="wd-aws-spot", image=_image(fresh),
                             progress=lambda *_: None) as pool:
            assert pool.hosts[0].extra["market"] == "spot"
            assert len(node_watchdogs(node, "wd-aws-spot")) == 1
            doomed = pool.submit(nap(120), pool.workers[0])
            imds.arm()
            armed = time.monotonic()
            with pytest.raises(sky.SpotReclaimError, match=f"is being reclaimed \\(spot\\) at {NOTICE_TIME}"):
                doomed.wait(20)
            assert time.monotonic() - armed < 5.0 + 2.0  # the provider's polling interval, and the worker's look
    finally:
        imds.stop()
    assert {r.client for r in imds.requests} == {node.addr}
    assert {i["State"]["Name"] for i in moto_ec2.instances("wd-aws-spot")} == {"terminated"}
    _wait_for(lambda: node_watchdogs(node, "wd-aws-spot") == [], 3)  # within a tick (1 s) of the pool closing


@sky.compute
def long_the_first_time(seconds: float) -> str:
    """Sleeps ``seconds`` the first time it runs on a node (a marker in the home folder), then answers at once."""
    import os
    import time

    marker = os.path.expanduser("~/ran-once")
    if os.path.exists(marker):
        return "ran again"
    open(marker, "w").close()
    time.sleep(seconds)
    return "ran the first time"


@pytest.mark.ssh
def test_retry_on_interruption_replaces_the_reclaimed_node_in_its_zone_and_runs_the_task_again(moto_ec2, fresh,
                                                                                             monkeypatch):
    """AWS(retry_on_interruption=True): the task on a spot node EC2 reclaims fails there, a new instance takes the
    node's rank in the same zone and groups, and the task runs again (the new instance is played by the same test
    node, so the task's marker shows that it ran twice)."""
    from tests.test_aws import _only, on_cluster

    _only(monkeypatch, fresh)
    imds = StandInIMDS(fresh.bridge_addr)
    node = fresh.nodes[0]
    (node.home / "ran-once").unlink(missing_ok=True)
    provider = on_cluster(moto_ec2, fresh, spot=True, metadata_endpoint=imds.url, console_timeout=0.5,
                          retry_on_interruption=True)
    try:
        with sky.ComputePool(provider=provider, nodes=1, accelerator="T4", name="wd-aws-retry", image=_image(fresh),
                             progress=lambda *_: None) as pool:
            first = pool.hosts[0].instance_id

            def reclaim() -> None:  # EC2's notice once the task runs; gone again for the instance that replaces it
                time.sleep(1.0)
                imds.arm()
                _wait_for(lambda: pool.workers[0].reclaimed, 30)
                imds.notice = None

            threading.Thread(target=reclaim, daemon=True).start()
            assert long_the_first_time(120) >> pool == "ran again"
            second = pool.hosts[0].instance_id
            assert second != first and len(pool.workers) == 1 and not pool.workers[0].reclaimed
            by_id = {i["InstanceId"]: i for i in moto_ec2.instances("wd-aws-retry")}
            assert by_id[first]["State"]["Name"] in ("shutting-down", "terminated")
            assert by_id[second]["Placement"]["AvailabilityZone"] == by_id[first]["Placement"]["AvailabilityZone"]
            assert [g["GroupId"] for g in by_id[second]["SecurityGroups"]] == \
                [g["GroupId"] for g in by_id[first]["SecurityGroups"]]
            assert long_the_first_time(0) >> pool == "ran again"  # the replaced node takes work
    finally:
        imds.stop()
        (node.home / "ran-once").unlink(missing_ok=True)
    assert {i["State"]["Name"] for i in moto_ec2.instances("wd-aws-retry")} == {"terminated"}
