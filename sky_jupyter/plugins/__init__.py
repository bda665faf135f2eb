"""The plugins sky_jupyter ships: ``sky.plugins.huggingface(token=...)`` and ``sky.plugins.torch(backend=...)``."""

from __future__ import annotations

from typing import Any

__all__ = ["huggingface", "torch"]


def __getattr__(name: str) -> Any:
    if name == "huggingface":
        from .huggingface import huggingface

        return huggingface
    if name == "torch":
        from .torch import torch

        return torch
    raise AttributeError(name)
