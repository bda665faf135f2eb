"""The node's share folder: a payload that several workers of one node need crosses the client's link once.

The worker that receives it with its own work (the carrier) writes it to one file and hard-links that file once per
sibling (``KEY.1`` ... ``KEY.N``) before it queues the work, so it is there however long the carrier's own queue is.
Each sibling maps its link when its job starts (copy-on-write: values built from it stay writable, and a sibling
allocates and copies nothing up front, which on a node whose workers share few cores is most of a large payload's
cost), then unlinks it: the data is freed once the last mapping of it is gone.
A copy never read (its worker died) goes with the folder when the pool shuts down.

A file is ``!I`` (number of buffers), one ``!Q`` length per buffer, then the buffers.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
import time

_COUNT = struct.Struct("!I")
_LEN = struct.Struct("!Q")
_KEY = re.compile(r"[0-9a-f]{8,64}")
MAX_COPIES = 4096


class ShareError(Exception):
    """A shared payload that cannot be stored or read (a bad key, a copy that never arrived)."""


def check(key: object, copies: object, copy: object) -> None:
    """Raise ShareError unless the frame's share fields are what a client sends (the key names a file)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise ShareError(f"a shared payload's key must be 8 to 64 hex digits, got {key!r}")
    for name, value in (("copies", copies), ("copy", copy)):
        if type(value) is not int or not 0 <= value <= MAX_COPIES:
            raise ShareError(f"a shared payload's {name} must be a whole number from 0 to {MAX_COPIES}, got {value!r}")


def store(folder: str, key: str, frames: list[bytearray], copies: int) -> None:
    """Keep ``frames`` for ``copies`` siblings: one file, one hard link each (written whole before it is linked)."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    tmp = os.path.join(folder, f"{key}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(_COUNT.pack(len(frames)) + b"".join(_LEN.pack(len(b)) for b in frames))
        for buf in frames:
            f.write(buf)
    try:
        for i in range(1, copies + 1):
            link = os.path.join(folder, f"{key}.{i}")
            try:
                os.link(tmp, link)
            except FileExistsError:  # a copy of the same payload that its sibling has not read yet: the same bytes
                continue
    finally:
        os.unlink(tmp)


def take(folder: str, key: str, copy: int, wait: float, carrier: str) -> list[memoryview]:
    """Map and remove this worker's copy, waiting up to ``wait`` seconds for the carrier to write it (its frame
    left the client first, but the carrier may still be reading it). Interruptible: it sleeps in small steps."""
    path = os.path.join(folder, f"{key}.{copy}")
    deadline = time.monotonic() + wait
    delay = 0.002
    while True:
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below, after the unlink that frees its space
            break
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise ShareError(f"this task's data, sent once to this node with {carrier}'s copy of the task, did "
                                 f"not arrive within {wait:.0f} s (that copy was lost with its connection, or the "
                                 f"worker died); run it again") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
    try:
        os.unlink(path)
        (count,) = _COUNT.unpack(f.read(_COUNT.size))
        sizes = struct.unpack(f"!{count}Q", f.read(count * _LEN.size)) if count else ()
        start = _COUNT.size + count * _LEN.size
        if start + sum(sizes) > os.fstat(f.fileno()).st_size:
            raise ShareError(f"the shared copy {path} is shorter than its header says")
        view = memoryview(mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE))
        frames = []
        for size in sizes:
            frames.append(view[start:start + size])
            start += size
        return frames
    finally:
        f.close()
