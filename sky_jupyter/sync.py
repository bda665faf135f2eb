"""``Image(includes=[...], excludes=[...])``: local files and packages kept in sync in every node's working folder.

Each included path arrives under its own name in the folder the node's workers start in (their home on SSH and
AWS, the node's folder on Local), which is on their ``sys.path``: ``includes=["./mypkg"]`` lets tasks ``import
mypkg``; ``includes=["data/labels.csv"]`` gives them ``labels.csv``. ``excludes`` are glob patterns matched
against each file's path below an included folder and against its name (``__pycache__``, ``*.pyc`` and ``.git``
always are).

Delta sync: the node keeps a manifest of what it was sent (path and sha256, ``~/.sky_jupyter/includes.json`` in
its working folder); the client sends a tar of only the files whose content differs, and removes those it no longer
includes. It runs when a pool starts or grows, on ``pool.sync()``, and before each ``%%sky`` cell (a pass of
``stat`` calls when nothing changed). A module a worker has imported already keeps its old code until the worker
restarts. Only the standard library: :func:`node_manifest` and :func:`node_apply` run on the nodes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import shutil
import tarfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from .errors import ConfigError

ALWAYS_EXCLUDED = ("__pycache__", "*.pyc", ".git")
MANIFEST = os.path.join(".sky_jupyter", "includes.json")

_hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256: unchanged files are not re-read


def check_includes(includes: Iterable[object], excludes: Iterable[object]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The paths and patterns as given, checked: every included path exists, and no two arrive under one name."""
    if isinstance(includes, str) or isinstance(excludes, str):
        raise ConfigError("Image(includes=..., excludes=...) take lists, not one string: write includes=['./mypkg'].")
    paths = tuple(str(p) for p in includes)
    names: dict[str, str] = {}
    for path in paths:
        source = Path(path).expanduser()
        if not source.exists():
            raise ConfigError(f"Image(includes=...) entry {path!r} does not exist here ({source.resolve()}); "
                              f"include a file or folder of this machine.")
        name = source.resolve().name
        if name in names:
            raise ConfigError(f"Image(includes=...) entries {names[name]!r} and {path!r} would both arrive as "
                              f"{name!r} in the nodes' working folder; include their common parent instead.")
        names[name] = path
    return paths, tuple(str(p) for p in excludes)


def _excluded(rel: PurePosixPath, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(str(rel), p) or any(fnmatch.fnmatch(part, p) for part in rel.parts) for p in patterns)


def _sha256(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    found = _hashes.get(key)
    if found is None:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        found = _hashes[key] = digest.hexdigest()
    return found


def local_manifest(includes: tuple[str, ...], excludes: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Node path (posix, relative to its working folder) -> (sha256, local path) for every included file."""
    patterns = ALWAYS_EXCLUDED + tuple(excludes)
    found: dict[str, tuple[str, str]] = {}
    for include in includes:
        source = Path(include).expanduser().resolve()
        top = PurePosixPath(source.name)
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for path in files:
            rel = top / PurePosixPath(path.relative_to(source).as_posix()) if path != source else top
            if not _excluded(rel.relative_to(top) if path != source else rel, patterns):
                found[str(rel)] = (_sha256(path), str(path))
    return found


def tar_of(files: dict[str, str]) -> bytes:
    """A gzipped tar of ``{node path: local path}``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, local in sorted(files.items()):
            tar.add(local, arcname=name, recursive=False)
    return buf.getvalue()


# -- on the node ---------------------------------------------------------------------------------------------------
def node_manifest() -> dict[str, str]:
    """What this node was last sent: node path -> sha256 (empty before the first sync)."""
    try:
        with open(MANIFEST) as f:
            found = json.load(f)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def node_apply(archive: bytes, remove: list[str], manifest: dict[str, str]) -> int:
    """Unpack ``archive`` in the working folder, delete ``remove`` (files an earlier sync brought that are no longer
    included), and record ``manifest``. Returns how many files were written."""
    root = os.path.realpath(".")
    for name in remove:
        target = os.path.realpath(name)
        if target.startswith(root + os.sep) and os.path.isfile(target):
            os.unlink(target)
    written = 0
    if archive:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                # Only plain files and folders, inside the working folder (the client made it, but a node
                # extracts nothing that could land elsewhere; Pythons before 3.11.4 have no tarfile filters).
                target = os.path.realpath(member.name)
                if not (member.isfile() or member.isdir()) or not target.startswith(root + os.sep):
                    raise ValueError(f"the includes archive holds {member.name!r}, which would not land as a plain "
                                     f"file in the working folder")
                if member.isfile() and os.path.isdir(target):  # a folder replaced by a file between syncs
                    shutil.rmtree(target)
            checked = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # the same checks again
            for member in members:
                member.mode = (member.mode | 0o600) & 0o755 if member.isfile() else 0o755
                tar.extract(member, ".", set_attrs=member.isfile(), **checked)  # type: ignore[arg-type]
            written = sum(1 for m in members if m.isfile())
    os.makedirs(os.path.dirname(MANIFEST), mode=0o700, exist_ok=True)
    tmp = f"{MANIFEST}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, MANIFEST)
    return written
