"""A notebook through a real Jupyter kernel (nbclient, ipykernel) on the Local provider: globals in and out, a
two-node cell grouped per node, and remote cells as IPython cells (``!cmd``, ``%pip``, matplotlib, HTML,
DataFrames, tqdm, display updates), checked in the outputs nbclient saves, as nbval would see them."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import socket
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.shell import kernelspec  # noqa: E402 - after the skips

PACKAGE = "sky_tiny_pkg"


def tiny_wheel(folder: Path) -> Path:
    """A one-module wheel built by hand: ``%pip install`` of it needs no index and no build backend."""
    dist = f"{PACKAGE}-0.1.dist-info"
    files = {
        f"{PACKAGE}/__init__.py": "VALUE = 42\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PACKAGE}\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: sky-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{PACKAGE}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return wheel


def cells(wheel: Path, node_site: Path) -> list[tuple[str, str]]:
    """(tag, source) of each code cell."""
    return [
        ("setup", f"""\
import os
# Local nodes share this machine's Python: give them their own site folder, so that what %pip installs on a
# node is importable there and not in this kernel. No package index is contacted.
os.environ.update(PIP_TARGET={str(node_site)!r}, PYTHONPATH={str(node_site)!r}, PIP_NO_INDEX="1",
                  PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_CACHE_DIR="1")
%load_ext sky_jupyter
%sky config pool=kernel-test torch=false"""),
        ("interpreter", "import sys\nprint(sys.executable)"),
        ("inputs", "data = list(range(10))\nfactor = 3"),
        ("globals", """\
%%sky
scaled = [x * factor for x in data]
total = sum(scaled)
print(f"computed {len(scaled)} values on the node")
total"""),
        ("back", "scaled[:3], total"),
        ("two-nodes", """\
%%sky --nodes 2
import sky_jupyter as sky
part = sky.shard(data)
print(f"rank {sky.instance_info().rank} sums {part} to {sum(part)}")"""),
        ("hostname", "%%sky\n!hostname"),
        ("pip", f"%%sky\n%pip install --no-index --no-deps {wheel}"),
        ("use-pkg", f"%%sky\nimport {PACKAGE}\npkg_value = {PACKAGE}.VALUE"),
        ("local-pkg", f"""\
import importlib.util
print("pkg_value", pkg_value)
print("importable here:", importlib.util.find_spec({PACKAGE!r}) is not None)"""),
        ("plot", """\
%%sky
import matplotlib.pyplot as plt
plt.plot([1, 3, 2])
plt.title("made on the node");"""),
        ("html", """\
%%sky
from IPython.display import HTML, display
import pandas as pd
display(HTML("<b>bold from the node</b>"))
pd.DataFrame({"a": [1, 2], "b": [3, 4]})"""),
        ("tqdm", """\
%%sky
from tqdm.auto import tqdm
for step in tqdm(range(1000), mininterval=0):
    pass"""),
        ("order", """\
%%sky
from IPython.display import HTML, display
print("first")
display(HTML("<i>second</i>"))
print("third")"""),
        ("update", """\
%%sky
from IPython.display import HTML, display
handle = display(HTML("<p>starting</p>"), display_id=True)
handle.update(HTML("<p>finished</p>"))"""),
        ("down", "%sky down --all"),
    ]


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("kernel")
    wheel = tiny_wheel(root)
    node_site = root / "node-site"
    node_site.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source, metadata={"tags": [tag]}) for tag, source in cells(wheel, node_site)]
    mp = pytest.MonkeyPatch()
    mp.setenv("JUPYTER_PATH", str(kernelspec(root / "jupyter")))
    mp.delenv("SKY_JUPYTER_PLAIN", raising=False)
    try:
        client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=120,
                                         resources={"metadata": {"path": str(root)}})
        client.execute()
    finally:
        mp.undo()
    saved = root / "executed.ipynb"
    nbformat.write(nb, saved)
    return {"cells": {c.metadata["tags"][0]: c for c in nb.cells}, "saved": saved, "node_site": node_site}


def text(cell: Any, name: str | None = None) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and (name is None or o.name == name))


def data(cell: Any, output_type: str) -> list[dict[str, Any]]:
    return [o.data for o in cell.outputs if o.output_type == output_type]


def test_the_kernel_runs_this_environments_python(executed):
    assert text(executed["cells"]["interpreter"]) == sys.executable + "\n"


def test_globals_go_in_and_come_back(executed):
    cell = executed["cells"]["globals"]
    assert text(cell) == "computed 10 values on the node\n"
    assert data(cell, "execute_result") == [{"text/plain": "135"}]
    assert data(executed["cells"]["back"], "execute_result") == [{"text/plain": "([0, 3, 6], 135)"}]


def test_two_node_output_is_grouped_per_node(executed):
    assert text(executed["cells"]["two-nodes"]) == (
        "[node 0]\nrank 0 sums [0, 1, 2, 3, 4] to 10\n[node 1]\nrank 1 sums [5, 6, 7, 8, 9] to 35\n")


def test_shell_command_prints_the_nodes_hostname(executed):
    assert text(executed["cells"]["hostname"]) == socket.gethostname() + "\n"


def test_pip_install_on_the_node_is_importable_there_and_not_here(executed):
    assert "Successfully installed" in text(executed["cells"]["pip"])
    assert text(executed["cells"]["local-pkg"]) == "pkg_value 42\nimportable here: False\n"
    assert (executed["node_site"] / PACKAGE / "__init__.py").exists()
    assert importlib.util.find_spec(PACKAGE) is None


def test_matplotlib_figure_arrives_as_png(executed):
    cell = executed["cells"]["plot"]
    (figure,) = data(cell, "display_data")
    assert base64.b64decode(figure["image/png"]).startswith(b"\x89PNG")
    assert not data(cell, "execute_result")  # the trailing semicolon hides the last value, as locally


def test_html_and_dataframe_arrive_as_html(executed):
    cell = executed["cells"]["html"]
    assert data(cell, "display_data")[0]["text/html"] == "<b>bold from the node</b>"
    (frame,) = data(cell, "execute_result")
    assert "<table" in frame["text/html"] and "a  b" in frame["text/plain"]


def test_tqdm_leaves_a_bounded_readable_output(executed):
    cell = executed["cells"]["tqdm"]
    shown = text(cell)
    assert "1000/1000" in shown and "100%" in shown
    assert "\r" not in shown and shown.count("\n") <= 2
    assert len(json.dumps(cell.outputs)) < 1000


def test_output_order_across_stream_and_display(executed):
    outputs = executed["cells"]["order"].outputs
    kinds = [(o.output_type, o.get("text") or o.get("data", {}).get("text/html")) for o in outputs]
    assert kinds == [("stream", "first\n"), ("display_data", "<i>second</i>"), ("stream", "third\n")]


def test_display_updates_are_saved_in_their_final_state(executed):
    cell = executed["cells"]["update"]
    assert [d["text/html"] for d in data(cell, "display_data")] == ["<p>finished</p>"]
    saved = nbformat.read(executed["saved"], as_version=4)
    (update_cell,) = [c for c in saved.cells if c.metadata["tags"] == ["update"]]
    assert "starting" not in json.dumps(update_cell.outputs)


# -- %%sky --bg through an interactive client: the output stays with the cell that started it --------------------
def test_background_output_goes_to_its_own_cell_in_a_kernel(tmp_path, monkeypatch):
    from jupyter_client.manager import start_new_kernel

    monkeypatch.setenv("JUPYTER_PATH", str(kernelspec(tmp_path)))
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "0")
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def execute(code: str) -> str:
            msg_id = kc.execute(code, allow_stdin=True)  # an interactive client, as JupyterLab is
            reply = kc.get_shell_msg(timeout=120)
            assert reply["parent_header"]["msg_id"] == msg_id
            assert reply["content"]["status"] == "ok", reply["content"]
            return msg_id

        execute("%load_ext sky_jupyter\n%sky config pool=bg-kernel torch=false\nx = 21")
        gate = tmp_path / "gate"
        background = execute(f"""%%sky --bg
import os, time
print("started", flush=True)
while not os.path.exists({str(gate)!r}):
    time.sleep(0.02)
print("finished", x * 2, flush=True)
y = x * 2""")
        later = execute("x = 0\nprint('a later cell')")
        gate.touch()
        waited = execute("%sky wait\nprint('y is', y)")
        execute("%sky down --all")
        streams: dict[str, str] = {}
        while True:
            try:
                msg = kc.get_iopub_msg(timeout=2)
            except Exception:  # noqa: BLE001 - queue.Empty: everything has arrived
                break
            if msg["msg_type"] == "stream":
                parent = msg["parent_header"].get("msg_id")
                streams[parent] = streams.get(parent, "") + msg["content"]["text"]
        assert "started" in streams.get(background, "") and "finished 42" in streams.get(background, ""), streams
        assert "finished" not in streams.get(later, "") and "a later cell" in streams.get(later, ""), streams
        assert "y is 42" in streams.get(waited, ""), streams
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


# -- a kernel that shuts down or restarts tears its pools down ------------------------------------------------------
@pytest.mark.ssh
@pytest.mark.parametrize("how", ["restart", "shutdown"])
def test_restarting_or_shutting_down_the_kernel_stops_its_workers_at_once(tmp_path, monkeypatch, sshd_cluster, how):
    from jupyter_client.manager import start_new_kernel

    from sky_jupyter import state
    from tests.test_ssh import workers_on

    monkeypatch.setenv("JUPYTER_PATH", str(kernelspec(tmp_path)))
    nodes = sshd_cluster.nodes[:2]
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        kc.execute_interactive(f"%load_ext sky_jupyter\n%sky config provider=ssh torch=false "
                               f"hosts={','.join(n.host_string for n in nodes)} key_file={sshd_cluster.key_file}",
                               timeout=60)
        reply = kc.execute_interactive(f"%%sky --nodes 2 --pool kernel-{how}\nx = 1", timeout=300)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert all(workers_on(sshd_cluster, n) for n in nodes)
        assert state.load(f"kernel-{how}") is not None
        if how == "restart":
            km.restart_kernel()  # what the notebook's Restart does: the old kernel exits cleanly first
        else:
            km.shutdown_kernel()
        # Not the dead-man switch (minutes later): the kernel stopped them on its way out.
        assert not any(workers_on(sshd_cluster, n) for n in nodes)
        assert state.load(f"kernel-{how}") is None
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)
