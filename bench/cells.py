"""%%sky cells on warm Local pools, side by side in one run:

(a) median time of a trivial %%sky cell on 2 nodes vs ipyparallel's blocking %%px on 2 local engines (goal <= 0.5x;
    plain %%px returns before the engines finish, so --block makes both wait for the result);
(b) a cell reading an unchanged 256 MB array: second run vs first run (goal <= 0.05x);
(c) a trivial cell on 4 nodes vs on 1 node (goal <= 1.5x).

    pip install -e '.[notebook]' -r bench/requirements.txt && python bench/cells.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("SKY_JUPYTER_PLAIN", "0")

from _common import report, summary, timed
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds for (c)")
    args = parser.parse_args()

    import numpy as np

    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext sky_jupyter")
    shell.run_cell("%sky config torch=false idle_timeout=3600")

    two = summary(timed(cell_timer(shell, "%%sky --nodes 2 --pool two\nx = 1\n"), args.n))
    px = px_figures(shell, max(100, args.n // 2))

    shell.user_ns["big"] = np.ones(args.mb * (1 << 20) // 8)
    read_big = cell_timer(shell, "%%sky --pool one\ntotal = float(big[:10].sum())\n")
    cell_timer(shell, "%%sky --pool one\npass\n")()  # pool started and warm
    t0 = time.perf_counter()
    read_big()
    first = time.perf_counter() - t0
    seconds = []
    for _ in range(5):
        t0 = time.perf_counter()
        read_big()
        seconds.append(time.perf_counter() - t0)
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

    report("cells", {
        "a_trivial_cell_2_nodes": {"sky_ms": two, "ipyparallel_px_ms": px,
                                   "ratio": round(two["median_ms"] / px["median_ms"], 4), "goal_at_most": 0.5},
        "b_unchanged_array": {"megabytes": args.mb, "first_run_s": round(first, 4), "second_run_s": round(second, 4),
                              "ratio": round(second / first, 4), "goal_at_most": 0.05},
        "c_four_vs_one_node": {"one_node_ms": one, "four_nodes_ms": four,
                               "ratio": round(four["median_ms"] / one["median_ms"], 4), "goal_at_most": 1.5},
    })


if __name__ == "__main__":
    main()
