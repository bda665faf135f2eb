"""``sky.Worker(executor="process")``: a task in a process of its own, forked from the worker, so that CPU-bound
pure Python runs on as many cores as the worker has slots (threads would share one interpreter lock).

The child gets the task's payload and the worker's plugin decorators as they are at the fork (the namespace, the
imported modules, torch's process group: everything the worker holds is there, copy-on-write), runs it, and sends
back its value, or its error's meta and pickle, through a pipe; what it prints reaches the worker through pipes of
its own on file descriptors 1 and 2, tagged with its task. An interrupt is a SIGINT to the child. A child does not
touch the worker's connection, outbox or locks: it writes only to its pipes and leaves with ``os._exit``.
"""

from __future__ import annotations

import codecs
import inspect
import os
import signal
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from .. import protocol as P

_LEN = struct.Struct("!Q")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _child(frames: list, decorators: list[Any], result_fd: int, error_frames: Callable[[BaseException], Any]
           ) -> None:
    """In the forked child: run the task, write (ok, value) or (False, meta, exception frames), leave."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    try:
        fn, args, kwargs = P.loads(frames)
        for decorate in reversed(decorators):
            fn = decorate(fn)
        value = fn(*args, **kwargs)
        if inspect.isgenerator(value):  # a generator: its items, as a list (as the worker does for one value)
            value = list(value)
        answer: tuple[Any, ...] = (True, value)
    except BaseException as exc:  # noqa: BLE001 - goes back to the worker
        meta, payload = error_frames(exc)
        answer = (False, meta, [bytes(memoryview(f)) for f in payload])
    try:
        data = b"".join(bytes(memoryview(f)) for f in _framed(P.dumps(answer)))
    except Exception as exc:  # noqa: BLE001 - an unpicklable value: say so instead
        meta, payload = error_frames(TypeError(f"the result ({type(answer[1]).__name__}) cannot be pickled: {exc}"))
        data = b"".join(_framed(P.dumps((False, meta, []))))
    sys.stdout.flush()
    sys.stderr.flush()
    _write_all(result_fd, data)
    os._exit(0)


def _framed(parts: list) -> list[bytes]:
    """``parts`` (a pickle and its buffers) as one byte string: a count, each length, then the bytes."""
    out = [_LEN.pack(len(parts))]
    out += [_LEN.pack(memoryview(p).nbytes) for p in parts]
    out += [bytes(memoryview(p)) for p in parts]
    return out


def _unframed(data: bytes) -> list[memoryview]:
    view = memoryview(data)
    (count,) = _LEN.unpack_from(view, 0)
    sizes = [_LEN.unpack_from(view, _LEN.size * (1 + i))[0] for i in range(count)]
    at = _LEN.size * (1 + count)
    parts = []
    for size in sizes:
        parts.append(view[at:at + size])
        at += size
    return parts


def run_forked(frames: list, decorators: list[Any], output: Callable[[str, str], None],
               started: Callable[[int], None], error_frames: Callable[[BaseException], Any]
               ) -> tuple[Any, list]:
    """Run one task in a forked child. ``output(stream name, text)`` gets what it prints, ``started(pid)`` its
    pid (for interrupts). Returns (None, reply frames) for a value, or (error meta, exception frames)."""
    result_r, result_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of the worker's but what this function hands it
        try:
            os.close(result_r)
            os.close(out_r)
            os.close(err_r)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            _child(frames, decorators, result_w, error_frames)
        finally:
            os._exit(70)
    for fd in (result_w, out_w, err_w):
        os.close(fd)
    started(pid)

    def forward(fd: int, name: str) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            while data := os.read(fd, 65536):
                output(name, decoder.decode(data))
        finally:
            os.close(fd)

    forwarders = [threading.Thread(target=forward, args=(fd, name), daemon=True, name=f"sky-fork-{name}")
                  for fd, name in ((out_r, "stdout"), (err_r, "stderr"))]
    for thread in forwarders:
        thread.start()
    try:
        data = _read_all(result_r)
    finally:
        os.close(result_r)
        _, status = os.waitpid(pid, 0)
        for thread in forwarders:
            thread.join(5)
    if not data:
        why = (f"was killed by {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
               if os.WIFSIGNALED(status) else f"exited with code {os.waitstatus_to_exitcode(status)}")
        return error_frames(RuntimeError(f"the task's process (pid {pid}) {why} before it could answer"))
    answer = P.loads(_unframed(data))
    if answer[0]:
        return None, P.dumps_reply(answer[1])
    return answer[1], answer[2]
