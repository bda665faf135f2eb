"""Reliability and security on real parts: faults injected for real, bad input, load, and the dead-man switch.

SSH, HuggingFace and AWS cases live beside their providers' tests and extend this file's tables.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import sky_jupyter as sky

pytest.importorskip("IPython")
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

from sky_jupyter.notebook.manager import manager
from tests.waiting import wait_for

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cell(ip: InteractiveShell, source: str):
    with capture_output(display=True) as cap:
        result = ip.run_cell(textwrap.dedent(source).strip("\n") + "\n", store_history=False)
    return result, cap.stdout + cap.stderr


# -- faults ------------------------------------------------------------------------------------------------

def test_worker_killed_mid_cell_is_named_quickly_and_pool_recovers(shell):
    cell(shell, "%%sky --nodes 2 --pool faults\nimport os\npid = os.getpid()")
    workers = manager().pools["faults"].pool.workers
    pids = [n.handle.pid for n in workers]

    def kill_node_1_once_it_runs_the_cell() -> None:
        wait_for(lambda: workers[1].ping(timeout=10)["busy"], what="node 1 to run the cell")
        os.kill(pids[1], signal.SIGKILL)

    threading.Thread(target=kill_node_1_once_it_runs_the_cell, daemon=True).start()
    start = time.monotonic()
    result, out = cell(shell, "%%sky --nodes 2 --pool faults\nimport time\ntime.sleep(30)")
    elapsed = time.monotonic() - start
    assert isinstance(result.error_in_exec, sky.WorkerLostError)
    assert "node 1" in str(result.error_in_exec) and "SIGKILL" in str(result.error_in_exec)
    assert elapsed < 5.5, elapsed
    result, out = cell(shell, "%%sky --nodes 2 --pool faults\nimport os\nprint('alive', os.getpid())")
    assert result.success, out
    assert f"alive {pids[0]}" in out  # node 0 kept its worker and namespace
    assert manager().pools["faults"].pool.workers[1].handle.pid != pids[1]
    cell(shell, "%sky down faults")


def test_client_silent_past_grace_fires_the_dead_man_switch(tmp_path):
    """A client that stops (SIGSTOP: no heartbeats, connections open) loses its workers after the grace."""
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import sky_jupyter as sky
        pool = sky.ComputePool(nodes=2, grace=2.0, name="deadman").start()
        print(" ".join(str(n.handle.pid) for n in pool.workers), flush=True)
        time.sleep(120)
    """))
    env = {**os.environ, "SKY_JUPYTER_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: not any(_alive(p) for p in pids), timeout=15,
                 what="the workers of a stopped client to end after its grace period")
        log = (tmp_path / "home" / "local" / "deadman" / "node-0" / "worker.log").read_text()
        assert "dead-man switch" in log
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_killed_client_leaves_no_worker(tmp_path):
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import sky_jupyter as sky
        pool = sky.ComputePool(nodes=2, name="orphans").start()
        print(" ".join(str(n.handle.pid) for n in pool.workers), flush=True)
        time.sleep(120)
    """))
    env = {**os.environ, "SKY_JUPYTER_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    pids = [int(p) for p in proc.stdout.readline().split()]
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(_alive(p) for p in pids), timeout=10, what="the workers of a killed client to end")


# -- bad input ---------------------------------------------------------------------------------------------

BAD_CELLS = [
    ("%%sky --nodes 0", "--nodes must be at least 1"),
    ("%%sky --nodes -2", "--nodes must be at least 1"),
    ("%%sky --nodes two", "invalid int value: 'two'"),
    ("%%sky --nodes 1.5", "invalid int value: '1.5'"),
    ("%%sky --provider gcp", "invalid choice: 'gcp'"),
    ("%%sky --provider", "expected one argument"),
    ("%%sky --rank -1", "--rank must be 0 or more"),
    ("%%sky --rank x", "invalid int value: 'x'"),
    ("%%sky --timeout 0", "--timeout must be positive"),
    ("%%sky --timeout soon", "invalid float value: 'soon'"),
    ("%%sky --colour blue", "unrecognized arguments: --colour"),
    ("%%sky stray words", "only options"),
    ("%%sky --pool", "expected one argument"),
    ("%%sky --pool 'bad name'", "may hold only letters"),
    ("%%sky --nodes", "expected one argument"),
]

BAD_BODIES = [
    ("x = (1,", "was never closed"),
    ("def f(:\n    pass", "invalid syntax"),
    ("return 5", "'return' outside function"),
    ("break", "'break' outside loop"),
    ("for in range(3): pass", "invalid syntax"),
    ("print('unclosed)", "unterminated string"),
    ("  indented = 1\nnot = 2", "unexpected indent"),
]

BAD_LINES = [
    ("%sky", "needs a command"),
    ("%sky explode", "unknown %sky command 'explode'"),
    ("%sky config nodes=0", "nodes must be a whole number of at least 1"),
    ("%sky config nodes=-1", "nodes must be a whole number of at least 1"),
    ("%sky config nodes=many", "nodes must be a whole number"),
    ("%sky config provider=gcp", "provider must be one of"),
    ("%sky config colour=blue", "unknown setting 'colour'"),
    ("%sky config nodes", "expected KEY=VALUE"),
    ("%sky config hf=maybe", "hf must be true or false"),
    ("%sky config idle_timeout=-5", "idle_timeout must be positive"),
    ("%sky config idle_timeout=soon", "idle_timeout must be a number"),
    ("%sky config pull_budget=0", "pull_budget must be positive"),
    ("%sky down nosuchpool", "no pool named 'nosuchpool'"),
    ("%sky pull", "usage: %sky pull NAME"),
    ("%sky pull a b", "usage: %sky pull NAME"),
    ("%sky pull nothing_here --pool=nosuchpool", "no running pool named 'nosuchpool'"),
    ("%sky logs 99", "node 99 does not exist"),
]


def _assert_clean_failure(shell, source: str, expected: str) -> None:
    shell.user_ns.pop("ran_anyway", None)
    result, out = cell(shell, source)
    error = result.error_in_exec or result.error_before_exec
    assert error is not None, f"{source!r} did not fail"
    text = f"{out}\n{error}"
    assert expected in text, f"{source!r}: expected {expected!r} in {text!r}"
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    assert len(str(error).strip().splitlines()) <= 2, f"{source!r}: error is not short: {error}"
    assert first_line, source
    assert "ran_anyway" not in shell.user_ns


@pytest.mark.parametrize("line,expected", BAD_CELLS)
def test_bad_cell_lines(shell, line, expected):
    cell(shell, "%%sky\nwarm = 1")  # a working pool, which must keep working
    _assert_clean_failure(shell, f"{line}\nran_anyway = True", expected)
    result, _ = cell(shell, "%%sky\nafter = warm + 1")
    assert result.success and shell.user_ns["after"] == 2


@pytest.mark.parametrize("body,expected", BAD_BODIES)
def test_cells_that_do_not_parse(shell, body, expected):
    cell(shell, "%%sky\nwarm = 1")
    _assert_clean_failure(shell, f"%%sky\nran_anyway = True\n{body}", expected)
    result, _ = cell(shell, "%%sky\nafter = warm + 1")
    assert result.success


@pytest.mark.parametrize("line,expected", BAD_LINES)
def test_bad_line_commands(shell, line, expected):
    cell(shell, "%%sky\nwarm = 1")
    _assert_clean_failure(shell, line, expected)
    result, _ = cell(shell, "%%sky\nafter = warm + 1")
    assert result.success


BAD_API = [
    (lambda: sky.ComputePool(nodes=0), sky.ConfigError, "nodes must be a whole number of at least 1, got 0"),
    (lambda: sky.ComputePool(nodes=-3), sky.ConfigError, "got -3"),
    (lambda: sky.ComputePool(nodes="2"), sky.ConfigError, "got '2'"),
    (lambda: sky.ComputePool(nodes=True), sky.ConfigError, "got True"),
    (lambda: sky.ComputePool(provider="aws"), sky.ConfigError, "provider must be sky.Local()"),
    (lambda: sky.ComputePool(provider=sky.Local), sky.ConfigError, "forget the parentheses"),
    (lambda: sky.ComputePool(image={"pip": []}), sky.ConfigError, "image must be a sky.Image"),
    (lambda: sky.ComputePool(plugins=[sky.plugins.torch]), sky.ConfigError, "plugins[0] is function"),
    (lambda: sky.ComputePool(name="no spaces"), sky.ConfigError, "may hold only letters"),
    (lambda: sky.Image(pip="numpy"), sky.ConfigError, "list of package names"),
    (lambda: sky.Image(env={"9LIVES": "x"}), sky.ConfigError, "'9LIVES' is not a valid"),
    (lambda: sky.plugins.torch(backend="tcp"), sky.ConfigError, "torch backend must be one of"),
    (lambda: sky.gather(1, 2), TypeError, "sky.gather argument 0 is int"),
    (lambda: sky.compute(5), TypeError, "decorates a function"),
    (lambda: sky.Plugin.create(""), sky.ConfigError, "non-empty name"),
    (lambda: sky.SSH(hosts=["user@:22"]), sky.ConfigError, "SSH host 'user@:22' is not"),
    (lambda: sky.SSH(hosts=["a@b:notaport"]), sky.ConfigError, "SSH host 'a@b:notaport' is not"),
    (lambda: sky.SSH(hosts=[]), sky.ConfigError, "non-empty list of hosts"),
    (lambda: sky.ComputePool(provider=sky.SSH(["gpu1"], key_file="/nonexistent/key")).start(), sky.ConfigError,
     "/nonexistent/key"),
    (lambda: sky.plugins.huggingface(token=""), sky.ConfigError, "token from token= is empty"),
    (lambda: sky.plugins.huggingface(token="hf_abc def"), sky.ConfigError, "contains whitespace"),
    (lambda: sky.ComputePool(image=sky.Image(pip=["sky-no-such-package-zz"]), name="nopkg").start(),
     sky.ConfigError, "sky-no-such-package-zz"),
]


@pytest.mark.parametrize("make,error,expected", BAD_API)
def test_bad_api_input(make, error, expected):
    with pytest.raises(error) as info:
        make()
    assert expected in str(info.value)
    assert len(str(info.value).splitlines()) == 1


def test_bad_input_table_is_large_enough():
    assert len(BAD_CELLS) + len(BAD_BODIES) + len(BAD_LINES) + len(BAD_API) >= 40


# -- load --------------------------------------------------------------------------------------------------

def test_a_thousand_cells_keep_memory_and_files_flat(shell):
    cell(shell, "%%sky --nodes 2 --pool load\nn = 0")
    for _ in range(100):  # warm up caches before measuring
        cell(shell, "%%sky --nodes 2 --pool load\nn = n + 1")
    rss, fds = _rss_kb(), _fds()
    for _ in range(1000):
        result, out = cell(shell, "%%sky --nodes 2 --pool load\nn = n + 1")
        assert result.success, out
    assert shell.user_ns["n"] == 1100
    grown_kb, fd_delta = _rss_kb() - rss, _fds() - fds
    print(f"1000 cells on 2 nodes: RSS grew {grown_kb} KB, open files changed by {fd_delta}")
    assert grown_kb < 30_000, f"client memory grew by {grown_kb} KB over 1000 cells"
    assert abs(fd_delta) <= 2
    cell(shell, "%sky down load")


def test_two_hundred_concurrent_tasks_from_eight_threads(local_pool):
    double = sky.compute(lambda v: 2 * v)
    for i in range(50):
        double(i) >> local_pool
    rss, fds = _rss_kb(), _fds()
    errors: list[BaseException] = []
    results: dict[int, int] = {}

    def work(base: int) -> None:
        try:
            for i in range(25):
                results[base + i] = double(base + i) >> local_pool
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 100,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 200 and all(v == 2 * k for k, v in results.items())
    assert _rss_kb() - rss < 20_000 and abs(_fds() - fds) <= 2
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


# -- faults on the real sshd cluster ---------------------------------------------------------------------------

def _slow_value(seconds: float) -> str:
    print("started", flush=True)
    time.sleep(seconds)
    return "slept"


@pytest.mark.ssh
def test_ssh_cut_mid_task_delivers_the_result(sshd_cluster):
    from sky_jupyter import protocol as P
    from tests.test_ssh import drop_user_sessions, provider

    node = sshd_cluster.nodes[0]
    with sky.ComputePool(provider=provider(sshd_cluster, [node]), name="cut-task") as pool:
        pool.workers[0].submit(P.CELL, {"code": "kept = 7"}).wait(30)
        printed: list[str] = []
        call = pool.submit(sky.compute(_slow_value)(2.0), sink=lambda kind, meta: printed.append(meta.get("text", "")))
        wait_for(lambda: "started" in "".join(printed), what="the task to start on the node")
        assert drop_user_sessions(node) > 0  # the SSH connection dies while the task runs
        assert call.wait(60) == "slept"  # delivered after the reconnect: the worker held it until acknowledged
        assert pool.workers[0].submit(P.CELL, {"code": "kept"}).wait(30)["value"] == 7


@pytest.mark.ssh
def test_a_node_whose_sshd_and_worker_are_gone(sshd_cluster):
    from tests.test_ssh import provider, rank_and_hostname

    victim = sshd_cluster.nodes[2]
    with sky.ComputePool(provider=provider(sshd_cluster), nodes=3, name="one-gone") as pool:
        try:
            sshd_cluster.ssh(victim, "pkill -KILL -u \"$(id -u)\" -f 'sky_jupyter[.]worker'; true")
            sshd_cluster.stop_node(victim)
            with pytest.raises(sky.SkyError) as info:
                rank_and_hostname() @ pool
            assert "node 2" in str(info.value)
            ranks = {(rank_and_hostname() >> pool)[0] for _ in range(6)}
            assert ranks <= {0, 1} and ranks
            states = {row["rank"]: row["state"] for row in pool.status()}
            assert states[2] in ("unreachable", "lost"), states
            assert states[0] == states[1] == "ready"
        finally:
            sshd_cluster.restart_sshd(victim)


@pytest.mark.ssh
def test_a_killed_client_leaves_no_worker_on_ssh_nodes(sshd_cluster, tmp_path):
    from tests.test_ssh import workers_on

    nodes = sshd_cluster.nodes[:2]
    hosts = [n.host_string for n in nodes]
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import sky_jupyter as sky
        pool = sky.ComputePool(provider=sky.SSH({hosts!r}, key_file={str(sshd_cluster.key_file)!r}), nodes=2,
                               grace=3.0, name="killed-client").start()
        print("ready", flush=True)
        time.sleep(120)
    """))
    env = {**os.environ, "SKY_JUPYTER_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert all(workers_on(sshd_cluster, n) for n in nodes)
    finally:
        proc.kill()
        proc.wait()
    wait_for(lambda: not any(workers_on(sshd_cluster, n) for n in nodes), timeout=30, interval=0.5,
             what="the SSH workers of a killed client to end")


@pytest.mark.ssh
def test_a_program_that_exits_without_closing_its_pool_shuts_it_down(sshd_cluster, tmp_path):
    from sky_jupyter import state
    from tests.test_ssh import workers_on

    nodes = sshd_cluster.nodes[:2]
    script = tmp_path / "forgetful.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        import sky_jupyter as sky
        pool = sky.ComputePool(provider=sky.SSH({[n.host_string for n in nodes]!r},
                                                key_file={str(sshd_cluster.key_file)!r}), nodes=2,
                               name="forgotten").start()
        print(sky.compute(lambda: "ran")() >> pool)
    """))  # ends without pool.close(): the exit handler must close it, before paramiko's closes the connections
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ran", done.stderr
    assert not any(workers_on(sshd_cluster, n) for n in nodes), "workers outlived a program that exited"
    assert state.load("forgotten") is None


@pytest.mark.ssh
def test_ssh_workers_listen_on_localhost_only(sshd_cluster):
    from tests.test_ssh import provider

    node = sshd_cluster.nodes[1]
    with sky.ComputePool(provider=provider(sshd_cluster, [node]), name="listen-check") as pool:
        port = pool.workers[0].handle.port
        rows = sshd_cluster.ssh(node, "cat /proc/net/tcp /proc/net/tcp6 2>/dev/null", check=True).stdout.splitlines()
        listening = {r.split()[1] for r in rows[1:] if len(r.split()) > 3 and r.split()[3] == "0A"
                     and r.split()[1].rsplit(":", 1)[1] == f"{port:04X}"}
        assert listening == {f"0100007F:{port:04X}"}


# -- secrets ---------------------------------------------------------------------------------------------------

def _cmdlines_with(secret: str, stop: threading.Event, found: list[str]) -> None:
    """Watch every process command line on this machine (test nodes' processes included) for ``secret``."""
    while not stop.is_set():
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if secret.encode() in f.read():
                            found.append(entry)
                except OSError:
                    continue
        stop.wait(0.02)


@pytest.mark.ssh
def test_the_hf_token_is_only_in_the_env_file_and_the_token_file(sshd_cluster, hf_hub, sky_home, capfd,
                                                                   monkeypatch):
    """A recognisable fake token through a working HF pool and a failing bootstrap: it shows up nowhere but
    the node's env file and the Hub's token files, all 0600."""
    from tests.test_ssh import provider

    for name in ("HF_TOKEN", "HF_HOME", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    token = hf_hub.token
    assert token.startswith("hf_skytest")
    endpoint = hf_hub.listen(sshd_cluster.bridge_addr)
    node = sshd_cluster.nodes[1]
    stop, cmdlines = threading.Event(), []
    watcher = threading.Thread(target=_cmdlines_with, args=(token, stop, cmdlines), daemon=True)
    watcher.start()
    try:
        hf = sky.plugins.huggingface(token=token, endpoint=endpoint)
        image = sky.Image(env={"HF_HOME": "~/hf-secrets"})
        with sky.ComputePool(provider=provider(sshd_cluster, [node]), plugins=[hf], image=image,
                             name="secrets-ok") as pool:
            loaded = sky.compute(_load_gated)("sky-test/tiny-bert") >> pool
            assert loaded == "BertForSequenceClassification"
        bad_image = sky.Image(pip=["sky-jupyter-no-such-package-zz"],
                              env={"UV_OFFLINE": "1", "HF_HOME": "~/hf-secrets"})
        with pytest.raises(sky.BootstrapError) as info:
            with sky.ComputePool(provider=provider(sshd_cluster, [node]), plugins=[hf], image=bad_image,
                                 name="secrets-bad"):
                pass
        texts = [str(info.value), repr(info.value), info.value.tail]
        # A tool that prints its credentials as it fails: masked on the node (its log) and here (the error).
        chatty = sky.Plugin.create("chatty").with_bootstrap(
            lambda cluster: ['echo "debug: using token $HF_TOKEN"', "exit 3"])
        with pytest.raises(sky.BootstrapError) as info:
            with sky.ComputePool(provider=provider(sshd_cluster, [node]), plugins=[hf, chatty], image=image,
                                 name="secrets-chatty"):
                pass
        assert info.value.exit_code == 3 and "debug: using token ***" in info.value.tail
        texts += [str(info.value), repr(info.value), info.value.tail]
    finally:
        stop.set()
        watcher.join()
    out, err = capfd.readouterr()
    assert all(token not in t for t in [*texts, out, err])
    assert cmdlines == [], "the token appeared on a process command line"
    for path in sky_home.rglob("*"):
        # Local pools of other tests log their node folders into this Hub too: their token files are the
        # only place the token may be, private.
        if path.is_file() and token.encode() in path.read_bytes():
            assert path.name in ("token", "stored_tokens", "env.sh"), f"client file {path} holds the token"
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    holders = []
    for path in node.home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                if token.encode() in path.read_bytes():
                    holders.append(path)
            except OSError:
                continue
    assert holders == [], f"the token stayed on the node after its pools closed: {holders}"


def _load_gated(repo: str) -> str:
    from transformers import AutoModelForSequenceClassification

    return type(AutoModelForSequenceClassification.from_pretrained(repo)).__name__
