"""Host keys of EC2 instances, pinned by instance id in one store that every pool shares.

EC2 hands a released public address to a later instance, so a key pinned for an address says nothing about the next
machine there: pins keyed by address (and per pool, whose names are random) protect nothing across pools, and a
stale one makes the next launch fail. Here a key belongs to an instance id, which EC2 never reuses:

- before the first connection the provider reads the instance's console output (``GetConsoleOutput``, polled within
  a bound) and pins the keys cloud-init printed between ``-----BEGIN SSH HOST KEY KEYS-----`` and
  ``-----END SSH HOST KEY KEYS-----``: a key obtained from EC2's API, not from the network;
- when the console shows none in time, ``host_key_check="tofu"`` (the default) trusts the key the instance presents
  on first use, with a one-line warning (naming the earlier instance when the address had one with another key),
  and ``host_key_check="strict"`` refuses the connection;
- every later connection to that instance (reconnects, ``%sky attach`` from another kernel) must present a pinned
  key; a changed key is refused.

The store is ``~/.sky_jupyter/hostkeys/aws/<instance id>.json`` (folders 0700, files 0600). The user's
``~/.ssh/known_hosts`` is never written; for an instance it is read only for ``@revoked`` keys (its lines for an
EC2 address describe whichever instance held that address before). Hosts that are not instances (jump hosts named
in ``~/.ssh/config``) are checked as the SSH provider checks them: pinned per pool, against your known_hosts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from ...errors import ConfigError
from ...state import private_dir
from ...transport import DEFAULT_POLICY, HostKeyError, KnownHosts, fingerprint, host_id, note, read_known_hosts
from ..ssh import SSH

BEGIN = "-----BEGIN SSH HOST KEY KEYS-----"
END = "-----END SSH HOST KEY KEYS-----"
#: ``AWS(host_key_check=...)``: "tofu" verifies from the console output when it shows the keys in time and trusts
#: the first key otherwise (with a warning); "strict" refuses any key the console output did not show.
POLICIES = ("tofu", "strict")
#: Pins of instances not connected to for this long are dropped (instance ids never come back).
MAX_AGE_S = 30 * 24 * 3600.0
_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,32}$")
_KEY_TYPES = ("ssh-", "ecdsa-", "sk-")


def check_policy(value: object) -> str:
    if value not in POLICIES:
        raise ConfigError(f"host_key_check must be 'tofu' (verify from the console output, else trust on first use "
                          f"with a warning) or 'strict' (refuse keys the console output does not show), "
                          f"not {value!r}.")
    return str(value)


def console_keys(output: str) -> list[str]:
    """The host keys (``type base64``) cloud-init printed on the console: the last complete block's lines."""
    blocks = output.split(BEGIN)
    for block in reversed(blocks[1:]):
        if END not in block:
            continue
        keys = []
        for line in block.split(END, 1)[0].splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0].startswith(_KEY_TYPES):
                try:
                    base64.b64decode(fields[1], validate=True)
                except (ValueError, binascii.Error):
                    continue
                keys.append(f"{fields[0]} {fields[1]}")
        if keys:
            return keys
    return []


def _blob(body: str) -> bytes:
    return base64.b64decode(body.split()[1])


def _fingerprint(body: str) -> str:
    digest = base64.b64encode(hashlib.sha256(_blob(body)).digest()).decode().rstrip("=")
    return f"{body.split()[0]} SHA256:{digest}"


@dataclass(frozen=True, slots=True)
class Pin:
    """The host keys pinned for one instance, where they came from ("console" or "first use") and at which
    address it was reached."""

    instance_id: str
    keys: tuple[str, ...]
    source: str
    host: str = ""  # host_id(addr, port) when pinned
    region: str = ""
    pinned: float = 0.0

    def holds(self, key: paramiko.PKey) -> bool:
        blob = key.asbytes()
        return any(_blob(body) == blob for body in self.keys)


class HostKeyStore:
    """``~/.sky_jupyter/hostkeys/aws``: one 0600 JSON file per instance id."""

    def __init__(self, folder: Path | None = None) -> None:
        self._folder = folder
        self._lock = threading.Lock()

    @property
    def folder(self) -> Path:
        if self._folder is not None:
            self._folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            return self._folder
        return private_dir("hostkeys", "aws")

    def path(self, instance_id: str) -> Path:
        if not _INSTANCE_ID.match(instance_id):
            raise ValueError(f"not an EC2 instance id: {instance_id!r}")
        return self.folder / f"{instance_id}.json"

    def load(self, instance_id: str) -> Pin | None:
        try:
            data = json.loads(self.path(instance_id).read_text())
            return Pin(data["instance_id"], tuple(data["keys"]), data["source"], data.get("host", ""),
                       data.get("region", ""), float(data.get("pinned", 0.0)))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def pin(self, instance_id: str, keys: Sequence[str], source: str, host: str = "", region: str = "") -> Pin:
        """Record ``keys`` for the instance (replacing what was there), atomically, mode 0600."""
        pin = Pin(instance_id, tuple(keys), source, host, region, time.time())
        path = self.path(instance_id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"instance_id": instance_id, "keys": list(keys), "source": source, "host": host,
                       "region": region, "pinned": pin.pinned}, f)
        os.replace(tmp, path)
        self.prune()
        return pin

    def touch(self, instance_id: str) -> None:
        """Mark the pin as in use (pins of instances nobody connects to any more age out)."""
        try:
            os.utime(self.path(instance_id))
        except OSError:
            pass

    def forget(self, instance_ids: Iterable[str]) -> None:
        """Drop the pins of instances that are gone (terminated instances never come back)."""
        for instance_id in instance_ids:
            try:
                self.path(instance_id).unlink(missing_ok=True)
            except (OSError, ValueError):
                pass

    def at(self, host: str) -> list[Pin]:
        """Pins of instances that were reached at ``host`` (``host_id(addr, port)``), newest first."""
        found = []
        for path in self.folder.glob("i-*.json"):
            pin = self.load(path.stem)
            if pin is not None and pin.host == host:
                found.append(pin)
        return sorted(found, key=lambda p: -p.pinned)

    def prune(self, max_age: float = MAX_AGE_S) -> None:
        with self._lock:
            cutoff = time.time() - max_age
            for path in self.folder.glob("i-*.json"):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                except OSError:
                    pass


class InstanceKnownHosts(KnownHosts):
    """One pool's host-key check: an address that is one of the pool's instances (see :meth:`assign`) is held to
    that instance's pin; any other host (a jump host) is checked as :class:`KnownHosts` checks it, pinned in the
    pool's own file."""

    def __init__(self, path: Path, store: HostKeyStore, policy: str = "tofu", region: str = "",
                 timeout: float = 0.0) -> None:
        super().__init__(path)
        self.store = store
        self.policy = check_policy(policy)
        self.region = region
        self.timeout = timeout  # how long the console output was polled, for messages
        self._instances: dict[tuple[str, int], str] = {}

    def assign(self, addr: str, port: int, instance_id: str) -> None:
        """The instance this pool reaches at ``addr:port``."""
        with self._lock:
            self._instances[(addr, port)] = instance_id

    def instance_at(self, addr: str, port: int) -> str | None:
        with self._lock:
            return self._instances.get((addr, port))

    def pinned(self, addr: str, port: int) -> str | None:
        instance_id = self.instance_at(addr, port)
        if instance_id is None:
            return super().pinned(addr, port)
        pin = self.store.load(instance_id)
        return pin.keys[0] if pin else None

    def check(self, addr: str, port: int, key: paramiko.PKey, label: str, policy: str = DEFAULT_POLICY,
              user_files: Sequence[Path] = ()) -> bool:
        instance_id = self.instance_at(addr, port)
        if instance_id is None:
            return super().check(addr, port, key, label, policy, user_files)
        hid = host_id(addr, port)
        blob = key.asbytes()
        for path in user_files or (self.user_file,):
            for line in read_known_hosts(Path(path)):
                if line.marker == "@revoked" and line.blob == blob and line.matches(hid):
                    raise HostKeyError(f"{label}: instance {instance_id} ({hid}) presents the host key "
                                       f"{fingerprint(key)}, which {line.where} marks @revoked: the connection is "
                                       f"refused.")
        with self._lock:
            pin = self.store.load(instance_id)
            if pin is not None:
                if pin.holds(key):
                    self.store.touch(instance_id)
                    return False
                pinned = ", ".join(_fingerprint(k) for k in pin.keys)
                if policy == "no":
                    note(f"{label}: instance {instance_id} ({hid}) presents {fingerprint(key)}, not its pinned key "
                         f"({pinned}); accepted unchecked because ~/.ssh/config sets StrictHostKeyChecking no")
                    return False
                where = ("its console output showed" if pin.source == "console"
                         else f"the key pinned for it ({pin.source}) is")
                raise HostKeyError(
                    f"{label}: instance {instance_id} ({hid}) presents the host key {fingerprint(key)}, but {where} "
                    f"{pinned} ({self.store.path(instance_id)}): the connection is refused. Someone may be "
                    f"intercepting it (or connect_via maps the instance to another machine).")
            if policy == "no":
                note(f"{label}: accepted the host key of instance {instance_id} ({hid}, {fingerprint(key)}) unchecked, "
                     f"because ~/.ssh/config sets StrictHostKeyChecking no; it is not recorded anywhere")
                return False
            if self.policy == "strict" or policy == "yes":
                why = "host_key_check='strict'" if self.policy == "strict" else "~/.ssh/config's StrictHostKeyChecking"
                raise HostKeyError(
                    f"{label}: the host key of instance {instance_id} ({hid}, {fingerprint(key)}) could not be "
                    f"verified: its console output (GetConsoleOutput) showed no SSH host keys"
                    f"{f' within {self.timeout:.0f} s' if self.timeout else ''}, and {why} refuses keys it cannot "
                    f"verify. Use an image whose cloud-init prints them (Ubuntu's and the Deep Learning AMIs do), "
                    f"allow ec2:GetConsoleOutput, raise console_timeout=, or pass host_key_check='tofu'.")
            earlier = [p for p in self.store.at(hid) if p.instance_id != instance_id and not p.holds(key)]
            self.store.pin(instance_id, [f"{key.get_name()} {key.get_base64()}"], "first use", hid, self.region)
        also = (f"; {hid} belonged to instance {earlier[0].instance_id} before, with another key (EC2 reuses "
                f"addresses)") if earlier else ""
        note(f"warning: {label}: trusting the host key of instance {instance_id} ({hid}, {fingerprint(key)}) on first "
             f"use: its console output showed none{f' within {self.timeout:.0f} s' if self.timeout else ''}{also}; "
             f"host_key_check='strict' refuses instead")
        return True


class InstanceSSH(SSH):
    """The SSH half of the AWS provider: the SSH provider's code, with host keys checked per instance
    (:meth:`known_hosts` gives each pool an :class:`InstanceKnownHosts`, kept while the provider lives)."""

    def __init__(self, store: HostKeyStore, policy: str, *args: Any, region: str = "", timeout: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store
        self.policy = check_policy(policy)
        self.region = region
        self.timeout = timeout
        self._pools: dict[str, InstanceKnownHosts] = {}
        self._pools_lock = threading.Lock()

    def known_hosts(self, pool: str) -> InstanceKnownHosts:
        with self._pools_lock:
            known = self._pools.get(pool)
            if known is None:
                path = super().known_hosts(pool).path
                known = self._pools[pool] = InstanceKnownHosts(path, self.store, self.policy, self.region,
                                                               self.timeout)
            return known


def verify_from_console(read: Callable[[], str | None], deadline: float, poll: float) -> list[str]:
    """Poll ``read`` (the console output, or None when it cannot be read at all) until it shows host keys or the
    deadline passes; the keys found (none: not verified)."""
    while True:
        output = read()
        if output is None:
            return []
        keys = console_keys(output)
        if keys or time.monotonic() >= deadline:
            return keys
        time.sleep(max(0.05, min(poll, deadline - time.monotonic())))


__all__ = ["BEGIN", "END", "POLICIES", "HostKeyStore", "InstanceKnownHosts", "InstanceSSH", "Pin", "check_policy",
           "console_keys", "verify_from_console"]
