"""The notebook layer: ``%%sky`` / ``%sky`` magics, the pool manager, and the widget panel."""

from __future__ import annotations

from typing import Any


def load_ipython_extension(ipython: Any) -> None:
    from .magics import SkyMagics

    ipython.register_magics(SkyMagics)


def unload_ipython_extension(ipython: Any) -> None:
    from .manager import manager

    manager().shutdown_all()
