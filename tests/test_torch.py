"""The torch plugin's pure parts: torchrun-style variables per worker and the interface that carries an address."""

from __future__ import annotations

from sky_jupyter.info import InstanceInfo
from sky_jupyter.plugins.torch import distributed_env, interface_of

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def _info(rank: int, addrs: tuple[str, ...], per_node: int = 1) -> InstanceInfo:
    return InstanceInfo(rank=rank, world_size=len(addrs) * per_node, head_addr=addrs[0], node_addrs=addrs,
                        accelerator=None, pool_name="p", head_port=29577, node=rank // per_node,
                        worker=rank % per_node, workers_per_node=per_node)


def test_one_worker_per_machine():
    env = distributed_env(_info(2, ("10.0.0.1", "10.0.0.2", "10.0.0.3")), cuda=True)
    assert env == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29577", "WORLD_SIZE": "3", "RANK": "2",
                   "NODE_RANK": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}


def test_workers_of_a_node_count_locally_and_cpu_nodes_tell_accelerate():
    env = distributed_env(_info(3, ("10.0.0.1", "10.0.0.2"), per_node=2), cuda=False)
    assert (env["RANK"], env["WORLD_SIZE"], env["NODE_RANK"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == (
        "3", "4", "1", "1", "2")
    assert env["ACCELERATE_USE_CPU"] == "1"


def test_loopback_is_carried_by_lo():
    assert interface_of("127.0.0.1") == "lo"
