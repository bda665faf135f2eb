"""``sky.Local()``: N worker processes on this machine, each with its own node folder and rank.

The embedded default: no cloud, no SSH. Workers use this Python environment, so an image's pip packages must
already be installed here (a missing one is a clear error); its environment variables go to the workers;
plugin bootstrap phases run once per node folder, with the same script and marker as on remote nodes.

Workers start in the client's current folder (a notebook's own folder in Jupyter), so a relative path means in a
``%%sky`` cell what it means in the notebook. A node works in its own folder instead where it needs one: with
``Local(root=...)`` (node folders under ``root``, kept apart as remote nodes are) and when the image has
``includes`` (they arrive in the node's folder, as in a remote node's home; never among the client's own files).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import protocol as P
from ..accelerators import check as check_accelerator
from ..bootstrap import BootstrapPlan, follow
from ..errors import BootstrapError, ConfigError, ProvisionError
from ..protocol import READY
from ..state import sky_home
from .base import Host, PoolSpec, Progress, Provider, WorkerHandle


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def missing_requirements(requirements: tuple[str, ...]) -> list[str]:
    """Requirements this interpreter does not satisfy (name and, when ``packaging`` is present, version)."""
    from importlib import metadata

    missing = []
    for spec in requirements:
        name, specifier = _name_and_specifier(spec)
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(spec)
            continue
        if specifier is not None and version not in specifier:
            missing.append(spec)
    return missing


def _name_and_specifier(spec: str) -> tuple[str, Any]:
    """A requirement's distribution name and version specifier (None without ``packaging``: any version)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with nearly every environment
        return spec.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip(), None
    req = Requirement(spec)
    return req.name, req.specifier


def local_gpus() -> int:
    """The GPUs of this machine, as a node's bring-up counts them: the lines ``nvidia-smi -L`` lists, else the
    ``/dev/nvidiaN`` devices, else 0 (no torch import: that takes seconds)."""
    import re
    import shutil

    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        return sum(1 for line in out.splitlines() if line.startswith("GPU "))
    try:
        return sum(1 for name in os.listdir("/dev") if re.fullmatch(r"nvidia[0-9]+", name))
    except OSError:
        return 0


class LocalWorker(WorkerHandle):
    def __init__(self, proc: subprocess.Popen[bytes], port: int, label: str) -> None:
        self.proc = proc
        self.port = port
        self.pid = proc.pid
        self.label = label

    def open(self) -> P.FrameIO:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return P.FrameIO(P.socket_reader(sock), sock.sendall, sock.close, sock.settimeout)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def describe_exit(self) -> str:
        code = self.proc.poll()
        if code is None:
            return f"(local pid {self.pid}) is running"
        if code < 0:
            return f"(local pid {self.pid}) was killed by {signal.Signals(-code).name}"
        return f"(local pid {self.pid}) exited with code {code}"

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()  # the worker exits when its stdin closes
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Local(Provider):
    """Worker processes on this machine: ``sky.ComputePool(provider=sky.Local(), nodes=2)``.

    ``root``: where the node folders go (logs, bootstrap marker, includes); given, each node also works there, in
    ``root/POOL/node-N``. Without it the folders are kept under ``~/.sky_jupyter/local`` and workers start in the
    client's current folder (see the module's docstring)."""

    name = "local"

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else None

    def __repr__(self) -> str:
        return "Local()"

    def _pool_dir(self, pool: str) -> Path:
        return (self.root or sky_home() / "local") / pool

    def check(self, spec: PoolSpec) -> None:
        row = check_accelerator(spec.accelerator)  # an unknown kind is refused here as on AWS
        if row.gpus:  # one line, not a warning pointing at this file
            print(f"sky: the Local provider runs on this machine: accelerator {spec.accelerator!r} is recorded, not "
                  f"provided (the nodes use this machine's GPUs, if it has any)", file=sys.stderr)

    def reattach(self, pool: str, hosts: list[Host], cloud: dict[str, Any]) -> list[Host]:
        raise ConfigError(f"pool {pool!r} ran on the Local provider, whose workers end with the client that "
                          f"started them: nothing is left to attach to. `%sky down {pool}` forgets it; a new "
                          f"%%sky cell starts it again.")

    def provision(self, spec: PoolSpec) -> list[Host]:
        hosts = []
        for rank in range(spec.nodes):
            workdir = self._pool_dir(spec.name) / f"node-{rank}"
            workdir.mkdir(parents=True, exist_ok=True)
            workdir.chmod(0o700)
            hosts.append(Host(rank=rank, addr="127.0.0.1", private_addr="127.0.0.1", port=0,
                              hostname=socket.gethostname(),
                              extra={"workdir": str(workdir), "cwd": self._start_folder(workdir)}))
        return hosts

    def _start_folder(self, workdir: Path) -> str:
        """Where a node's workers start: the client's current folder, or the node's own with ``root`` given (or
        when the client's folder is gone)."""
        if self.root is not None:
            return str(workdir)
        try:
            return os.getcwd()
        except OSError:
            return str(workdir)

    def bootstrap(self, host: Host, plan: BootstrapPlan, progress: Progress) -> None:
        missing = missing_requirements(plan.image.pip)
        if missing:
            raise ConfigError(
                f"the Local provider runs workers in this Python environment, which lacks "
                f"{', '.join(missing)}; install them here first: {sys.executable} -m pip install "
                + " ".join(repr(m) if any(c in m for c in "<>=[ ") else m for m in missing)
            )
        workdir = Path(host.extra["workdir"])
        if plan.image.includes:  # synced into the folder the workers start in: never the client's own
            host.extra["cwd"] = str(workdir)
        if not plan.phases:
            return
        script = workdir / "bootstrap.sh"
        script.write_text(plan.script())
        # SKY_PYTHON: the interpreter the workers run, for phases that need one (a plugin's login).
        env = {**os.environ, **plan.image.environ, "HOME": str(workdir), "SKY_PYTHON": sys.executable}
        proc = subprocess.Popen(["bash", str(script)], cwd=workdir, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            follow(iter(proc.stdout), f"node {host.rank} (local)", lambda ph, ln: progress(host.rank, ph, ln))
        except BootstrapError as exc:  # the log is in the node's folder here, not in a home on a remote node
            raise BootstrapError(exc.node, exc.phase, exc.exit_code, exc.tail,
                                 log=str(workdir / ".sky_jupyter" / "bootstrap.log")) from None
        finally:
            proc.kill() if proc.poll() is None else None
            proc.wait()

    def gpu_count(self, host: Host) -> int:
        return local_gpus()

    def read_log(self, host: Host) -> str:
        workdir = Path(host.extra["workdir"])
        parts = []
        for path in (workdir / ".sky_jupyter" / "bootstrap.log", *sorted(workdir.glob("worker*.log"))):
            if path.exists():
                parts.append(f"==> {path} <==\n{path.read_text(errors='replace')[-20000:]}")
        return "\n".join(parts) or f"no logs yet in {workdir}"

    def start_worker(self, host: Host, config: dict[str, Any]) -> WorkerHandle:
        workdir = host.extra["workdir"]
        start_in = host.extra.get("cwd") or workdir
        # Started in the client's folder: -P keeps that folder off sys.path, so the notebook's own modules reach a
        # Local node the way they reach a remote one (shipped by value), and a missing one fails here as it would
        # there. A node folder is on sys.path, as a remote node's home is (includes arrive there).
        safe_path = ["-P"] if start_in != workdir else []
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH", "")) if p)
        env.update(config.get("env", {}))
        local_rank = int(config.get("local_rank", 0))
        log_path = Path(workdir) / (f"worker-{local_rank}.log" if local_rank else "worker.log")
        label = f"node {host.rank} worker {local_rank} (local)" if local_rank else f"node {host.rank} (local)"
        log = open(log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [sys.executable, *safe_path, "-m", "sky_jupyter.worker"], cwd=start_in, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
            )
        finally:
            log.close()
        assert proc.stdin is not None and proc.stdout is not None
        share = str(Path(workdir) / "share")
        config = {**config, "workdir": start_in, "exit_with_stdin": True, "share_dir": share,
                  "cleanup": [*config.get("cleanup", ()), share]}
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
        port = _read_ready(proc, log_path, label)
        return LocalWorker(proc, port, label)


def _read_ready(proc: subprocess.Popen[bytes], log: Path, label: str, timeout: float = 30.0) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    buf = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(READY):
                    return int(json.loads(line[len(READY):])["port"])
        elif proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise ProvisionError(f"{label}: the worker did not start within {timeout:.0f} s; its log says:\n{tail}")
