"""The node environment a pool asks for, as a frozen value that plugins return modified copies of."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from .errors import ConfigError
from .fetch_uv import shown as shown_url  # one way to hide a URL's password, for the client and the node alike
from .redaction import register

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: ``scheme://user:password@``: the password part, masked in messages that quote what the user wrote.
_URL_PASSWORD = re.compile(r"(://[^/@:\s]*:)[^/@\s]*@")


def _index_url(url: object, what: str) -> str:
    """Check a package index URL, and make its credentials (if any) secrets the redactor hides."""
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https", "file") or " " in url:
        shown = shown_url(url) if isinstance(url, str) else repr(url)
        raise ConfigError(f"{what} {shown!r} is not a package index URL; give one like "
                          f"'https://user:token@packages.example.com/simple'.")
    parts = urlsplit(url)
    if parts.password:
        register(parts.password)
    return url


def _package_names(names: Iterable[object], what: str) -> tuple[str, ...]:
    """Package names, in order and without repeats. One that starts with ``-`` is refused: apt-get and uv would
    read it as an option (``--index-url=...`` would send every install elsewhere)."""
    out = tuple(dict.fromkeys(str(p) for p in names))
    for name in out:
        if name.lstrip().startswith("-"):
            shown = _URL_PASSWORD.sub(r"\1***@", name)
            if what.startswith("Image(apt"):
                hint = "apt options belong in the node's own apt configuration"
            else:
                hint = "for another package index use Image(index_url=...), extra_index_urls=[...] or pip_indexes=[...]"
            raise ConfigError(f"{what} entry {shown!r} starts with '-', so apt-get or uv would read it as an "
                              f"option; list package names only ({hint}).")
    return out


@dataclass(frozen=True, slots=True)
class PipIndex:
    """A package index that some packages come from (Skyward's name): ``PipIndex(url, ["torch"])`` installs torch
    from ``url`` first, its dependencies from there or the pool's own index. Credentials in ``url`` never show."""

    url: str
    packages: tuple[str, ...] = ()

    def __init__(self, url: str, packages: Iterable[str] = ()) -> None:
        if isinstance(packages, str):
            raise ConfigError(f"PipIndex(packages=...) takes a list of package names, not {packages!r}; "
                              f"write packages=[{packages!r}].")
        object.__setattr__(self, "url", _index_url(url, "PipIndex url"))
        object.__setattr__(self, "packages", _package_names(packages, "PipIndex(packages=...)"))

    def __repr__(self) -> str:
        return f"PipIndex({shown_url(self.url)!r}, packages={list(self.packages)})"


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
    """What every node of a pool gets: pip packages, apt packages, environment variables, interpreter, and
    where its packages come from.

    ``env`` is stored as sorted pairs so the value stays hashable; read it with :attr:`environ`. ``index_url``
    replaces the default package index for every install on the node (uv, pip, the node's own uv download);
    ``extra_index_urls`` are searched too; ``pip_indexes`` name indexes that given packages come from.
    ``python_mirror`` is where ``uv python install`` downloads a Python when the node has none of the client's
    version (uv's ``UV_PYTHON_INSTALL_MIRROR``). ``includes`` are local files and folders kept in sync in the nodes'
    working folder (importable there), less what ``excludes`` globs match (:mod:`sky_jupyter.sync`).
    """

    pip: tuple[str, ...] = ()
    apt: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = field(default=())
    python: str | None = None
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    pip_indexes: tuple[PipIndex, ...] = ()
    python_mirror: str | None = None
    includes: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()

    def __init__(self, pip: Iterable[str] = (), apt: Iterable[str] = (),
                 env: Mapping[str, str] | Iterable[tuple[str, str]] = (), python: str | None = None,
                 index_url: str | None = None, extra_index_urls: Iterable[str] = (),
                 pip_indexes: Iterable[PipIndex] = (), python_mirror: str | None = None,
                 includes: Iterable[str] = (), excludes: Iterable[str] = ()) -> None:
        if isinstance(pip, str) or isinstance(apt, str):
            raise ConfigError("Image(pip=..., apt=...) takes a list of package names, not one string; "
                              "write pip=['numpy'].")
        if isinstance(extra_index_urls, str):
            raise ConfigError("Image(extra_index_urls=...) takes a list of URLs, not one string; "
                              "write extra_index_urls=['https://...'].")
        indexes = tuple(pip_indexes)
        for index in indexes:
            if not isinstance(index, PipIndex):
                raise ConfigError(f"Image(pip_indexes=...) takes sky.PipIndex(url, packages) values, not "
                                  f"{type(index).__name__}.")
        if python is not None and (not isinstance(python, str) or not python.strip() or python.lstrip()[0] == "-"):
            raise ConfigError(f"Image(python=...) must be a version like '3.11' or an interpreter path, not "
                              f"{python!r}.")
        object.__setattr__(self, "pip", _package_names(pip, "Image(pip=...)"))
        object.__setattr__(self, "apt", _package_names(apt, "Image(apt=...)"))
        object.__setattr__(self, "env", _frozen_env(dict(env)))
        object.__setattr__(self, "python", python)
        object.__setattr__(self, "index_url", None if index_url is None else _index_url(index_url, "Image index_url"))
        object.__setattr__(self, "extra_index_urls",
                           tuple(_index_url(u, "Image extra_index_urls entry") for u in extra_index_urls))
        object.__setattr__(self, "pip_indexes", indexes)
        object.__setattr__(self, "python_mirror",
                           None if python_mirror is None else _index_url(python_mirror, "Image python_mirror"))
        from .sync import check_includes

        paths, patterns = check_includes(includes, excludes)
        object.__setattr__(self, "includes", paths)
        object.__setattr__(self, "excludes", patterns)

    @property
    def environ(self) -> dict[str, str]:
        return dict(self.env)

    def with_pip(self, *packages: str) -> Image:
        return dataclasses.replace(self, pip=(*self.pip, *packages))

    def with_apt(self, *packages: str) -> Image:
        return dataclasses.replace(self, apt=(*self.apt, *packages))

    def with_env(self, **env: str) -> Image:
        return dataclasses.replace(self, env=_frozen_env({**self.environ, **env}))

    def __repr__(self) -> str:
        # Values may be secrets (HF_TOKEN): show names only.
        names = ", ".join(k for k, _ in self.env)
        text = f"Image(pip={list(self.pip)}, apt={list(self.apt)}, env=[{names}], python={self.python!r}"
        if self.index_url:
            text += f", index_url={shown_url(self.index_url)!r}"
        if self.extra_index_urls:
            text += f", extra_index_urls={[shown_url(u) for u in self.extra_index_urls]!r}"
        if self.pip_indexes:
            text += f", pip_indexes={list(self.pip_indexes)!r}"
        if self.python_mirror:
            text += f", python_mirror={shown_url(self.python_mirror)!r}"
        return text + ")"
