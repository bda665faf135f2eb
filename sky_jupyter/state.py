"""Pool state on disk: ``~/.sky_jupyter/pools/NAME.json`` (0600), written before anything is provisioned and
updated as it changes, so teardown and ``gc`` always know what exists, and a later client can attach to the
workers of a pool whose client died (``ComputePool.attach``, ``%sky attach``)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any


def sky_home() -> Path:
    """Where this client keeps its files: ``$SKY_JUPYTER_HOME``, else ``~/.sky_jupyter``."""
    return Path(os.environ.get("SKY_JUPYTER_HOME", Path.home() / ".sky_jupyter"))


def private_dir(*parts: str) -> Path:
    """``sky_home()/parts``, created if missing, it and ``sky_home()`` itself mode 0700: pool secrets, pinned host
    keys, key pairs and caches live there. Folders made 0755 by an earlier version are tightened."""
    folders = [sky_home()]
    for part in parts:
        folders.append(folders[-1] / part)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if folder.stat().st_mode & 0o077:
            folder.chmod(0o700)
    return folders[-1]


def pools_dir() -> Path:
    return private_dir("pools")


@dataclass
class PoolRecord:
    """What ``pools/NAME.json`` holds: enough to tear a pool down, find its machines, and attach to its workers
    after its client died. Its only secret is the pool's own (the file is 0600); a notebook's request never holds
    a token."""

    name: str
    provider: str = ""  # "local", "ssh" or "aws"
    provider_repr: str = ""
    nodes: int = 0
    accelerator: str | None = None
    secret: str = ""
    idle_timeout: float | None = None
    grace: float | None = None
    interrupt_grace: float | None = None
    head_port: int = 0
    store_port: int = 0
    hosts: list[dict[str, Any]] = field(default_factory=list)  # Host fields, per node
    workers: list[dict[str, Any]] = field(default_factory=list)  # rank, node, local_rank, port, pid
    workers_per_node: int | str = "auto"
    output: str | None = None
    gpus: dict[str, int] = field(default_factory=dict)  # node -> GPUs it reported (JSON keys are strings)
    cloud: dict[str, Any] = field(default_factory=dict)  # the provider's own ids (AWS: instances, groups...)
    request: dict[str, Any] = field(default_factory=dict)  # what the notebook asked for (%%sky options)
    client_pid: int = 0
    updated: float = 0.0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolRecord:
        """A record from a file's JSON; keys this version does not know (a newer client wrote them) are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known and value is not None})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def detached(self) -> bool:
        """Its client process has gone (a crashed or killed kernel), leaving it to be attached to or shut down."""
        return self.client_pid != os.getpid() and not pid_alive(self.client_pid)


def save(record: PoolRecord) -> Path:
    """Write ``record`` atomically (0600) as this process's: its pid and the time are set."""
    record.client_pid, record.updated = os.getpid(), time.time()
    path = pools_dir() / f"{record.name}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(record.to_json(), f, indent=1)
    os.replace(tmp, path)
    return path


def _read(path: Path) -> PoolRecord | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return PoolRecord.from_json({**data, "name": path.stem}) if isinstance(data, dict) else None


def load(name: str) -> PoolRecord | None:
    return _read(pools_dir() / f"{name}.json")


def update(name: str, **changes: Any) -> PoolRecord:
    """Replace some fields of a pool's record (a new record if there is none), keeping the rest."""
    record = replace(load(name) or PoolRecord(name), **changes)
    save(record)
    return record


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


def remove(name: str) -> None:
    try:
        (pools_dir() / f"{name}.json").unlink()
    except FileNotFoundError:
        pass


def all_pools() -> list[PoolRecord]:
    return [record for path in sorted(pools_dir().glob("*.json")) if (record := _read(path)) is not None]
