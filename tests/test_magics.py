"""%%sky and %sky through a real IPython shell, on real Local worker processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("IPython")
from IPython.core.error import UsageError

import sky_jupyter as sky
from sky_jupyter.notebook.manager import manager
from tests.shell import ok, run


def sent(rank: int = 0, pool: str = "default") -> list[str]:
    return manager().pools[pool].last_sent.get(rank, [])


def test_globals_in_and_out(shell):
    ok(shell, "a = 20\nb = 'unused'")
    result, out, _ = ok(shell, """
        %%sky
        c = a + 1
        print('on the node', c)
        c * 2
    """)
    assert "on the node 21" in out
    assert repr(result.result) == "42"
    assert shell.user_ns["c"] == 21
    assert sent() == ["a"]  # b is not read by the cell


@pytest.mark.parametrize("cell,expected", [
    ("x = x + 1", 2),
    ("x += 1", 2),
    ("if flag:\n    x = 100\ny2 = x", 1),  # flag False: x is read from the notebook
    ("for i in range(3):\n    x = x + i\ny2 = x", 4),
    ("total = 0\nfor i in range(3):\n    total = total + x\ny2 = total", 3),
    ("y2 = [x * k for k in range(3)]", [0, 1, 2]),
    ("def g():\n    return x * 10\ny2 = g()", 10),
])
def test_input_analysis_hard_cases(shell, cell, expected):
    ok(shell, "x = 1\nflag = False")
    ok(shell, "%%sky\n" + cell)
    value = shell.user_ns["y2"] if "y2" in cell else shell.user_ns["x"]
    assert value == expected


def test_del_removes_the_name_on_both_sides(shell):
    ok(shell, "gone = 5")
    ok(shell, "%%sky\ndel gone")
    assert "gone" not in shell.user_ns
    result, _, _ = run(shell, "%%sky\ngone")
    assert isinstance(result.error_in_exec, NameError)


def test_notebook_function_is_rebound_and_global_writes_land_remotely(shell):
    ok(shell, """
        counter = 0
        scale = 3
        def bump(k):
            global counter
            counter = counter + k * scale
            return counter
    """)
    ok(shell, "%%sky\nbump(1)\nbump(2)\nafter = counter")
    assert shell.user_ns["after"] == 9
    assert shell.user_ns["counter"] == 0  # the notebook's own counter is untouched: the cell did not bind it


def test_notebook_class_travels_by_value(shell):
    ok(shell, """
        class Box:
            def __init__(self, v):
                self.v = v
            def doubled(self):
                return Box(self.v * 2)
        box = Box(4)
    """)
    ok(shell, "%%sky\nbig = box.doubled()")
    assert shell.user_ns["big"].v == 8
    assert type(shell.user_ns["big"]).__name__ == "Box"


def test_modules_are_reimported_by_name(shell):
    ok(shell, "import json as j")
    ok(shell, "%%sky\nimport os\nencoded = j.dumps({'pid': os.getpid()})")
    assert shell.user_ns["os"] is os
    assert int(__import__("json").loads(shell.user_ns["encoded"])["pid"]) != os.getpid()


def test_helper_module_beside_the_notebook_travels_by_value(shell, tmp_path, monkeypatch):
    (tmp_path / "nb_helpers.py").write_text("def triple(v):\n    return 3 * v\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ok(shell, "from nb_helpers import triple")
    ok(shell, "%%sky\ntripled = triple(5)")
    assert shell.user_ns["tripled"] == 15


def test_unpicklable_input_is_named_before_anything_runs(shell, tmp_path):
    ok(shell, f"fh = open({str(tmp_path / 'f.txt')!r}, 'w')\nimport threading\nlk = threading.Lock()")
    ok(shell, "%%sky\nmarker_before = 1")
    result, _, _ = run(shell, "%%sky\nmarker_before = 2\nprint(fh, lk)")
    err = str(result.error_in_exec)
    assert "'fh' (TextIOWrapper" in err and "'lk' (lock" in err and "nothing ran" in err
    ok(shell, "%%sky\ncheck = marker_before")
    assert shell.user_ns["check"] == 1
    shell.user_ns["fh"].close()


def test_only_changed_values_are_shipped(shell):
    np = pytest.importorskip("numpy")
    shell.user_ns["arr"] = np.arange(1_000_000)
    ok(shell, "%%sky\ns1 = int(arr.sum())")
    assert "arr" in sent()
    ok(shell, "%%sky\ns2 = int(arr.sum())")
    assert "arr" not in sent()
    shell.user_ns["arr"][0] = 10
    ok(shell, "%%sky\ns3 = int(arr.sum())")
    assert "arr" in sent()
    assert shell.user_ns["s3"] == shell.user_ns["s1"] + 10


def test_values_a_node_computed_are_not_overwritten(shell):
    ok(shell, "%%sky --nodes 2\nimport sky_jupyter as sky\nmine = sky.instance_info().rank")
    assert shell.user_ns["mine"] == 0
    _, out, _ = ok(shell, "%%sky --nodes 2\nprint('mine is', mine)")
    assert "[node 0] mine is 0" in out and "[node 1] mine is 1" in out
    shell.user_ns["mine"] = 7  # a notebook change is shipped to every node
    _, out, _ = ok(shell, "%%sky --nodes 2\nprint('mine is', mine)")
    assert "[node 0] mine is 7" in out and "[node 1] mine is 7" in out


def test_large_values_stay_remote_as_handles(shell):
    manager().configure(pull_budget=1 << 20)
    try:
        ok(shell, "%%sky\nbig_blob = b'x' * (4 << 20)\nsmall = 1")
        handle = shell.user_ns["big_blob"]
        assert isinstance(handle, sky.remote.Remote)
        assert "big_blob: bytes, 4.2 MB, on node 0" in repr(handle)
        assert shell.user_ns["small"] == 1
        ok(shell, "%%sky\nblob_len = len(big_blob)")  # resolves remotely, no transfer
        assert shell.user_ns["blob_len"] == 4 << 20
        assert "big_blob" not in sent()
        ok(shell, "%sky pull big_blob")
        assert shell.user_ns["big_blob"] == b"x" * (4 << 20)
    finally:
        manager().configure(pull_budget=64 << 20)


def test_unpicklable_result_stays_remote(shell):
    ok(shell, "%%sky\nimport threading\nremote_lock = threading.Lock()")
    handle = shell.user_ns["remote_lock"]
    assert isinstance(handle, sky.remote.Remote) and "not picklable" in handle.reason
    ok(shell, "%%sky\nlocked = remote_lock.locked()")
    assert shell.user_ns["locked"] is False


def test_pull_all_gives_one_value_per_rank(shell):
    ok(shell, "%%sky --nodes 2\nimport sky_jupyter as sky\nwho = sky.instance_info().rank * 10")
    ok(shell, "%sky pull who --all")
    assert shell.user_ns["who"] == [0, 10]
    ok(shell, "vals = %sky pull who --all")  # the line magic's value binds too
    assert shell.user_ns["vals"] == [0, 10]


def test_error_has_its_type_and_the_cells_lines(shell):
    result, out, err = run(shell, """
        %%sky
        def inner(v):
            return v / 0
        inner(3)
    """)
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    text = out + err  # what IPython printed for the error
    assert "return v / 0" in text and "ZeroDivisionError" in text
    assert "magics.py" not in text
    assert "  (raised on node 0" in text and "((raised" not in text  # one pair of parentheses around the note


def test_multi_node_error_names_the_failed_ranks(shell):
    result, out, err = run(shell, """
        %%sky --nodes 2
        import sky_jupyter as sky
        if sky.instance_info().rank == 1:
            raise ValueError("only rank one fails")
    """)
    assert isinstance(result.error_in_exec, ValueError)
    assert "failed on 1 of 2 nodes (ranks 1)" in out + err


def test_a_keyboard_interrupt_the_cell_raises_on_a_node_fails_the_cell_with_its_node(shell):
    """Not the Stop button: the cell's own code raised it. It was taken for a node stopped because another failed
    (a KeyError: 0 on one node; rank 1's swallowed on two)."""
    for nodes, rank in ((1, 0), (2, 1)):
        result, out, err = run(shell, f"""
            %%sky --nodes {nodes}
            import sky_jupyter as sky
            if sky.instance_info().rank == {rank}:
                raise KeyboardInterrupt("raised by rank {rank}")
        """)
        assert isinstance(result.error_in_exec, KeyboardInterrupt), (nodes, result.error_in_exec)
        assert f"raised by rank {rank}" in out + err and f"(raised on node {rank} " in out + err
        assert "session.py" not in out + err  # the node's traceback, not this extension's frames


def test_bad_lines_are_one_line_usage_errors_and_run_nothing(shell):
    for line, words in [("%%sky --nodes 0", "--nodes must be at least 1"), ("%%sky --nodes x", "invalid int"),
                        ("%%sky --provider moon", "invalid choice"), ("%%sky --bogus", "unrecognized"),
                        ("%%sky --rank -1", "--rank must be"), ("%%sky --rank 5", "--rank 5 is not a worker of pool"),
                        ("%%sky extra words", "only options")]:
        result, out, err = run(shell, f"{line}\nran_anyway = True")
        assert result.error_in_exec is not None or result.error_before_exec is not None, line
        assert words in out + err + str(result.error_in_exec), (line, out, err)
        assert "ran_anyway" not in shell.user_ns


def test_logs_of_a_node_that_is_not_a_number_is_a_usage_error(shell):
    ok(shell, "%%sky\nx = 1")
    result, out, err = run(shell, "%sky logs abc")
    assert "takes a node number, not 'abc'" in out + err + str(result.error_in_exec)
    assert "invalid literal" not in out + err


def test_cell_that_does_not_parse_runs_nothing(shell):
    result, _out, _err = run(shell, "%%sky\nx = (1,\nnever = 1")
    assert result.error_in_exec is not None
    assert "never" not in shell.user_ns


def test_plain_mode_groups_output_per_node(shell, monkeypatch):
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "1")
    _, out, _ = ok(shell, """
        %%sky --nodes 2
        import sky_jupyter as sky, time
        r = sky.instance_info().rank
        for i in range(3):
            print(f"line {i} from {r}")
            time.sleep(0.01)
    """)
    assert out == ("[node 0]\nline 0 from 0\nline 1 from 0\nline 2 from 0\n"
                   "[node 1]\nline 0 from 1\nline 1 from 1\nline 2 from 1\n")


def test_progress_bar_collapses_in_plain_mode(shell, monkeypatch):
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "1")
    _, _out, err = ok(shell, """
        %%sky
        import sys
        for i in range(1000):
            sys.stderr.write(f"\\rstep {i + 1}/1000")
            sys.stderr.flush()
        sys.stderr.write("\\n")
    """)
    assert err.strip() == "step 1000/1000"


def test_interrupt_reaches_every_node_quickly(shell):
    ok(shell, "%%sky --nodes 2\nkept_value = 123")
    sent_at: list[float] = []

    def interrupt() -> None:
        sent_at.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    timer = threading.Timer(0.5, interrupt)
    timer.start()
    result, _, _ = run(shell, "%%sky --nodes 2\nimport time\ntime.sleep(60)")
    stopped_after = time.monotonic() - sent_at[0]
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    # Both nodes stopped their 60 s sleep: the cell ended right after the interrupt (about 0.1 s when quiet;
    # the bound leaves room for a loaded 2-core CI machine).
    assert stopped_after < 5, stopped_after
    ok(shell, "%%sky --nodes 2\nkept_after = kept_value")
    assert shell.user_ns["kept_after"] == 123


def test_timeout_interrupts(shell):
    result, out, err = run(shell, "%%sky --timeout 0.5\nimport time\ntime.sleep(30)")
    assert isinstance(result.error_in_exec, TimeoutError) or "timeout" in (out + err).lower()


def test_pool_grows_and_conflicts_say_how_to_restart(shell):
    ok(shell, "%%sky --pool grower\nv = 1")
    assert manager().pools["grower"].pool.size == 1
    _, out, _ = ok(shell, "%%sky --pool grower --nodes 3\nimport sky_jupyter as sky\n"
                          "print(sky.instance_info().world_size)")
    assert manager().pools["grower"].pool.size == 3
    assert out.count("3") >= 3
    result, out, err = run(shell, "%%sky --pool grower --hf\npass")
    assert "%sky down grower" in out + err + str(result.error_in_exec)
    ok(shell, "%sky down grower")
    assert "grower" not in manager().pools


def test_status_and_config(shell):
    ok(shell, "%%sky\npass")
    result, _, _ = ok(shell, "%sky status")
    text = repr(result.result)
    assert "default" in text and "local" in text and "ready" in text
    assert "<table>" in result.result._repr_html_()
    result, _, _ = ok(shell, "%sky config idle_timeout=600")
    assert "idle_timeout = 600.0" in repr(result.result)
    result, out, err = run(shell, "%sky config nodes=0")
    assert "nodes must be" in out + err + str(result.error_in_exec)
    result, out, err = run(shell, "%sky config colour=blue")
    assert "unknown setting 'colour'" in out + err + str(result.error_in_exec)


def test_idle_pool_is_shut_down_with_a_notice(shell):
    manager().configure(idle_timeout=1.0)
    try:
        ok(shell, "%%sky --pool sleepy\nz = 1")
        pids = [n.handle.pid for n in manager().pools["sleepy"].pool.workers]
        deadline = time.monotonic() + 10
        while "sleepy" in manager().pools and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "sleepy" not in manager().pools
        for pid in pids:
            stat = Path(f"/proc/{pid}/stat")
            assert not stat.exists() or stat.read_text().split()[2] == "Z"
        _, _, err = ok(shell, "%sky status")
        assert "sleepy" in err and "idle" in err
    finally:
        manager().configure(idle_timeout=1800.0)


def test_help_lists_options_and_commands(shell):
    doc = shell.find_cell_magic("sky").__doc__
    for word in ("--nodes", "--hf", "--no-torch", "--rank", "--pull", "--timeout", "--pool", "--bg", "%sky down",
                 "%sky pull", "%sky wait [POOL]"):
        assert word in doc, word


# -- %%sky --bg and %sky wait ------------------------------------------------------------------------------------
BG_POOL = "bg"


@pytest.fixture
def live(shell, monkeypatch):
    """The shell as an interactive kernel sees it (--bg runs in the foreground in non-interactive runs). A test
    that fails half-way leaves no background cell running for the next one."""
    from sky_jupyter.notebook.manager import manager

    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "0")
    yield shell
    npool = manager().pools.get(BG_POOL)
    job = npool.background if npool is not None else None
    if job is not None and job.running:
        for rank in job.ranks:
            npool.pool.workers[rank].interrupt()
        assert job.done.wait(30), "a background cell could not be stopped"
    if npool is not None:
        npool.background = None


def cell(shell, source: str) -> None:
    """Run a cell; raise its error as the notebook would show it."""
    result = shell.run_cell(source, store_history=False)
    if not result.success:
        raise result.error_before_exec or result.error_in_exec


def test_a_background_cell_leaves_the_notebook_usable_and_binds_its_names_when_it_ends(live, tmp_path):
    gate = tmp_path / "go"
    live.user_ns.update(bg_x=21, bg_gate=str(gate))
    cell(live, f"""%%sky --bg --pool {BG_POOL}
import os, time
while not os.path.exists(bg_gate):
    time.sleep(0.02)
bg_y = bg_x * 2
""")
    # Returned while the cell is still waiting for the gate, which only this test opens.
    assert "bg_y" not in live.user_ns
    live.user_ns["bg_x"] = 0  # the cell took bg_x as it was when it ran
    busy = rf"pool '{BG_POOL}' is still running a background cell.*%sky wait {BG_POOL}"
    with pytest.raises(UsageError, match=busy):
        cell(live, f"%%sky --pool {BG_POOL}\nbg_z = 1\n")
    assert "bg_z" not in live.user_ns
    cell(live, "%%sky --pool bg-other\nbg_z = 1\n")  # other pools are free
    assert live.user_ns["bg_z"] == 1
    gate.touch()
    cell(live, f"%sky wait {BG_POOL}")
    assert live.user_ns["bg_y"] == 42
    cell(live, f"%%sky --pool {BG_POOL}\nbg_z = bg_y + 1\n")  # the pool is free again, its namespace intact
    assert live.user_ns["bg_z"] == 43
    cell(live, f"%sky wait {BG_POOL}")  # nothing left to wait for: says so


def test_wait_raises_the_background_cells_error_with_its_type(live):
    cell(live, f"%%sky --bg --pool {BG_POOL}\nimport time\ntime.sleep(0.2)\n1 / 0\n")
    with pytest.raises(ZeroDivisionError):
        cell(live, f"%sky wait {BG_POOL}")
    cell(live, f"%%sky --pool {BG_POOL}\nok = 'pool still works'\n")
    assert live.user_ns["ok"] == "pool still works"


def test_bad_input_fails_at_once_and_nothing_runs_in_the_background(live):
    live.user_ns["guard"] = threading.Lock()  # a notebook variable that cannot travel
    try:
        with pytest.raises(sky.SerializationError, match="cannot send notebook variable 'guard'.*nothing ran"):
            cell(live, f"%%sky --bg --pool {BG_POOL}\nheld = guard.locked()\n")
    finally:
        live.user_ns.pop("guard")
    with pytest.raises(UsageError, match="SyntaxError|invalid syntax"):
        cell(live, f"%%sky --bg --pool {BG_POOL}\ndef broken(:\n    pass\n")
    cell(live, f"%%sky --pool {BG_POOL}\nfree = True\n")  # not left busy
    assert live.user_ns["free"] is True


def test_interrupting_wait_stops_the_background_cell_on_the_nodes(live):
    cell(live, f"%%sky --bg --pool {BG_POOL}\nimport time\ntime.sleep(60)\n")
    timer = threading.Timer(0.5, lambda: signal.pthread_kill(threading.main_thread().ident, signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        cell(live, f"%sky wait {BG_POOL}")
    assert time.monotonic() - started < 30
    cell(live, f"%%sky --pool {BG_POOL}\nafter = 'usable'\n")
    assert live.user_ns["after"] == "usable"


def test_a_keyboard_interrupt_raised_by_a_background_cells_code_fails_it_on_its_node(live):
    """Not taken for a Stop: ``%sky wait`` raises it with the node and that node's traceback, and the other node's
    result does not hide it."""
    cell(live, f"%%sky --bg --nodes 2 --pool {BG_POOL}\nimport sky_jupyter as sky\n"
               f"if sky.instance_info().node == 1:\n    raise KeyboardInterrupt('raised by the cell')\n")
    result, out, err = run(live, f"%sky wait {BG_POOL}")
    error = result.error_in_exec
    assert isinstance(error, KeyboardInterrupt), (error, out, err)
    shown = out + err + "\n".join(getattr(error, "__notes__", ()))
    assert "raised by the cell" in str(error) + shown and "1 of 2" in shown, shown
    assert "KeyError" not in shown
    cell(live, f"%%sky --pool {BG_POOL}\nafter_bg_interrupt = 'usable'\n")
    assert live.user_ns["after_bg_interrupt"] == "usable"


def test_non_interactive_runs_run_it_in_the_foreground(shell, monkeypatch):
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "1")
    cell(shell, f"%%sky --bg --pool {BG_POOL}\nfg = 'done before the magic returned'\n")
    assert shell.user_ns["fg"] == "done before the magic returned"


def test_show_all_displays_every_nodes_value_labelled(shell):
    result, _, _ = ok(shell, """
        %%sky --nodes 2 --pool show-all --show-all --no-torch
        import sky_jupyter as sky
        ["value of rank", sky.instance_info().rank]
    """)
    assert repr(result.result) == "[node 0] ['value of rank', 0]\n[node 1] ['value of rank', 1]"
    assert result.result._repr_html_().count("<th") == 2
    result, _, _ = ok(shell, """
        %%sky --nodes 2 --pool show-all --no-torch
        sky.instance_info().rank
    """)
    assert repr(result.result) == "0"  # without it, rank 0's only
    ok(shell, "%sky down show-all")


def test_line_commands_take_options_either_way_and_print_their_help(shell):
    """``%sky`` subcommands are argparse subparsers: ``--pool NAME`` as well as ``--pool=NAME``; ``-h`` for each."""
    ok(shell, "%%sky --pool either\nseen = 41")
    result, out, _ = run(shell, "v = %sky pull seen --pool either")
    assert result.success and shell.user_ns["v"] == 41
    result, out, _ = run(shell, "w = %sky pull seen --pool=either")
    assert result.success and shell.user_ns["w"] == 41
    result, out, err = run(shell, "%sky logs 0 --pool either")
    assert result.success and "worker" in out
    for command, words in [("down", "[NAME | --all]"), ("pull", "NAME [--all] [--pool NAME]"), ("logs", "[NODE]"),
                           ("config", "[KEY=VALUE ...]")]:
        result, out, err = run(shell, f"%sky {command} -h")
        assert result.success, (command, result.error_in_exec)
        assert f"usage: %sky {command} {words}" in out, (command, out)
        assert "Traceback" not in out + err and "To exit" not in out + err
    result, out, _ = run(shell, "%sky -h")
    assert result.success and all(c in out for c in ("status", "down", "config", "pull", "logs", "wait", "attach",
                                                     "panel", "gc"))
    result, out, err = run(shell, "%sky down either --bogus")
    assert "%sky down: unrecognized arguments: --bogus; usage: %sky down [NAME | --all]" in str(result.error_in_exec)
    assert "either" in repr(shell.run_line_magic("sky", "status"))  # the bad line changed nothing
    ok(shell, "%sky down either")
