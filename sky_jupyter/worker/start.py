"""``python -m sky_jupyter.worker``: start a worker process.

It reads its configuration (pool secret included, so the secret is never on a command line) as one JSON line on
stdin, listens on a localhost port, prints ``SKY-READY {"port": ..., "pid": ...}`` and, when asked to detach,
leaves the SSH session that started it and moves its output to a log file, so it outlives that session.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading

from .. import protocol as P
from .output import log
from .server import Worker


def _watch_stdin(worker: Worker) -> None:
    """Local workers: the client holds our stdin; when it closes, the client is gone.

    Reads the file descriptor itself, not ``sys.stdin``: a thread blocked in ``sys.stdin.buffer.read`` holds the
    buffer's lock, a task that forks (a fork Pool, DataLoader workers) copies it held, and the child blocks
    forever when multiprocessing closes its stdin."""
    try:
        fd = sys.__stdin__.fileno() if sys.__stdin__ is not None else -1
        while fd >= 0 and os.read(fd, 1024):
            pass
    except OSError:
        pass  # stdin closed or gone: the client is gone too
    finally:
        worker.shutdown("the client closed the worker's stdin")


def _leave_session() -> None:
    """Carry on in a child with a session of its own, so the worker outlives the SSH session that started it.

    Only after the config line has been read: sshd may close our stdin as soon as the process it started
    exits, and a ``setsid`` in front of Python (which forks when run by a session leader) could exit before
    sshd had written the line. The child inherits stdout, so the client still reads the READY line from it.
    """
    if os.fork():
        os._exit(0)
    os.setsid()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sky_jupyter.worker")
    parser.add_argument("--listen-fd", type=int)
    parser.add_argument("--config-fd", type=int)
    parser.add_argument("--generation", type=int, default=0)
    # Which of its node's workers this one is (the node's bring-up starts them all from one config line).
    parser.add_argument("--local-rank", type=int)
    args = parser.parse_args(argv)
    if args.config_fd is not None:
        with os.fdopen(args.config_fd, "rb") as f:
            line = f.readline()
    else:
        line = sys.stdin.buffer.readline()
    config = json.loads(line)
    if args.local_rank is not None:
        config["local_rank"] = args.local_rank
        if args.local_rank and config.get("log"):  # worker.log, worker-1.log, ...
            root, ext = os.path.splitext(config["log"])
            config["log"] = f"{root}-{args.local_rank}{ext}"
    if config.get("detach") and args.generation == 0:
        _leave_session()
    if args.listen_fd is not None:
        listener = socket.socket(fileno=args.listen_fd)
    else:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(config.get("port", 0))))
        listener.listen(socket.SOMAXCONN)  # a burst of connections is turned away by the accept loop at once
    os.set_inheritable(listener.fileno(), False)
    if config.get("workdir"):
        os.makedirs(os.path.expanduser(config["workdir"]), exist_ok=True)
        os.chdir(os.path.expanduser(config["workdir"]))
    os.environ.update(config.get("env", {}))
    if args.generation == 0:
        port = listener.getsockname()[1]
        ready = {"port": port, "pid": os.getpid(), "local_rank": int(config.get("local_rank", 0))}
        sys.stdout.write(f"{P.READY} {json.dumps(ready)}\n")
        sys.stdout.flush()
        if config.get("detach"):
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            logfd = os.open(os.path.expanduser(config.get("log", "worker.log")),
                            os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(logfd, 1)
            os.dup2(logfd, 2)
    log(f"worker generation {args.generation} serving node {config.get('rank', 0)} worker "
        f"{config.get('local_rank', 0)} "
        f"on 127.0.0.1:{listener.getsockname()[1]}")
    worker = Worker(config, listener, args.generation)
    if config.get("exit_with_stdin"):
        threading.Thread(target=_watch_stdin, args=(worker,), daemon=True).start()
    worker.serve()
