"""%%sky cells on warm Local pools, side by side in one run:

(a) median time of a trivial %%sky cell on 2 nodes vs ipyparallel's blocking %%px on 2 local engines (goal <= 0.5x;
    plain %%px returns before the engines finish, so --block makes both wait for the result);
(b) a cell reading an unchanged 256 MB array: second run vs first run (goal <= 0.05x), and the part of the second
    run the node spends re-hashing the array to see whether the cell changed it;
(c) a trivial cell on 4 nodes vs on 1 node (goal <= 1.5x);
(d) 20,000 printed lines in a real Jupyter kernel (jupyter_client, as JupyterLab drives it): iopub stream messages
    and seconds of a %%sky cell on one Local node vs the same loop run in the kernel itself (goal <= 50 messages,
    <= 2x the time). ``--prints-only`` runs (d) alone and updates its entry in cells.json.

    pip install -e '.[notebook]' -r bench/requirements.txt && python bench/cells.py
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SKY_JUPYTER_PLAIN", "0")

from _common import RESULTS, report, summary, timed
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output


def cell_timer(shell: InteractiveShell, source: str):
    def run() -> None:
        with capture_output():
            result = shell.run_cell(source, store_history=False)
        if not result.success:
            raise RuntimeError(f"cell failed: {result.error_in_exec or result.error_before_exec}")
    return run


def px_figures(shell: InteractiveShell, n: int) -> dict[str, float]:
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=2, log_level=40)
    client = cluster.start_and_connect_sync()
    try:
        client.wait_for_engines(2, timeout=120)
        client[:].activate()
        return summary(timed(cell_timer(shell, "%%px --block\nx = 1\n"), n))
    finally:
        client.close()
        cluster.stop_cluster_sync()


PRINTS = "for i in range({n}):\n    print(i)\n"


def _kernel_cell(kc, code: str, timeout: float = 300) -> tuple[float, int, str]:
    """Run ``code`` in the kernel as an interactive front end does (stdin allowed); (seconds until its reply and
    every output arrived, iopub stream messages, their text)."""
    t0 = time.perf_counter()
    msg_id = kc.execute(code, allow_stdin=True)
    messages, text, idle, reply = 0, [], False, None
    end = time.monotonic() + timeout
    while not (idle and reply is not None):
        if time.monotonic() > end:
            raise TimeoutError(f"the kernel did not finish {code[:40]!r} within {timeout} s")
        try:
            msg = kc.get_iopub_msg(timeout=0.05)
        except queue.Empty:
            msg = None
        if msg is not None and msg["parent_header"].get("msg_id") == msg_id:
            if msg["msg_type"] == "stream":
                messages += 1
                text.append(msg["content"]["text"])
            elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        if reply is None:
            try:
                shell = kc.get_shell_msg(timeout=0 if msg is not None else 0.01)
            except queue.Empty:
                continue
            if shell["parent_header"].get("msg_id") == msg_id:
                reply = shell["content"]
                if reply["status"] != "ok":
                    raise RuntimeError(f"cell failed: {reply.get('ename')}: {reply.get('evalue')}")
    return time.perf_counter() - t0, messages, "".join(text)


def prints_figures(lines: int, rounds: int) -> dict[str, object]:
    """(d): a kernel running this interpreter, the loop locally and as %%sky on a warm Local pool, interleaved."""
    from jupyter_client.manager import start_new_kernel

    spec = Path(tempfile.mkdtemp(prefix="sky-bench-kernel-")) / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (sky bench)", "language": "python"}))
    os.environ["JUPYTER_PATH"] = str(spec.parent.parent)
    km, kc = start_new_kernel(kernel_name="python3")
    try:
        _kernel_cell(kc, "%load_ext sky_jupyter\n%sky config pool=prints torch=false idle_timeout=3600")
        _kernel_cell(kc, "%%sky\nx = 1\n")  # the pool started and warm
        expected = "".join(f"{i}\n" for i in range(lines))
        local: list[tuple[float, int]] = []
        remote: list[tuple[float, int]] = []
        for _ in range(rounds):
            for code, into in ((PRINTS.format(n=lines), local), ("%%sky\n" + PRINTS.format(n=lines), remote)):
                seconds, messages, text = _kernel_cell(kc, code)
                if text != expected:
                    raise RuntimeError(f"the printed text differs from what the loop printed ({len(text)} characters "
                                       f"instead of {len(expected)})")
                into.append((seconds, messages))
        _kernel_cell(kc, "%sky down --all")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    med = statistics.median
    local_s, sky_s = med(s for s, _ in local), med(s for s, _ in remote)
    return {"lines": lines, "rounds": rounds,
            "local_s": round(local_s, 4), "local_stream_messages": max(m for _, m in local),
            "sky_s": round(sky_s, 4), "sky_stream_messages": max(m for _, m in remote),
            "sky_stream_messages_per_round": [m for _, m in remote],
            "ratio": round(sky_s / local_s, 4), "goal_ratio_at_most": 2.0, "goal_messages_at_most": 50}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for (c) and (d)")
    parser.add_argument("--lines", type=int, default=20000, help="lines printed in (d)")
    parser.add_argument("--prints-only", action="store_true", help="run (d) alone; its entry in cells.json is updated")
    args = parser.parse_args()

    if args.prints_only:
        path = RESULTS / "cells.json"
        earlier = json.loads(path.read_text()) if path.exists() else {}
        kept = {k: v for k, v in earlier.items() if k not in ("bench", "when", "machine")}
        report("cells", {**kept, "d_prints_in_a_kernel": prints_figures(args.lines, args.rounds)})
        return

    import numpy as np

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext sky_jupyter")
    shell.run_cell("%sky config torch=false idle_timeout=3600")

    two = summary(timed(cell_timer(shell, "%%sky --nodes 2 --pool two\nx = 1\n"), args.n))
    px = px_figures(shell, max(100, args.n // 2))

    from sky_jupyter.notebook.manager import manager  # (b) reads the node's re-hash time from the pool

    shell.user_ns["big"] = np.ones(args.mb * (1 << 20) // 8)
    read_big = cell_timer(shell, "%%sky --pool one\ntotal = float(big[:10].sum())\n")
    cell_timer(shell, "%%sky --pool one\npass\n")()  # pool started and warm
    t0 = time.perf_counter()
    read_big()
    first = time.perf_counter() - t0
    seconds, rehash = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        read_big()
        seconds.append(time.perf_counter() - t0)
        rehash.append(manager().pools["one"].last_rehash[0])
    second = sorted(seconds)[len(seconds) // 2]
    del shell.user_ns["big"]

    # Interleaved rounds, so that a slow spell of this machine falls on both sides alike.
    run_one = cell_timer(shell, "%%sky --pool one\nx = 1\n")
    run_four = cell_timer(shell, "%%sky --nodes 4 --pool four\nx = 1\n")
    one_samples: list[float] = []
    four_samples: list[float] = []
    for _ in range(args.rounds):
        one_samples += timed(run_one, args.n // args.rounds)
        four_samples += timed(run_four, args.n // args.rounds)
    one, four = summary(one_samples), summary(four_samples)
    shell.run_cell("%sky down --all")
    prints = prints_figures(args.lines, args.rounds)

    report("cells", {
        "a_trivial_cell_2_nodes": {"sky_ms": two, "ipyparallel_px_ms": px,
                                   "ratio": round(two["median_ms"] / px["median_ms"], 4), "goal_at_most": 0.5},
        "b_unchanged_array": {"megabytes": args.mb, "first_run_s": round(first, 4), "second_run_s": round(second, 4),
                              "node_rehash_s": round(statistics.median(rehash), 4),
                              "ratio": round(second / first, 4), "goal_at_most": 0.05},
        "c_four_vs_one_node": {"one_node_ms": one, "four_nodes_ms": four,
                               "ratio": round(four["median_ms"] / one["median_ms"], 4), "goal_at_most": 1.5},
        "d_prints_in_a_kernel": prints,
    })


if __name__ == "__main__":
    main()
