"""The SSH transport: one :class:`Connection` per node, hiding paramiko from the rest of the code.

Like Fabric's ``Connection``: ``run`` a command, ``start`` one and read its output as it comes, ``put`` bytes or a
file, and ``open_tcp`` a ``direct-tcpip`` channel to a port on the node's loopback (how the client reaches its
worker). Tuned for bulk data as docs/notes.md records: a TCP_NODELAY socket, AES-GCM first, a large window and packet
size, large reads served from a buffer (paramiko's own small reads copy its whole buffer each time), and client
rekeying left to the server (paramiko issue 822). A dropped connection is rebuilt with backoff on the next use.

Host keys are pinned per pool in a known_hosts file of its own: the first connection records the key, every later
one must present the same key, and a changed key is refused with an error naming the host and both fingerprints.
A key the user's ``~/.ssh/known_hosts`` already holds for the host must match too, and one it marks ``@revoked`` is
always refused. ``StrictHostKeyChecking`` (per host, from ~/.ssh/config) decides what happens to a host nobody knows
yet (:data:`HOST_KEY_POLICIES`). A node behind bastions (``ProxyJump``) is reached through a ``direct-tcpip``
channel of each jump host in turn, every jump host's key checked the same way.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import hmac
import itertools
import json
import os
import re
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import paramiko

from . import protocol as P
from .errors import AuthenticationError, ConfigError, ProvisionError
from .redaction import redact

#: Channel window and packet size we advertise: bulk data from the node never waits for window adjustments.
WINDOW = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
#: How much one read takes from paramiko's buffer (one copy of everything buffered, not one per frame part).
READ_CHUNK = 8 * 1024 * 1024
#: AES-GCM first: paramiko encrypts it fastest (no separate MAC pass). paramiko has no chacha20.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-ctr")
#: Seconds between keepalive probes; a connection whose probe goes unanswered for 3 intervals is closed (like
#: OpenSSH's ServerAliveInterval/ServerAliveCountMax), so a silently dead link is noticed and rebuilt.
KEEPALIVE_S = 15.0
#: paramiko would start a rekey after 512 MiB, and a channel opened or closed during it hangs the connection
#: (paramiko issue 822); the server rekeys by its own limits instead.
NO_CLIENT_REKEY = 1 << 62


class HostKeyError(ProvisionError, AuthenticationError):
    """A node presented a host key other than the one pinned for it: the connection is refused."""


class SSHConnectError(ProvisionError):
    """A node could not be reached or would not let us log in."""


class SSHAuthError(SSHConnectError, AuthenticationError):
    """The node refused every key we offered (retrying would not help)."""


class RemoteCommandError(ProvisionError):
    """A command the client ran on a node failed."""


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's ``SHA256:...`` form, as ``ssh-keygen -lf`` prints it."""
    return f"{key.get_name()} {key.fingerprint}"


def host_id(addr: str, port: int) -> str:
    """How known_hosts names a host: ``addr``, or ``[addr]:port`` off port 22."""
    return addr if port == 22 else f"[{addr}]:{port}"


#: ``StrictHostKeyChecking`` as this client applies it: ``yes`` refuses a host whose key neither the pool nor your
#: known_hosts holds; ``accept-new`` pins it on first use (the default, also when ~/.ssh/config says nothing);
#: ``no`` accepts any key with a warning and pins nothing. A changed key is refused except under ``no``; a revoked
#: key always. There is no terminal to ask on, so ``ask`` (OpenSSH's default when set explicitly) acts as ``yes``.
HOST_KEY_POLICIES = {"yes": "yes", "ask": "yes", "accept-new": "accept-new", "no": "no", "off": "no"}
DEFAULT_POLICY = "accept-new"

_noted: set[str] = set()
_noted_lock = threading.Lock()


def note(text: str, once: str | None = None) -> None:
    """One line on stderr for the user (where a notebook shows it); with ``once``, only the first time per key."""
    if once is not None:
        with _noted_lock:
            if once in _noted:
                return
            _noted.add(once)
    print(f"sky: {text}", file=sys.stderr)


def _key_fingerprint(keytype: str, blob: bytes) -> str:
    """``type SHA256:...`` of a public key blob, as :func:`fingerprint` prints a key."""
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"{keytype} SHA256:{digest}"


def _pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("|1|"):  # hashed (HashKnownHosts): |1|base64(salt)|base64(HMAC-SHA1(salt, name))
        try:
            salt, digest = (base64.b64decode(part) for part in pattern[3:].split("|", 1))
        except (ValueError, binascii.Error):
            return False
        return hmac.compare_digest(hmac.new(salt, name.encode(), hashlib.sha1).digest(), digest)
    # OpenSSH patterns know only * and ?; "[addr]:port" is literal, not a character class.
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(regex, name.lower()) is not None


@dataclass(frozen=True, slots=True)
class KnownHostLine:
    """One key line of a known_hosts file: its marker (``""``, ``@revoked``), host patterns and key."""

    marker: str
    patterns: tuple[str, ...]
    keytype: str
    blob: bytes
    where: str

    def matches(self, hid: str) -> bool:
        """Does this line name ``hid``? A matching ``!pattern`` excludes it."""
        hit = False
        for pattern in self.patterns:
            if pattern.startswith("!"):
                if _pattern_matches(pattern[1:], hid):
                    return False
            elif _pattern_matches(pattern, hid):
                hit = True
        return hit

    @property
    def fingerprint(self) -> str:
        return _key_fingerprint(self.keytype, self.blob)


def read_known_hosts(path: Path) -> list[KnownHostLine]:
    """The key lines of an OpenSSH known_hosts file (none when it is missing or unreadable).

    Parsed here rather than by paramiko, which reads a marker as a host name and so ignores ``@revoked`` lines.
    ``@cert-authority`` lines (host certificates, which this client does not check) are skipped with a one-line
    note; so are lines that are not ``[marker] patterns keytype base64``.
    """
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        marker = fields.pop(0) if fields[0].startswith("@") else ""
        where = f"{path}:{number}"
        if marker == "@cert-authority":
            note(f"{where}: skipping an @cert-authority line (host certificates are not checked here; the host's own "
                 f"key must be pinned or listed)", once=f"ca {where} {raw}")
            continue
        if marker not in ("", "@revoked") or len(fields) < 3:
            note(f"{where}: skipping a line that is not '[@revoked] hosts keytype key'", once=f"bad {where} {raw}")
            continue
        try:
            blob = base64.b64decode(fields[2], validate=True)
        except (ValueError, binascii.Error):
            note(f"{where}: skipping a line whose key is not base64", once=f"bad {where} {raw}")
            continue
        lines.append(KnownHostLine(marker, tuple(fields[0].split(",")), fields[1], blob, where))
    return lines


class KnownHosts:
    """Host keys pinned for one pool (a known_hosts file of its own), checked against the user's too."""

    def __init__(self, path: Path, user_file: Path | None = None) -> None:
        self.path = path
        self.user_file = user_file if user_file is not None else Path.home() / ".ssh" / "known_hosts"
        self._lock = threading.Lock()

    def pinned(self, addr: str, port: int) -> str | None:
        """The pinned key's known_hosts line body (``type base64``), if any."""
        hid = host_id(addr, port)
        for line in read_known_hosts(self.path):
            if not line.marker and line.matches(hid):
                return f"{line.keytype} {base64.b64encode(line.blob).decode()}"
        return None

    def check(self, addr: str, port: int, key: paramiko.PKey, label: str, policy: str = DEFAULT_POLICY,
              user_files: Sequence[Path] = ()) -> bool:
        """Accept ``key`` for the host under ``policy`` (see :data:`HOST_KEY_POLICIES`) or raise
        :class:`HostKeyError`; pin it when the host is new. ``user_files`` replace the user's known_hosts
        (``UserKnownHostsFile``).

        Returns True when the key was pinned just now.
        """
        hid = host_id(addr, port)
        blob = key.asbytes()
        sources = [(self.path, "this pool pinned"),
                   *((Path(f), "your known_hosts holds") for f in (user_files or (self.user_file,)))]
        with self._lock:
            known = False
            for path, whose in sources:
                lines = [line for line in read_known_hosts(path) if line.matches(hid)]
                revoked = [line for line in lines if line.marker == "@revoked" and line.blob == blob]
                if revoked:
                    raise HostKeyError(
                        f"{label}: {hid} presents the host key {fingerprint(key)}, which {revoked[0].where} marks "
                        f"@revoked: the connection is refused. Ask the machine's administrator for its current key.")
                listed = [line for line in lines if not line.marker]
                if not listed:
                    continue
                if any(line.blob == blob for line in listed):
                    known = True
                    continue
                old = next((line for line in listed if line.keytype == key.get_name()), listed[0])
                if policy == "no":
                    note(f"{label}: the host key of {hid} changed ({old.fingerprint} at {old.where}, now "
                         f"{fingerprint(key)}); accepted unchecked because ~/.ssh/config sets "
                         f"StrictHostKeyChecking no")
                    return False
                raise HostKeyError(
                    f"{label}: the host key of {hid} changed: it presents {fingerprint(key)}, but {whose} "
                    f"{old.fingerprint} ({old.where}). Someone may be intercepting the connection, or the machine "
                    f"was reinstalled; if you trust the new key, delete the line for {hid} from {path} and start "
                    f"the pool again."
                )
            if policy == "no":
                if not known:
                    note(f"{label}: accepted the host key of {hid} ({fingerprint(key)}) unchecked, because "
                         f"~/.ssh/config sets StrictHostKeyChecking no; it is not recorded anywhere")
                return False
            if not known and policy == "yes":
                raise HostKeyError(
                    f"{label}: {hid} presents the host key {fingerprint(key)}, which neither this pool nor your "
                    f"known_hosts ({', '.join(str(p) for p, _ in sources[1:])}) holds, and ~/.ssh/config sets "
                    f"StrictHostKeyChecking {policy}: the connection is refused. Check the key with the machine's "
                    f"administrator and add it to your known_hosts (`ssh {addr}` once, or ssh-keyscan), or set "
                    f"StrictHostKeyChecking accept-new for this host.")
            if any(not line.marker and line.matches(hid) for line in read_known_hosts(self.path)):
                return False
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as f:
                f.write(f"{hid} {key.get_name()} {key.get_base64()}\n")
            return True


@dataclass(frozen=True, slots=True)
class Target:
    """Where and as whom to log in: the resolved form of one host string.

    ``strict`` is the host-key policy (:data:`HOST_KEY_POLICIES`), ``known_hosts`` the user's known_hosts files for
    it (empty: ``~/.ssh/known_hosts``), ``jump`` the hosts to pass through in order (``ProxyJump``).
    """

    addr: str
    port: int = 22
    user: str | None = None
    key_files: tuple[str, ...] = ()
    label: str = ""
    strict: str = DEFAULT_POLICY
    known_hosts: tuple[str, ...] = ()
    jump: tuple[Target, ...] = ()

    @property
    def login(self) -> str:
        return self.user or _local_user()

    @property
    def display(self) -> str:
        return self.label or f"{self.login}@{self.addr}" + (f":{self.port}" if self.port != 22 else "")

    def to_json(self) -> str:
        """This target as one JSON string (how a host's jump hosts are kept in a pool's state file)."""
        return json.dumps({"addr": self.addr, "port": self.port, "user": self.user, "key_files": self.key_files,
                           "label": self.label, "strict": self.strict, "known_hosts": self.known_hosts,
                           "jump": [hop.to_json() for hop in self.jump]})

    @classmethod
    def from_json(cls, text: str) -> Target:
        d = json.loads(text)
        return cls(addr=d["addr"], port=int(d["port"]), user=d.get("user"), key_files=tuple(d.get("key_files", ())),
                   label=d.get("label", ""), strict=d.get("strict", DEFAULT_POLICY),
                   known_hosts=tuple(d.get("known_hosts", ())),
                   jump=tuple(cls.from_json(hop) for hop in d.get("jump", ())))


def _local_user() -> str:
    import getpass

    return getpass.getuser()


def load_key(path: str) -> paramiko.PKey | None:
    """The private key at ``path``; None when it is passphrase-protected (the agent may hold it).

    Raises ConfigError naming the file when it is missing, unreadable or not a key.
    """
    file = Path(path).expanduser()
    try:
        with open(file, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"SSH key file {file} cannot be read ({exc.strerror}); pass key_file= the path of "
                          f"your private key.") from None
    try:
        return paramiko.PKey.from_path(str(file))
    except paramiko.PasswordRequiredException:
        return None
    except (paramiko.SSHException, ValueError, OSError) as exc:
        raise ConfigError(f"SSH key file {file} is not a private key paramiko can read ({exc}).") from None


def _agent_keys() -> list[paramiko.PKey]:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        return list(paramiko.Agent().get_keys())
    except paramiko.SSHException:
        return []


class ChannelReader:
    """``readinto`` over a paramiko channel for :class:`~sky_jupyter.protocol.FrameIO`.

    paramiko's ``recv(n)`` copies the rest of its buffer on every call, so many small reads against a large window
    cost O(n) each. This takes everything buffered in one large ``recv`` and serves later reads from it.
    """

    def __init__(self, channel: paramiko.Channel, chunk: int = READ_CHUNK) -> None:
        self._channel = channel
        self._chunk = chunk
        self._view = memoryview(b"")
        self._pos = 0

    def readinto(self, buffer: bytearray | memoryview, /) -> int:
        want = len(buffer)
        if want == 0:
            return 0
        avail = len(self._view) - self._pos
        if avail == 0:
            data = self._channel.recv(max(want, self._chunk))
            if not data:
                return 0
            if len(data) <= want:  # straight into the caller's buffer: nothing to keep
                buffer[: len(data)] = data
                return len(data)
            self._view, self._pos, avail = memoryview(data), 0, len(data)
        n = min(want, avail)
        buffer[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        if self._pos == len(self._view):
            self._view, self._pos = memoryview(b""), 0
        return n


def send_view(channel: paramiko.Channel, data: bytes | bytearray | memoryview) -> None:
    """``channel.sendall(data)`` through a memoryview: paramiko slices what is left after each packet, which
    copies when it is bytes."""
    # types-paramiko says bytes or bytearray; sendall only slices and measures it, as a memoryview allows.
    channel.sendall(memoryview(data).cast("B"))  # type: ignore[arg-type]


def _sender(channel: paramiko.Channel) -> Any:
    def sendall(data: bytes | memoryview) -> None:
        try:
            send_view(channel, data)
        except (paramiko.SSHException, EOFError) as exc:  # FrameIO users expect OSError when the stream breaks
            raise ConnectionResetError(f"SSH connection lost: {exc or type(exc).__name__}") from None

    return sendall


class RemoteProcess:
    """A command started on a node: write to its stdin, iterate over its output lines, then ``wait()``.

    stderr is merged into stdout, so the lines come in the order the command wrote them.
    """

    def __init__(self, channel: paramiko.Channel, command: str, label: str) -> None:
        self.channel = channel
        self.command = command
        self.label = label
        self._file = channel.makefile("rb", 64 * 1024)

    def write(self, data: bytes | str) -> None:
        send_view(self.channel, data.encode() if isinstance(data, str) else data)

    def close_stdin(self) -> None:
        self.channel.shutdown_write()

    def __iter__(self) -> Iterator[str]:
        for raw in self._file:
            yield raw.decode(errors="replace")

    def readline(self) -> str:
        return self._file.readline().decode(errors="replace")

    def wait(self, timeout: float | None = None) -> int:
        if not self.channel.status_event.wait(timeout):
            raise TimeoutError(f"{self.label}: {self.command!r} did not finish within {timeout} s")
        return self.channel.recv_exit_status()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remote_path(path: str) -> str:
    """Shell-quote a node path, keeping a leading ``~/`` as the node user's home."""
    if path == "~":
        return '"$HOME"'
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


class Connection:
    """An SSH connection to one node, rebuilt on demand after it drops."""

    def __init__(self, target: Target, known_hosts: KnownHosts, *, connect_timeout: float = 10.0,
                 reconnect_for: float = 20.0, keepalive: float = KEEPALIVE_S) -> None:
        self.target = target
        self.known_hosts = known_hosts
        self.connect_timeout = connect_timeout
        self.reconnect_for = reconnect_for
        self.keepalive = keepalive
        self.connects = 0
        self._transport: paramiko.Transport | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._keys: dict[tuple[str, ...], list[paramiko.PKey]] = {}
        #: The jump hosts' transports under the current one (ProxyJump), closed with it.
        self._jumps: list[paramiko.Transport] = []

    def __repr__(self) -> str:
        return f"<Connection {self.target.display} {'up' if self.active else 'down'}>"

    @property
    def label(self) -> str:
        return self.target.display

    @property
    def active(self) -> bool:
        t = self._transport
        return t is not None and t.is_active()

    # -- connecting -----------------------------------------------------------------------------------------
    def transport(self, patience: float | None = None) -> paramiko.Transport:
        """The live transport, reconnecting with backoff when the last one dropped (for up to ``patience``
        seconds, by default ``reconnect_for``)."""
        t = self._transport
        if t is not None and t.is_active():
            return t
        with self._lock:
            if self._closed:
                raise SSHConnectError(f"{self.label}: the connection was closed")
            t = self._transport
            if t is not None and t.is_active():
                return t
            if t is not None:
                t.close()
                self._close_jumps()
            self._transport = self._connect_with_backoff(first=t is None, patience=patience)
            if self._watchdog is None and self.keepalive > 0:
                self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                                  name=f"sky-ssh-keepalive-{self.target.addr}")
                self._watchdog.start()
            return self._transport

    def connect(self) -> Connection:
        self.transport()
        return self

    def _connect_with_backoff(self, first: bool, patience: float | None) -> paramiko.Transport:
        if patience is None:
            patience = self.connect_timeout if first else self.reconnect_for
        deadline = time.monotonic() + patience
        delay = 0.05
        while True:
            try:
                return self._connect_once()
            except (HostKeyError, SSHAuthError, ConfigError):
                raise
            except (OSError, EOFError, paramiko.SSHException) as exc:
                last: BaseException = exc
            if time.monotonic() + delay > deadline:
                raise SSHConnectError(
                    f"{self.label}: cannot connect over SSH ({type(last).__name__}: {last}); check that the "
                    f"machine is up and that `ssh -p {self.target.port} {self.target.login}@{self.target.addr}` "
                    f"works."
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _auth_keys(self, target: Target) -> list[paramiko.PKey]:
        keys = self._keys.get(target.key_files)
        if keys is None:
            keys = [key for key in map(load_key, target.key_files) if key is not None]
            self._keys[target.key_files] = keys
        return [*keys, *_agent_keys()]

    def _connect_once(self) -> paramiko.Transport:
        """One connection: straight to the node, or through its jump hosts (``ProxyJump``), each hop a
        ``direct-tcpip`` channel of the one before, each host's key checked under its own policy."""
        hops = [*self.target.jump, self.target]
        sock: Any = socket.create_connection((hops[0].addr, hops[0].port), timeout=self.connect_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        jumps: list[paramiko.Transport] = []
        try:
            for hop, after in itertools.pairwise(hops):
                t = self._handshake(sock, hop, f"{self.label} (jump host {hop.display})")
                jumps.append(t)
                try:
                    sock = t.open_channel("direct-tcpip", (after.addr, after.port), ("127.0.0.1", 0),
                                          window_size=WINDOW, max_packet_size=MAX_PACKET,
                                          timeout=self.connect_timeout)
                except paramiko.ChannelException as exc:  # an OSError to the backoff: the node may be booting
                    raise ConnectionRefusedError(f"jump host {hop.display} could not connect to "
                                                 f"{host_id(after.addr, after.port)} ({exc.text})") from None
            t = self._handshake(sock, self.target, self.label)
        except BaseException:
            for jump in reversed(jumps):  # a failed handshake closed its own socket already
                jump.close()
            raise
        self._jumps = jumps
        self.connects += 1
        return t

    def _handshake(self, sock: Any, target: Target, label: str) -> paramiko.Transport:
        """Start SSH over ``sock``, check ``target``'s host key and log in."""
        t = paramiko.Transport(sock, default_window_size=WINDOW, default_max_packet_size=MAX_PACKET)
        try:
            options = t.get_security_options()
            supported = set(options.ciphers)
            options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in supported) + tuple(
                c for c in options.ciphers if c not in PREFERRED_CIPHERS)
            # Instance attributes shadow paramiko's class-wide limits for this connection only.
            t.packetizer.REKEY_BYTES = t.packetizer.REKEY_PACKETS = NO_CLIENT_REKEY
            t.start_client(timeout=self.connect_timeout)
            key = t.get_remote_server_key()
            self.known_hosts.check(target.addr, target.port, key, label, target.strict,
                                   [Path(f).expanduser() for f in target.known_hosts])
            self._authenticate(t, target, label)
        except BaseException:
            t.close()
            raise
        return t

    def _authenticate(self, t: paramiko.Transport, target: Target, label: str) -> None:
        keys = self._auth_keys(target)
        if not keys:
            raise ConfigError(f"{label}: no SSH key to log in with; pass key_file=..., add an IdentityFile "
                              f"to ~/.ssh/config, or load a key into ssh-agent.")
        errors = []
        for key in keys:
            try:
                t.auth_publickey(target.login, key)
            except paramiko.AuthenticationException as exc:
                errors.append(f"{key.get_name()} {key.fingerprint}: {exc}")
                continue
            if t.is_authenticated():
                return
        raise SSHAuthError(f"{label}: the server refused the key(s) for user {target.login!r} "
                           f"({'; '.join(errors)}); check the user name and that the public key is in the "
                           f"node's ~/.ssh/authorized_keys.")

    def _watch(self) -> None:
        """Probe the server every ``keepalive`` seconds; close a transport that stops answering, so its channels
        end (their readers see EOF) and the next use reconnects."""
        while not self._stop.wait(self.keepalive):
            t = self._transport
            if t is None or not t.is_active():
                continue
            probe = threading.Thread(target=t.global_request, args=("keepalive@openssh.com",), daemon=True)
            probe.start()
            probe.join(self.keepalive * 3)
            if probe.is_alive() and t.is_active():
                t.close()

    def server_key(self) -> str:
        """The node's host key as a known_hosts body (``type base64``)."""
        key = self.transport().get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"

    # -- commands -------------------------------------------------------------------------------------------
    def _session(self, timeout: float | None, patience: float | None = None) -> paramiko.Channel:
        try:
            return self.transport(patience).open_session(window_size=WINDOW, max_packet_size=MAX_PACKET,
                                                         timeout=timeout or self.connect_timeout)
        except (paramiko.SSHException, EOFError, OSError):
            # The transport may have died between the check and the open: one fresh try.
            return self.transport(patience).open_session(window_size=WINDOW, max_packet_size=MAX_PACKET,
                                                         timeout=timeout or self.connect_timeout)

    def run(self, command: str, input: bytes | str | memoryview | None = None, timeout: float | None = 60.0,
            check: bool = False, patience: float | None = None) -> tuple[int, str, str]:
        """Run ``command`` through the user's shell; ``(exit code, stdout, stderr)``. ``patience`` bounds the
        reconnect when the connection is down."""
        chan = self._session(timeout, patience)
        try:
            chan.settimeout(timeout)
            chan.exec_command(command)
            err_parts: list[bytes] = []

            def read_err() -> None:
                while True:
                    data = chan.recv_stderr(1 << 20)
                    if not data:
                        return
                    err_parts.append(data)

            err_thread = threading.Thread(target=read_err, daemon=True)
            err_thread.start()
            if input is not None:
                send_view(chan, input.encode() if isinstance(input, str) else input)
            chan.shutdown_write()
            out_parts = []
            while True:
                data = chan.recv(1 << 20)
                if not data:
                    break
                out_parts.append(data)
            if not chan.status_event.wait(timeout):
                raise TimeoutError
            code = chan.recv_exit_status()
            err_thread.join(timeout)
        except TimeoutError:
            raise RemoteCommandError(f"{self.label}: {command.splitlines()[0][:80]!r} did not finish within "
                                     f"{timeout} s") from None
        finally:
            chan.close()
        out = b"".join(out_parts).decode(errors="replace")
        err = b"".join(err_parts).decode(errors="replace")
        if check and code != 0:
            raise RemoteCommandError(f"{self.label}: {command.splitlines()[0][:80]!r} failed with exit code "
                                     f"{code}: {redact(err.strip() or out.strip())[-2000:]}")
        return code, out, err

    def start(self, command: str, timeout: float | None = None) -> RemoteProcess:
        """Start ``command`` and return it running (stderr merged into stdout)."""
        chan = self._session(None)
        chan.set_combine_stderr(True)
        chan.settimeout(timeout)
        chan.exec_command(command)
        return RemoteProcess(chan, command, self.label)

    def run_stream(self, command: str, input: bytes | str | None = None,
                   timeout: float | None = None) -> Iterator[str]:
        """Run ``command`` and yield its output lines as they come; :class:`RemoteCommandError` if it fails."""
        with self.start(command, timeout) as proc:
            if input:
                proc.write(input)
            proc.close_stdin()
            tail: collections.deque[str] = collections.deque(maxlen=20)
            for line in proc:
                tail.append(line)
                yield line
            code = proc.wait(timeout)
        if code != 0:
            raise RemoteCommandError(f"{self.label}: {command.splitlines()[0][:80]!r} failed with exit code "
                                     f"{code}: {redact(''.join(tail)).strip()}")

    def put(self, data: bytes | os.PathLike[str] | str, path: str, mode: int = 0o600, *, through: str = "cat") -> None:
        """Write ``data`` (bytes, or a local file's contents) to ``path`` on the node atomically, with ``mode``.

        The bytes travel on the command's stdin, never on a command line; on the node they pass through the
        command ``through`` (a decompressor, say) on their way to the file.
        """
        target = remote_path(path)
        tmp = remote_path(f"{path}.sky-tmp-{os.getpid()}-{threading.get_ident()}")
        parent = remote_path(os.path.dirname(path) or ".")
        command = (f"umask 077 && mkdir -p {parent} && {{ {through} > {tmp} && chmod {mode:o} {tmp} && "
                   f"mv -f {tmp} {target} || {{ r=$?; rm -f {tmp}; exit $r; }}; }}")
        chan = self._session(None)
        try:
            chan.exec_command(command)
            if isinstance(data, bytes):
                send_view(chan, data)
            else:
                with open(data, "rb") as f:
                    while chunk := f.read(4 << 20):
                        send_view(chan, chunk)
            chan.shutdown_write()
            err = chan.makefile_stderr("rb").read().decode(errors="replace")
            code = chan.recv_exit_status()
        finally:
            chan.close()
        if code != 0:
            raise RemoteCommandError(f"{self.label}: writing {path} failed (exit code {code}): {err.strip()}")

    def open_tcp(self, port: int, host: str = "127.0.0.1") -> P.FrameIO:
        """A frame stream to ``host:port`` as seen from the node, through a ``direct-tcpip`` channel."""
        t = self.transport()
        try:
            chan = t.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), window_size=WINDOW,
                                  max_packet_size=MAX_PACKET, timeout=self.connect_timeout)
        except paramiko.ChannelException as exc:
            raise ConnectionRefusedError(f"{self.label}: nothing accepts connections on {host}:{port} there "
                                         f"({exc.text})") from None
        except (paramiko.SSHException, EOFError) as exc:
            raise ConnectionResetError(f"{self.label}: {exc}") from None
        return P.FrameIO(ChannelReader(chan), _sender(chan), chan.close, chan.settimeout)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._closed = True
            t, self._transport = self._transport, None
        if t is not None:
            t.close()
        self._close_jumps()

    def _close_jumps(self) -> None:
        jumps, self._jumps = self._jumps, []
        for jump in reversed(jumps):
            jump.close()
