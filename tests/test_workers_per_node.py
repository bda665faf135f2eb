"""Several worker processes per node (``workers_per_node``), on real parts: Local worker processes, the real sshd
test nodes, torch.distributed with gloo on the CPU, a real IPython shell.

GPUs are played by a stand-in ``nvidia-smi`` (``-L`` lists N "GPU k: ..." lines) put on the PATH the node's
bring-up sees: for Local nodes this process's PATH (monkeypatched), for an SSH node a folder in the node user's
HOME that a line at the top of its ``~/.bashrc`` puts first on PATH (bash reads ``.bashrc`` for the commands sshd
runs; the line is removed afterwards). This machine's own PATH is never changed for anyone else.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import sky_jupyter as sky
from sky_jupyter import protocol as P
from sky_jupyter import state
from sky_jupyter.notebook.manager import manager
from tests.test_attach import abandon
from tests.test_ssh import workers_on

if TYPE_CHECKING:
    from tests.fixtures.sshd_cluster import Cluster, SshNode

ENV_NAMES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK")
BLOB = bytes(range(256)) * (6 * 1024)  # 1.5 MiB: over pool.SHARE_AT, so it crosses each node's link once
BLOB_DIGEST = hashlib.sha256(BLOB).hexdigest()
STANDIN_MARK = "# sky-test-standin-nvidia-smi"
SHARE_POOL = "--pool wpn-share --workers-per-node 3"  # a notebook pool of 1 Local node x 3 workers


# -- what runs on the workers ----------------------------------------------------------------------------------
@sky.compute
def where() -> dict[str, Any]:
    """This worker's place as every source tells it, and a gloo all_reduce of rank + 1 over the process group."""
    import os

    import torch
    import torch.distributed as dist

    info = sky.instance_info()
    value = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(value)
    return {
        "pid": os.getpid(), "env": {name: os.environ.get(name) for name in ENV_NAMES},
        "sum": value.item(), "backend": dist.get_backend(), "dist_rank": dist.get_rank(),
        "dist_world": dist.get_world_size(),
        "info": {"rank": info.rank, "world_size": info.world_size, "node": info.node, "worker": info.worker,
                 "workers_per_node": info.workers_per_node, "total_nodes": info.total_nodes,
                 "global_worker_index": info.global_worker_index, "total_workers": info.total_workers,
                 "accelerators": info.accelerators, "is_head": info.is_head},
        "shard": sky.shard(list(range(8))),
    }


@sky.compute
def place() -> tuple[int, int, int, int, int]:
    """(pid, rank, node, worker, accelerators) without torch."""
    import os

    info = sky.instance_info()
    return os.getpid(), info.rank, info.node, info.worker, info.accelerators


@sky.compute
def pid_after(seconds: float) -> int:
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


@sky.compute
def digest(data: bytes) -> tuple[int, str]:
    import hashlib

    return sky.instance_info().rank, hashlib.sha256(data).hexdigest()


@sky.compute
def mark_and_sleep(folder: str, seconds: float) -> int:
    import os
    import time

    rank = sky.instance_info().rank
    open(os.path.join(folder, str(rank)), "w").close()
    time.sleep(seconds)
    return rank


def _talk() -> int:
    import sys

    rank = sky.instance_info().rank
    print(f"said on stdout by {rank}")
    print(f"said on stderr by {rank}", file=sys.stderr)
    return rank


talk = sky.compute(_talk)
talk_head = sky.compute(sky.stdout(only="head")(_talk))
talk_silent = sky.compute(sky.silent(_talk))


# -- helpers -------------------------------------------------------------------------------------------------------
def expected_env(rank: int, per_node: int, world: int) -> dict[str, str]:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank % per_node), "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(per_node), "NODE_RANK": str(rank // per_node)}


def check_torch_layout(results: list[dict[str, Any]], nodes: int, per_node: int, accelerators: int = 0) -> None:
    """Every worker's torchrun variables, instance_info and process group agree with rank = node * per_node +
    worker, and the all_reduce of rank + 1 summed over every rank."""
    world = nodes * per_node
    assert len(results) == world
    for rank, got in enumerate(results):
        assert got["env"] == expected_env(rank, per_node, world), (rank, got["env"])
        assert got["info"] == {"rank": rank, "world_size": world, "node": rank // per_node,
                               "worker": rank % per_node, "workers_per_node": per_node, "total_nodes": nodes,
                               "global_worker_index": rank, "total_workers": world, "accelerators": accelerators,
                               "is_head": rank == 0}, (rank, got["info"])
        assert (got["dist_rank"], got["dist_world"], got["backend"]) == (rank, world, "gloo")
        assert got["sum"] == world * (world + 1) / 2, (rank, got["sum"])
    assert len({got["pid"] for got in results}) == world, "two ranks share a process"


def write_standin(folder: Path, gpus: int) -> Path:
    """A stand-in ``nvidia-smi`` in ``folder`` whose ``-L`` lists ``gpus`` GPUs as the real one does."""
    folder.mkdir(parents=True, exist_ok=True)
    smi = folder / "nvidia-smi"
    smi.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = -L ] || exit 0
        i=0
        while [ $i -lt {gpus} ]; do echo "GPU $i: Stand-in GPU (UUID: GPU-standin-$i)"; i=$((i + 1)); done
        """))
    smi.chmod(0o755)
    folder.chmod(0o755)
    return smi


@contextlib.contextmanager
def standin_gpus_on(cluster: Cluster, node: SshNode, gpus: int) -> Iterator[None]:
    """The node's non-interactive shells (what a bring-up runs in) find a stand-in nvidia-smi listing ``gpus``
    GPUs: a folder in the node user's HOME, put first on PATH by a line at the top of its ~/.bashrc (above Debian's
    early return for non-interactive shells). Both go afterwards."""
    folder = node.home / "sky-test-standin-bin"
    write_standin(folder, gpus)
    rc = node.home / ".bashrc"
    rc.write_text(f'PATH="$HOME/{folder.name}:$PATH"  {STANDIN_MARK}\n' + rc.read_text())
    try:
        seen = cluster.ssh(node, "command -v nvidia-smi && nvidia-smi -L", check=True).stdout.splitlines()
        assert seen[0] == f"/home/{node.user}/{folder.name}/nvidia-smi", seen
        assert len([line for line in seen if line.startswith("GPU ")]) == gpus, seen
        yield
    finally:
        rc.write_text("".join(line for line in rc.read_text().splitlines(keepends=True) if STANDIN_MARK not in line))
        shutil.rmtree(folder, ignore_errors=True)
        assert cluster.ssh(node, "command -v nvidia-smi").returncode != 0, "the stand-in is still on the node's PATH"


def count_sends(monkeypatch: pytest.MonkeyPatch, worker: Any) -> dict[str, Any]:
    """Observe what this client writes to ``worker``'s link: the bytes on the wire and the frames' kinds, shared
    metas and payload sizes (the link's own FrameIO, wrapped on the instance; it still sends everything)."""
    io = worker.ensure_link().io
    seen: dict[str, Any] = {"bytes": 0, "frames": []}
    sendall, send = io._sendall, io.send

    def counting_sendall(data: Any) -> Any:
        seen["bytes"] += memoryview(data).nbytes
        return sendall(data)

    def recording_send(kind: str, task_id: int = 0, meta: Any = None, payload: Any = (), before: bytes = b"") -> None:
        seen["frames"].append((kind, meta if kind == P.SHARED else None, sum(memoryview(p).nbytes for p in payload)))
        send(kind, task_id, meta, payload, before)

    monkeypatch.setattr(io, "_sendall", counting_sendall)
    monkeypatch.setattr(io, "send", recording_send)
    return seen


def assert_carried_once(carrier: dict[str, Any], siblings: list[dict[str, Any]], size: int) -> None:
    """The carrier's link took the payload in one shared frame for every sibling; the siblings' links took only
    small shared frames naming their copy."""
    shared = [frame for frame in carrier["frames"] if frame[0] == P.SHARED]
    assert len(shared) == 1, carrier["frames"]
    assert shared[0][1]["copies"] == len(siblings) and shared[0][1]["copy"] == 0 and shared[0][2] >= size
    assert carrier["bytes"] >= size
    for copy, sibling in enumerate(siblings, start=1):
        frames = [frame for frame in sibling["frames"] if frame[0] == P.SHARED]
        assert len(frames) == 1 and frames[0][1]["copy"] == copy and frames[0][2] == 0, sibling["frames"]
        assert frames[0][1]["key"] == shared[0][1]["key"]
        assert sibling["bytes"] < 64 * 1024, f"a sibling's link carried {sibling['bytes']} bytes"


def kill_when_marked(folder: Path, marks: int, pid: int, timeout: float = 60) -> threading.Thread:
    """Once ``marks`` ranks wrote their marker into ``folder`` (their task runs), SIGKILL ``pid``."""
    def run() -> None:
        deadline = time.monotonic() + timeout
        while len(list(folder.iterdir())) < marks and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def run(ip: Any, source: str) -> tuple[Any, str, str]:
    from IPython.utils.capture import capture_output

    with capture_output(display=True) as cap:
        result = ip.run_cell(textwrap.dedent(source).strip("\n") + "\n", store_history=True)
    return result, cap.stdout, cap.stderr


def ok(ip: Any, source: str) -> tuple[Any, str, str]:
    result, out, err = run(ip, source)
    if not result.success:
        raise AssertionError(f"cell failed: {result.error_in_exec or result.error_before_exec!r}\n{out}\n{err}")
    return result, out, err


# -- Local: 2 nodes x 2 workers with torch ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sky.ComputePool]:
    with sky.ComputePool(provider=sky.Local(root=tmp_path_factory.mktemp("wpn-torch")), nodes=2,
                         workers_per_node=2, plugins=[sky.plugins.torch()], name="wpn-torch") as pool:
        yield pool


def test_local_two_by_two_torch_pool_numbers_ranks_like_torchrun(torch_pool):
    pool = torch_pool
    assert [(w.rank, w.node, w.local_rank, w.per_node) for w in pool.workers] == [
        (0, 0, 0, 2), (1, 0, 1, 2), (2, 1, 0, 2), (3, 1, 1, 2)]
    assert [h.rank for h in pool.hosts] == [0, 1] and pool.gpus == {0: 0, 1: 0}
    assert [w.label for w in pool.workers][1] == "rank 1 (node 0 worker 1, 127.0.0.1)"
    results = where() @ pool
    check_torch_layout(results, nodes=2, per_node=2)
    assert [r["pid"] for r in results] == [w.handle.pid for w in pool.workers]
    assert len({w.handle.port for w in pool.workers}) == 4
    assert [r["shard"] for r in results] == [[0, 1], [2, 3], [4, 5], [6, 7]]  # split over workers, not nodes


def test_shift_spreads_over_every_worker(torch_pool):
    pool = torch_pool
    pids = [w.handle.pid for w in pool.workers]
    assert pid_after(0) >> pool == pids[0]  # all idle: the lowest rank
    busy = pool.submit(pid_after(1.5))
    other = pid_after(0) >> pool
    assert other != busy.node.handle.pid and other in pids, "a call went to the busy worker while others idled"
    assert busy.wait(30) == busy.node.handle.pid
    started = time.monotonic()
    spread = sky.gather(*(pid_after(1.0) for _ in range(4))) >> pool
    assert sorted(spread) == sorted(pids), spread  # four at once: one on each worker
    assert time.monotonic() - started < 3.5, "the four sleepers ran one after another"


def test_api_output_shows_the_heads_stdout_and_everyones_stderr_by_default(torch_pool, capsys):
    assert talk() @ torch_pool == [0, 1, 2, 3]
    out, err = capsys.readouterr()
    assert out.splitlines() == ["[rank 0] said on stdout by 0"], out
    assert sorted(err.splitlines()) == [f"[rank {r}] said on stderr by {r}" for r in range(4)], err


def test_status_has_a_row_per_worker_with_its_memory(torch_pool):
    rows = torch_pool.status()
    assert [(r["rank"], r["node"], r["worker"]) for r in rows] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    for row in rows:
        assert isinstance(row["rss"], int) and row["rss"] > 20 << 20, row  # a Python with torch imported
        assert row["state"] == "ready"


# -- Local: 1 node x 3 workers, every worker's stdout shown -------------------------------------------------------
@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sky.ComputePool]:
    with sky.ComputePool(provider=sky.Local(root=tmp_path_factory.mktemp("wpn-trio")), nodes=1, workers_per_node=3,
                         output="all", name="wpn-trio") as pool:
        yield pool


def test_stdout_and_silent_decorators(trio, capsys):
    assert talk() @ trio == [0, 1, 2]
    out, err = capsys.readouterr()
    assert sorted(out.splitlines()) == [f"[rank {r}] said on stdout by {r}" for r in range(3)], out
    assert sorted(err.splitlines()) == [f"[rank {r}] said on stderr by {r}" for r in range(3)], err
    assert talk_head() @ trio == [0, 1, 2]
    out, err = capsys.readouterr()
    assert out.splitlines() == ["[rank 0] said on stdout by 0"], out
    assert sorted(err.splitlines()) == [f"[rank {r}] said on stderr by {r}" for r in range(3)], err
    assert talk_silent() @ trio == [0, 1, 2]
    out, err = capsys.readouterr()
    assert (out, err) == ("", "")


def test_a_large_broadcast_crosses_the_nodes_link_once(trio, monkeypatch):
    seen = [count_sends(monkeypatch, w) for w in trio.workers]
    assert digest(BLOB) @ trio == [(r, BLOB_DIGEST) for r in range(3)]
    assert_carried_once(seen[0], seen[1:], len(BLOB))
    share = Path(trio.hosts[0].extra["workdir"]) / "share"
    assert share.is_dir() and list(share.iterdir()) == [], "a shared copy was left behind"


def test_a_killed_worker_fails_the_broadcast_naming_it_and_is_replaced(trio, tmp_path):
    before = [w.handle.pid for w in trio.workers]
    marks = tmp_path / "marks"
    marks.mkdir()
    killer = kill_when_marked(marks, 3, before[1])
    started = time.monotonic()
    with pytest.raises(sky.WorkerLostError) as info:
        mark_and_sleep(str(marks), 3) @ trio
    killer.join(5)
    message = str(info.value)
    assert "rank 1 (node 0 worker 1, 127.0.0.1)" in message and "SIGKILL" in message, message
    assert "failed on 1 of 3 workers (ranks 1)" in getattr(info.value, "__notes__", []), info.value
    assert time.monotonic() - started < 30
    after = [pid for _, pid in sorted((r, pid) for pid, r, *_ in place() @ trio)]
    assert after[0] == before[0] and after[2] == before[2] and after[1] != before[1], (before, after)
    assert [w.handle.pid for w in trio.workers] == after
    assert [(w.rank, w.node, w.local_rank) for w in trio.workers] == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]


def test_interrupt_stops_every_worker(trio):
    calls = [trio.submit(pid_after(60), node=w) for w in trio.workers]
    time.sleep(0.5)
    started = time.monotonic()
    trio.interrupt()
    for call in calls:
        with pytest.raises(KeyboardInterrupt):
            call.wait(20)
    assert time.monotonic() - started < 10
    assert [pid for pid, *_ in place() @ trio] == [w.handle.pid for w in trio.workers]  # the same processes



def test_ctrl_c_while_waiting_stops_every_worker(trio):
    timer = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            pid_after(60) @ trio
    finally:
        timer.cancel()
    assert time.monotonic() - started < 15
    started = time.monotonic()
    assert [pid for pid, *_ in place() @ trio] == [w.handle.pid for w in trio.workers]
    assert time.monotonic() - started < 5, "a worker was still busy with the interrupted call"


def test_a_call_that_lands_on_a_non_head_worker_shows_its_stdout(torch_pool, capsys):
    """``>>`` runs on one worker, the least busy: what it prints must show wherever it lands (with output="head",
    the default with several workers per node, only the head's stdout of a call run on *every* worker is kept)."""
    busy = torch_pool.submit(pid_after(1.5))  # the head is busy: the next call goes to rank 1
    assert talk() >> torch_pool == 1
    busy.wait(30)
    assert torch_pool.run(talk(), rank=1) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == ["[rank 1] said on stderr by 1"] * 2, err
    assert out.splitlines() == ["[rank 1] said on stdout by 1"] * 2, out

# -- "auto": one worker per GPU with the torch plugin -----------------------------------------------------------------
def test_auto_on_local_starts_one_worker_per_gpu_with_torch_only(tmp_path, monkeypatch):
    folder = tmp_path / "standin-bin"
    write_standin(folder, 4)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    with sky.ComputePool(provider=sky.Local(root=tmp_path / "a"), nodes=1, plugins=[sky.plugins.torch()],
                         name="wpn-auto-torch") as pool:
        assert pool.gpus == {0: 4} and len(pool.workers) == 4
        check_torch_layout(where() @ pool, nodes=1, per_node=4, accelerators=4)
    with sky.ComputePool(provider=sky.Local(root=tmp_path / "b"), nodes=1, name="wpn-auto-plain") as pool:
        assert pool.gpus == {0: 4} and len(pool.workers) == 1
        assert [rest for _, *rest in place() @ pool] == [[0, 0, 0, 4]]


@pytest.mark.ssh
def test_auto_on_an_ssh_node_counts_its_gpus_with_its_own_nvidia_smi(sshd_cluster):
    node = sshd_cluster.nodes[2]
    provider = sky.SSH([node.host_string], key_file=sshd_cluster.key_file)
    with standin_gpus_on(sshd_cluster, node, 4):
        with sky.ComputePool(provider=provider, nodes=1, plugins=[sky.plugins.torch()], name="wpn-ssh-auto") as pool:
            assert pool.gpus == {0: 4} and len(pool.workers) == 4
            assert len(workers_on(sshd_cluster, node)) == 4
            check_torch_layout(where() @ pool, nodes=1, per_node=4, accelerators=4)
        with sky.ComputePool(provider=provider, nodes=1, name="wpn-ssh-auto-plain") as pool:
            assert pool.gpus == {0: 4} and len(pool.workers) == 1
            assert [rest for _, *rest in place() @ pool] == [[0, 0, 0, 4]]
    assert workers_on(sshd_cluster, node) == []


# -- SSH: 2 nodes x 2 workers with torch ---------------------------------------------------------------------------
@pytest.mark.ssh
def test_ssh_two_by_two_torch_pool(sshd_cluster, monkeypatch):
    nodes = sshd_cluster.nodes[:2]
    with sky.ComputePool(provider=sky.SSH([n.host_string for n in nodes], key_file=sshd_cluster.key_file), nodes=2,
                         workers_per_node=2, plugins=[sky.plugins.torch()], name="wpn-ssh") as pool:
        assert [(w.rank, w.node, w.local_rank) for w in pool.workers] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
        results = where() @ pool
        check_torch_layout(results, nodes=2, per_node=2)
        assert [w.hostname for w in pool.workers] == ["node0", "node0", "node1", "node1"]
        for k, node in enumerate(nodes):
            assert sorted(map(int, workers_on(sshd_cluster, node))) == sorted(
                r["pid"] for r in results[2 * k:2 * k + 2])
        # A large payload crosses each node's link once (worker 0 of each node carries it), its copies consumed.
        seen = [count_sends(monkeypatch, w) for w in pool.workers]
        assert digest(BLOB) @ pool == [(r, BLOB_DIGEST) for r in range(4)]
        assert_carried_once(seen[0], seen[1:2], len(BLOB))
        assert_carried_once(seen[2], seen[3:], len(BLOB))
        for k, node in enumerate(nodes):
            share = node.home / ".sky_jupyter" / "run" / f"wpn-ssh-{k}" / "share"
            assert share.is_dir() and list(share.iterdir()) == [], k
    for node in nodes:
        assert workers_on(sshd_cluster, node) == []
        assert not list((node.home / ".sky_jupyter" / "run").glob("wpn-ssh-*"))


@pytest.mark.ssh
def test_attach_to_an_ssh_pool_with_two_workers_per_node(sshd_cluster, tmp_path):
    name = "wpn-attach"
    hosts = sshd_cluster.host_strings()[:2]
    abandon(f"""
        import sky_jupyter as sky
        from sky_jupyter import protocol as P
        pool = sky.ComputePool(provider=sky.SSH({hosts!r}, key_file={str(sshd_cluster.key_file)!r}), nodes=2,
                               workers_per_node=2, name={name!r}, grace=120).start()
        pool.workers[3].submit(P.CELL, {{"code": "kept = 'set on rank 3'"}}).wait(60)
    """, tmp_path)
    recorded = state.load(name).workers
    assert [(w["rank"], w["node"], w["local_rank"]) for w in recorded] == [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]
    assert all(w["port"] and w["pid"] for w in recorded)
    pool = sky.ComputePool.attach(name)
    try:
        assert [(w.rank, w.node, w.local_rank, w.per_node) for w in pool.workers] == [
            (0, 0, 0, 2), (1, 0, 1, 2), (2, 1, 0, 2), (3, 1, 1, 2)]
        assert [w.handle.pid for w in pool.workers] == [w["pid"] for w in recorded]
        assert pool.workers[3].submit(P.CELL, {"code": "kept"}).wait(30)["value"] == "set on rank 3"
        with pytest.raises(NameError):
            pool.workers[2].submit(P.CELL, {"code": "kept"}).wait(30)
        assert [(pid, rest) for pid, *rest in place() @ pool] == [
            (w["pid"], [w["rank"], w["node"], w["local_rank"], 0]) for w in recorded]
    finally:
        pool.close()
    assert not any(workers_on(sshd_cluster, n) for n in sshd_cluster.nodes[:2])
    assert state.load(name) is None


# -- notebook cells --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nb(shell) -> Iterator[Any]:
    """The module's IPython shell; bare cells start 2 workers per node (set back to "auto" afterwards, so other
    modules' pools are not affected)."""
    ok(shell, "%sky config workers_per_node=2")
    try:
        yield shell
    finally:
        manager().configure(workers_per_node="auto")


def test_cells_show_the_heads_stdout_unless_asked_for_all(nb):
    assert manager().settings.workers_per_node == 2
    cell = """
        %%sky --pool wpn-out {options}
        import sys, sky_jupyter as sky
        me = sky.instance_info().rank
        print(f"out from {{me}}")
        print(f"err from {{me}}", file=sys.stderr)
    """
    _, out, err = ok(nb, cell.format(options=""))
    pool = manager().pools["wpn-out"].pool
    assert [(w.rank, w.node, w.local_rank) for w in pool.workers] == [(0, 0, 0), (1, 0, 1)]
    assert out.splitlines() == ["[rank 0] out from 0"], out
    assert sorted(err.splitlines()) == ["[rank 0] err from 0", "[rank 1] err from 1"], err
    _, out, err = ok(nb, cell.format(options="--output all"))
    assert sorted(out.splitlines()) == ["[rank 0] out from 0", "[rank 1] out from 1"], out
    assert sorted(err.splitlines()) == ["[rank 0] err from 0", "[rank 1] err from 1"], err
    _, out, _ = ok(nb, cell.format(options="--output head"))
    assert out.splitlines() == ["[rank 0] out from 0"], out



def test_a_cell_run_on_one_non_head_rank_shows_its_stdout(nb):
    """``--rank 1`` runs the cell on that worker alone: its stdout is all the cell has to show."""
    _, out, err = ok(nb, """
        %%sky --pool wpn-out --rank 1
        import sys, sky_jupyter as sky
        print("out from", sky.instance_info().rank)
        print("err from", sky.instance_info().rank, file=sys.stderr)
    """)
    assert err.splitlines() == ["err from 1"], err
    assert out.splitlines() == ["out from 1"], out

def test_a_large_global_read_by_a_cell_crosses_the_link_once(nb, monkeypatch):
    ok(nb, f"%%sky {SHARE_POOL}\nimport hashlib")
    pool = manager().pools["wpn-share"].pool
    assert [(w.node, w.local_rank) for w in pool.workers] == [(0, 0), (0, 1), (0, 2)]
    seen = [count_sends(monkeypatch, w) for w in pool.workers]
    nb.user_ns["blob"] = BLOB
    _, out, _ = ok(nb, """
        %%sky --pool wpn-share --output all
        import sky_jupyter as sky
        print(sky.instance_info().rank, hashlib.sha256(blob).hexdigest(), len(blob))
    """)
    assert sorted(out.splitlines()) == [f"[rank {r}] {r} {BLOB_DIGEST} {len(BLOB)}" for r in range(3)], out
    assert_carried_once(seen[0], seen[1:], len(BLOB))
    share = Path(pool.hosts[0].extra["workdir"]) / "share"
    assert share.is_dir() and list(share.iterdir()) == [], "a shared copy was left behind"


def test_a_worker_killed_during_a_cell_fails_it_naming_its_rank_and_the_pool_recovers(nb, tmp_path):
    ok(nb, f"%%sky {SHARE_POOL}\nimport os")
    pool = manager().pools["wpn-share"].pool
    before = [w.handle.pid for w in pool.workers]
    marks = tmp_path / "marks"
    marks.mkdir()
    nb.user_ns["marks_dir"] = str(marks)
    killer = kill_when_marked(marks, 3, before[1])
    started = time.monotonic()
    result, out, err = run(nb, """
        %%sky --pool wpn-share
        import os, time, sky_jupyter as sky
        open(os.path.join(marks_dir, str(sky.instance_info().rank)), "w").close()
        time.sleep(30)
    """)
    killer.join(5)
    assert time.monotonic() - started < 20, "the other workers were not stopped after the failure"
    error = result.error_in_exec
    assert isinstance(error, sky.WorkerLostError), (error, out, err)
    assert "rank 1 (node 0 worker 1, 127.0.0.1)" in str(error) and "SIGKILL" in str(error), error
    notes = " ".join(getattr(error, "__notes__", []))
    assert "workers (ranks" in notes and "rank 1's" in notes, notes
    _, out, _ = ok(nb, """
        %%sky --pool wpn-share --output all
        import os, sky_jupyter as sky
        print(sky.instance_info().rank, os.getpid())
    """)
    lines = sorted(out.splitlines())
    assert [line.split()[:3] for line in lines] == [["[rank", f"{r}]", str(r)] for r in range(3)], out
    assert [int(line.split()[3]) for line in lines] == [w.handle.pid for w in pool.workers]
    # Ranks 0 and 2 are the same processes; rank 1 is a fresh one in the same place.
    assert [w.handle.pid for w in pool.workers][::2] == before[::2] and pool.workers[1].handle.pid != before[1]
    assert [(w.rank, w.node, w.local_rank) for w in pool.workers] == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]


def test_a_replaced_worker_is_sent_the_notebook_values_again(nb):
    """A worker that died and was replaced lost its namespace: a cell reading a notebook value that the dead
    worker held must send it to the fresh one again."""
    nb.user_ns["kept_input"] = 41
    ok(nb, f"%%sky {SHARE_POOL}\nseen = kept_input")
    pool = manager().pools["wpn-share"].pool
    victim = pool.workers[2].handle.pid
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pool.workers[2].state not in ("lost", "stopped") and time.monotonic() < deadline:
        time.sleep(0.05)
    _, out, _ = ok(nb, """
        %%sky --pool wpn-share --output all
        import sky_jupyter as sky
        print(sky.instance_info().rank, kept_input + 1)
    """)
    assert sorted(out.splitlines()) == [f"[rank {r}] {r} 42" for r in range(3)], out
    assert pool.workers[2].handle.pid != victim


def test_sky_status_lists_every_worker_with_node_worker_and_memory(nb):
    ok(nb, f"%%sky {SHARE_POOL}\npass")
    result, _, _ = ok(nb, "%sky status")
    table = result.result
    rows = [r for r in table.rows if r["pool"] == "wpn-share"]
    assert [(r["rank"], r["node"], r["worker"]) for r in rows] == [(0, 0, 0), (1, 0, 1), (2, 0, 2)]
    for row in rows:
        assert row["memory"].endswith(" MiB") and int(row["memory"].split()[0]) > 10, row
    header = repr(table).splitlines()[0].split()
    assert {"rank", "node", "worker", "memory"} <= set(header), header
    assert "<th>worker</th>" in table._repr_html_() and "<th>memory</th>" in table._repr_html_()
