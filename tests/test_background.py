"""``%%sky --bg``: a cell that runs in the background while the notebook stays usable, and ``%sky wait``.

Through a real IPython shell (what the magic does) and through a real kernel (that the output keeps going to the
cell that started it while later cells run), on the Local provider.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import pytest
from IPython.core.error import UsageError

import sky_jupyter as sky

POOL = "bg"


@pytest.fixture
def live(shell, monkeypatch):
    """The shell as an interactive kernel sees it (--bg runs in the foreground in non-interactive runs). A test
    that fails half-way leaves no background cell running for the next one."""
    from sky_jupyter.notebook.manager import manager

    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "0")
    yield shell
    npool = manager().pools.get(POOL)
    job = npool.background if npool is not None else None
    if job is not None and job.running:
        for rank in job.ranks:
            npool.pool.nodes[rank].interrupt()
        assert job.done.wait(30), "a background cell could not be stopped"
    if npool is not None:
        npool.background = None


def cell(shell, source: str) -> None:
    result = shell.run_cell(source, store_history=False)
    if not result.success:
        raise result.error_before_exec or result.error_in_exec


def test_a_background_cell_leaves_the_notebook_usable_and_binds_its_names_when_it_ends(live, tmp_path):
    gate = tmp_path / "go"
    live.user_ns.update(bg_x=21, bg_gate=str(gate))
    cell(live, f"""%%sky --bg --pool {POOL}
import os, time
while not os.path.exists(bg_gate):
    time.sleep(0.02)
bg_y = bg_x * 2
""")
    # Returned while the cell is still waiting for the gate, which only this test opens.
    assert "bg_y" not in live.user_ns
    live.user_ns["bg_x"] = 0  # the cell took bg_x as it was when it ran
    with pytest.raises(UsageError, match=rf"pool '{POOL}' is still running a background cell.*%sky wait {POOL}"):
        cell(live, f"%%sky --pool {POOL}\nbg_z = 1\n")
    assert "bg_z" not in live.user_ns
    cell(live, "%%sky --pool bg-other\nbg_z = 1\n")  # other pools are free
    assert live.user_ns["bg_z"] == 1
    gate.touch()
    cell(live, f"%sky wait {POOL}")
    assert live.user_ns["bg_y"] == 42
    cell(live, f"%%sky --pool {POOL}\nbg_z = bg_y + 1\n")  # the pool is free again, its namespace intact
    assert live.user_ns["bg_z"] == 43
    cell(live, f"%sky wait {POOL}")  # nothing left to wait for: says so


def test_wait_raises_the_background_cells_error_with_its_type(live):
    cell(live, f"%%sky --bg --pool {POOL}\nimport time\ntime.sleep(0.2)\n1 / 0\n")
    with pytest.raises(ZeroDivisionError):
        cell(live, f"%sky wait {POOL}")
    cell(live, f"%%sky --pool {POOL}\nok = 'pool still works'\n")
    assert live.user_ns["ok"] == "pool still works"


def test_bad_input_fails_at_once_and_nothing_runs_in_the_background(live):
    live.user_ns["guard"] = threading.Lock()  # a notebook variable that cannot travel
    try:
        with pytest.raises(sky.SerializationError, match="cannot send notebook variable 'guard'.*nothing ran"):
            cell(live, f"%%sky --bg --pool {POOL}\nheld = guard.locked()\n")
    finally:
        live.user_ns.pop("guard")
    with pytest.raises(UsageError, match="SyntaxError|invalid syntax"):
        cell(live, f"%%sky --bg --pool {POOL}\ndef broken(:\n    pass\n")
    cell(live, f"%%sky --pool {POOL}\nfree = True\n")  # not left busy
    assert live.user_ns["free"] is True


def test_interrupting_wait_stops_the_background_cell_on_the_nodes(live):
    cell(live, f"%%sky --bg --pool {POOL}\nimport time\ntime.sleep(60)\n")
    timer = threading.Timer(0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cell(live, f"%sky wait {POOL}")
    assert time.monotonic() - started < 30
    cell(live, f"%%sky --pool {POOL}\nafter = 'usable'\n")
    assert live.user_ns["after"] == "usable"


def test_non_interactive_runs_run_it_in_the_foreground(shell, monkeypatch):
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "1")
    cell(shell, f"%%sky --bg --pool {POOL}\nfg = 'done before the magic returned'\n")
    assert shell.user_ns["fg"] == "done before the magic returned"


# -- through a real kernel: the output stays with the cell that started it ---------------------------------------
def test_background_output_goes_to_its_own_cell_in_a_kernel(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    from jupyter_client.manager import start_new_kernel

    spec = tmp_path / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sky tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "0")
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        def execute(code: str) -> str:
            msg_id = kc.execute(code, allow_stdin=True)  # an interactive client, as JupyterLab is
            reply = kc.get_shell_msg(timeout=120)
            assert reply["parent_header"]["msg_id"] == msg_id
            assert reply["content"]["status"] == "ok", reply["content"]
            return msg_id

        execute(f"%load_ext sky_jupyter\n%sky config pool={POOL}-kernel torch=false\nx = 21")
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


def test_help_lists_the_option_and_the_subcommand(shell):
    from sky_jupyter.notebook.magics import SkyMagics

    doc = SkyMagics.sky.__doc__
    assert "--bg" in doc and "%sky wait [POOL]" in doc
