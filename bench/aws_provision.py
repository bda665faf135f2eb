"""What the AWS provider adds on top of SSH: a ready pool (``ComputePool.start()``) and its teardown
(``close()``) on the same 3 sshd nodes, once as ``sky.SSH`` and once as ``sky.AWS`` against moto's EC2 server
(instances mapped onto the nodes with ``connect_via``), nodes already bootstrapped. Also the EC2 calls alone
(``AWS.launch`` + ``AWS.terminate``). moto answers in milliseconds where EC2 takes a minute or more to boot an
instance: this measures our own overhead (API round trips, state file writes, SSH banner wait), not AWS.

Needs root (it starts its own sshd nodes). Nothing reaches AWS: boto3 talks to moto on 127.0.0.1.

    .venv/bin/python bench/aws_provision.py [--rounds 5]
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

from _common import report

import sky_jupyter as sky
from sky_jupyter.providers.base import PoolSpec
from tests.fixtures.moto_ec2 import running_moto
from tests.fixtures.sshd_cluster import ensure_node_python, pinned_requirements, start_cluster

NODES = 3


def pool_round(provider: sky.Provider, name: str) -> tuple[float, float]:
    """(seconds to a ready pool, seconds to close it)."""
    started = time.perf_counter()
    pool = sky.ComputePool(provider=provider, nodes=NODES, accelerator="T4", name=name, progress=lambda *a: None)
    pool.start()
    ready = time.perf_counter() - started
    started = time.perf_counter()
    pool.close()
    return ready, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ensure_node_python(pinned_requirements())
    times: dict[str, list[float]] = {k: [] for k in ("ssh_start", "ssh_close", "aws_start", "aws_close",
                                                     "aws_launch_api", "aws_terminate_api")}
    with tempfile.TemporaryDirectory(prefix="bench-aws-") as tmp, running_moto() as moto:
        os.environ.setdefault("SKY_JUPYTER_HOME", str(Path(tmp) / "sky_home"))
        from sky_jupyter.providers.aws import AWS

        with start_cluster(NODES, Path(tmp)) as cluster:
            key = str(cluster.key_file)
            image = moto.image_id()

            def aws() -> AWS:
                return AWS(ami=image, ssh_cidr="203.0.113.7/32", key_file=key, session=moto.session(), poll=0.05,
                           poweroff_command="true", connect_via=lambda d, rank: cluster.nodes[rank].host_string)

            pool_round(sky.SSH(cluster.host_strings(), key_file=key), "bench-warmup")  # bootstrap once
            for i in range(args.rounds):
                ready, closed = pool_round(sky.SSH(cluster.host_strings(), key_file=key), f"bench-ssh-{i}")
                times["ssh_start"].append(ready)
                times["ssh_close"].append(closed)
                ready, closed = pool_round(aws(), f"bench-aws-{i}")
                times["aws_start"].append(ready)
                times["aws_close"].append(closed)
                provider = aws()
                started = time.perf_counter()
                provider.launch(PoolSpec(f"bench-api-{i}", NODES, "T4"))
                times["aws_launch_api"].append(time.perf_counter() - started)
                started = time.perf_counter()
                provider.terminate(f"bench-api-{i}")
                times["aws_terminate_api"].append(time.perf_counter() - started)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    report("aws_provision", {
        "what": f"seconds, {NODES} warm sshd nodes; AWS = moto EC2 on 127.0.0.1 mapped onto the same nodes; "
                f"medians of {args.rounds} interleaved rounds",
        "seconds_median": med,
        "seconds_all": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "aws_overhead_start_s": round(med["aws_start"] - med["ssh_start"], 3),
        "aws_overhead_close_s": round(med["aws_close"] - med["ssh_close"], 3),
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=False).stdout.strip(),
    })


if __name__ == "__main__":
    main()
