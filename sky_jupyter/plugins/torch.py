"""``sky.plugins.torch(backend=None)``: torch on every node and ``torch.distributed`` wired across the pool.

At pool start, eagerly, every worker (one per GPU with ``workers_per_node="auto"``) gets MASTER_ADDR (node 0's
private address), MASTER_PORT (a port found free on node 0), WORLD_SIZE and RANK (over all workers), NODE_RANK,
LOCAL_RANK and LOCAL_WORLD_SIZE (within its node), and ACCELERATE_USE_CPU=1 on nodes without CUDA (transformers'
Trainer decides on DDP from these variables, and on CPU it trains unsynchronised replicas without
ACCELERATE_USE_CPU), then selects ``cuda:LOCAL_RANK`` (every GPU stays visible: HF Trainer and Accelerate pick that
device themselves) and joins the process group (nccl with CUDA, else gloo). A pool that grows, or gets this plugin
while running, sets every worker up again: the group is destroyed and formed anew with the new world size, and the
variables are put back as they were whenever the group goes (so none claims a group that no longer exists).

Gloo binds to the interface its host name resolves to unless ``GLOO_SOCKET_IFNAME`` says otherwise; on machines
whose host name does not resolve to the address peers use (network namespaces, several interfaces), that breaks
the rendezvous. So when ``GLOO_SOCKET_IFNAME`` is unset, it is set to the interface that carries the node's own
private address, when one does.

On nodes with an EFA device (AWS pools of several p4d/p4de/p5/p5e/p5en nodes get one), NCCL is pointed at it through
libfabric (:data:`EFA_ENV`, each variable only where the environment does not set it already).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from collections.abc import Iterator
from typing import Any

from ..errors import ConfigError, ProvisionError
from ..image import Image
from ..plugin import Cluster, Plugin

BACKENDS = (None, "gloo", "nccl", "mpi")
#: NCCL over EFA (the aws-ofi-nccl plugin of the Deep Learning AMIs): libfabric's EFA provider, GPUDirect RDMA, and
#: fork safety for DataLoader workers.
EFA_ENV = {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "FI_EFA_FORK_SAFE": "1"}
_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


class RendezvousError(ProvisionError):
    """The nodes of a pool could not form a torch.distributed process group (one cannot reach the head)."""


def _has_torch(image: Image) -> bool:
    return any(p.split("[")[0].split("=")[0].split("<")[0].split(">")[0].strip().lower() == "torch"
               for p in image.pip)


def interface_of(addr: str) -> str | None:
    """The name of the network interface that carries IPv4 address ``addr`` here (Linux), or None."""
    try:
        import fcntl
        import struct

        packed = socket.inet_aton(addr)
    except (ImportError, OSError):
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                answer = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # an interface without an IPv4 address
                continue
            if answer[20:24] == packed:
                return name
    return None


def has_efa(root: str = "/sys/class/infiniband") -> bool:
    """Does this machine have an EFA device (an RDMA device driven by ``efa``)?"""
    try:
        names = os.listdir(root)
    except OSError:
        return False
    return any(os.path.basename(os.path.realpath(os.path.join(root, name, "device", "driver"))) == "efa"
               for name in names)


def efa_env(environ: Any = os.environ, root: str = "/sys/class/infiniband") -> dict[str, str]:
    """:data:`EFA_ENV` less what ``environ`` sets already, on a machine with EFA; else nothing."""
    return {k: v for k, v in EFA_ENV.items() if k not in environ} if has_efa(root) else {}


def distributed_env(info: Any, cuda: bool) -> dict[str, str]:
    """The torchrun-style variables for this worker: RANK and WORLD_SIZE over all workers of the pool, NODE_RANK
    its node, LOCAL_RANK its index among that node's LOCAL_WORLD_SIZE workers."""
    env = {
        "MASTER_ADDR": info.head_addr, "MASTER_PORT": str(info.head_port), "WORLD_SIZE": str(info.world_size),
        "RANK": str(info.rank), "NODE_RANK": str(info.node),
        "LOCAL_RANK": str(info.worker), "LOCAL_WORLD_SIZE": str(info.workers_per_node),
    }
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def torch(backend: str | None = None, timeout: float = 60.0) -> Plugin:
    """torch.distributed across the pool; ``backend`` defaults to nccl with CUDA, else gloo.

    ``timeout``: seconds every node waits for the others to join before the pool start fails with a
    :class:`RendezvousError` naming the node (and for later collectives).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"torch backend must be one of gloo, nccl, mpi (or None for automatic), got {backend!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ConfigError(f"torch timeout must be a positive number of seconds, got {timeout!r}")

    def transform(image: Image, cluster: Cluster) -> Image:
        return image if _has_torch(image) else image.with_pip("torch")

    @contextlib.contextmanager
    def around_app(info: Any) -> Iterator[None]:
        import torch as torch_module
        import torch.distributed as dist

        cuda = torch_module.cuda.is_available()
        chosen = backend or ("nccl" if cuda else "gloo")
        node = (f"node {info.node} ({socket.gethostname()}, {info.addr})" if info.workers_per_node == 1 else
                f"rank {info.rank} (node {info.node} worker {info.worker}, {socket.gethostname()}, {info.addr})")
        if chosen == "nccl" and not cuda:
            raise ConfigError(f"torch backend 'nccl' needs CUDA, and {node} has none; use backend='gloo' or a GPU "
                              f"accelerator.")
        env = distributed_env(info, cuda)
        if chosen == "nccl":
            env.update(efa_env())
        if chosen == "gloo" and not os.environ.get("GLOO_SOCKET_IFNAME"):
            ifname = interface_of(info.addr)
            if ifname:
                env["GLOO_SOCKET_IFNAME"] = ifname
        before = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            if cuda:
                torch_module.cuda.set_device(int(env["LOCAL_RANK"]) % torch_module.cuda.device_count())
            try:
                dist.init_process_group(chosen, rank=info.rank, world_size=info.world_size,
                                        timeout=datetime.timedelta(seconds=timeout))
            except Exception as exc:  # noqa: BLE001 - torch raises several types here; all mean "could not meet"
                ifname_var = "NCCL_SOCKET_IFNAME" if chosen == "nccl" else "GLOO_SOCKET_IFNAME"
                first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
                what = ("the head: not every worker joined its" if info.rank == 0 else "it could not join the")
                raise RendezvousError(
                    f"torch.distributed rendezvous failed on {node}, {what} {chosen} process group at "
                    f"MASTER_ADDR={info.head_addr} MASTER_PORT={info.head_port} ({info.world_size} workers) within "
                    f"{timeout:g} s ({type(exc).__name__}: {first_line}). Check that every node reaches node 0 at "
                    f"that address and port (security group, firewall), and the network interface {chosen} uses "
                    f"({ifname_var}={os.environ.get(ifname_var, 'unset')})."
                ) from None
            yield
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            # Set up again (the pool grew) or turned off: no variable claims a process group that is gone.
            for key, value in before.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    return Plugin.create("torch").with_transform(transform).with_around_app(around_app)
