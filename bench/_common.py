"""Shared by the benchmarks: timing helpers and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# The benchmarks' test nodes never reach for the public package index: a node without uv gets this client's (or
# fetches it from a test index the pool's image names).
os.environ.setdefault("SKY_JUPYTER_DEFAULT_INDEX", "")


def timed(fn: Callable[[], Any], n: int, warmup: int = 20) -> list[float]:
    """Seconds per call for ``n`` calls after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered) * 1e3, "p90_ms": ordered[int(len(ordered) * 0.9)] * 1e3,
            "min_ms": ordered[0] * 1e3, "n": len(ordered)}


def seconds(samples: list[float]) -> dict[str, float]:
    """:func:`summary` in seconds instead of milliseconds."""
    return {k.replace("_ms", "_s"): (round(v / 1e3, 4) if k.endswith("_ms") else v)
            for k, v in summary(samples).items()}


def report(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    data = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            **figures}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2))
    print(f"written to {path}")
    return path


def paired_comparison(base: str, sky_runs: list[dict[str, Any]], sky_call: list[float], base_runs: list[dict[str, Any]],
                      base_job: list[float], goal: float) -> dict[str, Any]:
    """A warm sky call against ``base`` (torchrun, a plain script) over interleaved rounds: the ratio of medians,
    each round's own ratio (its two jobs ran back to back, so it is immune to load shifts of a shared machine),
    the training loops alone, and whether both ratios meet ``goal``."""
    med = statistics.median
    ratio_job = med(sky_call) / med(base_job)
    paired = [c / b for c, b in zip(sky_call, base_job)]
    return {
        f"ratio_sky_call_over_{base}_job_only": round(ratio_job, 4),
        f"ratio_sky_call_over_{base}_job_only_per_round": [round(r, 4) for r in paired],
        f"ratio_sky_call_over_{base}_job_only_paired_median": round(med(paired), 4),
        f"ratio_train_only_sky_over_{base}": round(
            med([r["train_s"] for r in sky_runs]) / med([r["train_s"] for r in base_runs]), 4),
        "goal_ratio_at_most": goal,
        "goal_met": ratio_job <= goal and med(paired) <= goal,
        "goal_met_ratio_of_medians": ratio_job <= goal,
        "goal_met_paired_median": med(paired) <= goal,
    }


# ---------------------------------------------------------------------------------------------------------------
# Byte-counting links (tests/fixtures/slowlink.py) in a helper process: their threads do not compete with the
# bench's client for its GIL. A bench runs ``python BENCH.py --links-helper`` through :class:`Links` and calls
# :func:`links_helper` when it sees that flag.


def links_helper() -> None:
    """Start SlowLinks (and package indexes) when asked (JSON lines on stdin, answers on stdout), report their
    byte counters, and stop them all when stdin closes (the bench ended, or died)."""
    import signal
    import sys

    from tests.fixtures.pkg_index import PackageIndex
    from tests.fixtures.slowlink import SlowLink

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the bench's to handle; it closes our stdin
    links: dict[int, SlowLink] = {}
    indexes: list[PackageIndex] = []
    try:
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "start":
                link = SlowLink((req["addr"], req["port"]), rtt=req["rtt"], rate_bps=req["rate_bps"],
                                handshake=req["handshake"])
                links[link.port] = link
                out: dict[str, Any] = {"port": link.port}
            elif req["op"] == "index":
                index = PackageIndex(Path(req["folder"]), req["addrs"])
                indexes.append(index)
                out = {"port": index.port}
            elif req["op"] == "counts":
                out = {str(p): [link.bytes_up, link.bytes_down, link.connections] for p, link in links.items()}
            else:
                out = {"error": f"unknown op {req['op']!r}"}
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    finally:
        for link in links.values():
            link.stop()
        for index in indexes:
            index.stop()


class Links:
    """The bench's handle on its links helper process (``script --links-helper``)."""

    def __init__(self, script: str) -> None:
        import subprocess
        import sys
        import threading

        self.proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--links-helper"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parents[1], start_new_session=True)
        self._lock = threading.Lock()

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the links helper ended (exit code {self.proc.poll()})")
        return dict(json.loads(line))

    def start(self, addr: str, port: int, rtt: float = 0.0, rate_bps: float | None = None,
              handshake: bool = False) -> int:
        """A link to ``addr:port`` with that delay and rate (none: only counting); its local port."""
        req = {"op": "start", "addr": addr, "port": port, "rtt": rtt, "rate_bps": rate_bps, "handshake": handshake}
        return int(self._ask(req)["port"])

    def index(self, folder: Path, addrs: list[str]) -> int:
        return int(self._ask({"op": "index", "folder": str(folder), "addrs": addrs})["port"])

    def counts(self) -> dict[int, tuple[int, int]]:
        """Bytes up and down through each link so far, by its port."""
        return {int(p): (up, down) for p, (up, down, _) in self._ask({"op": "counts"}).items()}

    def stop(self) -> None:
        import contextlib
        import subprocess

        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

