"""A running pool changing shape: growing keeps torch.distributed over all its workers, --torch / --no-torch turn it
on and off live, and what the pool manager tells about a running pool (idle_timeout, %sky down, a restart, a
Local pool whose kernel died). Real Local workers, gloo on CPU, a real IPython shell."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("IPython")
pytest.importorskip("torch")

import sky_jupyter as sky
from sky_jupyter import plugins, state
from sky_jupyter.errors import ConfigError
from sky_jupyter.notebook.manager import manager
from tests.shell import ok, run

ROOT = Path(__file__).resolve().parents[1]

# What a cell prints about its worker's torch.distributed: one line per node.
PROBE = """
import os, torch, torch.distributed as dist
import sky_jupyter as sky
info = sky.instance_info()
total = None
if dist.is_initialized():
    t = torch.ones(1)
    dist.all_reduce(t)
    total = int(t.item())
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
print("probe", {"on": dist.is_initialized(), "sum": total, "env": env, "info": (info.rank, info.world_size),
                "pid": os.getpid(), "x": globals().get("x")})
"""




def probes(out: str) -> dict[int, dict]:
    """The PROBE line of each node in a cell's output (node 0 alone: no label)."""
    found = {}
    for line in out.splitlines():
        m = re.match(r"(?:\[node (\d+)\] )?probe (.*)$", line)
        if m:
            found[int(m.group(1) or 0)] = eval(m.group(2))  # our own cell printed a dict literal
    return found


def pids(pool: str) -> list[int]:
    return [w.handle.pid for w in manager().pools[pool].pool.workers]


@contextlib.contextmanager
def torch_setting(value: bool | None) -> Iterator[None]:
    """Bare cells' torch setting for a while (the shell fixture sets it off)."""
    before = manager().settings.torch
    manager().configure(torch=value)
    try:
        yield
    finally:
        manager().configure(torch=before)


def test_growing_a_one_node_pool_brings_torch_distributed_up_over_every_worker(shell):
    with torch_setting(None):  # the built-in default: on when nodes > 1
        ok(shell, "%%sky --pool grow-torch --no-pull\nx = 1")  # stays on node 0 alone
        _, out, _ = ok(shell, "%%sky --pool grow-torch\n" + PROBE)
        assert probes(out)[0]["on"] is False  # one node: off by default
        head = pids("grow-torch")[0]
        _, out, _ = ok(shell, "%%sky --pool grow-torch --nodes 2\n" + PROBE)
    seen = probes(out)
    assert sorted(seen) == [0, 1]
    for node, probe in seen.items():
        assert probe["on"] and probe["sum"] == 2, probe  # an all_reduce over both workers
        env = probe["env"]
        assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["NODE_RANK"]) == (str(node), "2", "0",
                                                                                       str(node))
        assert probe["info"] == (node, 2)
    assert seen[0]["env"]["MASTER_ADDR"] == seen[1]["env"]["MASTER_ADDR"] == "127.0.0.1"
    assert seen[0]["env"]["MASTER_PORT"] == seen[1]["env"]["MASTER_PORT"]
    assert seen[0]["pid"] == head and seen[0]["x"] == 1  # the same worker, its namespace kept
    assert seen[1]["x"] is None
    # A cell on node 0 alone still has the group of two (it stays formed between cells).
    _, out, _ = ok(shell, "%%sky --pool grow-torch --nodes 1\n"
                          "import torch.distributed as dist\nprint('probe', {'world': dist.get_world_size()})")
    assert probes(out)[0] == {"world": 2}
    ok(shell, "%sky down grow-torch")


def test_torch_turns_on_and_off_on_a_running_pool_keeping_its_workers(shell):
    ok(shell, "%%sky --pool live-torch --no-pull\nx = 'kept'")  # torch off: the shell fixture's setting
    head = pids("live-torch")[0]
    _, out, _ = ok(shell, "%%sky --pool live-torch --torch\n" + PROBE)
    probe = probes(out)[0]
    assert probe["on"] and probe["sum"] == 1 and probe["pid"] == head and probe["x"] == "kept"
    assert (probe["env"]["RANK"], probe["env"]["WORLD_SIZE"]) == ("0", "1")
    _, out, _ = ok(shell, "%%sky --pool live-torch\n" + PROBE)  # a bare cell keeps it on
    assert probes(out)[0]["on"]
    # --no-torch tears the group down, and the variables that described it go with it.
    _, out, _ = ok(shell, "%%sky --pool live-torch --no-torch\n" + PROBE)
    probe = probes(out)[0]
    assert not probe["on"] and probe["pid"] == head and probe["x"] == "kept"
    assert set(probe["env"].values()) == {None}
    # Turned off by the user, it stays off when the pool grows, even where the default would turn it on.
    with torch_setting(None):
        _, out, _ = ok(shell, "%%sky --pool live-torch --nodes 2\n" + PROBE)
    assert [p["on"] for p in probes(out).values()] == [False, False]
    assert probes(out)[0]["pid"] == head
    ok(shell, "%sky down live-torch")


def test_a_pool_started_with_no_torch_stays_without_it_when_it_grows(shell):
    with torch_setting(None):
        ok(shell, "%%sky --pool never-torch --no-torch\npass")
        _, out, _ = ok(shell, "%%sky --pool never-torch --nodes 2\n" + PROBE)
    assert [p["on"] for p in probes(out).values()] == [False, False]
    ok(shell, "%sky down never-torch")


def test_the_panel_grows_a_pool_as_a_bare_cell_would(shell):
    """Launch asks what a bare cell asks: a pool it started with torch by default gets torch as it grows."""
    pytest.importorskip("ipywidgets")
    from sky_jupyter.notebook.panel import Panel

    mgr = manager()
    before = mgr.settings
    mgr.configure(pool="panel-grow", nodes=1, torch=None)
    panel = Panel(mgr)
    try:
        panel.launch().result(300)
        pool = mgr.pools["panel-grow"].pool
        assert [p.name for p in pool.plugins] == []
        mgr.configure(nodes=2)
        panel.launch().result(300)
        assert [p.name for p in pool.plugins] == ["torch"] and pool.size == 2
        assert [p["sum"] for p in sky.compute(_probe)() @ pool] == [2, 2]
    finally:
        panel.close()
        mgr.down("panel-grow")
        mgr.configure(pool=before.pool, nodes=before.nodes, torch=before.torch)


def _probe() -> dict:
    import torch
    import torch.distributed as dist

    total = None
    if dist.is_initialized():
        t = torch.ones(1)
        dist.all_reduce(t)
        total = int(t.item())
    return {"on": dist.is_initialized(), "sum": total, "pid": os.getpid(), "rank": os.environ.get("RANK"),
            "world": os.environ.get("WORLD_SIZE"), "port": os.environ.get("MASTER_PORT"),
            "info": (sky.instance_info().rank, sky.instance_info().world_size)}


@contextlib.contextmanager
def _fails_to_set_up(info: object) -> Iterator[None]:
    raise RuntimeError("this plugin never sets a worker up")
    yield  # pragma: no cover - a generator, so that contextmanager takes it


def test_the_python_api_grows_a_torch_pool_and_switches_torch_on_a_running_one():
    with sky.ComputePool(sky.Local(), nodes=1, plugins=[plugins.torch(timeout=60)], name="api-grow") as pool:
        before = sky.compute(_probe)() @ pool
        assert before[0]["on"] and before[0]["world"] == "1"
        pool.grow(2)
        after = sky.compute(_probe)() @ pool
        assert [(p["sum"], p["rank"], p["world"], p["info"]) for p in after] == [(2, "0", "2", (0, 2)),
                                                                                 (2, "1", "2", (1, 2))]
        assert after[0]["pid"] == before[0]["pid"]
        # The group re-formed at a port found free now: at the old one, a worker quick to join again could reach
        # the old group's store before node 0 had closed it.
        assert after[0]["port"] == after[1]["port"] != before[0]["port"]

        pool.use_plugins([])  # torch off, the workers kept
        off = sky.compute(_probe)() @ pool
        assert [(p["on"], p["rank"], p["world"]) for p in off] == [(False, None, None)] * 2
        assert [p["pid"] for p in off] == [p["pid"] for p in after]
        pool.use_plugins([plugins.torch(timeout=60)])
        assert [p["sum"] for p in sky.compute(_probe)() @ pool] == [2, 2]

        # A chain that cannot set the workers up leaves the pool as it was.
        broken = sky.Plugin.create("broken").with_around_app(_fails_to_set_up)
        torch_chain = pool.plugins
        with pytest.raises(Exception, match="never sets a worker up"):
            pool.use_plugins([*torch_chain, broken])
        assert pool.plugins == torch_chain
        assert [p["sum"] for p in sky.compute(_probe)() @ pool] == [2, 2]


def test_turning_torch_on_is_refused_where_nodes_would_need_more_workers():
    with sky.ComputePool(sky.Local(), nodes=1, name="api-layout") as pool:
        pool.gpus[0] = 2  # as a two-GPU node's bring-up counts it: torch would want a worker per GPU
        with pytest.raises(ConfigError, match=r"cannot turn torch on while it runs: node 0 runs 1 worker\(s\) "
                                              r"and would need 2.*%sky down api-layout"):
            pool.use_plugins([plugins.torch()])
        assert pool.plugins == () and (sky.compute(os.getpid)() >> pool) == pool.workers[0].handle.pid


def _env(name: str) -> str | None:
    return os.environ.get(name)  # on the worker: its own environment


def test_a_plugin_switched_on_a_running_pool_has_its_client_hook_entered_and_left():
    seen: list[str] = []

    @contextlib.contextmanager
    def around_client(pool: object) -> Iterator[None]:
        seen.append("enter")
        try:
            yield
        finally:
            seen.append("exit")

    @contextlib.contextmanager
    def around_app(info: object) -> Iterator[None]:
        os.environ["SKY_TEST_PLUGIN"] = "on"
        try:
            yield
        finally:
            os.environ.pop("SKY_TEST_PLUGIN")

    marker = sky.Plugin.create("marker").with_around_client(around_client).with_around_app(around_app)
    with sky.ComputePool(sky.Local(), nodes=1, name="api-hooks") as pool:
        pid = sky.compute(os.getpid)() >> pool
        pool.use_plugins([marker])
        assert seen == ["enter"]
        assert (sky.compute(_env)("SKY_TEST_PLUGIN") >> pool) == "on"
        pool.use_plugins([])
        assert seen == ["enter", "exit"]
        assert (sky.compute(_env)("SKY_TEST_PLUGIN") >> pool) is None
        pool.use_plugins([marker])
        assert (sky.compute(os.getpid)() >> pool) == pid  # the same worker throughout
    assert seen == ["enter", "exit", "enter", "exit"]  # left once more with the pool, not twice


def test_idle_timeout_changes_reach_a_running_pool(shell):
    assert manager().settings.idle_timeout > 60
    ok(shell, "%%sky --pool idle-live\nq = 1")
    try:
        ok(shell, "%sky config idle_timeout=1")
        assert manager().pools["idle-live"].pool.idle_timeout == 1.0
        deadline = time.monotonic() + 30
        while "idle-live" in manager().pools and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "idle-live" not in manager().pools
    finally:
        manager().configure(idle_timeout=1800.0)
    _, _, err = ok(shell, "%sky status")
    assert "idle-live" in err and "idle" in err


def test_down_says_it_stopped_a_running_background_cell(shell, monkeypatch):
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "0")  # --bg as an interactive kernel runs it
    ok(shell, "%%sky --bg --pool bg-down\nimport time\ntime.sleep(120)")
    job = manager().pools["bg-down"].background
    assert job is not None and job.running
    _, out, _ = ok(shell, "%sky down bg-down")
    assert re.search(r"shut down: bg-down \(its background cell, running for \d+ s, was stopped\)", out), out
    assert job.done.wait(30)
    _, out, _ = ok(shell, "%sky down --all")  # nothing was running in the background here: the plain line
    assert "background" not in out


def test_status_never_offers_attach_for_a_local_pool_whose_kernel_died(shell):
    # A "kernel" that starts a Local pool and is killed: its workers end with it.
    script = ("import os, signal, sky_jupyter as sky\n"
              "sky.ComputePool(sky.Local(), name='orphan-local').start()\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    recorded = state.load("orphan-local")
    assert recorded is not None and recorded.detached
    result, out, err = ok(shell, "%sky status")
    assert "orphan-local" not in repr(result.result) + out + err
    assert "orphan-local" not in [p.name for p in manager().detached()]
    assert state.load("orphan-local") is None  # cleaned up, not left for an attach that must fail
    deadline = time.monotonic() + 30
    alive = [w["pid"] for w in recorded.workers]
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if state.pid_alive(pid)]
        time.sleep(0.1)
    assert not alive, "the killed kernel's Local workers should have ended with it"


def test_the_restart_notice_lands_in_the_cell_that_was_stopped(shell):
    ok(shell, "%%sky --pool stubborn\nready = 1")
    worker = manager().pools["stubborn"].pool.workers[0]

    def stop_once_running() -> None:
        deadline = time.monotonic() + 60
        while worker.in_flight() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # in its loop on the node
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    stopper = threading.Thread(target=stop_once_running, daemon=True)
    stopper.start()
    # Code that swallows KeyboardInterrupt: after interrupt_grace (10 s) its worker is restarted.
    result, out, err = run(shell, "%%sky --pool stubborn\nimport time\nwhile True:\n    try:\n"
                                  "        time.sleep(60)\n    except KeyboardInterrupt:\n        pass\n")
    stopper.join()
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert re.search(r"sky: node 0 .*: the worker was restarted; its remote namespace was lost", err), err
    _, out, err = ok(shell, "%%sky --pool stubborn\nafter = 2")
    assert "restarted" not in out + err  # said once, where it happened
    assert shell.user_ns["after"] == 2
    ok(shell, "%sky down stubborn")


def test_a_state_file_of_another_live_client_is_left_alone(shell, tmp_path):
    """Only the records of dead clients are cleaned: a Local pool a running kernel owns is not touched."""
    state.save(state.PoolRecord("someone-elses", provider="local"))
    path = state.pools_dir() / "someone-elses.json"
    recorded = json.loads(path.read_text())
    recorded["client_pid"] = os.getppid()  # alive, and not this process
    path.write_text(json.dumps(recorded))
    try:
        assert "someone-elses" not in [p.name for p in manager().detached()]
        assert state.load("someone-elses") is not None
    finally:
        state.remove("someone-elses")
