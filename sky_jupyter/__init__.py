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

import importlib
from typing import TYPE_CHECKING, Any

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
    SpotReclaimError,
    VersionMismatchError,
    WorkerLostError,
)
from .info import InstanceInfo, instance_info, is_head, shard, silent, stderr, stdout

__version__ = "0.1.0"

# The client's machinery is imported on first use: a node's worker imports this package before anything else and
# needs none of it (and the SSH and AWS providers need paramiko and boto3, the panel ipywidgets).
_LAZY = {
    "Image": "image", "PipIndex": "image", "Remote": "remote", "Cluster": "plugin", "Plugin": "plugin",
    "ComputePool": "pool", "Spec": "spec", "Worker": "spec",
    "Local": "providers", "SSH": "providers", "AWS": "providers", "panel": "notebook.panel",
}

__all__ = [
    "AWS", "SSH", "AuthenticationError", "BootstrapError", "Cluster", "Compute", "ComputePool", "ConfigError",
    "ConnectionLostError", "Image", "InstanceInfo", "Local", "PendingCompute", "PendingGroup", "PipIndex", "Plugin",
    "ProvisionError", "Remote", "RemoteError", "SerializationError", "SkyError", "Spec", "SpotReclaimError",
    "VersionMismatchError", "Worker", "WorkerLostError", "accelerators", "barrier", "compute", "counter", "dict",
    "gather", "instance_info", "is_head", "lock", "panel", "plugins", "pool", "queue", "set", "shard", "silent",
    "stderr", "stdout",
]

if TYPE_CHECKING:
    from . import plugins
    from .image import Image, PipIndex
    from .notebook.panel import panel
    from .plugin import Cluster, Plugin
    from .pool import ComputePool
    from .providers import AWS, SSH, Local
    from .remote import Remote
    from .spec import Spec, Worker


#: The shared collections: ``sky.dict`` and ``sky.set`` are not bound here, where they would hide the builtins.
_STORE = {"dict": "dict_", "set": "set_", "counter": "counter", "queue": "queue", "barrier": "barrier",
          "lock": "lock"}


def __getattr__(name: str) -> Any:
    if name in ("plugins", "pool", "accelerators"):  # sky.pool(...) is Skyward's ComputePool(...): that module is
        # callable; sky.accelerators.H100(count=8) builds accelerator names
        return importlib.import_module(f".{name}", __name__)
    if name in _STORE:
        return getattr(importlib.import_module(".store", __name__), _STORE[name])
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sky_jupyter' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext sky_jupyter``: register the ``%%sky`` and ``%sky`` magics, and show this package's errors
    without its own frames (:func:`sky_jupyter.tracebacks.show_sky_error`), unless the shell already has a custom
    exception handler of someone else's."""
    from .notebook import load_ipython_extension as load
    from .tracebacks import show_sky_error

    load(ipython)
    if not getattr(ipython, "custom_exceptions", ()) or ipython.custom_exceptions == (SkyError,):
        ipython.set_custom_exc((SkyError,), show_sky_error)


def unload_ipython_extension(ipython: Any) -> None:
    from .notebook import unload_ipython_extension as unload

    if getattr(ipython, "custom_exceptions", ()) == (SkyError,):
        ipython.set_custom_exc((), None)
    unload(ipython)
