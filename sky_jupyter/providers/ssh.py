"""``sky.SSH(hosts=[...])``: machines you already have, reached over SSH.

Hosts are ``"addr"``, ``"user@addr"``, ``"user@addr:port"`` or ``~/.ssh/config`` aliases (HostName, User, Port and
IdentityFile are honoured); rank follows list order. Each node is bootstrapped once per image (env file, apt, uv,
venv, pip, plugin phases; :mod:`sky_jupyter.bootstrap`), gets the client's own sky_jupyter package (unpacked once
per content), and runs its workers (one, a given number, or one per GPU), each started detached so that it
outlives the SSH connection that started it, and reached through a ``direct-tcpip`` channel to its localhost port.
The AWS provider reuses all of this for its instances.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import platform
import re
import shlex
import tarfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import cloudpickle
import paramiko

from .. import protocol as P
from ..bootstrap import (
    NEED,
    NODE_ENV_FILE,
    NODE_HOME,
    NODE_PYTHON,
    BootstrapPlan,
    env_file,
    follow,
    forget_secrets,
    hub_token_path,
    remote_plan,
    restore_hub_token,
)
from ..errors import ConfigError, ProvisionError
from ..image import Image
from ..redaction import redact
from ..state import private_dir
from ..transport import (
    DEFAULT_POLICY,
    HOST_KEY_POLICIES,
    KEEPALIVE_S,
    Connection,
    KnownHosts,
    RemoteProcess,
    SSHConnectError,
    Target,
    load_key,
    note,
    remote_path,
)
from ..worker import watchdog
from .base import Host, NodeStart, PoolSpec, Progress, Provider, WorkerHandle, check_workers, in_parallel

_HOST = re.compile(r"^(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
                   r"(?P<addr>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*)"
                   r"(?::(?P<port>[0-9]{1,5}))?$")
_DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
T = TypeVar("T")


def parse_host(text: object) -> tuple[str | None, str, int | None]:
    """``user@addr:port`` -> (user, addr, port); raise ConfigError naming a malformed host string."""
    if not isinstance(text, str):
        raise ConfigError(f"SSH host {text!r} is a {type(text).__name__}, not a string like 'user@10.0.0.5:22'.")
    m = _HOST.match(text.strip())
    port = int(m["port"]) if m and m["port"] else None
    if m is None or (port is not None and not 0 < port < 65536):
        raise ConfigError(f"SSH host {text!r} is not 'addr', 'user@addr', 'user@addr:port' or an ~/.ssh/config "
                          f"alias.")
    return m["user"], m["addr"].strip("[]"), port


# -- the client's package, shipped to nodes --------------------------------------------------------------------
_package_cache: dict[str, Any] = {}
_package_lock = threading.Lock()


def _package_files() -> tuple[Path, list[Path], tuple[Any, ...]]:
    root = Path(__file__).resolve().parents[1]
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo"))
    stamp = (str(root), tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    return root, files, stamp


def package_digest() -> str:
    """A hash of this client's sky_jupyter sources: names the package on nodes (re-checked on each call, so an
    edited package is shipped again)."""
    root, files, stamp = _package_files()
    with _package_lock:
        if _package_cache.get("stamp") != stamp:
            digest = hashlib.sha256()
            for path in files:
                digest.update(f"{root.name}/{path.relative_to(root).as_posix()}".encode() + b"\0")
                digest.update(path.read_bytes() + b"\0")
            _package_cache.clear()
            _package_cache.update(stamp=stamp, digest=digest.hexdigest()[:16])
        return _package_cache["digest"]


def package_archive() -> tuple[str, bytes]:
    """This client's sky_jupyter package as a gzipped tar (built once per content) and its digest.

    Modules come compiled for this Python too (unchecked-hash pycs in ``__pycache__``): nodes run the client's
    major.minor, so a worker's first start does not compile the package. Nodes unpack it with ``tar``.
    """
    import py_compile
    import sys
    import tempfile

    digest = package_digest()
    root, files, _ = _package_files()
    with _package_lock:
        if _package_cache.get("archive_digest") == digest:
            return digest, _package_cache["archive"]
        buf = io.BytesIO()
        tag = sys.implementation.cache_tag
        with (tempfile.TemporaryDirectory(prefix="sky-pkg-") as tmp,
              tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tar):
            for i, path in enumerate(files):
                rel = path.relative_to(root)
                name = f"{root.name}/{rel.as_posix()}"
                _tar_add(tar, name, path.read_bytes())
                if path.suffix == ".py" and tag:
                    pyc = Path(tmp) / f"{i}.pyc"
                    try:
                        py_compile.compile(str(path), cfile=str(pyc), dfile=name, doraise=True,
                                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
                    except py_compile.PyCompileError:
                        continue  # the node compiles it (and reports the error) itself
                    parent = f"{root.name}/{rel.parent.as_posix()}/" if rel.parent.parts else f"{root.name}/"
                    _tar_add(tar, f"{parent}__pycache__/{path.stem}.{tag}.pyc", pyc.read_bytes())
        _package_cache.update(archive_digest=digest, archive=buf.getvalue())
        return digest, _package_cache["archive"]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


_uv_lock = threading.Lock()


def _client_uv() -> str | None:
    """The uv binary of this client (the ``uv`` package), to upload to nodes of the same platform.

    One thread at a time: the nodes of a pool bootstrap in parallel, and uv's lookup reads ``sysconfig``, whose
    first use in a process is not thread-safe (a second thread can see its variables half-filled, and uv then
    fails on a missing ``EXE``)."""
    with _uv_lock:
        try:
            from uv import find_uv_bin
        except ImportError:
            import shutil

            return shutil.which("uv")
        try:
            return find_uv_bin()
        except FileNotFoundError:
            return None


def _compressed_uv(uv: str) -> str | None:
    """``uv`` compressed with zstd (about 37% of its size), made once per uv binary and kept under
    ``~/.sky_jupyter/cache``; None when this machine has no ``zstd`` command."""
    import shutil
    import subprocess

    zstd = shutil.which("zstd")
    if zstd is None:
        return None
    st = os.stat(uv)
    key = hashlib.sha256(f"{os.path.realpath(uv)}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = private_dir("cache") / f"uv-{key}.zst"
    if cached.exists():
        return str(cached)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}-{threading.get_ident()}")
    try:
        subprocess.run([zstd, "-q", "-9", "-T0", "-f", uv, "-o", str(tmp)], check=True, capture_output=True)
        os.replace(tmp, cached)
    except (OSError, subprocess.CalledProcessError):
        tmp.unlink(missing_ok=True)
        return None
    return str(cached)


_packages_seen: set[str] | None = None


def _has_package(host: Host, now: bool = False) -> bool:
    """Whether this client (or an earlier one: kept in ``~/.sky_jupyter/cache/package-on-nodes``) has seen
    ``host`` holding this package; ``now``: it does, from here on. Only an optimisation: a node that lost its
    copy asks for it again."""
    global _packages_seen
    key = f"{host.user or ''}@{host.addr}:{host.port} {package_digest()}"
    path = private_dir("cache") / "package-on-nodes"
    with _package_lock:
        if _packages_seen is None:
            try:
                _packages_seen = set(path.read_text().splitlines())
            except OSError:
                _packages_seen = set()
        if now and key not in _packages_seen:
            _packages_seen.add(key)
            with open(path, "a") as f:
                f.write(key + "\n")
        return key in _packages_seen


def _node_package_dir() -> str:
    """Where a node keeps this client's package (one folder per content), shell-quoted."""
    return remote_path(f"{NODE_HOME}/pkg/sky_jupyter-{package_digest()}")


def _run_dir(pool: str, rank: int) -> str:
    """Where a pool's worker on a node keeps its log (removed when the worker stops)."""
    return f"{NODE_HOME}/run/{pool}-{rank}"


def _cleanup(run_dir: str, env: dict[str, str]) -> list[str]:
    """What a worker removes when it shuts down, also when its client went silent (dead-man switch): its run
    folder, the node's env file, and the Hub's token file when the pool has an HF token."""
    paths = [run_dir, NODE_ENV_FILE]
    if env.get("HF_TOKEN"):
        paths.append(hub_token_path(env))
    return paths


def _detached(config: dict[str, Any], run_dir: str, env: dict[str, str]) -> dict[str, Any]:
    """A worker's config for a node: detached from the SSH session, logging in its run folder, on a free port; with
    a watchdog, where to leave the client's heartbeat for it (and, on spot nodes, where it leaves reclaim notices)."""
    extra: dict[str, Any] = {}
    if config.get("watchdog") is not None:
        extra["heartbeat"] = f"{run_dir}/{watchdog.HEARTBEAT}"
    if config.get("spot") is not None:
        extra["spot_notice"] = f"{run_dir}/{watchdog.NOTICE_FILE}"
    return {**config, "detach": True, "log": f"{run_dir}/worker.log", "port": 0, "cleanup": _cleanup(run_dir, env),
            "share_dir": f"{run_dir}/share", **extra}


def _watchdog_start(config: dict[str, Any] | None, run_dir: str, env: dict[str, str], pkg_dir: str) -> str:
    """The shell line that starts the node's watchdog for this pool (:mod:`sky_jupyter.worker.watchdog`) in the
    background, detached, when the config asks for one (``watchdog``: the dead-man switch that powers the node off;
    ``spot``: reclaim notices from the instance metadata); else nothing. Its config is on its command line: paths,
    the grace, the poweroff command and the metadata endpoint, no secrets. A watchdog already watching the run
    folder (a worker restarted) keeps it; the new one exits."""
    if config is None or (config.get("watchdog") is None and config.get("spot") is None):
        return ""
    dog = config.get("watchdog")
    spec: dict[str, Any] = {"run_dir": run_dir, "cleanup": _cleanup(run_dir, env), "spot": config.get("spot")}
    if dog is not None:
        spec["grace"] = float(dog.get("grace") or config.get("grace", 600.0))
        spec["command"] = dog.get("command") or watchdog.POWEROFF
    run = remote_path(run_dir)
    return (f"(umask 077; PYTHONPATH={pkg_dir}${{PYTHONPATH:+:$PYTHONPATH}} {remote_path(NODE_PYTHON)} "
            f"-m sky_jupyter.worker.watchdog {shlex.quote(json.dumps(spec))} "
            f"< /dev/null >> {run}/{watchdog.LOG_FILE} 2>&1 &)")


#: The line a node's bring-up prints before starting its workers: how many, and how many GPUs it found.
WORKERS = "::sky-workers"


def _await_ready(lines: Iterator[str], conn: Connection, host: Host, label: str, run_dir: str,
                 count: int = 1) -> NodeStart:
    """The node's started workers, once each one's READY line has come (within 60 s; a ``::sky-workers N GPUS``
    line first says how many to wait for); else what the node printed, in a ProvisionError."""
    seen: list[str] = []
    ready: dict[int, SSHWorker] = {}
    gpus = 0
    deadline = time.monotonic() + 60
    try:
        for line in lines:
            if line.startswith(P.READY):
                said = json.loads(line[len(P.READY):])
                local = int(said.get("local_rank", 0))
                ready[local] = SSHWorker(conn, int(said["port"]), int(said["pid"]), host.display, run_dir, local)
                if len(ready) >= count:
                    return NodeStart([ready[i] for i in sorted(ready)], gpus)
            elif line.startswith(WORKERS):
                count, gpus = (int(word) for word in line.split()[1:3])
            else:
                seen.append(line)
            if time.monotonic() > deadline:
                break
    except TimeoutError:
        pass
    for worker in ready.values():  # a node whose workers did not all start: stop the ones that did
        try:
            worker.stop(1.0)
        except Exception:  # noqa: BLE001 - what the node printed is what to report
            pass
    tail = redact("".join(seen[-20:]).strip()) or "(no output)"
    started = f" ({len(ready)} of {count} workers started)" if count > 1 else ""
    raise ProvisionError(f"{label}: the worker did not start{started}; it printed:\n{tail}\n"
                         f"Its log is {run_dir}/worker.log on the node.")


def _worker_running(pid: int) -> str:
    """Shell test: is ``pid`` still our worker (not a reused pid)?"""
    return f"kill -0 {pid} 2>/dev/null && grep -qa sky_jupyter.worker /proc/{pid}/cmdline 2>/dev/null"


# The node's side of a bring-up (the command line: paths only, no secrets). stdin brings: the env file and the
# bootstrap script, each as a length line and its bytes, then the worker's config as one JSON line (held in a
# shell variable: its secret never touches the disk or a command line). The node asks for what it lacks with a
# ``::sky-need ITEM`` line and reads the answer (a length line, 0 for none, and the bytes): this client's package
# before the script, its uv from within the script's uv phase (fd 3) when the node could not download one. Then
# the script runs (it exits at once when its marker exists), the Hub's token file is written again from the env file
# when the pool has an HF token (the marker skips the login that first wrote it), and, when asked, the worker starts
# with its config: one worker, a given number, or one per GPU the node lists (``nvidia-smi -L``, else its
# /dev/nvidiaN devices), all from the same config line, each told its local rank. ~/.sky_jupyter and its folders are
# 0700.
_BRING_UP = """umask 077; H={home}; mkdir -p "$H" && chmod 700 "$H" || exit 1
find "$H" -mindepth 1 -maxdepth 1 -type d ! -perm 700 -exec chmod 700 {{}} + 2>/dev/null
IFS= read -r n && head -c "$n" > "$H/env.sh.tmp" && chmod 600 "$H/env.sh.tmp" && mv -f "$H/env.sh.tmp" "$H/env.sh" \
  || exit 1
IFS= read -r n && head -c "$n" > {script} || exit 1
IFS= read -r config || exit 1
unpack() {{
  t={pkg}.$$; mkdir -p "$t" && head -c "$1" | tar -xzf - -C "$t" && {{ mv -T "$t" {pkg} 2>/dev/null || [ -d {pkg} ]; }}
  r=$?; rm -rf "$t"; [ $r -eq 0 ] || {{ echo "unpacking the sky_jupyter package failed"; exit 1; }}
}}
IFS= read -r n || exit 1
if [ "$n" -gt 0 ]; then if [ -d {pkg} ]; then head -c "$n" > /dev/null; else unpack "$n"; fi; fi
if [ ! -d {pkg} ]; then
  echo "{need} pkg"
  IFS=' ' read -r n how || exit 1
  unpack "$n"
fi
SKY_ASK_CLIENT=1 bash {script} 3<&0 < /dev/null || exit $?
{restore}
[ -n "{start}" ] || exit 0
mkdir -p {run} || exit 1
gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
elif ls -d /dev/nvidia[0-9]* >/dev/null 2>&1; then gpus=$(ls -d /dev/nvidia[0-9]* | wc -l); fi
n={workers}; if [ "$n" = gpus ]; then n=$gpus; fi; [ "$n" -ge 1 ] 2>/dev/null || n=1
echo "{announce} $n $gpus"
cd && export PYTHONPATH={pkg}${{PYTHONPATH:+:$PYTHONPATH}}
{watchdog}
i=1
while [ $i -lt $n ]; do printf '%s\\n' "$config" | {python} -m sky_jupyter.worker --local-rank $i & i=$((i+1)); done
printf '%s\\n' "$config" | exec {python} -m sky_jupyter.worker --local-rank 0
"""


class SSHWorker(WorkerHandle):
    """A worker started detached on a node: reached through the node's SSH connection, checked and stopped by
    pid over SSH (reconnecting first when the connection dropped)."""

    def __init__(self, conn: Connection, port: int, pid: int, label: str, run_dir: str, local_rank: int = 0) -> None:
        self.conn = conn
        self.port = port
        self.pid = pid
        self.label = label
        self.run_dir = run_dir
        self.local_rank = local_rank
        self._last_words = ""
        self._unreachable = ""

    def open(self) -> P.FrameIO:
        return self.conn.open_tcp(self.port)

    def alive(self) -> bool:
        try:
            code, _, _ = self.conn.run(_worker_running(self.pid), timeout=15)
        except Exception as exc:
            self._unreachable = str(exc)
            raise
        self._unreachable = ""
        return code == 0

    def stop(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` for the worker to exit (it was asked to), then kill it; remove its log, and the
        node's run folder with the last one."""
        steps = max(1, int(timeout / 0.05))
        run = remote_path(self.run_dir)
        log = f"{run}/worker-{self.local_rank}.log" if self.local_rank else f"{run}/worker.log"
        script = f"""
running() {{ {_worker_running(self.pid)}; }}
if ! running; then echo gone; tail -n 5 {log} 2>/dev/null; fi
i=0; while running && [ $i -lt {steps} ]; do sleep 0.05; i=$((i+1)); done
if running; then kill -TERM {self.pid}; sleep 0.5; running && kill -KILL {self.pid}; fi
rm -f {log}; ls {run}/worker*.log >/dev/null 2>&1 || rm -rf {run}
"""
        _, out, _ = self.conn.run(script, timeout=timeout + 15, patience=5.0)
        if out.startswith("gone"):
            self._last_words = redact(out[4:].strip())

    def describe_exit(self) -> str:
        where = f"(pid {self.pid} on {self.label})"
        if self._unreachable:
            return f"{where} cannot be reached: {self._unreachable}"
        if self._last_words:
            return f"{where} is gone; the end of its log:\n{self._last_words}"
        return f"{where} is gone"


class SSH(Provider):
    """Machines you already have: ``sky.ComputePool(provider=sky.SSH(hosts=["gpu1", "bob@10.0.0.7"]), nodes=2)``.

    ``user``, ``key_file`` and ``port`` apply to hosts whose string does not say (``user`` and ``key_file`` win
    over ``~/.ssh/config``; ``port`` only where the config names none). ``python`` is the interpreter the node's
    venv is built from (a version like "3.11" or a path), by default the client's major.minor; ``Image(python=...)``
    wins over it. ``ssh_config`` names a config file other than ``~/.ssh/config``; ``keepalive`` is the seconds
    between probes of each connection (one unanswered for three intervals is rebuilt).
    """

    name = "ssh"

    def __init__(self, hosts: Sequence[str], user: str | None = None, key_file: str | os.PathLike[str] | None = None,
                 port: int = 22, python: str | None = None, *, ssh_config: str | os.PathLike[str] | None = None,
                 connect_timeout: float = 10.0, keepalive: float = KEEPALIVE_S) -> None:
        if isinstance(hosts, str) or not isinstance(hosts, Sequence) or not hosts:
            raise ConfigError(f"SSH(hosts=...) takes a non-empty list of hosts, e.g. hosts=['gpu1', "
                              f"'ubuntu@10.0.0.5'], not {hosts!r}.")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ConfigError(f"SSH(port=...) must be a TCP port number, not {port!r}.")
        if python is not None and (not isinstance(python, str) or not python.strip() or python.lstrip()[0] == "-"):
            raise ConfigError(f"SSH(python=...) must be a version like '3.11' or an interpreter path, not {python!r}.")
        self.hosts = list(hosts)
        self.user = user
        self.key_file = str(Path(key_file).expanduser()) if key_file is not None else None
        self.port = port
        self.python = python
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self.ssh_config_path = Path(ssh_config).expanduser() if ssh_config else Path("~/.ssh/config").expanduser()
        self._config = self._load_config(self.ssh_config_path, explicit=ssh_config is not None)
        self.targets = [self._resolve(h) for h in self.hosts]
        self._conns: dict[tuple[str, int], Connection] = {}
        self._conns_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SSH(hosts={self.hosts!r})"

    # -- configuration ---------------------------------------------------------------------------------------
    @staticmethod
    def _load_config(path: Path, explicit: bool) -> paramiko.SSHConfig | None:
        if not path.is_file():
            if explicit:
                raise ConfigError(f"SSH config file {path} does not exist.")
            return None
        try:
            return paramiko.SSHConfig.from_path(str(path))
        except (OSError, ValueError, paramiko.SSHException) as exc:
            raise ConfigError(f"SSH config file {path} cannot be read: {exc}") from None

    def _lookup(self, alias: str) -> dict[str, Any]:
        return dict(self._config.lookup(alias)) if self._config is not None else {}

    def _resolve(self, text: str) -> Target:
        user, alias, port = parse_host(text)
        cfg = self._lookup(alias)
        addr = cfg.get("hostname", alias)
        user = user or self.user or cfg.get("user")
        if port is None:
            port = self.port if self.port != 22 or "port" not in cfg else self._config_port(cfg, alias)
        if self.key_file:
            keys: tuple[str, ...] = (self.key_file,)
        elif cfg.get("identityfile"):
            keys = tuple(str(Path(k).expanduser()) for k in cfg["identityfile"] if Path(k).expanduser().is_file())
        else:
            keys = tuple(str(Path(k).expanduser()) for k in _DEFAULT_KEYS if Path(k).expanduser().is_file())
        jump = self._jump_hosts(cfg.get("proxyjump"), alias)
        if cfg.get("proxycommand") and not jump:
            note(f"{self.ssh_config_path}: ProxyCommand for host {alias!r} is not supported; connecting to "
                 f"{addr}:{port} directly (ProxyJump names bastions)", once=f"proxycommand {alias}")
        return Target(addr=addr, port=port, user=user, key_files=keys, label=text, jump=jump,
                      **self._host_key_options(cfg, alias))

    def _config_port(self, cfg: dict[str, Any], alias: str) -> int:
        try:
            return int(cfg.get("port", 22))
        except ValueError:
            raise ConfigError(f"{self.ssh_config_path}: Port {cfg['port']!r} for host {alias!r} is not a "
                              f"number.") from None

    def _host_key_options(self, cfg: dict[str, Any], alias: str) -> dict[str, Any]:
        """``StrictHostKeyChecking`` and ``UserKnownHostsFile`` of a config entry, as Target fields."""
        value = cfg.get("stricthostkeychecking")
        strict = DEFAULT_POLICY if value is None else HOST_KEY_POLICIES.get(value.lower())
        if strict is None:
            raise ConfigError(f"{self.ssh_config_path}: StrictHostKeyChecking {value!r} for host {alias!r} is not "
                              f"yes, accept-new or no.")
        files = str(cfg.get("userknownhostsfile", "")).split()
        if [f.lower() for f in files] == ["none"]:
            files = [os.devnull]
        return {"strict": strict, "known_hosts": tuple(str(Path(f).expanduser()) for f in files)}

    def _jump_hosts(self, value: str | None, alias: str) -> tuple[Target, ...]:
        """``ProxyJump``: the hosts to pass through, in order. Each is looked up in the config (HostName, User,
        Port, IdentityFile, StrictHostKeyChecking, UserKnownHostsFile; its own ProxyJump is not followed); without
        an IdentityFile of its own it logs in with ``key_file=`` or the default keys."""
        if not value or value.strip().lower() == "none":
            return ()
        hops = []
        for part in value.split(","):
            text = part.strip().removeprefix("ssh://")
            try:
                user, hop, port = parse_host(text)
            except ConfigError:
                raise ConfigError(f"{self.ssh_config_path}: ProxyJump {value!r} for host {alias!r}: {text!r} is not "
                                  f"'host', 'user@host' or 'user@host:port'.") from None
            cfg = self._lookup(hop)
            if cfg.get("identityfile"):
                keys = tuple(str(Path(k).expanduser()) for k in cfg["identityfile"] if Path(k).expanduser().is_file())
            elif self.key_file:
                keys = (self.key_file,)
            else:
                keys = tuple(str(Path(k).expanduser()) for k in _DEFAULT_KEYS if Path(k).expanduser().is_file())
            hops.append(Target(addr=cfg.get("hostname", hop), port=port or self._config_port(cfg, hop),
                               user=user or cfg.get("user"), key_files=keys, label=text,
                               **self._host_key_options(cfg, hop)))
        return tuple(hops)

    def check(self, spec: PoolSpec) -> None:
        if spec.nodes > len(self.targets):
            raise ConfigError(f"the pool asks for {spec.nodes} nodes but SSH(hosts=...) lists {len(self.targets)}; "
                              f"add hosts or ask for fewer nodes.")
        agent = bool(os.environ.get("SSH_AUTH_SOCK"))
        for target in self.targets[: spec.nodes]:
            usable = [load_key(path) for path in target.key_files]  # raises ConfigError naming a bad file
            if not any(usable) and not agent:
                raise ConfigError(
                    f"SSH host {target.label!r}: no private key to log in with"
                    + (f" ({', '.join(target.key_files)} need a passphrase)" if target.key_files else "")
                    + "; pass key_file=..., add an IdentityFile to ~/.ssh/config, or load the key into ssh-agent."
                )

    def known_hosts(self, pool: str) -> KnownHosts:
        """Where this pool pins its nodes' host keys (beside its state file; kept after the pool closes)."""
        return KnownHosts(private_dir("pools") / f"{pool}.known_hosts")

    # -- connections -----------------------------------------------------------------------------------------
    def connection(self, host: Host) -> Connection:
        """The pool's live connection to ``host`` (one per node, rebuilt after drops)."""
        pool = str(host.extra.get("pool", ""))
        with self._conns_lock:
            conn = self._conns.get((pool, host.rank))
            if conn is None:
                target = Target(addr=host.addr, port=host.port, user=host.user,
                                key_files=tuple(host.extra.get("key_files", ())),
                                label=str(host.extra.get("label", host.display)),
                                strict=str(host.extra.get("strict", DEFAULT_POLICY)),
                                known_hosts=tuple(host.extra.get("known_hosts", ())),
                                jump=tuple(Target.from_json(hop) for hop in host.extra.get("jump", ())))
                conn = Connection(target, self.known_hosts(pool), connect_timeout=self.connect_timeout,
                                  keepalive=self.keepalive)
                self._conns[(pool, host.rank)] = conn
        return conn

    def provision(self, spec: PoolSpec) -> list[Host]:
        """Connect to the first ``spec.nodes`` hosts at once (pinning their host keys).

        Connections this pool already has (a pool that grows) are kept.
        """
        known = self.known_hosts(spec.name)
        with self._conns_lock:
            conns = [self._conns.get((spec.name, rank))
                     or Connection(t, known, connect_timeout=self.connect_timeout, keepalive=self.keepalive)
                     for rank, t in enumerate(self.targets[: spec.nodes])]
        # Connecting is all: the hostname comes with the worker's setup (two round trips fewer on a slow link).
        names = in_parallel([c.connect for c in conns])
        failed = [(c, r) for c, r in zip(conns, names) if isinstance(r, BaseException)]
        if failed:
            with self._conns_lock:
                kept = set(map(id, self._conns.values()))
            for conn in conns:
                if id(conn) not in kept:
                    conn.close()
            first = failed[0][1]
            assert isinstance(first, BaseException)
            if len(failed) == 1:
                raise first
            listing = "\n".join(f"  {c.label}: {r}" for c, r in failed)
            raise ProvisionError(f"{len(failed)} of {len(conns)} SSH hosts could not be reached:\n{listing}")
        hosts = []
        for rank, conn in enumerate(conns):
            target = conn.target
            extra = {"pool": spec.name, "label": target.display, "host_key": conn.server_key(),
                     "key_files": list(target.key_files), "strict": target.strict,
                     "known_hosts": list(target.known_hosts), "jump": [hop.to_json() for hop in target.jump]}
            hosts.append(Host(rank=rank, addr=target.addr, private_addr=target.addr, port=target.port,
                              user=target.login, extra=extra))
            with self._conns_lock:
                self._conns[(spec.name, rank)] = conn
        return hosts

    def reattach(self, pool: str, hosts: list[Host], cloud: dict[str, Any]) -> list[Host]:
        """Connect again to a pool's recorded hosts, each still held to the host key it was pinned to."""
        hosts = [replace(h, extra={**h.extra, "pool": pool}) for h in hosts]
        conns = [self.connection(h) for h in hosts]
        results = in_parallel([conn.connect for conn in conns])
        failed = [(h, r) for h, r in zip(hosts, results) if isinstance(r, BaseException)]
        if failed:
            self.release(hosts)
            listing = "; ".join(f"node {h.rank} ({h.display}): {r}" for h, r in failed)
            raise ProvisionError(f"pool {pool!r}: {len(failed)} of {len(hosts)} nodes cannot be reached ({listing}).")
        return hosts

    def worker(self, host: Host, port: int, pid: int, local_rank: int = 0) -> WorkerHandle:
        return SSHWorker(self.connection(host), port, pid, host.display,
                         _run_dir(str(host.extra.get("pool", "")), host.rank), local_rank)

    def release(self, hosts: list[Host]) -> None:
        """Remove the pool's secrets from its nodes (the env file, the Hub's token file), then close the
        connections."""
        try:
            self._forget_secrets(hosts)
        finally:
            self._close_connections(hosts)

    def _forget_secrets(self, hosts: list[Host]) -> None:
        """The env file and the Hub's token file leave every node this pool is connected to (its workers removed
        them already when they stopped; this also covers a bring-up that failed before a worker started). A node
        that cannot be reached within a few seconds is named in a warning."""
        with self._conns_lock:
            found = [(h, self._conns.get((str(h.extra.get("pool", "")), h.rank))) for h in hosts]
        reachable = [(h, c) for h, c in found if c is not None]
        command = f"bash -c {shlex.quote(forget_secrets())}"
        results = in_parallel([functools.partial(c.run, command, timeout=15, check=True, patience=2.0)
                               for _, c in reachable])
        for (host, _), result in zip(reachable, results):
            if isinstance(result, Exception):
                note(f"warning: could not remove {NODE_ENV_FILE} (and the Hub token file) from {host.display}: "
                     f"{result}; they hold secrets, delete them there by hand.")

    def disconnect(self, hosts: list[Host]) -> None:
        self._close_connections(hosts)

    def _close_connections(self, hosts: list[Host]) -> None:
        for host in hosts:
            with self._conns_lock:
                conn = self._conns.pop((str(host.extra.get("pool", "")), host.rank), None)
            if conn is not None:
                conn.close()

    def read_log(self, host: Host) -> str:
        """The end of the node's bootstrap log and of this pool's worker log there, for ``%sky logs``."""
        pool = str(host.extra.get("pool", ""))
        run = remote_path(_run_dir(pool, host.rank))
        script = (f"for p in {remote_path(NODE_HOME + '/bootstrap.log')} {run}/worker.log {run}/worker-*.log "
                  f"{run}/{watchdog.LOG_FILE}; do\n"
                  f"  if [ -f \"$p\" ]; then echo \"==> $p <==\"; tail -n 200 \"$p\"; fi\ndone\n")
        _, out, _ = self.connection(host).run(script, timeout=30)
        return redact(out) or f"no logs yet on {host.display} (under {NODE_HOME})"

    # -- bootstrap -------------------------------------------------------------------------------------------
    def plan(self, image: Image, plugin_phases: list[tuple[str, str]]) -> BootstrapPlan:
        client = ".".join(platform.python_version_tuple()[:2])
        python = image.python or self.python or client
        return remote_plan(image, plugin_phases, python, {"cloudpickle": cloudpickle.__version__})

    def bootstrap(self, host: Host, plan: BootstrapPlan, progress: Progress) -> None:
        """Make the node match ``plan`` (one SSH command; see :meth:`bring_up`), without starting a worker."""
        self._drive(host, plan, None, progress)

    def bring_up(self, host: Host, plan: BootstrapPlan, config: dict[str, Any], progress: Progress) -> NodeStart:
        """Bootstrap the node and start its worker in one SSH command, so that a link's latency is paid a few
        times per node, not once per step: what every node needs (env file, script, worker config) goes out with
        the command; the node asks for what it lacks (this client's package, its uv) in one more exchange."""
        started = self._drive(host, plan, config, progress)
        assert started is not None
        return started

    def _drive(self, host: Host, plan: BootstrapPlan, config: dict[str, Any] | None,
               progress: Progress) -> NodeStart | None:
        conn = self.connection(host)
        label = f"node {host.rank} ({host.display})"
        pool = str((config or {}).get("pool") or host.extra.get("pool") or "pool")
        run_dir = _run_dir(pool, host.rank)
        pkg_dir = _node_package_dir()
        script = plan.script().encode()
        env = env_file(plan.environ).encode()
        command = _BRING_UP.format(
            home=remote_path(NODE_HOME), script=remote_path(f"{NODE_HOME}/bootstrap-{plan.key}.sh"), pkg=pkg_dir,
            run=remote_path(run_dir), python=remote_path(NODE_PYTHON), start="1" if config is not None else "",
            need=NEED, restore=self._restore(plan), announce=WORKERS,
            workers=check_workers((config or {}).get("workers_per_node", 1)),
            watchdog=_watchdog_start(config, run_dir, {**plan.environ, **(config or {}).get("env", {})}, pkg_dir))
        if config is not None:
            config = _detached(config, run_dir, {**plan.environ, **config.get("env", {})})
        # The package goes out unasked unless this client has seen the node holding it: on a slow link, sending
        # half a megabyte costs less than the round trip of being asked for it.
        package = b"" if _has_package(host) else package_archive()[1]
        payload = (b"%d\n" % len(env) + env + b"%d\n" % len(script) + script
                   + json.dumps(config or {}).encode() + b"\n" + b"%d\n" % len(package) + package)
        with conn.start(command, timeout=None) as proc:
            proc.write(payload)  # OpenSSH opens a session's window only when its command starts: no sooner

            def answered() -> Iterator[str]:
                for line in proc:
                    if line.startswith(NEED):
                        self._send_needs(proc, line[len(NEED):].split(), label)
                    else:
                        yield line

            output = answered()
            follow(output, label, lambda phase, line: progress(host.rank, phase, line))
            _has_package(host, True)
            if config is None:
                code = proc.wait(60)
                if code != 0:
                    raise ProvisionError(f"{label}: the bootstrap ended with exit code {code} after finishing")
                return None
            proc.channel.settimeout(60)
            return _await_ready(output, conn, host, label, run_dir)

    @staticmethod
    def _restore(plan: BootstrapPlan) -> str:
        """The bring-up's step after the script: the Hub's token file again, when a plugin's secret is HF_TOKEN."""
        if "HF_TOKEN" not in plan.secrets:
            return ""
        return (f"bash -c {shlex.quote(restore_hub_token())} "
                f"|| {{ echo 'could not write the Hub token file from the env file'; exit 1; }}")

    def _send_needs(self, proc: RemoteProcess, words: list[str], label: str) -> None:
        """Answer the node's ``::sky-need`` line: ``pkg``, or ``uv SYSTEM MACHINE zstd|-`` (its ``uname -s -m`` and
        whether it has zstd). The answer is a length line (0: nothing to send) and the bytes."""
        match words:
            case ["pkg"]:
                data = package_archive()[1]
                proc.write(b"%d\n" % len(data) + data)
            case ["uv", system, machine, zstd]:
                path, packed = self._uv_for(system, machine, zstd == "zstd")
                if path is None:
                    proc.write(b"0 -\n")  # nothing for that platform: the node says what to do
                    return
                proc.write(f"{os.path.getsize(path)} {'zstd' if packed else 'raw'}\n".encode())
                with open(path, "rb") as f:
                    while chunk := f.read(4 << 20):
                        proc.write(chunk)
            case _:
                raise ProvisionError(f"{label}: the node asked for {' '.join(words)!r}, which this client does not "
                                     f"know; is the node running another sky_jupyter version's bootstrap?")

    @staticmethod
    def _uv_for(system: str, machine: str, node_has_zstd: bool) -> tuple[str | None, bool]:
        """This client's uv for a node of that platform (compressed when both ends have zstd: 14 MB instead of
        38 MB over the client's uplink), or None when the platforms differ or this client has no uv."""
        uv = _client_uv()
        if uv is None or (system, machine) != (platform.system(), platform.machine()):
            return None, False
        packed = _compressed_uv(uv) if node_has_zstd else None
        return (packed, True) if packed is not None else (uv, False)

    # -- workers ---------------------------------------------------------------------------------------------
    def start_worker(self, host: Host, config: dict[str, Any]) -> WorkerHandle:
        """Start the node's worker, its config (and secret) on stdin; it moves to a session of its own itself."""
        conn = self.connection(host)
        local_rank = int(config.get("local_rank", 0))
        label = f"node {host.rank} worker {local_rank} ({host.display})"
        pool = str(config.get("pool") or host.extra.get("pool") or "pool")
        run_dir = _run_dir(pool, host.rank)
        pkg_dir = _node_package_dir()
        python = remote_path(NODE_PYTHON)
        watch = _watchdog_start(config, run_dir, config.get("env", {}), pkg_dir)
        config = _detached(config, run_dir, config.get("env", {}))
        # The worker keeps the user's umask and starts in $HOME. The pool's watchdog, when it has one, is started
        # again too: a worker that died and was stopped took the run folder, and so the watchdog, with it (one that
        # still runs keeps watching and the new one leaves).
        command = f"""(umask 077; mkdir -p {remote_path(run_dir)}) || exit 1
cd || exit 1
{watch}
PYTHONPATH={pkg_dir}${{PYTHONPATH:+:$PYTHONPATH}} exec {python} -m sky_jupyter.worker --local-rank {local_rank}"""
        with conn.start(command, timeout=60) as proc:
            proc.write(json.dumps(config) + "\n")
            proc.close_stdin()
            return _await_ready(iter(proc), conn, host, label, run_dir).workers[0]


__all__ = ["SSH", "SSHConnectError", "SSHWorker", "package_archive", "package_digest", "parse_host"]
