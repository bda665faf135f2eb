"""Cold bring-up of 1 and 4 fresh Debian nodes over slow links, warm starts, re-attach, and the sequential SSH
round trips of one node's bring-up.

Nodes: 4 OpenSSH nodes on the bookworm rootfs (tests/fixtures/rootfs.py: a bare Debian 12 with python3, no pip,
no venv module, no uv), each in its own network namespace. They install from a package index served on the
cluster bridge (tests/fixtures/pkg_index.py), so the index is on the nodes' side, not behind the slow link.

Links: the client reaches each node through its own user-space delaying proxy (tests/fixtures/slowlink.py; this
kernel has no netem): 40 ms RTT, 200 Mbit/s per direction, TCP handshake charged. The same proxy with rtt=0 (same
rate) is the baseline: a part's sequential round trips are (t at 40 ms - t at 0 ms) / 40 ms, cross-checked
against links of 200 ms RTT (--count-rtt), where node-side CPU noise weighs 5x less. The proxies and the package
index run in a helper process, so neither competes with this client for its GIL.

Figures (medians of --rounds interleaved rounds):
- cold ``ComputePool.start()`` (every node's HOME reset) of 1 and of 4 nodes at 40 ms; goal 4 nodes <= 1.3x 1 node;
- round trips of one node's cold start, split into (a) connect (``SSH.provision``: TCP, SSH transport, auth,
  ``hostname``), (b) bootstrap + worker start (``SSH.bring_up``), (c) worker connect + setup (the rest of
  ``start()``); goal (b)+(c) <= 6; each part is also split into the SSH requests and lines it waits for;
- warm start of a new pool on bootstrapped nodes (1 and 4) at 40 ms; goal < 1 s;
- ``ComputePool.attach(name)`` of a pool whose client process died (1 and 4 nodes) at 40 ms; goal < 1 s;
- bytes through each node's link, cold, warm and attach; the machine's busy CPU seconds per start.

Needs root (sshd nodes, namespaces, overlay mounts); about 1.5 minutes with the defaults:

    .venv/bin/python bench/bringup.py [--rounds 3] [--count-rtt 0.2]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from _common import Links, links_helper, report  # noqa: E402  (it also turns the default index off for benches)

RTT = 0.040
COUNT_RTT = 0.200  # the cross-check: node-side CPU noise of +-50 ms is +-1.2 round trips at 40 ms, +-0.25 at 200 ms
RATE_BPS = 200e6
GOAL_RATIO = 1.3
GOAL_ROUND_TRIPS = 6
GOAL_WARM_S = 1.0
GOAL_ATTACH_S = 1.0
NODES = 4

now = time.perf_counter


class HelperIndex:
    """The cluster's package index, served by the helper process (another machine's work, not this client's):
    what ``Cluster.attach_index`` needs of a PackageIndex."""

    def __init__(self, links: Links, folder: Path, addrs: list[str]) -> None:
        self.addrs = addrs
        self.port = links.index(folder, addrs)

    def url_for(self, addr: str, *, credentials: bool = False) -> str:
        if addr not in self.addrs:
            raise ValueError(f"the index does not listen on {addr} (only on {self.addrs})")
        return f"http://{addr}:{self.port}/simple"

    def stop(self) -> None:
        """It stops with the helper."""


# ---------------------------------------------------------------------------------------------------------------
# Instrumentation (benchmark only: wrappers around the provider instance, the pool instance, and - for the
# step-by-step trace of 1-node runs - a few paramiko and sky_jupyter methods; product code is unchanged)


class Tracer:
    """While recording (1-node runs, whose network waits all happen in the calling thread), every mark is the end
    of a step: (time, part, what the step waited for)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, str]] | None = None
        self.thread: threading.Thread | None = None
        self.part = "pre"

    @contextlib.contextmanager
    def recording(self, on: bool, part: str = "pre") -> Iterator[list[tuple[float, str, str]]]:
        events: list[tuple[float, str, str]] = []
        self.events, self.thread, self.part = (events if on else None), threading.current_thread(), part
        try:
            yield events
        finally:
            self.events = None

    def mark(self, label: str | None) -> None:
        events = self.events
        if events is not None and label and threading.current_thread() is self.thread:
            events.append((now(), self.part, label))

    def set_part(self, part: str) -> None:
        if self.events is not None and threading.current_thread() is self.thread:
            self.part = part


TRACER = Tracer()


def _line_step(line: str) -> str | None:
    from sky_jupyter import protocol as P
    from sky_jupyter.bootstrap import CACHED, DONE, NEED, PHASE_START

    text = line.rstrip("\n")
    if text.startswith(NEED):
        return f"node's ::sky-need {text[len(NEED):].split()[0] if text[len(NEED):].split() else ''} line back"
    if text.startswith(PHASE_START):
        return f"::sky-phase-start {text[len(PHASE_START):]} line back"
    if text == DONE:
        return "::sky-done line back (bootstrap script finished)"
    if text == CACHED:
        return "::sky-cached line back (bootstrap marker found)"
    if text.startswith(P.READY):
        return "worker's SKY-READY line back (worker started, port bound)"
    return None


def install_trace_hooks() -> None:
    """Class-level wrappers that mark when each network wait of a traced run ends."""
    import paramiko

    from sky_jupyter import protocol as P
    from sky_jupyter.transport import RemoteProcess

    def after(cls: type, name: str, label: Callable[[tuple[Any, ...]], str]) -> None:
        original = getattr(cls, name)

        def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = original(self, *args, **kwargs)
            TRACER.mark(label(args))
            return result

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(cls, name, wrapper)

    after(paramiko.Transport, "start_client", lambda a: "TCP connect + SSH banners + key exchange (start_client)")
    after(paramiko.Transport, "auth_publickey", lambda a: "ssh-userauth service + publickey auth (auth_publickey)")
    after(paramiko.Transport, "open_channel", lambda a: f"open_channel({a[0] if a else '?'}) confirmed")
    after(paramiko.Channel, "exec_command", lambda a: "exec_command reply")
    after(P.FrameIO, "recv_json", lambda a: "JSON frame from the worker")
    original_iter = RemoteProcess.__iter__

    def lines(self: RemoteProcess) -> Iterator[str]:
        for line in original_iter(self):
            TRACER.mark(_line_step(line))
            yield line

    RemoteProcess.__iter__ = lines  # type: ignore[method-assign]


def instrument(provider: Any, pool: Any, rec: dict[str, Any]) -> None:
    """Time the provider's parts (per node) and mark the pool's steps; wrappers on these instances only."""
    provision, bring_up, send_needs, setup_all = (provider.provision, provider.bring_up, provider._send_needs,
                                                  pool._setup_all)
    lock = threading.Lock()

    def timed_provision(spec: Any) -> Any:
        TRACER.mark("local: image, plan, state file")
        TRACER.set_part("a")
        started = now()
        try:
            return provision(spec)
        finally:
            rec["provision"] = (started, now())
            TRACER.mark("hostname output + exit status back; host key noted")
            TRACER.set_part("gap")

    def timed_bring_up(host: Any, plan: Any, config: Any, progress: Any) -> Any:
        TRACER.mark("local: state file, bring-up thread")
        TRACER.set_part("b")
        started = now()
        try:
            return bring_up(host, plan, config, progress)
        finally:
            with lock:
                rec["bring_up"][host.rank] = (started, now())
            TRACER.mark("ready line parsed; bring_up returns")
            TRACER.set_part("c")

    def timed_send_needs(proc: Any, words: list[str], label: str) -> None:
        started, sent = now(), 0
        write = proc.write

        def counted(data: bytes | str) -> None:
            nonlocal sent
            sent += len(data)
            write(data)

        proc.write = counted  # this RemoteProcess instance only, for this answer
        try:
            send_needs(proc, words, label)
        finally:
            proc.write = write
        with lock:
            rec["sent_needs"].append({"what": words[0] if words else "", "bytes": sent,
                                      "seconds": round(now() - started, 3)})
        TRACER.mark(f"client answers ::sky-need {words[0] if words else ''}: {sent:,} bytes (_send_needs returns)")

    def marked_setup_all() -> None:
        TRACER.mark("head-port task submitted and answered")
        setup_all()
        TRACER.mark("setup call submitted and answered")

    provider.provision, provider.bring_up, provider._send_needs = timed_provision, timed_bring_up, timed_send_needs
    pool._setup_all = marked_setup_all


def busy_cpu_seconds() -> float:
    """CPU time spent so far by everything on this machine (nodes, proxies, client, and any other load)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def steps_of(events: list[tuple[float, str, str]], started: float) -> list[tuple[str, str, float]]:
    """(part, step, seconds) from the marks: each step lasts from the previous mark to its own; repeated names in
    a part are numbered."""
    out: list[tuple[str, str, float]] = []
    seen: dict[tuple[str, str], int] = {}
    last = started
    for t, part, label in events:
        n = seen[(part, label)] = seen.get((part, label), 0) + 1
        out.append((part, label if n == 1 else f"{label} #{n}", t - last))
        last = t
    return out


# ---------------------------------------------------------------------------------------------------------------
# One measured run


CHILD = r"""
import json, os, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"])
import sky_jupyter as sky
pool = sky.ComputePool(provider=sky.SSH(args["hosts"], key_file=args["key_file"]), nodes=len(args["hosts"]),
                       image=sky.Image(index_url=args["index_url"]), name=args["name"], grace=120,
                       progress=lambda *event: None)
pool.start()
print("ready", flush=True)
os._exit(0)  # a client that dies: no close, no teardown; its pool stays recorded and its workers keep running
"""


class Bench:
    def __init__(self, cluster: Any, links: Links) -> None:
        self.cluster = cluster
        self.links = links
        self.ports: dict[float, list[int]] = {}
        self.open_pools: list[Any] = []
        self.detached: set[str] = set()
        self._names = itertools.count()

    def add_links(self, rtts: tuple[float, ...]) -> None:
        for rtt in rtts:
            self.ports[rtt] = [self.links.start(node.addr, node.port, rtt, RATE_BPS, handshake=True)
                               for node in self.cluster.nodes]

    def hosts(self, n: int, rtt: float) -> list[str]:
        return [f"{node.user}@127.0.0.1:{port}" for node, port in zip(self.cluster.nodes[:n], self.ports[rtt])]

    def reset(self, n: int) -> None:
        """Nodes as fresh machines: homes wiped, and this client forgets having seen them hold its package."""
        from sky_jupyter.providers import local, ssh

        for node in self.cluster.nodes[:n]:
            self.cluster.reset_home(node)
        ssh._packages_seen = None
        (local.sky_home() / "cache" / "package-on-nodes").unlink(missing_ok=True)
        os.sync()  # the file system's work for the wipe (journal, discards) is not the bring-up's
        time.sleep(0.5)

    def _bytes(self, before: dict[int, tuple[int, int]], n: int, rtt: float) -> list[list[int]]:
        after = self.links.counts()
        return [[after[p][0] - before[p][0], after[p][1] - before[p][1]] for p in self.ports[rtt][:n]]

    def start(self, n: int, rtt: float, trace: bool) -> dict[str, Any]:
        """A new pool's ``start()`` on the first ``n`` nodes through the ``rtt`` links; closed afterwards."""
        import sky_jupyter as sky

        phases: dict[int, dict[str, float]] = {}

        def progress(rank: int, phase: str, line: str) -> None:
            phases.setdefault(rank, {}).setdefault(phase, now())

        provider = sky.SSH(self.hosts(n, rtt), key_file=self.cluster.key_file)
        pool = sky.ComputePool(provider=provider, nodes=n, image=sky.Image(index_url=self.cluster.index_url),
                               name=f"bench-{next(self._names)}", progress=progress)
        rec: dict[str, Any] = {"bring_up": {}, "sent_needs": []}
        instrument(provider, pool, rec)
        before, busy = self.links.counts(), busy_cpu_seconds()
        self.open_pools.append(pool)
        with TRACER.recording(trace) as events:
            started = now()
            pool.start()
            ended = now()
            TRACER.mark("start() returns")
        busy = busy_cpu_seconds() - busy
        sent = self._bytes(before, n, rtt)
        try:
            pool.close()
        finally:
            self.open_pools.remove(pool)
        p0, p1 = rec["provision"]
        ups = rec["bring_up"]
        last_up = max(end for _, end in ups.values())
        parts = {"a_connect": p1 - p0, "b_bring_up": max(end - begin for begin, end in ups.values()),
                 "c_worker_connect_setup": ended - last_up}
        parts["other_local"] = (ended - started) - sum(parts.values())
        phase_s = {}
        for rank, seen in phases.items():  # each phase lasts until the next one starts (the last: bring_up's end)
            ordered = sorted(seen.items(), key=lambda kv: kv[1]) + [("end", ups[rank][1])]
            phase_s[rank] = {ph: round(t2 - t1, 3) for (ph, t1), (_, t2) in itertools.pairwise(ordered)}
        return {"seconds": ended - started, "parts": parts, "bytes": sent, "busy_cpu_s": busy,
                "per_node_bring_up_s": [round(ups[r][1] - ups[r][0], 3) for r in sorted(ups)],
                "phase_s": phase_s, "sent_needs": rec["sent_needs"],
                "steps": steps_of(events, started) if trace else None}

    def attach(self, n: int, rtt: float, trace: bool) -> dict[str, Any]:
        """A child client starts a pool on the first ``n`` nodes and dies; ``ComputePool.attach`` is timed."""
        import sky_jupyter as sky

        name = f"bench-attach-{next(self._names)}"
        args = {"root": str(ROOT), "hosts": self.hosts(n, rtt), "key_file": str(self.cluster.key_file),
                "index_url": self.cluster.index_url, "name": name}
        self.detached.add(name)
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                              timeout=300, cwd=ROOT, start_new_session=True)
        if done.returncode != 0 or "ready" not in done.stdout:
            raise RuntimeError(f"the abandoning client failed ({done.returncode}):\n{done.stderr[-3000:]}")
        before = self.links.counts()
        with TRACER.recording(trace, part="attach") as events:
            started = now()
            pool = sky.ComputePool.attach(name, progress=lambda *event: None)
            ended = now()
            TRACER.mark("attach() returns")
        self.detached.discard(name)
        self.open_pools.append(pool)
        sent = self._bytes(before, n, rtt)
        try:
            pool.close()
        finally:
            self.open_pools.remove(pool)
        return {"seconds": ended - started, "bytes": sent, "steps": steps_of(events, started) if trace else None}

    def cleanup(self) -> None:
        import sky_jupyter as sky

        for pool in list(self.open_pools):
            with contextlib.suppress(Exception):
                pool.close()
        for name in list(self.detached):
            with contextlib.suppress(Exception):
                sky.ComputePool.release_detached(name)


# ---------------------------------------------------------------------------------------------------------------
# Rounds and figures


def key(kind: str, n: int, rtt: float) -> str:
    return f"{kind}_{n}_{round(rtt * 1000)}ms"


def run_rounds(bench: Bench, rounds: int, count_rtt: float) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {}
    # Unmeasured: builds this client's package archive, warms the page cache with the node tree and the imports.
    bench.reset(1)
    bench.start(1, 0.0, trace=False)
    bench.start(1, 0.0, trace=False)
    bench.attach(1, 0.0, trace=False)
    for r in range(rounds):
        load = os.getloadavg()[0]
        for n in (1, NODES):
            rtts = [RTT, 0.0] + ([count_rtt] if n == 1 and count_rtt else [])
            rtts = rtts[r % len(rtts):] + rtts[:r % len(rtts)]  # a different one goes first each round
            for rtt in rtts:
                bench.reset(n)
                trace = n == 1
                cold = bench.start(n, rtt, trace)
                warm = bench.start(n, rtt, trace)
                att = bench.attach(n, rtt, trace)
                for kind, run in (("cold", cold), ("warm", warm), ("attach", att)):
                    runs.setdefault(key(kind, n, rtt), []).append({**run, "load1": load})
                print(f"round {r + 1}/{rounds} n={n} rtt={rtt * 1e3:.0f} ms: cold {cold['seconds']:.2f} s, "
                      f"warm {warm['seconds']:.3f} s, attach {att['seconds']:.3f} s (load {load:.2f})", flush=True)
    return runs


def med(values: list[float]) -> float:
    return statistics.median(values)


def step_table(runs: dict[str, list[dict[str, Any]]], kind: str, count_rtt: float) -> list[dict[str, Any]]:
    """Per step of a 1-node run: median ms at 40 ms, at 0 ms (and at the cross-check RTT), and the round trips
    that the differences make."""
    def by_step(k: str) -> dict[tuple[str, str], list[float]]:
        found: dict[tuple[str, str], list[float]] = {}
        for run in runs.get(k, ()):
            for part, step, dt in run["steps"] or ():
                found.setdefault((part, step), []).append(dt)
        return found

    s40, s0 = by_step(key(kind, 1, RTT)), by_step(key(kind, 1, 0.0))
    sx = by_step(key(kind, 1, count_rtt)) if count_rtt else {}
    order: list[tuple[str, str]] = []
    for table in (s40, s0, sx):
        order += [k for k in table if k not in order]
    rows = []
    for step in order:
        a, b, x = s40.get(step), s0.get(step), sx.get(step)
        row: dict[str, Any] = {"part": step[0], "step": step[1],
                               "ms_40": round(med(a) * 1e3, 1) if a else None,
                               "ms_0": round(med(b) * 1e3, 1) if b else None,
                               "round_trips": round((med(a) - med(b)) / RTT, 1) if a and b else None}
        if count_rtt:
            tag = f"{round(count_rtt * 1000)}"
            row[f"ms_{tag}"] = round(med(x) * 1e3, 1) if x else None
            row[f"round_trips_at_{tag}ms"] = round((med(x) - med(b)) / count_rtt, 1) if x and b else None
        rows.append(row)
    return rows


PARTS = ("a_connect", "b_bring_up", "c_worker_connect_setup", "other_local")


def figures(runs: dict[str, list[dict[str, Any]]], count_rtt: float) -> dict[str, Any]:
    def secs(k: str) -> float:
        return med([r["seconds"] for r in runs[k]])

    def part(k: str, name: str) -> float:
        return med([r["parts"][name] for r in runs[k]])

    seconds = {k: round(secs(k), 3) for k in runs}
    cold1, cold4 = key("cold", 1, RTT), key("cold", NODES, RTT)
    ratio40 = secs(cold4) / secs(cold1)
    ratio0 = secs(key("cold", NODES, 0.0)) / secs(key("cold", 1, 0.0))
    tag = f"{round(count_rtt * 1000)}ms"

    def round_trips(kind: str) -> dict[str, Any]:
        k40, k0, kx = key(kind, 1, RTT), key(kind, 1, 0.0), key(kind, 1, count_rtt)
        out: dict[str, Any] = {}
        for name in PARTS:
            out[name] = {"s_40": round(part(k40, name), 3), "s_0": round(part(k0, name), 3),
                         "round_trips": round((part(k40, name) - part(k0, name)) / RTT, 1),
                         "round_trips_paired_per_round": [round((x["parts"][name] - y["parts"][name]) / RTT, 1)
                                                          for x, y in zip(runs[k40], runs[k0])]}
            if count_rtt:
                out[name][f"s_{tag}"] = round(part(kx, name), 3)
                out[name][f"round_trips_at_{tag}"] = round((part(kx, name) - part(k0, name)) / count_rtt, 1)
                out[name][f"round_trips_at_{tag}_paired_per_round"] = [
                    round((x["parts"][name] - y["parts"][name]) / count_rtt, 1) for x, y in zip(runs[kx], runs[k0])]

        def bc(k: str) -> float:
            return part(k, "b_bring_up") + part(k, "c_worker_connect_setup")

        out["b_plus_c"] = round((bc(k40) - bc(k0)) / RTT, 1)
        out["total"] = round((secs(k40) - secs(k0)) / RTT, 1)
        if count_rtt:
            out[f"b_plus_c_at_{tag}"] = round((bc(kx) - bc(k0)) / count_rtt, 1)
            out[f"total_at_{tag}"] = round((secs(kx) - secs(k0)) / count_rtt, 1)
        return out

    rt = {kind: round_trips(kind) for kind in ("cold", "warm")}
    attach_rt: dict[str, Any] = {"round_trips": round((secs(key("attach", 1, RTT)) - secs(key("attach", 1, 0.0)))
                                                      / RTT, 1)}
    if count_rtt:
        attach_rt[f"round_trips_at_{tag}"] = round(
            (secs(key("attach", 1, count_rtt)) - secs(key("attach", 1, 0.0))) / count_rtt, 1)

    def per_node_bytes(k: str) -> dict[str, Any]:
        ups = [b[0] for r in runs[k] for b in r["bytes"]]
        downs = [b[1] for r in runs[k] for b in r["bytes"]]
        return {"up_median": int(med(ups)), "down_median": int(med(downs)), "up_max": max(ups),
                "down_max": max(downs)}

    warm1, warm4 = secs(key("warm", 1, RTT)), secs(key("warm", NODES, RTT))
    att1, att4 = secs(key("attach", 1, RTT)), secs(key("attach", NODES, RTT))
    bc40 = rt["cold"]["b_plus_c"]
    rt_goal: dict[str, Any] = {"figure": "sequential round trips of one node's bootstrap, (b)+(c), cold",
                               "value": bc40, "goal": f"<= {GOAL_ROUND_TRIPS}", "met": bc40 <= GOAL_ROUND_TRIPS}
    if count_rtt:  # the same count with 5x the signal: judged on it (see the notes)
        bcx = rt["cold"][f"b_plus_c_at_{tag}"]
        rt_goal.update({f"value_at_{tag}": bcx, "met_at_40ms": bc40 <= GOAL_ROUND_TRIPS,
                        "met": bcx <= GOAL_ROUND_TRIPS, "judged_on": f"the {tag} cross-check"})
    goals = [
        {"figure": f"cold {NODES} nodes / cold 1 node at 40 ms", "value": round(ratio40, 3),
         "goal": f"<= {GOAL_RATIO}", "met": ratio40 <= GOAL_RATIO},
        rt_goal,
        {"figure": "warm start of a new pool, 1 node, 40 ms (s)", "value": round(warm1, 3),
         "goal": f"< {GOAL_WARM_S}", "met": warm1 < GOAL_WARM_S},
        {"figure": f"warm start of a new pool, {NODES} nodes, 40 ms (s)", "value": round(warm4, 3),
         "goal": f"< {GOAL_WARM_S}", "met": warm4 < GOAL_WARM_S},
        {"figure": "attach after the client died, 1 node, 40 ms (s)", "value": round(att1, 3),
         "goal": f"< {GOAL_ATTACH_S}", "met": att1 < GOAL_ATTACH_S},
        {"figure": f"attach after the client died, {NODES} nodes, 40 ms (s)", "value": round(att4, 3),
         "goal": f"< {GOAL_ATTACH_S}", "met": att4 < GOAL_ATTACH_S},
    ]
    needs = [x for k in (cold1, cold4) for r in runs[k] for x in r["sent_needs"]]
    return {
        "goals": goals,
        "goal_met": all(g["met"] for g in goals),
        "seconds_median": seconds,
        "cold_seconds_40ms": {"1_node": seconds[cold1], f"{NODES}_nodes": seconds[cold4],
                              "ratio": round(ratio40, 3), "goal_ratio_at_most": GOAL_RATIO,
                              "met": ratio40 <= GOAL_RATIO},
        "cold_ratio_per_round_40ms": [round(x["seconds"] / y["seconds"], 3) for x, y in
                                      zip(runs[cold4], runs[cold1])],
        "cold_ratio_at_0ms": round(ratio0, 3),
        # The nodes share this machine's cores: C busy CPU seconds cannot take less than C / cpus of wall time.
        "cold_cpu_floor_s_40ms": {f"{n}": round(med([r["busy_cpu_s"] for r in runs[key("cold", n, RTT)]])
                                                / (os.cpu_count() or 1), 3) for n in (1, NODES)},
        "cold_per_node_bring_up_s_median_40ms": {
            f"{n}": round(med([s for r in runs[key("cold", n, RTT)] for s in r["per_node_bring_up_s"]]), 3)
            for n in (1, NODES)},
        "cold_phase_s_median_40ms": {f"{n}": _phase_medians(runs[key("cold", n, RTT)]) for n in (1, NODES)},
        "cold_client_sent_on_need_40ms": {
            what: {"times": sum(1 for x in needs if x["what"] == what),
                   "bytes_median": int(med([x["bytes"] for x in needs if x["what"] == what])),
                   "seconds_median": round(med([x["seconds"] for x in needs if x["what"] == what]), 3)}
            for what in sorted({x["what"] for x in needs})},
        "round_trips_1_node_cold": rt["cold"],
        "round_trips_1_node_warm": rt["warm"],
        "round_trips_1_node_attach": attach_rt,
        "steps_1_node_cold": step_table(runs, "cold", count_rtt),
        "steps_1_node_warm": step_table(runs, "warm", count_rtt),
        "steps_1_node_attach": step_table(runs, "attach", count_rtt),
        "bytes_per_node_40ms": {f"{kind}_{n}": per_node_bytes(key(kind, n, RTT))
                                for kind in ("cold", "warm", "attach") for n in (1, NODES)},
        "cold_parts_s_40ms": {f"{n}": {p: round(part(key("cold", n, RTT), p), 3) for p in PARTS}
                              for n in (1, NODES)},
        "machine_busy_cpu_s_median": {k: round(med([r["busy_cpu_s"] for r in v]), 2)
                                      for k, v in runs.items() if "busy_cpu_s" in v[0]},
    }


def _phase_medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    found: dict[str, list[float]] = {}
    for run in runs:
        for phases in run["phase_s"].values():
            for phase, s in phases.items():
                found.setdefault(phase, []).append(s)
    return {phase: round(med(v), 3) for phase, v in found.items()}


def print_tables(fig: dict[str, Any], count_rtt: float) -> None:
    tag = f"{round(count_rtt * 1000)}ms"
    print("\n== goals ==")
    for g in fig["goals"]:
        extra = ""
        if f"value_at_{tag}" in g:
            extra = (f"   (40 ms count; at {tag}: {g[f'value_at_{tag}']}; judged on {g['judged_on']}; at 40 ms "
                     f"it would be {'met' if g['met_at_40ms'] else 'NOT met'})")
        print(f"  {g['figure']:<62} {g['value']!s:>7}  goal {g['goal']:<5} "
              f"{'met' if g['met'] else 'NOT met'}{extra}")
    print("\n== seconds (median) ==")
    for k, v in sorted(fig["seconds_median"].items()):
        print(f"  {k:<22} {v:8.3f}")
    print(f"  cold ratio {NODES}/1 at 40 ms {fig['cold_seconds_40ms']['ratio']} (per round "
          f"{fig['cold_ratio_per_round_40ms']}), at 0 ms {fig['cold_ratio_at_0ms']}")
    print(f"  cold at 40 ms: per-node bring_up {fig['cold_per_node_bring_up_s_median_40ms']} s; machine CPU floor "
          f"(busy CPU s / cpus) {fig['cold_cpu_floor_s_40ms']} s")
    print(f"  cold phases (s, median per node) {fig['cold_phase_s_median_40ms']}")
    print(f"  client answers to ::sky-need (cold, 40 ms) {fig['cold_client_sent_on_need_40ms']}")
    for kind in ("cold", "warm"):
        rt = fig[f"round_trips_1_node_{kind}"]
        cross = f"  [cross-check (t{tag[:-2]} - t0) / {tag}]" if count_rtt else ""
        print(f"\n== round trips, 1 node {kind}: (t40 - t0) / 40 ms{cross} ==")
        for name in PARTS:
            p = rt[name]
            print(f"  {name:<24} {p['s_40']:7.3f} s @40  {p['s_0']:7.3f} s @0  {p['round_trips']:5.1f} RT  "
                  f"per round {p['round_trips_paired_per_round']}"
                  + (f"  [{p[f'round_trips_at_{tag}']:5.1f} RT]" if f"round_trips_at_{tag}" in p else ""))
        print(f"  (b)+(c) {rt['b_plus_c']} RT [{rt.get(f'b_plus_c_at_{tag}')}]; total {rt['total']} RT "
              f"[{rt.get(f'total_at_{tag}')}]")
    print(f"  attach: {fig['round_trips_1_node_attach']}")
    for kind in ("cold", "warm", "attach"):
        cross = f", [ms @{tag}, RT at {tag}]" if count_rtt else ""
        print(f"\n== steps, 1 node {kind}: ms @40, ms @0, RT{cross} ==")
        for row in fig[f"steps_1_node_{kind}"]:
            extra = (f"  [{row.get(f'ms_{tag[:-2]}')!s:>7} {row.get(f'round_trips_at_{tag}')!s:>5}]"
                     if count_rtt else "")
            print(f"  {row['part']:<6} {row['step'][:72]:<72} {row['ms_40']!s:>7} {row['ms_0']!s:>7} "
                  f"{row['round_trips']!s:>5}{extra}")
    print("\n== bytes per node at 40 ms (up = client -> node) ==")
    for k, v in fig["bytes_per_node_40ms"].items():
        print(f"  {k:<10} up {v['up_median']:>11,}  down {v['down_median']:>9,}")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count-rtt", type=float, default=COUNT_RTT,
                        help="RTT (s) of a third set of links for the 1-node round-trip cross-check; 0: none")
    parser.add_argument("--links-helper", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.links_helper:
        links_helper()
        return
    if os.geteuid() != 0:
        sys.exit("bench/bringup.py needs root: it starts sshd nodes in namespaces on overlay mounts")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up as for Ctrl-C
    count_rtt = args.count_rtt if args.count_rtt and args.count_rtt not in (RTT, 0.0) else 0.0

    from tests.fixtures.pkg_index import fill_index
    from tests.fixtures.rootfs import build_rootfs, rootfs_info
    from tests.fixtures.sshd_cluster import remove_tree, start_cluster

    rootfs = build_rootfs("bookworm")
    index_dir = fill_index()
    tmp = Path(tempfile.mkdtemp(prefix="bench-bringup-"))
    os.environ["SKY_JUPYTER_HOME"] = str(tmp / "sky_home")
    load_before = os.getloadavg()
    began = time.time()
    links = Links(__file__)
    try:
        from sky_jupyter.providers.ssh import _client_uv, package_archive

        install_trace_hooks()
        with start_cluster(NODES, tmp / "cluster", rootfs=rootfs) as cluster:
            cluster.attach_index(HelperIndex(links, index_dir, [cluster.bridge_addr, "127.0.0.1"]))  # type: ignore[arg-type]
            bench = Bench(cluster, links)
            bench.add_links((RTT, 0.0) + ((count_rtt,) if count_rtt else ()))
            try:
                runs = run_rounds(bench, args.rounds, count_rtt)
            finally:
                bench.cleanup()
    finally:
        links.stop()
        remove_tree(tmp)  # refuses to delete through a mount that stayed
    fig = figures(runs, count_rtt)
    print_tables(fig, count_rtt)
    uv = _client_uv()
    sent = fig["cold_client_sent_on_need_40ms"]
    cold_nodes = sum(len(r["bytes"]) for k in (key("cold", 1, RTT), key("cold", NODES, RTT)) for r in runs[k])
    uv_note = (f"This client's uv ({os.path.getsize(uv) if uv else 0:,} bytes) was uploaded in "
               f"{sent.get('uv', {}).get('times', 0)} of {cold_nodes} cold node bring-ups at 40 ms; otherwise each "
               "node fetched uv for its platform from the pool's index, which is on the cluster bridge here (the "
               "nodes' own network), not behind the slow link.")
    report("bringup", {
        "what": "ComputePool.start() of fresh bookworm rootfs SSH nodes through per-node user-space delaying proxies "
                "(medians of interleaved rounds); warm starts and attach after a dead client",
        "conditions": {
            "rounds": args.rounds, "rtt_s": RTT, "rate_bps": RATE_BPS, "baseline": "the same proxies with rtt=0",
            "count_rtt_s": count_rtt or None, "rootfs": str(rootfs), "node_python": rootfs_info(rootfs).get("python"),
            # 1-minute load averages; the ones taken during the rounds include this bench's own processes.
            "load1_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "load1_at_round_start": sorted({round(r["load1"], 2) for v in runs.values() for r in v}),
            "minutes": round((time.time() - began) / 60, 1),
        },
        "notes": [
            "Round trips: (median at 40 ms - median at 0 ms) / 0.040 s, same proxy and rate at both; a part's "
            "count is the latency it waits for in sequence. (a) = SSH.provision (TCP, transport, auth, hostname); "
            "(b) = SSH.bring_up (one SSH command: bootstrap + worker start); (c) = the rest of start() (direct-tcpip "
            "to the worker, handshake, head-port task, setup call); other_local = before/between them (local). "
            "The *_at_200ms figures are the same count against links of 200 ms RTT (1 node only): node-side CPU "
            "noise (the venv and pip phases vary by 50-100 ms between runs) is 1-2.5 round trips at 40 ms, "
            "0.25-0.5 at 200 ms; the round-trip goal is judged on the 200 ms count when it was measured "
            "(goals[1]: value = the 40 ms count, value_at_200ms, met_at_40ms).",
            "steps_*: marks from wrappers around paramiko (start_client, auth_publickey, open_channel, "
            "exec_command), the bring-up's output lines, SSH._send_needs, FrameIO.recv_json and the pool's setup "
            "call (benchmark-only wrappers); each step runs from the previous mark to its own.",
            f"Cold bytes up: this client's sky_jupyter package archive ({len(package_archive()[1]):,} bytes) and "
            f"the bootstrap payload (env file, script, worker config). {uv_note} cloudpickle comes from that "
            "index too.",
            "The package index and the links run in a helper process (the index as another machine's work, the "
            "links' pacing free of this client's GIL). Nodes, proxies, index and client share this machine's "
            "cores (machine_busy_cpu_s_median counts every process on it, other test suites included): a 4-node "
            f"cold start that needs C CPU seconds cannot take less than C / {os.cpu_count()} s here, however "
            "parallel it is.",
            "The proxies terminate TCP: sshd's segments are acknowledged by the proxy's kernel on the bridge, not "
            "across the delayed link, and the upload is paced at the rate from its first byte (no slow start). "
            "The first channel opened on a fresh SSH connection (provision's session; attach's direct-tcpip) waits "
            "~40 ms at 0 ms RTT too: sshd's socket still has Nagle on (TCP_NODELAY comes with the first session) "
            "and its confirmation waits for the delayed ACK of the small packet it sent after auth (checked by "
            "hand: gone with `ip route ... quickack 1` on the bridge route). With latency that wait overlaps the "
            "link's, so that step reads about 1 round trip low in (a) and attach; (b) and (c) use a connection "
            "past it.",
        ],
        **fig,
        "samples": {k: [{kk: vv for kk, vv in r.items() if kk != "steps"} for r in v] for k, v in runs.items()},
    })


if __name__ == "__main__":
    main()
