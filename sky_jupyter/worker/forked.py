"""``sky.Worker(executor="process")``: a task in a process of its own, forked from the worker, so that CPU-bound
pure Python runs on as many cores as the worker has slots (threads would share one interpreter lock).

The child gets the task's payload and the worker's plugin decorators as they are at the fork (the namespace, the
imported modules, torch's process group: everything the worker holds is there, copy-on-write), runs it, and sends
back its value, or its error's meta and pickle, through a pipe; what it prints reaches the worker through pipes of
its own on file descriptors 1 and 2, tagged with its task, and what it reads (``input()``, ``getpass``, ``sys.stdin``)
it asks of the worker through a pair of pipes, one JSON line each way, which the worker asks of the client. An
interrupt is a SIGINT to the child. A child does not touch the worker's connection, outbox or locks: it writes
only to its pipes and leaves with ``os._exit``.
"""

from __future__ import annotations

import builtins
import codecs
import getpass
import inspect
import json
import os
import select
import signal
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

from .. import protocol as P
from .output import TaskStdin, refusal

_LEN = struct.Struct("!Q")
_forking = threading.Lock()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


class _ChildInput:
    """``input()`` in the forked child: a JSON line to the worker with the prompt, a JSON line back with the answer
    (``{"value": ...}``, or ``{"error": ..., "message": ...}`` as in :class:`~sky_jupyter.protocol.InputReplyMeta`)."""

    def __init__(self, ask_fd: int, answer_fd: int) -> None:
        self._ask_fd = ask_fd
        self._answers = open(answer_fd, "rb", closefd=False)  # noqa: SIM115 - lives with the child

    def ask(self, prompt: str, password: bool = False, task: int | None = None) -> str:
        _write_all(self._ask_fd, json.dumps({"prompt": prompt, "password": password}).encode() + b"\n")
        line = self._answers.readline()
        reply = json.loads(line) if line else {"error": "EOFError", "message": "the worker gave no answer"}
        if isinstance(reply.get("value"), str):
            return reply["value"]
        raise refusal(str(reply.get("error")), str(reply.get("message")))

    def input(self, prompt: object = "") -> str:
        return self.ask(str(prompt))

    def getpass(self, prompt: str = "Password: ", stream: Any = None) -> str:
        return self.ask(str(prompt), password=True)


class _Relay:
    """In the worker, for one child: what it prints goes to ``output``, each prompt it sends is asked (``ask``, on a
    thread of its own: the answer may take a person minutes) and the answer written back. One thread reads the three
    pipes, so what the child printed before a prompt is passed on before the prompt."""

    def __init__(self, out_fd: int, err_fd: int, ask_fd: int, answer_fd: int, output: Callable[[str, str], None],
                 ask: Callable[[str, bool], str]) -> None:
        self._streams = {fd: (name, codecs.getincrementaldecoder("utf-8")("replace"))
                         for fd, name in ((out_fd, "stdout"), (err_fd, "stderr"))}
        for fd in self._streams:
            os.set_blocking(fd, False)
        self._ask_fd = ask_fd
        self._asked = b""
        self._answers = open(answer_fd, "wb", buffering=0)  # noqa: SIM115 - closed by close()
        self._answers_lock = threading.Lock()
        self._output = output
        self._ask = ask
        self.thread = threading.Thread(target=self._loop, daemon=True, name="sky-fork-relay")
        self.thread.start()

    def _loop(self) -> None:
        open_fds = [*self._streams, self._ask_fd]
        try:
            while open_fds:
                ready, _, _ = select.select(open_fds, [], [])
                if self._ask_fd in ready:
                    for fd in self._streams:  # written before the prompt: in the pipes already, and first
                        if fd in open_fds and not self._drain(fd):
                            open_fds.remove(fd)
                    data = os.read(self._ask_fd, 65536)
                    if not data:
                        open_fds.remove(self._ask_fd)
                    self._take_asks(data)
                for fd in ready:
                    if fd in self._streams and fd in open_fds and not self._drain(fd):
                        open_fds.remove(fd)
        finally:
            for fd in (*self._streams, self._ask_fd):
                os.close(fd)

    def _drain(self, fd: int) -> bool:
        """Pass on what waits in one of the child's output pipes; False at its end."""
        name, decoder = self._streams[fd]
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return True
            if not data:
                return False
            self._output(name, decoder.decode(data))

    def _take_asks(self, data: bytes) -> None:
        self._asked += data
        *lines, self._asked = self._asked.split(b"\n")
        for line in lines:
            request = json.loads(line)
            threading.Thread(target=self._answer, args=(str(request.get("prompt", "")), bool(request.get("password"))),
                             daemon=True, name="sky-fork-input").start()

    def _answer(self, prompt: str, password: bool) -> None:
        try:
            reply: dict[str, str] = {"value": self._ask(prompt, password)}
        except BaseException as exc:  # noqa: BLE001 - the child raises it from its input()
            name = type(exc).__name__
            reply = {"error": name if name in ("KeyboardInterrupt", "StdinNotImplementedError") else "EOFError",
                     "message": str(exc)}
        with self._answers_lock:
            if self._answers.closed:
                return
            try:
                self._answers.write(json.dumps(reply).encode() + b"\n")
            except OSError:  # the child is gone (interrupted while it waited)
                pass

    def close(self) -> None:
        self.thread.join(5)
        with self._answers_lock:
            self._answers.close()


def _child(frames: list, decorators: list[Any], result_fd: int, error_frames: Callable[[BaseException], Any],
           asker: _ChildInput) -> None:
    """In the forked child: run the task, write (ok, value) or (False, meta, exception frames), leave."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
    sys.stdin = TaskStdin(asker)
    builtins.input = asker.input
    getpass.getpass = asker.getpass
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
               started: Callable[[int], None], error_frames: Callable[[BaseException], Any],
               ask: Callable[[str, bool], str]) -> tuple[Any, list]:
    """Run one task in a forked child. ``output(stream name, text)`` gets what it prints, ``started(pid)`` its
    pid (for interrupts), ``ask(prompt, password)`` what it reads. Returns (None, reply frames) for a value, or
    (error meta, exception frames)."""
    # One fork at a time, its child's ends of the pipes closed here before another: a sibling forked meanwhile
    # would hold them open, so this child's end (EOF on its result) would wait for the sibling's, which may wait
    # for input the client asks only once this call has ended.
    with _forking:
        result_r, result_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        ask_r, ask_w = os.pipe()
        answer_r, answer_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: nothing of the worker's but what this function hands it
            try:
                for fd in (result_r, out_r, err_r, ask_r, answer_w):
                    os.close(fd)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                _child(frames, decorators, result_w, error_frames, _ChildInput(ask_w, answer_r))
            finally:
                os._exit(70)
        for fd in (result_w, out_w, err_w, ask_w, answer_r):
            os.close(fd)
    started(pid)
    relay = _Relay(out_r, err_r, ask_r, answer_w, output, ask)
    try:
        data = _read_all(result_r)
    finally:
        os.close(result_r)
        _, status = os.waitpid(pid, 0)
        relay.close()
    if not data:
        why = (f"was killed by {signal.Signals(-os.waitstatus_to_exitcode(status)).name}"
               if os.WIFSIGNALED(status) else f"exited with code {os.waitstatus_to_exitcode(status)}")
        return error_frames(RuntimeError(f"the task's process (pid {pid}) {why} before it could answer"))
    answer = P.loads(_unframed(data))
    if answer[0]:
        return None, P.dumps_reply(answer[1])
    return answer[1], answer[2]
