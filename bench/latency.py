"""Round trip of a trivial task on a warm Local pool, side by side with ipyparallel's apply_sync on local
engines, measured in the same run. Goal: sky's median at most 0.25x ipyparallel's.

    pip install -e . -r bench/requirements.txt && python bench/latency.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import report, summary, timed

import sky_jupyter as sky


def trivial() -> int:
    return 1


def sky_figures(n: int) -> dict[str, float]:
    task = sky.compute(trivial)
    with sky.ComputePool(provider=sky.Local(), nodes=1, name="bench-latency") as pool:
        return summary(timed(lambda: task() >> pool, n))


def ipyparallel_figures(n: int) -> dict[str, float]:
    import ipyparallel as ipp

    cluster = ipp.Cluster(n=1, log_level=40)
    client = cluster.start_and_connect_sync()
    try:
        client.wait_for_engines(1, timeout=120)
        view = client[0]
        return summary(timed(lambda: view.apply_sync(trivial), n))
    finally:
        client.close()
        cluster.stop_cluster_sync()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000)
    args = parser.parse_args()
    ours = sky_figures(args.n)
    theirs = ipyparallel_figures(max(200, args.n // 2))
    ratio = ours["median_ms"] / theirs["median_ms"]
    report("latency", {
        "what": "median round trip of a trivial task, warm pool, one local worker/engine",
        "sky_local": ours, "ipyparallel_apply_sync": theirs,
        "ratio_sky_over_ipyparallel": round(ratio, 4), "goal_ratio_at_most": 0.25, "goal_met": ratio <= 0.25,
    })


if __name__ == "__main__":
    main()
