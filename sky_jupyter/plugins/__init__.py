"""The plugins sky_jupyter ships: ``sky.plugins.huggingface(token=...)``, ``sky.plugins.torch(backend=...)``,
``sky.plugins.joblib()`` and ``sky.plugins.sklearn()``.

The modules import only the standard library at load time (torch, huggingface_hub, joblib are imported where used),
so they are imported eagerly: a lazy ``__getattr__`` would let the submodule replace the function of the same
name on this package after the first import.
"""

from __future__ import annotations

from .huggingface import huggingface
from .joblib import joblib, sklearn
from .torch import torch

__all__ = ["huggingface", "joblib", "sklearn", "torch"]
