"""Pool state on disk: ``~/.sky_jupyter/pools/NAME.json`` (0600), written before anything is provisioned and
updated as it changes, so teardown and ``gc`` always know what exists, and a later client can attach to the
workers of a pool whose client died (``ComputePool.attach``, ``%sky attach``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .providers.local import private_dir


def pools_dir() -> Path:
    return private_dir("pools")


def save(name: str, state: dict[str, Any]) -> Path:
    path = pools_dir() / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({**state, "name": name, "updated": time.time(), "client_pid": os.getpid()}, f, indent=1)
    os.replace(tmp, path)
    return path


def load(name: str) -> dict[str, Any] | None:
    path = pools_dir() / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def update(name: str, **changes: Any) -> None:
    """Add or replace some keys of a pool's state file, keeping the rest."""
    save(name, {**(load(name) or {}), **changes})


def pid_alive(pid: object) -> bool:
    """Whether process ``pid`` runs. A killed kernel its parent has not reaped yet (a zombie) does not."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc here: the signal check is all there is
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X")  # the state field follows the command's ")"


def detached(recorded: dict[str, Any]) -> bool:
    """Is this a pool whose client process has gone (a crashed or killed kernel), leaving it to be attached
    to or shut down?"""
    pid = recorded.get("client_pid")
    return pid != os.getpid() and not pid_alive(pid)


def remove(name: str) -> None:
    try:
        (pools_dir() / f"{name}.json").unlink()
    except FileNotFoundError:
        pass


def all_pools() -> list[dict[str, Any]]:
    out = []
    for path in sorted(pools_dir().glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out
