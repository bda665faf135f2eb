"""The plugins sky_jupyter ships: ``sky.plugins.huggingface(token=...)`` and ``sky.plugins.torch(backend=...)``.

Both modules import only the standard library at load time (torch and huggingface_hub are imported where used),
so they are imported eagerly: a lazy ``__getattr__`` would let the submodule replace the function of the same
name on this package after the first import.
"""

from __future__ import annotations

from .huggingface import huggingface
from .torch import torch

__all__ = ["huggingface", "torch"]
