"""``python -m sky_jupyter.worker.watchdog CONFIG``: a node's watchdog, one per pool per node, beside its workers.

The workers' own dead-man switch lives in the worker process: a worker that died, or hangs, cannot power the machine
off, and a cloud machine left that way keeps billing. The watchdog is a separate small process that a node's bring-up
starts (when the provider asks for it: AWS does), detached like the workers, so that it outlives the SSH session.

- **Dead-man switch.** Workers touch the heartbeat file in the pool's run folder (``~/.sky_jupyter/run/POOL-NODE/
  heartbeat``) when their client speaks (any frame: a task, a heartbeat ping), at most once a second. When the file
  has not changed for ``grace`` seconds (measured on this process's monotonic clock, so a clock step does not fire
  it), the watchdog removes the pool's secrets from the node (the workers' ``cleanup`` list), runs ``command`` (AWS:
  power off; the instance's shutdown behaviour terminates it) and exits. It fires whether the workers are dead,
  hung, or alive with their client gone (a dead kernel, a cut link).
- **Quiet end.** When the pool closes, its run folder is removed: the watchdog sees its lock file gone (or replaced
  by a newer watchdog's) and exits without doing anything.
- **Spot reclaims** (``spot`` in the config, on spot nodes only): every ``interval`` seconds it asks the instance
  metadata service (IMDSv2: a session token from ``PUT /latest/api/token``, then ``GET /latest/meta-data/spot/
  instance-action``; 404 means no notice) and, once EC2 announces that it takes the instance back, writes the
  notice to ``spot-notice.json`` in the run folder, where the workers find it and tell their client.

One watchdog per run folder: it holds an exclusive lock on ``watchdog.pid`` there; a second one started for the same
folder (a worker restarted by its client) exits at once. Its log is ``watchdog.log`` in the run folder.
Standard library only (the node side's rule).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import Any

#: What a node runs to power itself off when no command is configured.
POWEROFF = "sudo -n shutdown -h now || shutdown -h now"
#: The instance metadata service; ``spot.endpoint`` in the config, else this variable, else the real address.
METADATA_ENV = "SKY_JUPYTER_METADATA_ENDPOINT"
METADATA_ENDPOINT = "http://169.254.169.254"
#: File names in the run folder.
HEARTBEAT = "heartbeat"
NOTICE_FILE = "spot-notice.json"
LOCK_FILE = "watchdog.pid"
LOG_FILE = "watchdog.log"
TOKEN_TTL = 21600  # seconds an IMDSv2 session token lives (the most it may)


def log(msg: str) -> None:
    sys.stderr.write(f"[sky watchdog {os.getpid()} {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def touch(path: str) -> None:
    """Mark a heartbeat: update the file's times, creating it if need be (not its folder: a pool that closed has
    none, and must not get one back)."""
    try:
        os.utime(path)
    except FileNotFoundError:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        except OSError:
            pass
    except OSError:
        pass


class Metadata:
    """A small IMDSv2 client: one session token, renewed before it expires or when refused."""

    def __init__(self, endpoint: str, timeout: float = 2.0) -> None:
        import urllib.request

        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self._token = ""
        self._token_until = 0.0
        # Never through a proxy the node's environment names: the metadata service is link-local.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _request(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, response.read(65536)
        except urllib.error.HTTPError as error:
            return error.code, b""

    def token(self) -> str:
        if not self._token or time.monotonic() > self._token_until:
            status, body = self._request("PUT", "/latest/api/token",
                                         {"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)})
            if status != 200:
                raise OSError(f"the metadata service refused a session token (HTTP {status})")
            self._token, self._token_until = body.decode().strip(), time.monotonic() + TOKEN_TTL - 60
        return self._token

    def instance_action(self) -> dict[str, Any] | None:
        """EC2's notice that it takes this spot instance back (``{"action": "terminate", "time": "...Z"}``), or
        None while there is none."""
        for _ in range(2):
            status, body = self._request("GET", "/latest/meta-data/spot/instance-action",
                                         {"X-aws-ec2-metadata-token": self.token()})
            if status == 401:  # the token expired or the service restarted: a fresh one, once
                self._token = ""
                continue
            if status == 404:
                return None
            if status != 200:
                raise OSError(f"the metadata service answered HTTP {status}")
            notice = json.loads(body)
            if not isinstance(notice, dict):
                raise ValueError(f"the instance action is not an object: {body[:200]!r}")
            return notice
        raise OSError("the metadata service refused its own session token")


class Watchdog:
    def __init__(self, config: dict[str, Any], lock_fd: int) -> None:
        self.run_dir = os.path.expanduser(str(config["run_dir"]))
        self.lock_fd = lock_fd
        self.command: str | None = config.get("command")
        self.grace = float(config.get("grace", 600.0))
        self.cleanup = [str(p) for p in config.get("cleanup", [])]
        self.spot: dict[str, Any] | None = config.get("spot") or None
        self.tick = min(1.0, max(0.05, self.grace / 20))
        self.heartbeat = os.path.join(self.run_dir, HEARTBEAT)

    def still_mine(self) -> bool:
        """Whether the run folder still holds this watchdog's lock file (it is removed when the pool closes)."""
        try:
            here, mine = os.stat(os.path.join(self.run_dir, LOCK_FILE)), os.fstat(self.lock_fd)
        except OSError:
            return False
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def _beat(self) -> int | None:
        try:
            return os.stat(self.heartbeat).st_mtime_ns
        except OSError:
            return None

    def run(self) -> None:
        touch(self.heartbeat)  # starting counts as the client's word: it is bringing the node up
        if self.spot is not None:
            threading.Thread(target=self.watch_spot, daemon=True, name="sky-spot").start()
        what = [f"dead-man switch after {self.grace:g} s without the client"] if self.command else []
        if self.spot is not None:
            what.append("spot reclaim notices")
        log(f"watching {self.run_dir}: {', '.join(what) or 'nothing'}")
        last, changed = self._beat(), time.monotonic()
        while True:
            time.sleep(self.tick)
            if not self.still_mine():
                log("the pool's run folder is gone (the pool closed): exiting")
                return
            beat = self._beat()
            if beat != last:
                last, changed = beat, time.monotonic()
            silent = time.monotonic() - changed
            if self.command and silent > self.grace:
                self.fire(silent)
                return

    def fire(self, silent: float) -> None:
        import subprocess

        log(f"no word from the client for {silent:.1f} s (grace {self.grace:g} s): dead-man switch; removing the "
            f"pool's secrets and running the poweroff command")
        for path in self.cleanup:
            remove_path(path)
        try:
            done = subprocess.run(self.command or POWEROFF, shell=True, stdin=subprocess.DEVNULL, timeout=120,
                                  check=False)
            log(f"the poweroff command exited with {done.returncode}")
        except (OSError, subprocess.SubprocessError) as exc:
            log(f"the poweroff command failed: {exc}")

    def watch_spot(self) -> None:
        assert self.spot is not None
        endpoint = str(self.spot.get("endpoint") or os.environ.get(METADATA_ENV) or METADATA_ENDPOINT)
        interval = max(0.1, float(self.spot.get("interval", 5.0)))
        metadata = Metadata(endpoint)
        said = ""
        while True:
            try:
                notice = metadata.instance_action()
            except (OSError, ValueError) as exc:  # unreachable, refused, malformed: said once, asked again later
                if str(exc) != said:
                    said = str(exc)
                    log(f"cannot ask {endpoint} for spot notices: {exc}")
                notice = None
            if notice is not None:
                path = os.path.join(self.run_dir, NOTICE_FILE)
                try:
                    with open(f"{path}.tmp", "w") as f:
                        json.dump(notice, f)
                    os.replace(f"{path}.tmp", path)
                except OSError as exc:
                    log(f"could not write the spot notice: {exc}")
                    time.sleep(interval)
                    continue
                log(f"spot notice: {notice}")
                return
            time.sleep(interval)


def remove_path(path: str) -> None:
    """Remove a file or folder (``~`` is the user's home); nothing when it is gone already."""
    import shutil

    path = os.path.expanduser(path)
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def main(argv: list[str] | None = None) -> None:
    import fcntl

    args = sys.argv[1:] if argv is None else argv
    config = json.loads(args[0])
    run_dir = os.path.expanduser(str(config["run_dir"]))
    # A session of its own, so that the SSH session that started it can end (its caller runs it in the background
    # with its output in the log already).
    if os.fork():
        os._exit(0)
    os.setsid()
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    try:
        lock_fd = os.open(os.path.join(run_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        log(f"cannot start: {exc}")
        return
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return  # this folder has its watchdog already
    os.ftruncate(lock_fd, 0)
    os.write(lock_fd, f"{os.getpid()}\n".encode())
    Watchdog(config, lock_fd).run()


if __name__ == "__main__":
    main()
