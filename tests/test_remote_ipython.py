"""Remote cells are IPython cells: magics, shell commands and rich output from the nodes, through a real local
InteractiveShell and real Local worker processes. Also: nodes without IPython still run the Python API."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
import textwrap
from typing import Any

import pytest

pytest.importorskip("IPython")
from IPython.core.displaypub import DisplayPublisher
from IPython.core.interactiveshell import InteractiveShell

import sky_jupyter as sky
from sky_jupyter import protocol as P
from sky_jupyter.notebook.manager import manager
from sky_jupyter.notebook.output import _collapse_carriage_returns, _fold
from sky_jupyter.worker.cells import pip_command

POOL = "ipy"


class Recorder(DisplayPublisher):
    """What a cell wrote and displayed, in order: ("stdout"|"stderr", text), ("display", message), ("clear",)."""

    def __init__(self, events: list[tuple[Any, ...]]) -> None:
        super().__init__()
        self.events = events

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs):
        self.events.append(("display", {"data": data, "metadata": metadata or {}, "transient": transient,
                                        "update": update}))

    def clear_output(self, wait=False):
        self.events.append(("clear",))


class _Writer:
    def __init__(self, events: list[tuple[Any, ...]], name: str) -> None:
        self.events, self.name = events, name

    def write(self, text: str) -> int:
        if text:
            self.events.append((self.name, text))
        return len(text)

    def flush(self) -> None:
        pass


class Ran:
    def __init__(self, result: Any, events: list[tuple[Any, ...]]) -> None:
        self.result = result
        self.events = events

    def text(self, name: str = "stdout") -> str:
        return "".join(e[1] for e in self.events if e[0] == name)

    @property
    def displays(self) -> list[dict[str, Any]]:
        return [e[1] for e in self.events if e[0] == "display"]

    def kinds(self) -> list[str]:
        """The order of outputs, consecutive text of one stream merged."""
        out: list[str] = []
        for event in self.events:
            if not out or out[-1] != event[0] or event[0] == "display":
                out.append(event[0])
        return out


@pytest.fixture(scope="module")
def shell():
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext sky_jupyter", store_history=False)
    mgr = manager()
    before = mgr.settings
    mgr.configure(provider="local", nodes=1, pool=POOL, torch=False)
    yield ip
    ip.run_cell(f"%sky down {POOL}", store_history=False)
    mgr.settings = before


def run(ip: InteractiveShell, source: str, plain: bool = True, ok: bool = True) -> Ran:
    events: list[tuple[Any, ...]] = []
    saved_pub = ip.display_pub
    ip.display_pub = Recorder(events)
    old_plain = os.environ.get("SKY_JUPYTER_PLAIN")
    os.environ["SKY_JUPYTER_PLAIN"] = "1" if plain else "0"
    try:
        with contextlib.redirect_stdout(_Writer(events, "stdout")), \
                contextlib.redirect_stderr(_Writer(events, "stderr")):
            result = ip.run_cell(textwrap.dedent(source).strip("\n") + "\n", store_history=False)
    finally:
        ip.display_pub = saved_pub
        if old_plain is None:
            os.environ.pop("SKY_JUPYTER_PLAIN", None)
        else:
            os.environ["SKY_JUPYTER_PLAIN"] = old_plain
    if ok and not result.success:
        raise AssertionError(f"cell failed: {result.error_in_exec or result.error_before_exec!r}\n{events}")
    return Ran(result, events)


# -- magics and shell commands act on the node ------------------------------------------------------------------
def test_shell_commands_run_on_the_node(shell):
    ran = run(shell, """
        %%sky
        !hostname
        !pwd
        !echo "exit code before: $_exit_code"
    """)
    out = _collapse_carriage_returns(ran.text())
    lines = out.splitlines()
    assert socket.gethostname() in lines
    assert os.getcwd() in lines, out  # Local nodes start in the client's folder (a notebook's own, in Jupyter)
    assert "\r" not in out


@pytest.mark.ssh
def test_shell_commands_on_ssh_nodes_print_each_nodes_own_name(shell, sshd_cluster):
    pytest.importorskip("paramiko")
    nodes = sshd_cluster.nodes[:2]
    mgr = manager()
    before = mgr.settings
    mgr.configure(provider="ssh", hosts=tuple(n.host_string for n in nodes), key_file=str(sshd_cluster.key_file),
                  pool="ipy-ssh")
    try:
        ran = run(shell, "%%sky --nodes 2\n!hostname")
    finally:
        shell.run_cell("%sky down ipy-ssh", store_history=False)
        mgr.settings = before
    expected = "".join(f"[node {k}]\n{node.hostname}\n" for k, node in enumerate(nodes))
    assert _collapse_carriage_returns(ran.text()) == expected


def test_line_magics_and_get_ipython_act_on_the_node(shell):
    ran = run(shell, """
        %%sky
        %env SKY_REMOTE_ONLY=yes
        import os
        seen_env = os.environ["SKY_REMOTE_ONLY"]
        shell_kind = type(get_ipython()).__name__
        node_pid = os.getpid()
        %timeit -n 3 -r 1 sum(range(10))
    """)
    assert shell.user_ns["seen_env"] == "yes"
    assert "SKY_REMOTE_ONLY" not in os.environ
    assert shell.user_ns["shell_kind"] == "NodeShell"
    assert shell.user_ns["node_pid"] != os.getpid()
    assert "per loop" in ran.text()


def test_subprocess_output_at_the_descriptor_level_arrives_in_order(shell):
    ran = run(shell, """
        %%sky
        import os, subprocess, sys
        print("one")
        subprocess.run(["echo", "two"], check=True)
        print("three")
        os.system("echo four; echo five >&2")
        subprocess.run([sys.executable, "-c", "print('x' * 100_000)"], check=True)
        print("six")
    """)
    assert ran.text().replace("x" * 100_000 + "\n", "") == "one\ntwo\nthree\nfour\nsix\n"
    assert "five" in ran.text("stderr")


def test_the_node_keeps_no_hidden_references_to_last_values(shell):
    run(shell, """
        %%sky --no-pull
        import weakref
        class Big:
            pass
        big = Big()
        ref = weakref.ref(big)
        big
    """)
    run(shell, "%%sky\nimport gc\ndel big\ngc.collect()\nstill_alive = ref() is not None")
    assert shell.user_ns["still_alive"] is False


# -- rich output ---------------------------------------------------------------------------------------------------
def test_display_html_dataframe_and_last_value(shell):
    pytest.importorskip("pandas")
    ran = run(shell, """
        %%sky
        from IPython.display import HTML, Markdown, display
        import pandas as pd
        display(HTML("<b>bold on the node</b>"))
        display(Markdown("*marked*"))
        frame = pd.DataFrame({"a": [1, 2], "b": [3, 4]})
        frame
    """)
    html, markdown = ran.displays
    assert html["data"]["text/html"] == "<b>bold on the node</b>"
    assert markdown["data"]["text/markdown"] == "*marked*"
    bundle = ran.result.result._repr_mimebundle_()[0]
    assert "<table" in bundle["text/html"] and "text/plain" in bundle


def test_a_trailing_semicolon_hides_the_last_value(shell):
    assert run(shell, "%%sky\n6 * 7;").result.result is None
    assert repr(run(shell, "%%sky\n6 * 7").result.result) == "42"


def test_matplotlib_figure_is_shown_when_the_cell_ends(shell):
    pytest.importorskip("matplotlib")
    ran = run(shell, """
        %%sky
        import matplotlib.pyplot as plt
        plt.plot([1, 3, 2])
        print("plotted")
        backend = plt.get_backend()
    """)
    assert ran.kinds() == ["stdout", "display"]
    (figure,) = ran.displays
    assert figure["data"]["image/png"].startswith("iVBOR")  # base64 of the PNG signature
    assert "inline" in shell.user_ns["backend"]


@sky.compute
def _import_pyplot_in_a_task() -> str:
    import matplotlib.pyplot as plt

    return plt.get_backend()


def test_figures_show_even_when_a_task_imported_pyplot_before_the_first_cell():
    pytest.importorskip("matplotlib")
    with sky.ComputePool(provider=sky.Local(), nodes=1, name="mpl-first") as pool:
        assert "inline" not in (_import_pyplot_in_a_task() >> pool)  # no shell yet: a plain backend
        frames: list[tuple[str, Any]] = []
        meta = {"code": "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.get_backend()",
                "filename": "<sky-cell-m>", "display": True}
        result = pool.workers[0].submit(P.CELL, meta, (), lambda kind, m: frames.append((kind, m))).wait(60)
    assert "inline" in result["display"]["data"]["text/plain"]
    assert [m["data"]["image/png"][:5] for kind, m in frames if kind == P.DISPLAY] == ["iVBOR"]


@pytest.mark.parametrize("plain", [True, False])
def test_stream_and_display_order_is_kept(shell, plain):
    ran = run(shell, """
        %%sky
        from IPython.display import HTML, display
        import sys
        print("first")
        display(HTML("<i>second</i>"))
        print("third")
        sys.stdout.write("fourth, unfinished line")
        display(HTML("<i>fifth</i>"))
    """, plain=plain)
    assert ran.kinds() == ["stdout", "display", "stdout", "display"]
    assert ran.text() == "first\nthird\nfourth, unfinished line"


def test_live_multi_node_displays_are_labelled(shell):
    ran = run(shell, """
        %%sky --nodes 2
        import sky_jupyter as sky
        from IPython.display import HTML, display
        display(HTML(f"<p>rank {sky.instance_info().rank}</p>"))
    """, plain=False)
    assert sorted(d["data"]["text/html"] for d in ran.displays) == ["<p>rank 0</p>", "<p>rank 1</p>"]
    assert sorted(line for line in ran.text().splitlines() if line) == ["[node 0]", "[node 1]"]


def test_plain_mode_groups_rich_output_per_node(shell):
    ran = run(shell, """
        %%sky --nodes 2
        import sky_jupyter as sky, time
        from IPython.display import HTML, display
        r = sky.instance_info().rank
        time.sleep(0.05 * (1 - r))  # rank 1 finishes first; the output still comes in rank order
        print(f"text from {r}")
        display(HTML(f"<p>rank {r}</p>"))
    """)
    flat = [e[1] if e[0] == "stdout" else e[1]["data"]["text/html"] for e in ran.events if e[0] != "stderr"]
    assert "".join(x if x.endswith("\n") else x + "|" for x in flat) == (
        "[node 0]\ntext from 0\n<p>rank 0</p>|[node 1]\ntext from 1\n<p>rank 1</p>|")


def test_display_updates_keep_their_final_state_in_plain_mode(shell):
    ran = run(shell, """
        %%sky
        from IPython.display import HTML, display, clear_output
        print("gone soon")
        clear_output()
        handle = display(HTML("<p>0 %</p>"), display_id=True)
        for pct in (50, 100):
            handle.update(HTML(f"<p>{pct} %</p>"))
        print("done")
    """)
    assert [d["data"]["text/html"] for d in ran.displays] == ["<p>100 %</p>"]
    assert not any(d["update"] for d in ran.displays)
    assert ran.text() == "done\n"


def test_display_updates_travel_as_updates_when_live(shell):
    ran = run(shell, """
        %%sky
        from IPython.display import display
        handle = display("a", display_id=True)
        handle.update("b")
    """, plain=False)
    first, second = ran.displays
    assert first["transient"]["display_id"] == second["transient"]["display_id"]
    assert (first["update"], second["update"]) == (False, True)
    assert second["data"]["text/plain"] == "'b'"


def _visible(events: list[tuple[Any, ...]]) -> str:
    """What a notebook front end shows at the end: everything after the last clear, displays as their text."""
    last_clear = max((i for i, e in enumerate(events) if e[0] == "clear"), default=-1)
    return "".join(e[1] if e[0] == "stdout" else e[1]["data"].get("text/plain", "") + "\n"
                   for e in events[last_clear + 1:] if e[0] in ("stdout", "display"))


def test_a_node_clearing_its_output_keeps_the_others_when_live(shell):
    ran = run(shell, """
        %%sky --nodes 2
        import time
        from IPython.display import clear_output, display
        import sky_jupyter as sky
        r = sky.instance_info().rank
        print(f"step 1 on {r}")
        display(f"plot {r}.1")
        time.sleep(0.3)
        if r == 0:
            clear_output(wait=True)  # a live plot redrawn: node 0's own earlier output goes
            display("plot 0.2")
    """, plain=False)
    assert ("clear",) in ran.events
    shown = _visible(ran.events)
    assert "[node 1] step 1 on 1" in shown and "'plot 1.1'" in shown, shown
    assert "'plot 0.2'" in shown and "step 1 on 0" not in shown and "'plot 0.1'" not in shown, shown


def test_widgets_travel_as_plain_text(shell):
    pytest.importorskip("ipywidgets")
    ran = run(shell, """
        %%sky
        import ipywidgets
        from IPython.display import display
        display(ipywidgets.IntSlider(value=3))
    """)
    (shown,) = ran.displays
    assert list(shown["data"]) == ["text/plain"]


# -- progress bars ---------------------------------------------------------------------------------------------
def test_tqdm_on_the_node_is_plain_text_and_collapses(shell):
    pytest.importorskip("tqdm")
    pytest.importorskip("ipywidgets")  # present on the node too, yet tqdm.auto must not pick its widget bar
    ran = run(shell, """
        %%sky
        from tqdm.auto import tqdm
        bar_module = tqdm.__module__
        widget_bars = "IPKernelApp" in get_ipython().config  # transformers' test for its notebook (HTML) bars
        for i in tqdm(range(1000), mininterval=0, desc="steps"):
            pass
    """)
    assert shell.user_ns["bar_module"] != "tqdm.notebook"
    assert shell.user_ns["widget_bars"] is False
    err = ran.text("stderr")
    assert "1000/1000" in err and "\r" not in err
    assert len(err) < 300, err
    assert not ran.displays


def test_tqdm_updates_stream_live(shell):
    pytest.importorskip("tqdm")
    ran = run(shell, """
        %%sky
        from tqdm import tqdm
        import time
        for i in tqdm(range(5), mininterval=0):
            time.sleep(0.01)
    """, plain=False)
    err = ran.text("stderr")
    assert err.count("\r") >= 5 and _collapse_carriage_returns(err).strip().startswith("100%")


def test_carriage_return_folding_matches_collapsing_everything():
    rng = random.Random(7)
    alphabet = ["a", "b", "\r", "\n", "\r\n", "50%", "100%"]
    for _ in range(2000):
        a = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        b = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))
        assert _collapse_carriage_returns(_fold(a) + b) == _collapse_carriage_returns(a + b), (a, b)
    assert _collapse_carriage_returns("host\r\n\r 10%\r100%\r\n") == "host\n100%\n"


# -- errors ----------------------------------------------------------------------------------------------------------
def test_errors_keep_their_type_and_the_cells_lines(shell):
    ran = run(shell, """
        %%sky
        def inner(v):
            return v / 0
        !echo before the error
        inner(3)
    """, ok=False)
    assert isinstance(ran.result.error_in_exec, ZeroDivisionError)
    text = ran.text() + ran.text("stderr")
    assert "return v / 0" in text and "before the error" in text
    assert "interactiveshell.py" not in text and "Traceback" not in text.split("before the error")[0]
    assert text.count("ZeroDivisionError") == 1  # not printed on the node as well


def test_unknown_magic_is_a_usage_error(shell):
    ran = run(shell, "%%sky\n%no_such_magic 1", ok=False)
    assert type(ran.result.error_in_exec).__name__ == "UsageError"
    assert "no_such_magic" in str(ran.result.error_in_exec)


def test_pip_falls_back_to_uv_without_pip():
    assert pip_command("install tiny", "/venv/bin/python", None) == "/venv/bin/python -m pip install tiny"
    assert pip_command("install -U 'a b'", "/venv/bin/python", "/h/uv") == (
        "/h/uv pip install --python /venv/bin/python -U 'a b'")


# -- nodes without IPython -------------------------------------------------------------------------------------
@sky.compute
def _node_report() -> dict[str, Any]:
    import os
    import subprocess

    try:
        import IPython  # noqa: F401
        has_ipython = True
    except ImportError:
        has_ipython = False
    print("printed on the node")
    subprocess.run(["echo", "from a subprocess"], check=True)
    return {"ipython": has_ipython, "pid": os.getpid()}


def test_python_api_and_cells_work_without_ipython_on_the_node(tmp_path, monkeypatch, capsys):
    shadow = tmp_path / "shadow" / "IPython"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('IPython is not installed on this node')\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    with sky.ComputePool(provider=sky.Local(), nodes=1, name="no-ipython") as pool:
        report = _node_report() >> pool
        assert report["ipython"] is False and report["pid"] != os.getpid()
        out = capsys.readouterr().out
        assert "printed on the node\nfrom a subprocess\n" in out
        frames: list[tuple[str, Any]] = []
        node = pool.workers[0]
        meta = {"code": "!echo no", "python": "total = 40 + 2\nprint('plain exec')\ntotal",
                "filename": "<sky-cell-x>", "binds": ["total"], "display": True}
        result = node.submit(P.CELL, meta, (), lambda kind, m: frames.append((kind, m))).wait(30)
        assert result["display"]["data"] == {"text/plain": "42"}
        assert P.loads(result["values"]["total"]) == 42
        assert frames == [(P.STREAM, {"name": "stdout", "text": "plain exec\n"})]
    assert "IPython" not in sys.modules or sys.modules["IPython"].__file__  # our own IPython is untouched
