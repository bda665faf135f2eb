"""A node's printed text is coalesced on its way to the notebook: thousands of prints make a few frames and a few
Jupyter messages, the text exact and in order (across stdout and stderr, around displays), while progress bars and
partial lines still show live. Checked in a real kernel driven by jupyter_client, and on frames from a Local
worker."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import sky_jupyter as sky
from sky_jupyter import protocol as P
from tests.test_stdin import Executed, start_kernel

#: Few: what arrives within the coalescing window goes together (before: one frame and message per line).
FEW = 50


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory):
    k = start_kernel(tmp_path_factory.mktemp("coalesce-kernel"), "coalesce")
    try:
        yield k
    finally:
        k.run("%sky down --all")
        k.close()


def runs(done: Executed) -> list[tuple[str, str]]:
    """The cell's stream text as (stream name, text) runs in the order shown, consecutive messages of one stream
    joined (how many messages carried a run is up to timing)."""
    out: list[tuple[str, str]] = []
    for content in done.streams():
        if out and out[-1][0] == content["name"]:
            out[-1] = (content["name"], out[-1][1] + content["text"])
        else:
            out.append((content["name"], content["text"]))
    return out


def numbers(start: int, stop: int) -> str:
    return "".join(f"{i}\n" for i in range(start, stop))


def test_thousands_of_prints_make_a_few_messages(kernel):
    done = kernel.ok("%%sky\nfor i in range(2000):\n    print(i)")
    assert done.text() == numbers(0, 2000)
    assert len(done.streams()) <= FEW, len(done.streams())


def test_stdout_and_stderr_keep_their_order(kernel):
    done = kernel.ok("%%sky\nimport sys\nfor i in range(3):\n    print('out', i)\n    print('more', i)\n"
                     "    print('err', i, file=sys.stderr)\nfor i in range(500):\n    print(i)")
    expected: list[tuple[str, str]] = []
    for i in range(3):
        expected += [("stdout", f"out {i}\nmore {i}\n"), ("stderr", f"err {i}\n")]
    expected.append(("stdout", numbers(0, 500)))
    assert runs(done) == expected


def test_a_display_between_prints_keeps_its_place(kernel):
    done = kernel.ok("%%sky\nfrom IPython.display import HTML, display\nfor i in range(1000):\n    print(i)\n"
                     "display(HTML('<b>between</b>'))\nfor i in range(1000, 2000):\n    print(i)")
    kinds = [m["msg_type"] for m in done.iopub if m["msg_type"] in ("stream", "display_data")]
    at = kinds.index("display_data")
    before = "".join(c["text"] for c in done.streams()[:at])
    after = "".join(c["text"] for c in done.streams()[at:])
    assert (before, after) == (numbers(0, 1000), numbers(1000, 2000))
    assert "<b>between</b>" in done.iopub[[m["msg_type"] for m in done.iopub].index("display_data")]["content"][
        "data"]["text/html"]
    assert len(done.streams()) <= FEW


def test_progress_updates_and_partial_lines_show_while_the_cell_runs(kernel, tmp_path: Path):
    """The node waits after each update until the test has seen it in the notebook: nothing waits for the end."""
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    code = f"""%%sky
import os, sys, time
def wait(path):
    while not os.path.exists(path):
        time.sleep(0.01)
for step in (1, 2):
    print(f"\\rstep {{step}}", end="", flush=True)
    wait({str(gates[0])!r} if step == 1 else {str(gates[1])!r})
print()
print("partial, no newline", end="")
wait({str(gates[2])!r})
print(" and the rest")"""
    seen: list[str] = []

    def on_iopub(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            seen.append(msg["content"]["text"])
            text = "".join(seen)
            for needle, gate in (("\rstep 1", gates[0]), ("\rstep 2", gates[1]), ("partial, no newline", gates[2])):
                if needle in text:
                    gate.touch()

    done = kernel.run(code, on_iopub=on_iopub, timeout=120)
    assert done.reply["status"] == "ok", done.reply
    assert done.text() == "\rstep 1\rstep 2\npartial, no newline and the rest\n"


def test_two_nodes_lines_keep_their_labels(kernel):
    done = kernel.ok("%%sky --nodes 2\nimport sky_jupyter as sky\nr = sky.instance_info().rank\n"
                     "for i in range(1000):\n    print(r, i)")
    lines = done.text().splitlines()
    for rank in (0, 1):
        mine = [line for line in lines if line.startswith(f"[node {rank}] ")]
        assert mine == [f"[node {rank}] {rank} {i}" for i in range(1000)]
    assert len(lines) == 2000
    assert len(done.streams()) <= 2 * FEW


# -- the frames a worker sends ---------------------------------------------------------------------------------
@sky.compute
def burst(n: int) -> int:
    import sys

    for i in range(n):
        print(i)
        if i % 1000 == 0:
            print("tick", i, file=sys.stderr)
    return n


def test_a_worker_sends_a_burst_of_prints_in_few_frames():
    frames: list[tuple[str, str]] = []

    def sink(kind: str, meta: Any) -> None:
        if kind == P.STREAM:
            frames.append((meta["name"], meta["text"]))

    with sky.ComputePool(provider=sky.Local(), nodes=1, name="coalesce-frames") as pool:
        assert pool.submit(burst(20000), sink=sink).wait(120) == 20000
    out = "".join(text for name, text in frames if name == "stdout")
    err = "".join(text for name, text in frames if name == "stderr")
    assert out == numbers(0, 20000)
    assert err == "".join(f"tick {i}\n" for i in range(0, 20000, 1000))
    # Each stderr line splits stdout's run (2 frames per tick at most), plus a few for the coalescing windows.
    assert len(frames) <= 2 * 20 + FEW, len(frames)
    # In order: each "tick i" comes after line i of stdout and before line i + 1.
    shown = ""
    for name, text in frames:
        if name == "stderr":
            for tick in text.splitlines():
                i = int(tick.split()[1])
                assert shown.endswith(f"\n{i}\n") or shown == f"{i}\n", (tick, shown[-20:])
        else:
            shown += text
