"""Wall time to a ready pool (``ComputePool.start()`` returning: connected, bootstrapped, workers set up) of 1 and
of 4 SSH nodes, cold (the nodes' ~/.sky_jupyter wiped: no uv, no venv, no package) and warm (marker present).
Goals: 4 nodes cold within 1.5x of 1 node cold; a warm re-attach under 1 s per pool.

Needs root: it starts its own sshd nodes (tests/fixtures/sshd_cluster.py).

    .venv/bin/python bench/bringup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import report

import sky_jupyter as sky
from tests.fixtures.sshd_cluster import ensure_node_python, pinned_requirements, start_cluster


def busy_cpu_seconds() -> float:
    """CPU time spent so far by everything on this machine (the test nodes share its cores with the client)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def bring_up(cluster, n: int) -> tuple[float, dict[str, float], float]:
    """Seconds until the pool is ready, when each phase first started (seconds from the start), and the CPU
    seconds the whole machine spent meanwhile."""
    phases: dict[str, float] = {}
    busy = busy_cpu_seconds()
    started = time.perf_counter()

    def progress(rank: int, phase: str, line: str) -> None:
        phases.setdefault(phase, round(time.perf_counter() - started, 3))

    provider = sky.SSH(cluster.host_strings()[:n], key_file=cluster.key_file)
    pool = sky.ComputePool(provider=provider, nodes=n, progress=progress)
    pool.start()
    took = time.perf_counter() - started
    busy = busy_cpu_seconds() - busy
    pool.close()
    return took, phases, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ensure_node_python(pinned_requirements())
    times: dict[str, list[float]] = {f"{kind}_{n}": [] for n in (1, 4) for kind in ("cold", "warm")}
    cpu: dict[str, list[float]] = {key: [] for key in times}
    phases: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-bringup-") as tmp:
        os.environ.setdefault("SKY_JUPYTER_HOME", str(Path(tmp) / "sky_home"))
        with start_cluster(4, Path(tmp)) as cluster:
            for _ in range(args.rounds):
                for n in (1, 4):
                    for node in cluster.nodes:
                        shutil.rmtree(node.home / ".sky_jupyter", ignore_errors=True)
                    os.sync()  # the file system's work for the wipe (journal, discards) is not the bring-up's
                    time.sleep(0.5)
                    for kind in ("cold", "warm"):
                        took, phases[f"{kind}_{n}"], busy = bring_up(cluster, n)
                        times[f"{kind}_{n}"].append(took)
                        cpu[f"{kind}_{n}"].append(busy)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    cold_ratio = med["cold_4"] / med["cold_1"]
    warm_worst = max(med["warm_1"], med["warm_4"])
    report("bringup", {
        "what": "seconds until ComputePool.start() returns on SSH nodes; medians of interleaved rounds",
        "seconds_median": med,
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "phase_first_seen_last_round": phases,
        # The nodes run on this machine's cores: a 4-node bring-up that needs C CPU seconds cannot take less than
        # C / cpus seconds here, however parallel it is; on separate machines each node brings its own cores.
        "machine_cpu_seconds_median": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
        "ratio_cold_4_over_cold_1": round(cold_ratio, 3), "goal_cold_ratio_at_most": 1.5,
        "warm_seconds_worst": warm_worst, "goal_warm_seconds_under": 1.0,
        "goal_met": cold_ratio <= 1.5 and warm_worst < 1.0,
    })


if __name__ == "__main__":
    main()
