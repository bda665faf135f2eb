"""The node environment a pool asks for, as a frozen value that plugins return modified copies of."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .errors import ConfigError

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _frozen_env(env: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    items = []
    for key, value in dict(env).items():
        if not isinstance(key, str) or not _ENV_NAME.match(key):
            raise ConfigError(f"Image env name {key!r} is not a valid environment variable name; "
                              f"use letters, digits and underscores.")
        items.append((key, str(value)))
    return tuple(sorted(items))


@dataclass(frozen=True, slots=True)
class Image:
    """What every node of a pool gets: pip packages, apt packages, environment variables, interpreter.

    ``env`` is stored as sorted pairs so the value stays hashable; read it with :attr:`environ`.
    """

    pip: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=())
    python: str | None = None

    def __init__(self, pip: Iterable[str] = (), apt: Iterable[str] = (),
                 env: Mapping[str, str] | Iterable[tuple[str, str]] = (), python: str | None = None) -> None:
        if isinstance(pip, str) or isinstance(apt, str):
            raise ConfigError("Image(pip=..., apt=...) takes a list of package names, not one string; "
                              "write pip=['numpy'].")
        object.__setattr__(self, "pip", tuple(dict.fromkeys(str(p) for p in pip)))
        object.__setattr__(self, "apt", tuple(dict.fromkeys(str(p) for p in apt)))
        object.__setattr__(self, "env", _frozen_env(dict(env)))
        object.__setattr__(self, "python", python)

    @property
    def environ(self) -> dict[str, str]:
        return dict(self.env)

    def with_pip(self, *packages: str) -> Image:
        return dataclasses.replace(self, pip=(*self.pip, *packages))

    def with_apt(self, *packages: str) -> Image:
        return dataclasses.replace(self, apt=(*self.apt, *packages))

    def with_env(self, **env: str) -> Image:
        return dataclasses.replace(self, env={**self.environ, **env})

    def __repr__(self) -> str:
        # Values may be secrets (HF_TOKEN): show names only.
        names = ", ".join(k for k, _ in self.env)
        return f"Image(pip={list(self.pip)}, apt={list(self.apt)}, env=[{names}], python={self.python!r})"
