"""What a user sees when something goes wrong: every error of ``%%sky`` and ``%sky`` is one clear line without this
extension's frames (the node's traceback stays where the user's code raised), and the small rough edges of issue 22
(an unknown accelerator, quotes around a pool name, ``sys.exit()`` on a node, the console demo, the working folder of
Local nodes, a rejected HF token). Real IPython shells, real Local workers, a real Jupyter kernel."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("IPython")
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output

import sky_jupyter as sky
from sky_jupyter.notebook.manager import manager
from tests.waiting import wait_for

PACKAGE = str(Path(sky.__file__).resolve().parent)


def run(ip: InteractiveShell, source: str):
    """Run a cell; return (result, everything IPython printed for it, colours removed)."""
    with capture_output(display=True) as cap:
        result = ip.run_cell(textwrap.dedent(source).strip("\n") + "\n", store_history=True)
    return result, re.sub(r"\x1b\[[0-9;]*m", "", cap.stdout + cap.stderr)


def ok(ip: InteractiveShell, source: str) -> str:
    result, shown = run(ip, source)
    assert result.success, f"cell failed: {result.error_in_exec or result.error_before_exec!r}\n{shown}"
    return shown


def no_frames_of_ours(shown: str) -> None:
    assert "sky_jupyter/" not in shown and PACKAGE not in shown, shown
    assert "Traceback (most recent call last)" not in shown and "----> " not in shown, shown


def interrupt_when(condition, timeout: float = 60.0) -> threading.Thread:
    """SIGINT to the main thread (the Stop button, as ipykernel sends it) as soon as ``condition()`` holds."""
    main = threading.main_thread().ident
    assert main is not None

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                signal.pthread_kill(main, signal.SIGINT)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


# -- item 7: one line, no frames of this extension ----------------------------------------------------------------
def test_an_input_that_cannot_travel_is_one_line(shell):
    ok(shell, "import threading\nedge_lock = threading.Lock()")
    result, shown = run(shell, "%%sky\nprint(edge_lock)")
    assert isinstance(result.error_in_exec, sky.SerializationError)
    no_frames_of_ours(shown)
    assert shown.strip().splitlines() == [
        "SerializationError: cannot send notebook variable 'edge_lock' (lock: \"cannot pickle '_thread.lock' "
        "object\") to the node; nothing ran. Create it inside the %%sky cell instead."]
    shell.user_ns.pop("edge_lock")


def test_a_timeout_is_one_line(shell):
    result, shown = run(shell, "%%sky --timeout 0.5\nimport time\ntime.sleep(30)")
    assert isinstance(result.error_in_exec, TimeoutError)
    no_frames_of_ours(shown)
    assert shown.strip() == "TimeoutError: the cell ran longer than --timeout 0.5 s and was interrupted on every node"


def test_stop_is_one_line_and_the_nodes_keep_their_namespace(shell, tmp_path):
    ok(shell, "%%sky --nodes 2\nkept_before_stop = 7")
    marker = tmp_path / "running"
    interrupt_when(marker.exists)
    result, shown = run(shell, f"""
        %%sky --nodes 2
        import pathlib, time
        bound_before_stop = 1
        pathlib.Path({str(marker)!r}).touch()
        time.sleep(60)
    """)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    no_frames_of_ours(shown)
    assert shown.strip() == ("KeyboardInterrupt: interrupted on every node; what the cell had bound there stays in "
                             "the nodes' namespaces, nothing came back here")
    ok(shell, "%%sky --nodes 2\nafter_stop = (kept_before_stop, bound_before_stop)")
    assert shell.user_ns["after_stop"] == (7, 1)


def test_a_keyboard_interrupt_the_cells_code_raises_keeps_the_nodes_traceback(shell):
    result, shown = run(shell, "%%sky\nraise KeyboardInterrupt('raised by the cell itself')")
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    assert "raise KeyboardInterrupt('raised by the cell itself')" in shown  # the node's traceback, with its line
    assert "sky_jupyter/" not in shown and "interrupted on every node" not in shown


def test_interrupting_pool_start_up_is_one_line(shell):
    name = "edges-starting"

    def starting() -> bool:
        pool = manager().starting.get(name)
        return pool is not None and bool(pool.hosts)  # provisioned: its workers are being started

    interrupt_when(starting)
    result, shown = run(shell, f"%%sky --pool {name} --nodes 2\nnever_bound = 1")
    assert isinstance(result.error_in_exec, KeyboardInterrupt), shown
    no_frames_of_ours(shown)
    assert shown.strip() == (f"KeyboardInterrupt: interrupted while pool '{name}' was starting; nothing ran, run the "
                             f"cell again to start it")
    assert "never_bound" not in shell.user_ns and name not in manager().pools
    # Nothing of it is left running: no worker process writes into the pool's node folders any more (a node that
    # was still starting stops its own workers once they exist).
    folder = str(sky.Local()._pool_dir(name))
    wait_for(lambda: not _processes_writing_under(folder), timeout=30,
             what=f"the interrupted pool's workers to end (still: {_processes_writing_under(folder)})")


def _processes_writing_under(folder: str) -> list[int]:
    """Processes whose stderr is a file under ``folder`` (a Local worker's is its log in its node folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "fd" / "2").startswith(folder + os.sep):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_gc_without_boto3_says_what_to_install(shell, monkeypatch):
    for module in [m for m in sys.modules if m.startswith("sky_jupyter.providers.aws")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "boto3", None)  # what an environment without the aws extra has
    result, shown = run(shell, "%sky gc")
    assert isinstance(result.error_in_exec, UsageError)
    no_frames_of_ours(shown)
    assert shown.strip() == ("UsageError: %sky gc needs boto3, which this kernel's Python does not have: run "
                             "%pip install 'sky-jupyter[aws]' here, then try again")


def test_an_error_of_the_python_api_in_a_cell_shows_the_users_line_only(shell):
    result, shown = run(shell, "import sky_jupyter as sky\nedge_pool = sky.ComputePool(nodes=0)")
    assert isinstance(result.error_in_exec, sky.ConfigError)
    assert "edge_pool = sky.ComputePool(nodes=0)" in shown  # the cell's own line
    assert "ConfigError: nodes must be a whole number of at least 1, got 0" in shown
    assert "sky_jupyter/" not in shown and PACKAGE not in shown
    _, full = run(shell, "%tb")  # every frame, for a bug report
    assert "ConfigError: nodes must be a whole number" in full and os.path.join(PACKAGE, "pool.py") in full


# -- item 8: small rough edges ------------------------------------------------------------------------------------
def test_an_unknown_accelerator_is_refused_listing_the_known_kinds(shell):
    result, shown = run(shell, "%%sky --accelerator X --pool edges-acc\nran = True")
    assert isinstance(result.error_in_exec, UsageError)
    assert shown.strip() == ("UsageError: --accelerator 'X' is not a kind this tool knows; use one of CPU, T4, A10G, "
                             "L4, L40S, A100, A100-80GB, H100:1, H100, H200")
    assert "ran" not in shell.user_ns and "edges-acc" not in manager().pools
    ok(shell, "%sky config accelerator=TPUv9")
    try:
        result, shown = run(shell, "%%sky --pool edges-acc\nran = True")
        assert "UsageError: the accelerator set with %sky config 'TPUv9' is not a kind this tool knows" in shown
        assert "ran" not in shell.user_ns
    finally:
        manager().configure(accelerator=None)
    with pytest.raises(sky.ConfigError, match="accelerator 'X' is not a kind this tool knows; use one of CPU, T4"):
        sky.ComputePool(provider=sky.Local(), accelerator="X", name="edges-acc").start()


def test_a_known_accelerator_on_local_is_one_line_not_a_warning(shell):
    result, shown = run(shell, "%%sky --accelerator T4 --pool edges-t4\nt4_ran = True")
    try:
        assert result.success and shell.user_ns["t4_ran"] is True
        assert ("sky: the Local provider runs on this machine: accelerator 'T4' is recorded, not provided" in shown)
        assert "Warning" not in shown and "local.py" not in shown
    finally:
        ok(shell, "%sky down edges-t4")


def test_quotes_around_option_values_are_stripped(shell):
    ok(shell, "%%sky --pool 'edges-quoted' --pull 'x_quoted,y_quoted'\nx_quoted = 1\ny_quoted = 2")
    assert "edges-quoted" in manager().pools and "'edges-quoted'" not in manager().pools
    ok(shell, '%%sky --pool "edges-quoted"\nsame_pool = x_quoted + 1')  # the same pool: its namespace is there
    assert shell.user_ns["same_pool"] == 2
    result, shown = run(shell, "%%sky --pool 'edges-quoted\nx = 1")
    assert isinstance(result.error_in_exec, UsageError) and "close the quote" in shown
    assert "shut down: edges-quoted" in ok(shell, "%sky down 'edges-quoted'")


def test_sys_exit_on_a_node_is_one_clear_line_and_keeps_the_namespace(shell):
    result, shown = run(shell, "%%sky\nbound_before_exit = 5\nimport sys\nsys.exit(3)")
    assert isinstance(result.error_in_exec, sky.RemoteError) and result.error_in_exec.type_name == "SystemExit"
    assert "To exit: use" not in shown and "%tb" not in shown
    no_frames_of_ours(shown)
    (line,) = shown.strip().splitlines()
    assert line.startswith("SystemExit: the cell called sys.exit(3) on node 0 (127.0.0.1): that node's worker goes on")
    ok(shell, "%%sky\nafter_exit = bound_before_exit")
    assert shell.user_ns["after_exit"] == 5


def test_sys_exit_or_another_base_exception_on_one_of_two_nodes_fails_the_cell_naming_it(shell):
    """Not only Exceptions: a node's SystemExit (or a BaseException of the user's) fails a multi-node cell with its
    node, as any error does, and does not stop the client's kernel."""
    result, shown = run(shell, "%%sky --nodes 2 --pool edges-exit\nimport sky_jupyter as sky, sys\n"
                               "if sky.instance_info().node == 1:\n    sys.exit(2)\nsurvived = True")
    assert isinstance(result.error_in_exec, sky.RemoteError) and result.error_in_exec.type_name == "SystemExit"
    assert "on node 1" in shown and "failed on 1 of 2 nodes" in shown, shown
    result, shown = run(shell, "%%sky --nodes 2 --pool edges-exit\nimport sky_jupyter as sky\n"
                               "class Halt(BaseException):\n    pass\n"
                               "if sky.instance_info().node == 0:\n    raise Halt('stop here')")
    assert "Halt" in type(result.error_in_exec).__name__ + str(result.error_in_exec) + shown, shown
    assert "stop here" in shown and "node 0" in shown
    ok(shell, "%sky down edges-exit")


def test_local_workers_start_in_the_clients_folder(shell, tmp_path, monkeypatch):
    notebook_folder = tmp_path / "notebook folder"
    notebook_folder.mkdir()
    (notebook_folder / "beside.txt").write_text("next to the notebook")
    monkeypatch.chdir(notebook_folder)
    try:
        ok(shell, "%%sky --pool edges-cwd --nodes 2\nimport os\nwhere = os.getcwd()\nread = open('beside.txt').read()")
    finally:
        ok(shell, "%sky down edges-cwd")
    assert shell.user_ns["where"] == str(notebook_folder)
    assert shell.user_ns["read"] == "next to the notebook"


@sky.compute
def _where() -> tuple[str, bool]:
    import os

    import edges_pkg  # noqa: F401 - included, importable where the node works

    return os.getcwd(), os.path.exists("edges_pkg/__init__.py")


def test_with_includes_or_a_root_local_nodes_work_in_their_own_folders(tmp_path, monkeypatch):
    client = tmp_path / "client"
    (client / "edges_pkg").mkdir(parents=True)
    (client / "edges_pkg" / "__init__.py").write_text("")
    monkeypatch.chdir(client)
    before = sorted(p.name for p in client.rglob("*"))
    image = sky.Image(includes=["edges_pkg"])
    with sky.ComputePool(provider=sky.Local(), nodes=1, image=image, name="edges-includes") as pool:
        where, synced = _where() >> pool
    assert where != str(client) and where.endswith(os.path.join("edges-includes", "node-0")) and synced
    assert sorted(p.name for p in client.rglob("*")) == before  # nothing synced among the client's own files
    with sky.ComputePool(provider=sky.Local(root=tmp_path / "nodes"), nodes=1, image=image, name="edges-root") as pool:
        where, _ = _where() >> pool
    assert where == str(tmp_path / "nodes" / "edges-root" / "node-0")


class _RejectingHub(BaseHTTPRequestHandler):
    """A Hub that refuses every token (what the real one answers to a wrong or revoked token)."""

    def do_GET(self) -> None:
        body = json.dumps({"error": "Invalid credentials in Authorization header"}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_rejected_hf_token_says_to_set_a_valid_one_and_where_the_log_is(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    for name in ("HF_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RejectingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    token = "hf_edgesWrongToken" + "x" * 19
    try:
        pool = sky.ComputePool(provider=sky.Local(root=tmp_path), name="edges-hf",
                               image=sky.Image(env={"HF_HOME": str(tmp_path / "hf")}),
                               plugins=[sky.plugins.huggingface(token=token,
                                                                endpoint=f"http://127.0.0.1:{server.server_port}")])
        with pytest.raises(sky.BootstrapError) as info:
            pool.start()
    finally:
        server.shutdown()
        server.server_close()
    text = str(info.value)
    log = tmp_path / "edges-hf" / "node-0" / ".sky_jupyter" / "bootstrap.log"
    assert "rejected the HF token (HTTP 401)" in text and "set HF_TOKEN, or enter it in the panel" in text
    assert "Fix the image or plugin" not in text and "on the node" not in text
    assert f"(the full log is {log})" in text and log.is_file()
    assert token not in text


# -- item 8: the console demo ---------------------------------------------------------------------------------------
def _main(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SKY_JUPYTER_HOME": str(cwd / "home")}
    return subprocess.run([sys.executable, "-m", "sky_jupyter", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_demo_bad_arguments_are_one_line_usage_errors(tmp_path):
    zero = _main("demo", "--nodes", "0", cwd=tmp_path, timeout=60)
    assert zero.returncode == 2 and "Traceback" not in zero.stderr
    assert "argument --nodes: must be at least 1, got 0" in zero.stderr
    missing = _main("quickstart", "no-such.ipynb", cwd=tmp_path, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "no notebook at no-such.ipynb" in missing.stderr
    shown = _main("--help", cwd=tmp_path, timeout=60).stdout
    assert "run functions and a %%sky cell on local worker processes" in " ".join(shown.split())


def test_demo_runs_without_stray_output_or_kernel_warnings(tmp_path):
    done = _main("demo", "--nodes", "1", cwd=tmp_path)
    shown = done.stdout + done.stderr
    assert done.returncode == 0, shown[-4000:]
    assert "back in the notebook: total = 45" in shown and "every cell ran" in shown
    assert "Out[" not in shown and "without encryption" not in shown and "Traceback" not in shown


# -- the same through a real Jupyter kernel -------------------------------------------------------------------------
def test_a_jupyter_kernel_shows_one_line_errors_and_runs_nodes_in_the_notebooks_folder(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sky tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    folder = tmp_path / "notebooks"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    sources = {
        "setup": "%load_ext sky_jupyter\n%sky config pool=edges-kernel torch=false",
        "relative": "%%sky\nheader = open('data.csv').read()",
        "show": "print(header, end='')",
        "lock": "import threading\nlk = threading.Lock()",
        "unpicklable": "%%sky\nprint(lk)",
        "api": "import sky_jupyter as sky\nsky.ComputePool(nodes=0)",
        "down": "%sky down --all",
    }
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src, metadata={"tags": [tag]})
                                         for tag, src in sources.items()])
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=120, allow_errors=True,
                            resources={"metadata": {"path": str(folder)}}).execute()
    cells = {c.metadata["tags"][0]: c for c in nb.cells}
    assert not [o for c in ("setup", "relative", "show", "lock", "down") for o in cells[c].outputs
                if o.output_type == "error"]
    assert [o.text for o in cells["show"].outputs] == ["a,b\n"]  # the node read it beside the notebook
    (error,) = [o for o in cells["unpicklable"].outputs if o.output_type == "error"]
    assert error.ename == "SerializationError" and error.traceback == [
        "SerializationError: cannot send notebook variable 'lk' (lock: \"cannot pickle '_thread.lock' object\") to "
        "the node; nothing ran. Create it inside the %%sky cell instead."]
    (error,) = [o for o in cells["api"].outputs if o.output_type == "error"]
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))
    assert error.ename == "ConfigError" and "sky.ComputePool(nodes=0)" in shown and "sky_jupyter/" not in shown
