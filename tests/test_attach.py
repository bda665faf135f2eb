"""Attaching to a pool whose client died (``ComputePool.attach``, ``%sky attach``): a real client process is
killed with its pool running on real sshd nodes, and this process takes the pool over."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from IPython.core.error import UsageError

import sky_jupyter as sky
from sky_jupyter import protocol as P
from sky_jupyter import state
from tests.test_ssh import workers_on

ROOT = Path(__file__).resolve().parents[1]


def abandon(code: str, tmp_path: Path) -> None:
    """Run ``code`` in a client process of its own until it prints "ready", then kill it (SIGKILL: no teardown
    runs, as when a kernel crashes). Its pools stay recorded in this session's ~/.sky_jupyter."""
    script = tmp_path / "client.py"
    script.write_text(f"import sys, time\nsys.path.insert(0, {str(ROOT)!r})\n" + textwrap.dedent(code)
                      + "\nprint('ready', flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SKY_JUPYTER_PLAIN": "0"})
    guard = threading.Timer(300, proc.kill)  # a client that hangs is killed: its output ends, the test fails
    guard.start()
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.strip() == "ready":
                break
        else:
            pytest.fail("the client process ended before it was ready:\n" + "".join(lines))
    finally:
        guard.cancel()
        proc.kill()
        proc.wait()


def api_client(cluster, name: str, nodes: int = 2) -> str:
    hosts = cluster.host_strings()[:nodes]
    return f"""
        import sky_jupyter as sky
        from sky_jupyter import protocol as P
        pool = sky.ComputePool(provider=sky.SSH({hosts!r}, key_file={str(cluster.key_file)!r}), nodes={nodes},
                               name={name!r}, grace=120).start()
        for node in pool.workers:
            node.submit(P.CELL, {{"code": f"x = {{40 + node.rank}}"}}).wait(60)
    """


def worker_pids(name: str) -> list[int]:
    return [w["pid"] for w in state.load(name).workers]


@pytest.mark.ssh
def test_a_pool_outlives_its_killed_client_and_another_client_takes_it_over(sshd_cluster, tmp_path):
    name = "attach-api"
    abandon(api_client(sshd_cluster, name) + """
        @sky.compute
        def slow():
            import time
            for i in range(8):
                print("tick", i, flush=True)
                time.sleep(0.25)
            return 7

        pool.submit(slow(), node=pool.workers[0])  # still running when the client dies
    """, tmp_path)
    pids = worker_pids(name)
    lines: list[tuple[int, str]] = []
    pool = sky.ComputePool.attach(name, leftover_sink=lambda rank: lambda kind, meta: lines.append(
        (rank, meta.get("text", ""))))
    try:
        assert [call.node.rank for call in pool.leftovers] == [0]
        assert pool.leftovers[0].wait(30) == 7  # its result, which no client had collected
        ticks = [int(n) for n in re.findall(r"tick (\d)", "".join(text for rank, text in lines if rank == 0))]
        assert ticks == list(range(ticks[0], 8)) and ticks[0] <= 1, ticks  # what it printed while no one listened
        # The namespaces are as the dead client left them, in the same worker processes.
        assert [n.submit(P.CELL, {"code": "x + 1"}).wait(30)["value"] for n in pool.workers] == [41, 42]
        assert [n.handle.pid for n in pool.workers] == pids
        assert [row["hostname"] for row in pool.status()] == [h.hostname for h in pool.hosts] != ["", ""]
        assert state.load(name).client_pid == os.getpid()
        with pytest.raises(sky.ConfigError, match="belongs to a client that is still running"):
            sky.ComputePool.attach(name)
    finally:
        pool.close()
    assert not any(workers_on(sshd_cluster, n) for n in sshd_cluster.nodes[:2])
    assert state.load(name) is None


@pytest.mark.ssh
def test_a_pool_with_a_dead_worker_is_left_as_it_was_and_can_be_released(sshd_cluster, tmp_path):
    name = "attach-broken"
    abandon(api_client(sshd_cluster, name), tmp_path)
    victim = sshd_cluster.nodes[1]
    sshd_cluster.ssh(victim, f"kill -9 {worker_pids(name)[1]}", check=True)
    with pytest.raises(sky.ConnectionLostError, match=r"node 1's worker .*is gone.*%sky down attach-broken"):
        sky.ComputePool.attach(name)
    assert workers_on(sshd_cluster, sshd_cluster.nodes[0]), "a failed attach stopped a worker it should leave"
    assert state.load(name).client_pid != os.getpid()
    sky.ComputePool.release_detached(name)
    assert not any(workers_on(sshd_cluster, n) for n in sshd_cluster.nodes[:2])
    assert state.load(name) is None


def test_local_pools_end_with_their_client(tmp_path, shell, monkeypatch):
    abandon("""
        import sky_jupyter as sky
        sky.ComputePool(nodes=1, name="attach-local").start()
    """, tmp_path)
    with pytest.raises(sky.ConfigError, match="Local provider, whose workers end with the client"):
        sky.ComputePool.attach("attach-local")
    # Through the notebook, for a pool started with --hf: no Hub token is needed to attach (the nodes keep
    # theirs), so the error is the real one.
    path = state.pools_dir() / "attach-local.json"
    recorded = json.loads(path.read_text())
    recorded["request"] = {"name": "attach-local", "provider": "local", "nodes": 1, "accelerator": None,
                           "hf": True, "torch": False}
    path.write_text(json.dumps(recorded))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-hf-login"))
    with pytest.raises(UsageError, match="Local provider, whose workers end with the client"):
        shell.run_cell("%sky attach attach-local", store_history=False).raise_error()
    shell.run_cell("%sky down attach-local", store_history=False).raise_error()  # forgets it
    assert state.load("attach-local") is None
    with pytest.raises(sky.ConfigError, match="no pool named 'attach-local' is recorded"):
        sky.ComputePool.attach("attach-local")


@pytest.mark.ssh
def test_sky_attach_in_a_new_kernel_keeps_the_namespace_and_the_running_cell(sshd_cluster, tmp_path, shell,
                                                                            monkeypatch, capsys):
    name = "attach-nb"
    hosts = ",".join(sshd_cluster.host_strings()[:2])
    abandon(f"""
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        def run(source):
            result = ip.run_cell(source)
            result.raise_error()
        run("%load_ext sky_jupyter")
        run("%sky config provider=ssh hosts={hosts} key_file={sshd_cluster.key_file} torch=false")
        run("%%sky --pool {name} --nodes 2\\nimport sky_jupyter as sky\\nmine = 40 + sky.instance_info().rank\\n")
        run("%%sky --pool {name} --rank 0 --bg\\nimport time\\nfor i in range(8):\\n    print('tick', i)\\n"
            "    time.sleep(0.25)\\nlate = 'done'\\n")
    """, tmp_path)
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "0")

    def cell(source: str) -> None:
        shell.run_cell(source, store_history=False).raise_error()

    cell("%sky status")
    assert f"%sky attach {name}" in capsys.readouterr().out
    with pytest.raises(UsageError, match=f"left running by a kernel that stopped.*%sky attach {name}"):
        cell(f"%%sky --pool {name}\nx = 1\n")
    cell(f"%sky attach {name}")
    cell(f"%sky wait {name}")
    out = capsys.readouterr()
    assert f"attached to pool '{name}'" in out.out and "tick 7" in out.out, out
    cell(f"%%sky --pool {name} --nodes 2\nfound = (mine, late if 'late' in globals() else None)\n")
    assert shell.user_ns["found"] == (40, "done")  # rank 0's namespace, with what the dead kernel's cell bound
    cell(f"%sky down {name}")
    assert not any(workers_on(sshd_cluster, n) for n in sshd_cluster.nodes[:2])
    assert state.load(name) is None
