"""Plugins: frozen values with optional hooks that shape a pool's image, bootstrap, workers and client.

Hooks, in the order a pool uses them:

* ``transform(image, cluster) -> image`` on the client, before the bootstrap script is generated;
* ``bootstrap(cluster) -> [shell ops]`` appended after the image phases, run once per node;
* ``around_app(info)`` a context manager entered in every worker at pool start, and left and entered again, with
  the new ``info``, on every worker when a running pool grows or changes its plugins (``pool.grow``,
  ``pool.use_plugins``): the torch plugin's process group re-forms there with the new world size;
* ``decorate(fn) -> fn`` wraps every task the worker runs;
* ``around_client(pool)`` a context manager on the client for the pool's life (or until a running pool stops
  using the plugin).

Hooks compose in plugin order; exits run in reverse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .image import Image


@dataclass(frozen=True, slots=True)
class Cluster:
    """What a plugin may know about the pool being built (before any machine exists)."""

    nodes: int
    accelerator: str | None
    provider: str
    pool_name: str
    gpu: bool = False
    workers_per_node: int | str = 1  # a number, or "auto" (one per GPU with the torch plugin)


Transform = Callable[[Image, Cluster], Image]
BootstrapOps = Callable[[Cluster], Sequence[str]]
AroundApp = Callable[[Any], AbstractContextManager[Any]]
Decorate = Callable[[Callable[..., Any]], Callable[..., Any]]
AroundClient = Callable[[Any], AbstractContextManager[Any]]


@dataclass(frozen=True, slots=True)
class Plugin:
    """A named bundle of hooks. Build with ``Plugin.create("name").with_transform(...)...``."""

    name: str
    transform: Transform | None = None
    bootstrap: BootstrapOps | None = None
    around_app: AroundApp | None = None
    decorate: Decorate | None = None
    around_client: AroundClient | None = None
    # Names of environment variables whose values are secrets (redacted from logs, never on disk in scripts).
    secrets: tuple[str, ...] = ()

    @classmethod
    def create(cls, name: str) -> Plugin:
        if not name or not isinstance(name, str):
            raise ConfigError("Plugin.create(name) needs a non-empty name, e.g. Plugin.create('wandb').")
        return cls(name=name)

    def with_transform(self, fn: Transform) -> Plugin:
        return dataclasses.replace(self, transform=fn)

    def with_bootstrap(self, fn: BootstrapOps) -> Plugin:
        return dataclasses.replace(self, bootstrap=fn)

    def with_around_app(self, fn: AroundApp) -> Plugin:
        return dataclasses.replace(self, around_app=fn)

    def with_decorate(self, fn: Decorate) -> Plugin:
        return dataclasses.replace(self, decorate=fn)

    def with_around_client(self, fn: AroundClient) -> Plugin:
        return dataclasses.replace(self, around_client=fn)

    def with_secrets(self, *names: str) -> Plugin:
        return dataclasses.replace(self, secrets=(*self.secrets, *names))


def check_plugins(plugins: Sequence[object]) -> tuple[Plugin, ...]:
    checked = []
    for i, plugin in enumerate(plugins):
        if not isinstance(plugin, Plugin):
            raise ConfigError(
                f"plugins[{i}] is {type(plugin).__name__}, not a sky.Plugin; pass e.g. "
                f"sky.plugins.huggingface(token=...) (did you forget the call parentheses?)."
            )
        checked.append(plugin)
    return tuple(checked)


def transform_image(image: Image, plugins: Sequence[Plugin], cluster: Cluster) -> Image:
    for plugin in plugins:
        if plugin.transform is not None:
            image = plugin.transform(image, cluster)
            if not isinstance(image, Image):
                raise ConfigError(f"plugin {plugin.name!r}: transform must return a sky.Image, "
                                  f"got {type(image).__name__}.")
    return image


def bootstrap_ops(plugins: Sequence[Plugin], cluster: Cluster) -> list[tuple[str, str]]:
    """(phase name, shell script) for each plugin that adds bootstrap work."""
    phases = []
    for plugin in plugins:
        if plugin.bootstrap is not None:
            ops = plugin.bootstrap(cluster)
            if isinstance(ops, str):
                ops = [ops]
            if ops:
                phases.append((plugin.name, "\n".join(ops)))
    return phases
