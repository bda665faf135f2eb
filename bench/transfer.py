"""Throughput of shipping a 256 MB numpy array to one SSH node (``fn(arr) >> pool``, fn returns ``arr.nbytes``),
side by side with the OpenSSH client piping the same bytes to the same node (``ssh node 'cat > /dev/null'``) in the
same run, rounds interleaved. Goal: at least 0.9x OpenSSH.

OpenSSH is timed whole (a fresh ``ssh`` per transfer, as a user would pipe a file) and net of its connection set-up
(the median of ``ssh node true`` subtracted), since the pool's connection is already up; the goal is judged on the
net figure. OpenSSH with paramiko's cipher (AES-GCM) and our transport alone (``cat`` through a session channel)
are shown for reference. Needs root: it starts its own sshd node (tests/fixtures/sshd_cluster.py).

    .venv/bin/python bench/transfer.py [--mb 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from _common import report

import sky_jupyter as sky
from tests.fixtures.sshd_cluster import ensure_node_python, pinned_requirements, start_cluster


@sky.compute
def nbytes(arr: np.ndarray) -> int:
    return arr.nbytes


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def openssh(argv: list[str], data: memoryview) -> None:
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(data)
    proc.stdin.close()
    if proc.wait() != 0:
        raise RuntimeError(f"{argv} failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ensure_node_python(pinned_requirements())
    arr = np.random.default_rng(0).integers(0, 256, size=args.mb << 20, dtype=np.uint8)
    data = memoryview(arr).cast("B")
    mb = arr.nbytes / 1e6
    times: dict[str, list[float]] = {k: [] for k in ("sky", "openssh", "openssh_aes128gcm", "openssh_connect",
                                                      "sky_transport_cat")}
    with tempfile.TemporaryDirectory(prefix="bench-transfer-") as tmp:
        os.environ.setdefault("SKY_JUPYTER_HOME", str(Path(tmp) / "sky_home"))
        with start_cluster(1, Path(tmp)) as cluster:
            node = cluster.nodes[0]
            ssh = cluster.ssh_argv(node, "cat > /dev/null")
            gcm = [*ssh[:1], "-c", "aes128-gcm@openssh.com", *ssh[1:]]
            true = cluster.ssh_argv(node, "true")
            provider = sky.SSH([node.host_string], key_file=cluster.key_file)
            with sky.ComputePool(provider=provider, nodes=1, progress=lambda *a: None) as pool:
                conn = provider.connection(pool.hosts[0])
                assert nbytes(arr) >> pool == arr.nbytes  # warm: worker, channel, page cache
                openssh(ssh, data)
                for _ in range(args.rounds):
                    times["sky"].append(timed(lambda: nbytes(arr) >> pool))
                    times["openssh"].append(timed(lambda: openssh(ssh, data)))
                    times["openssh_aes128gcm"].append(timed(lambda: openssh(gcm, data)))
                    times["openssh_connect"].append(timed(lambda: subprocess.run(true, check=True)))
                    times["sky_transport_cat"].append(timed(lambda: conn.run("cat > /dev/null", input=data)))
                cipher = conn.transport().remote_cipher

    connect = statistics.median(times["openssh_connect"])
    med = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: round(mb / med[k], 1) for k in ("sky", "openssh", "openssh_aes128gcm", "sky_transport_cat")}
    rate["openssh_net"] = round(mb / max(1e-9, med["openssh"] - connect), 1)
    rate["openssh_aes128gcm_net"] = round(mb / max(1e-9, med["openssh_aes128gcm"] - connect), 1)
    ratio = rate["sky"] / rate["openssh_net"]
    report("transfer", {
        "what": f"{args.mb} MiB numpy array to one SSH node: fn(arr) >> pool vs ssh node 'cat > /dev/null'; "
                f"medians of {args.rounds} interleaved rounds",
        "megabytes": round(mb, 1), "sky_cipher": cipher,
        "throughput_mb_s": rate,
        "seconds_median": {k: round(v, 4) for k, v in med.items()},
        "seconds_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio_sky_over_openssh": round(rate["sky"] / rate["openssh"], 3),
        "ratio_sky_over_openssh_net": round(ratio, 3),
        "goal_ratio_at_least": 0.9, "goal_met": ratio >= 0.9,
    })


if __name__ == "__main__":
    main()
