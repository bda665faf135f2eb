"""The widget panel, driven from Python (set values, click buttons) against real Local worker processes, a real
IPython shell with the extension loaded, the local Hub, and the SSH test nodes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

pytest.importorskip("ipywidgets")
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import sky_jupyter as sky
from sky_jupyter.notebook.manager import Settings, manager
from sky_jupyter.notebook.panel import Panel, hourly_price
from tests.waiting import wait_for

if TYPE_CHECKING:
    from tests.fixtures.hub import HubFixture
    from tests.fixtures.sshd_cluster import Cluster

ROOT = Path(__file__).resolve().parents[1]
HF_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_TOKEN_PATH")
DEFAULTS = {f: getattr(Settings(), f) for f in Settings.__slots__}


@pytest.fixture
def panel():
    """A fresh panel on the kernel's manager, with default settings (the local provider, no torch)."""
    mgr = manager()
    mgr.down(everything=True)
    mgr.configure(**{**DEFAULTS, "torch": False})
    p = Panel(mgr)
    yield p
    p.close()
    mgr.down(everything=True)
    mgr.configure(**DEFAULTS)


@pytest.fixture
def shell():
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext sky_jupyter", store_history=False)
    return ip


def cell(ip: InteractiveShell, source: str) -> tuple[Any, str, str]:
    with capture_output(display=True) as cap:
        result = ip.run_cell(textwrap.dedent(source).strip("\n") + "\n", store_history=True)
    if not result.success:
        raise AssertionError(f"cell failed: {result.error_in_exec or result.error_before_exec!r}\n{cap.stderr}")
    return result.result, cap.stdout, cap.stderr


def table_text(p: Panel) -> str:
    return re.sub(r"<[^>]+>", " ", p.table.value)


def events_of(mgr) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    mgr.listeners.append(lambda event, name: seen.append((event, name)))
    return seen


def all_widget_states() -> str:
    """Every live widget's state, as the notebook would save it."""
    from ipywidgets.widgets.widget import _instances

    return json.dumps([w.get_state() for w in list(_instances.values())], default=str)


# -- launch, progress, shutdown ------------------------------------------------------------------------------------
def test_importing_the_package_does_not_import_ipywidgets():
    code = ("import sys, sky_jupyter as sky; assert 'ipywidgets' not in sys.modules; "
            "assert callable(sky.panel); assert 'ipywidgets' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.stdout.strip() == "ok", out.stderr


def test_launch_shows_each_nodes_bootstrap_then_ready_then_shut_down(panel, hf_hub: HubFixture, monkeypatch):
    """2 Local nodes with the HuggingFace plugin: its login is a real bootstrap phase against the local Hub."""
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    manager().configure(pool="panel-hf")
    tables: list[str] = []
    panel.table.observe(lambda change: tables.append(change["new"]), "value")

    panel.nodes.value = 2
    panel.hf.value = True
    panel.token.value = hf_hub.token
    started = time.monotonic()
    panel.launch_button.click()
    clicked = time.monotonic() - started
    assert clicked < 0.5, "Launch must not block the notebook"
    assert panel.launch_button.disabled and panel.launch_button.description == "Launching..."
    panel.wait(120)

    assert panel.launch_button.disabled is False
    texts = [re.sub(r"<[^>]+>", " ", t) for t in tables]
    during = [t for t in texts if "bootstrapping" in t]
    assert during, "the table never showed a node bootstrapping"
    assert any(re.search(r"huggingface \(1/1\)", t) for t in during)
    assert any("<progress" in t for t in tables if "bootstrapping" in t)
    rows = panel.rows()
    assert [(r["pool"], r["node"], r["state"], r["phase"], r["address"]) for r in rows] == [
        ("panel-hf", 0, "ready", "done", "127.0.0.1"), ("panel-hf", 1, "ready", "done", "127.0.0.1")]
    assert all(r["cost"] is None for r in rows) and "n/a" in table_text(panel)
    assert "2 of 2 nodes ready" in panel.state.value
    assert any("pool 'panel-hf' ready: 2 nodes" in m for m in panel.messages)
    assert [r.path for r in hf_hub.requests].count("/api/whoami-v2") >= 2  # each node logged in for real
    assert hf_hub.token not in "".join(panel.messages) + all_widget_states()

    panel.down_button.click()
    panel.wait(60)
    assert "panel-hf" not in manager().pools
    assert panel.rows() == [] and "No nodes" in panel.table.value
    assert any("pool 'panel-hf' shut down" in m for m in panel.messages)


def test_a_failed_launch_is_reported_in_the_log_and_the_panel_recovers(panel, hf_hub: HubFixture, monkeypatch):
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hf_hub.url)
    manager().configure(pool="panel-rejected")
    panel.hf.value = True
    panel.token.value = "hf_notAcceptedByTheHub123"
    panel.launch_button.click()
    panel.wait(120)
    failure = [m for m in panel.messages if "launch failed" in m]
    assert failure and "rejected the HF token" in failure[0]
    assert "hf_notAcceptedByTheHub123" not in "".join(panel.messages)
    assert "panel-rejected" not in manager().pools and panel.rows() == []
    assert panel.launch_button.disabled is False


# -- one configuration with %%sky ----------------------------------------------------------------------------------
def test_what_the_panel_sets_is_what_a_bare_sky_cell_uses(panel, shell):
    panel.nodes.value = 2
    panel.idle.value = 12
    panel.accelerator.value = "cpu"
    assert manager().settings.nodes == 2 and manager().settings.idle_timeout == 720
    _, out, _ = cell(shell, """
        %%sky
        import sky_jupyter as sky
        info = sky.instance_info()
        print("rank", info.rank, "of", info.world_size)
    """)
    assert "rank 0 of 2" in out and "rank 1 of 2" in out
    npool = manager().pools["default"]
    assert npool.pool.size == 2 and npool.pool.idle_timeout == 720 and npool.pool.accelerator == "cpu"
    # The pool the cell started is in the panel's table, and the log says where it came from.
    assert [(r["node"], r["state"]) for r in panel.rows()] == [(0, "ready"), (1, "ready")]
    assert [[w["rank"] for w in r["workers"]] for r in panel.rows()] == [[0], [1]]
    assert "ready" in table_text(panel)
    # One worker per node: the table as before, one row per node and no worker rows.
    assert panel.table.value.count("sky-node-row") == 2 and "sky-worker-row" not in panel.table.value
    assert "2 of 2 nodes ready<" in panel.state.value
    assert any("started by a cell" in m for m in panel.messages)

    # And the other way: %sky config shows up in the panel's fields.
    cell(shell, "%sky config nodes=3 provider=ssh hosts=alice@gpu1,alice@gpu2 spot=true")
    assert (panel.nodes.value, panel.provider.value, panel.hosts.value, panel.spot.value) == (
        3, "ssh", "alice@gpu1, alice@gpu2", True)
    assert panel.hosts_row.layout.display == ""
    cell(shell, "%sky config provider=local")
    assert panel.hosts_row.layout.display == "none"

    cell(shell, "%sky down")
    assert panel.rows() == []
    assert any("pool 'default' shut down" in m for m in panel.messages)


def test_sky_panel_magic_and_sky_panel_show_the_kernels_one_panel(shell):
    result, _, _ = cell(shell, "%sky panel")
    assert result is sky.panel() and result is sky.panel()
    bundle = result._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == result.view.model_id
    assert "sky_jupyter panel" in bundle["text/plain"]  # not the repr of every child widget
    result.close()
    assert sky.panel() is not result and not sky.panel().closed  # a closed panel is replaced on the next call
    sky.panel().close()


def test_launch_grows_a_running_pool_and_reports_it(panel):
    panel.launch_button.click()
    panel.wait(60)
    assert manager().pools["default"].pool.size == 1
    panel.nodes.value = 2
    panel.launch_button.click()
    panel.wait(60)
    assert manager().pools["default"].pool.size == 2
    assert any("grew to 2 nodes" in m for m in panel.messages)
    panel.launch_button.click()
    panel.wait(60)
    assert "already running with 2 nodes" in panel.messages[-1]


# -- several workers per node --------------------------------------------------------------------------------------
def test_a_node_with_two_workers_shows_one_row_per_worker_under_it(panel, tmp_path):
    from sky_jupyter import protocol as P

    panel.workers.value = "2"
    assert manager().settings.workers_per_node == 2
    assert panel.request().workers_per_node == 2
    panel.launch_button.click()
    panel.wait(60)
    assert any("ready: 1 node (2 workers)" in m for m in panel.messages), panel.messages
    pool = manager().pools["default"].pool
    assert [(w.rank, w.node, w.local_rank) for w in pool.workers] == [(0, 0, 0), (1, 0, 1)]

    (row,) = panel.rows()
    assert (row["node"], row["state"], row["address"]) == (0, "ready", "127.0.0.1")
    assert [(w["rank"], w["worker"], w["state"]) for w in row["workers"]] == [(0, 0, "ready"), (1, 1, "ready")]
    assert "1 of 1 node ready (2 workers)" in panel.state.value
    table = panel.table.value
    assert table.count("sky-node-row") == 1 and table.count("sky-worker-row") == 2
    assert table.index("sky-node-row") < table.index("data-rank='0'") < table.index("data-rank='1'")
    text = table_text(panel)
    assert re.search(r"rank 0\s+worker 0 of 2\s+ready\s+idle", text), text
    assert re.search(r"rank 1\s+worker 1 of 2\s+ready\s+idle", text), text

    # What a worker runs and its memory (as its heartbeat reports it) show on its own row.
    for worker in pool.workers:
        worker.ping(timeout=10)
    release = tmp_path / "release"  # the task runs until the test has looked at the table
    code = f"import os, time\nwhile not os.path.exists({str(release)!r}):\n    time.sleep(0.02)\n"
    call = pool.workers[1].submit(P.CELL, {"code": code})
    try:
        panel.refresh()
        busy = [(w["rank"], w["in_flight"]) for w in panel.rows()[0]["workers"]]
        assert busy == [(0, 0), (1, 1)]
        assert all(w["rss"] and w["rss"] > 1 << 20 for w in panel.rows()[0]["workers"])
        text = table_text(panel)
        assert re.search(r"rank 0\s+worker 0 of 2\s+ready\s+idle\s+&middot;\s+\d+ MiB", text), text
        assert re.search(r"rank 1\s+worker 1 of 2\s+ready\s+busy \(1 task\)", text), text
    finally:
        release.touch()
    call.wait(30)
    panel.refresh()
    assert "busy" not in table_text(panel)

    # A Launch that asks another worker count of the running pool is refused, and says how to restart it.
    panel.workers.value = "auto"
    panel.launch_button.click()
    panel.wait(60)
    assert "launch failed" in panel.messages[-1] and "workers_per_node 2 (asked 'auto')" in panel.messages[-1]
    assert "(or click Shut down)" in panel.messages[-1]


def test_workers_per_node_field_follows_the_settings_and_rejects_bad_values(panel, shell):
    assert panel.workers.value == "auto" and manager().settings.workers_per_node == "auto"
    panel.workers.value = " 4 "
    assert manager().settings.workers_per_node == 4 and panel.notes["workers"].value == ""
    seen = events_of(manager())
    for bad in ("0", "two", "1.5", "-3"):
        panel.workers.value = bad
        note = panel.notes["workers"].value
        assert "workers_per_node must be 'auto' or a whole number" in note and "\n" not in note, note
        assert manager().settings.workers_per_node == 4  # the previous setting stays
    assert seen == []  # nothing was written
    assert panel.workers.value == "-3"  # what was typed stays in the field, to fix
    assert panel.launch() is None and "workers: workers_per_node must be" in panel.messages[-1]
    cell(shell, "%sky config nodes=2")  # a settings change elsewhere keeps the field as typed while it is wrong
    assert panel.workers.value == "-3" and panel.errors.keys() == {"workers"}
    panel.workers.value = "AUTO"
    assert manager().settings.workers_per_node == "auto" and panel.errors == {}
    panel.workers.value = ""  # emptied: the default
    assert manager().settings.workers_per_node == "auto" and panel.errors == {}

    # %sky config shows up in the field, and a panel opened later starts from the settings.
    cell(shell, "%sky config workers_per_node=3")
    assert panel.workers.value == "3"
    other = Panel(manager())
    try:
        assert other.workers.value == "3"
    finally:
        other.close()


# -- invalid input ------------------------------------------------------------------------------------------------
def test_invalid_inputs_are_shown_next_to_their_field_and_launch_nothing(panel):
    seen = events_of(manager())
    before = manager().settings

    panel.nodes.value = 0
    assert "at least 1 node" in panel.notes["nodes"].value
    panel.accelerator.value = "B300X"
    assert "unknown accelerator 'B300X'" in panel.notes["accelerator"].value
    assert "A100" in panel.notes["accelerator"].value and "H100" in panel.notes["accelerator"].value
    panel.idle.value = 0
    assert "more than 0" in panel.notes["idle"].value
    panel.token.value = "hf_two words SECRETPART"
    assert panel.token.value == ""
    assert "whitespace" in panel.notes["token"].value and "SECRETPART" not in panel.notes["token"].value
    panel.provider.value = "ssh"
    assert "needs hosts" in panel.notes["hosts"].value

    assert panel.launch() is None
    panel.launch_button.click()
    assert set(panel.errors) == {"nodes", "accelerator", "idle", "token", "hosts"}
    assert "not launched, fix first" in panel.messages[-1]
    assert manager().pools == {} and manager().starting == {}
    assert [e for e, _ in seen if e != "settings"] == []
    settings = manager().settings
    assert (settings.nodes, settings.accelerator, settings.idle_timeout, settings.hf_token) == (
        before.nodes, before.accelerator, before.idle_timeout, before.hf_token)

    # Fixing each field clears its message.
    panel.nodes.value = 2
    panel.accelerator.value = "a10g"
    panel.idle.value = 5
    panel.token.value = "hf_goodTokenWithoutSpaces1"
    panel.hosts.value = "alice@gpu1, alice@gpu2"
    assert panel.errors == {}
    assert "g5.xlarge" in panel.notes["accelerator"].value and "token set" in panel.notes["token"].value
    assert manager().settings.hosts == ("alice@gpu1", "alice@gpu2")


def test_accelerator_note_shows_instance_type_and_price(panel):
    panel.provider.value = "aws"
    panel.nodes.value = 2
    panel.accelerator.value = "A100"
    note = panel.notes["accelerator"].value
    assert "p4d.24xlarge" in note and "$21.96/h per node" in note and "$43.92/h for 2 nodes" in note
    panel.spot.value = True
    assert "spot costs less" in panel.notes["accelerator"].value
    panel.provider.value = "local"
    assert "Local: runs here, no cost" in panel.notes["accelerator"].value
    # The cost column: AWS nodes count the table's hourly price; Local and SSH machines cost us nothing to count.
    assert (hourly_price("aws", "A100"), hourly_price("aws", None)) == (21.96, 0.2016)
    assert hourly_price("local", "A100") is None and hourly_price("ssh", "A100") is None


# -- the token -----------------------------------------------------------------------------------------------------
def test_the_token_is_read_into_the_kernel_and_never_kept_in_widget_state(panel, tmp_path):
    import nbformat
    from ipywidgets.embed import embed_data

    token = "hf_panelSecretToken12345"
    # What the browser sends when the user presses Enter: a comm update of the field's value. Record what the
    # kernel sends back: ipywidgets echoes updates by default; the token must not travel back.
    sent: list[Any] = []
    comm = panel.token.comm
    original = comm.send
    comm.send = lambda data=None, metadata=None, buffers=None: (sent.append(data), original(data, metadata, buffers))
    try:
        panel.token.set_state({"value": token})
    finally:
        comm.send = original
    assert panel.token.value == ""
    assert manager().settings.hf_token == token
    assert manager().settings.public()["hf_token"] == "set"
    assert "token set" in panel.notes["token"].value
    assert token not in json.dumps(sent) and {"value": ""} in [d.get("state") for d in sent]
    assert token not in all_widget_states()
    assert all(token not in json.dumps(w.get_state(), default=str) for w in panel.children())
    assert token not in "".join(panel.messages)

    # The notebook as saved with its widget state: the token is nowhere in the file.
    data = embed_data(views=[panel.view])
    nb = nbformat.v4.new_notebook()
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": data["manager_state"]}
    nb.cells.append(nbformat.v4.new_code_cell("%sky panel", outputs=[nbformat.v4.new_output(
        "display_data", data={"application/vnd.jupyter.widget-view+json": data["view_specs"][0]})]))
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, path)
    saved = path.read_text()
    assert panel.view.model_id in saved and "PasswordModel" in saved
    assert token not in saved


# -- the SSH test nodes --------------------------------------------------------------------------------------------
@pytest.mark.ssh
@pytest.mark.slow
def test_launch_on_the_ssh_test_nodes_shows_real_bootstrap_phases(panel, sshd_cluster: Cluster):
    import shutil

    nodes = sshd_cluster.nodes[:2]
    for node in nodes:
        shutil.rmtree(node.home / ".sky_jupyter", ignore_errors=True)
    manager().configure(key_file=str(sshd_cluster.key_file), pool="panel-ssh")
    tables: list[str] = []
    panel.table.observe(lambda change: tables.append(re.sub(r"<[^>]+>", " ", change["new"])), "value")
    panel.provider.value = "ssh"
    panel.hosts.value = ", ".join(n.host_string for n in nodes)
    panel.nodes.value = 2
    panel.launch_button.click()
    panel.wait(300)
    assert not [m for m in panel.messages if "failed" in m], panel.messages
    phases = {m.group(1) for t in tables for m in re.finditer(r"bootstrapping\s+(\w+) \(\d+/\d+\)", t)}
    assert len(phases) >= 2, tables[-3:]
    rows = panel.rows()
    assert [(r["node"], r["state"], r["phase"]) for r in rows] == [(0, "ready", "done"), (1, "ready", "done")]
    assert [r["address"] for r in rows] == [f"{n.user}@{n.addr}" for n in nodes]
    panel.down_button.click()
    panel.wait(60)
    assert panel.rows() == []


def test_a_pool_left_by_a_dead_kernel_is_offered_for_attach_and_shut_down(panel, sshd_cluster: Cluster, tmp_path):
    from sky_jupyter import protocol as P
    from tests.test_attach import abandon, api_client
    from tests.test_ssh import workers_on

    abandon(api_client(sshd_cluster, "panel-left") + """
        @sky.compute
        def slow():
            import time
            time.sleep(0.5)
            print("still going", flush=True)
            return 1

        pool.submit(slow(), node=pool.workers[0])
    """, tmp_path)
    panel.refresh()
    assert panel.attach_button.layout.display == "none"  # the configured pool is another one
    manager().configure(pool="panel-left", provider="ssh", hosts=tuple(sshd_cluster.host_strings()[:2]),
                        key_file=str(sshd_cluster.key_file))
    panel.refresh()
    assert panel.attach_button.layout.display == "" and "left running by a kernel" in panel.detached_note.value
    panel.launch_button.click()  # a new pool over its record is refused, and the log says what to do
    panel.wait(60)
    assert "(or click Attach, or Shut down)" in panel.messages[-1]
    panel.attach_button.click()
    panel.wait(60)
    wait_for(lambda: any("[node 0] still going" in m for m in panel.messages), timeout=15,
             what="the output of the task the dead kernel left running")
    log = "\n".join(panel.messages)
    assert "attached to pool 'panel-left': 2 nodes" in log and "node 0 still runs" in log, log
    assert "[node 0] still going" in log, log
    npool = manager().pools["panel-left"]
    assert [n.submit(P.CELL, {"code": "x"}).wait(30)["value"] for n in npool.pool.workers] == [40, 41]
    assert panel.attach_button.layout.display == "none"
    assert [r["state"] for r in panel.rows()] == ["ready", "ready"]
    panel.down_button.click()
    panel.wait(60)
    assert not any(workers_on(sshd_cluster, n) for n in sshd_cluster.nodes[:2])
