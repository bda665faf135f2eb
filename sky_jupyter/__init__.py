"""sky_jupyter: run notebook cells and Python functions on cloud GPU machines as if they were local.

``import sky_jupyter as sky``::

    @sky.compute
    def train(lr: float) -> float: ...

    with sky.ComputePool(provider=sky.Local(), nodes=2) as pool:
        one = train(0.1) >> pool      # on one node
        every = train(0.1) @ pool     # on every node, in rank order

In a notebook: ``%load_ext sky_jupyter``, then a cell starting with ``%%sky``.
Importing this package needs only the standard library and cloudpickle (it is shipped to nodes as is).
"""

from __future__ import annotations

from typing import Any

from . import plugins
from .compute import Compute, PendingCompute, PendingGroup, compute, gather
from .errors import (
    AuthenticationError,
    BootstrapError,
    ConfigError,
    ConnectionLostError,
    ProvisionError,
    RemoteError,
    SerializationError,
    SkyError,
    VersionMismatchError,
    WorkerLostError,
)
from .image import Image
from .info import InstanceInfo, instance_info, shard
from .plugin import Cluster, Plugin
from .pool import ComputePool
from .providers import Local

__version__ = "0.1.0"

__all__ = [
    "AWS", "SSH", "AuthenticationError", "BootstrapError", "Cluster", "Compute", "ComputePool", "ConfigError",
    "ConnectionLostError", "Image", "InstanceInfo", "Local", "PendingCompute", "PendingGroup", "Plugin",
    "ProvisionError", "RemoteError", "SerializationError", "SkyError", "VersionMismatchError", "WorkerLostError",
    "compute", "gather", "instance_info", "plugins", "shard",
]


def __getattr__(name: str) -> Any:
    # SSH and AWS need paramiko / boto3, which nodes do not have: import them on first use.
    if name in ("SSH", "AWS"):
        from . import providers

        return getattr(providers, name)
    if name == "panel":  # the widget panel needs ipywidgets: imported on first use
        from .notebook.panel import panel

        return panel
    raise AttributeError(f"module 'sky_jupyter' has no attribute {name!r}")


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext sky_jupyter``: register the ``%%sky`` and ``%sky`` magics."""
    from .notebook import load_ipython_extension as load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .notebook import unload_ipython_extension as unload

    unload(ipython)
