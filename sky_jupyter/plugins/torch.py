"""``sky.plugins.torch(backend=None)``: torch on every node and ``torch.distributed`` wired across the pool.

At pool start, eagerly, every worker gets MASTER_ADDR (node 0's private address), MASTER_PORT (a port found
free on node 0), WORLD_SIZE, RANK, NODE_RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, and ACCELERATE_USE_CPU=1 on nodes
without CUDA (transformers' Trainer decides on DDP from these variables, and on CPU it trains unsynchronised
replicas without ACCELERATE_USE_CPU), then joins the process group (nccl with CUDA, else gloo).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

from ..image import Image
from ..plugin import Cluster, Plugin

BACKENDS = (None, "gloo", "nccl", "mpi")


def _has_torch(image: Image) -> bool:
    return any(p.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower() == "torch"
               for p in image.pip)


def torch(backend: str | None = None, timeout: float = 120.0) -> Plugin:
    """torch.distributed across the pool; ``backend`` defaults to nccl with CUDA, else gloo."""
    from ..errors import ConfigError

    if backend not in BACKENDS:
        raise ConfigError(f"torch backend must be one of gloo, nccl, mpi (or None for automatic), got {backend!r}")

    def transform(image: Image, cluster: Cluster) -> Image:
        return image if _has_torch(image) else image.with_pip("torch")

    @contextlib.contextmanager
    def around_app(info: Any) -> Iterator[None]:
        import torch as torch_module
        import torch.distributed as dist

        cuda = torch_module.cuda.is_available()
        same_host = [i for i, addr in enumerate(info.node_addrs) if addr == info.node_addrs[info.rank]]
        env = {
            "MASTER_ADDR": info.head_addr, "MASTER_PORT": str(info.head_port), "WORLD_SIZE": str(info.world_size),
            "RANK": str(info.rank), "NODE_RANK": str(info.rank), "LOCAL_RANK": str(same_host.index(info.rank)),
            "LOCAL_WORLD_SIZE": str(len(same_host)),
        }
        if not cuda:
            env["ACCELERATE_USE_CPU"] = "1"
        os.environ.update(env)
        chosen = backend or ("nccl" if cuda else "gloo")
        if cuda:
            torch_module.cuda.set_device(int(env["LOCAL_RANK"]) % torch_module.cuda.device_count())
        try:
            dist.init_process_group(chosen, rank=info.rank, world_size=info.world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        except Exception as exc:
            raise RuntimeError(
                f"torch.distributed rendezvous failed on node {info.rank} ({chosen}, MASTER_ADDR="
                f"{info.head_addr}:{info.head_port}, WORLD_SIZE={info.world_size}): {exc}. Check that the nodes "
                f"reach each other on that port (security group, firewall, GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME)."
            ) from None
        try:
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return Plugin.create("torch").with_transform(transform).with_around_app(around_app)
