"""ComputePool's Skyward arguments: Spec fallback chains and selection, max_hourly_cost, allocation, ttl,
default_compute_timeout, provision_timeout, and what is refused."""

from __future__ import annotations

import time

import pytest

import sky_jupyter as sky
from tests.waiting import wait_for

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


@sky.compute
def nap(seconds: float) -> str:
    time.sleep(seconds)
    return "awake"


def aws(**kw):
    pytest.importorskip("boto3")
    return sky.AWS(region="us-east-1", ssh_cidr="203.0.113.7/32", **kw)  # builds a client; contacts nothing


def test_a_spec_that_cannot_start_falls_back_to_the_next(tmp_path, a_key_file):
    unreachable = sky.SSH(["nobody@127.0.0.1:9"], key_file=a_key_file, connect_timeout=2)  # nothing listens
    with sky.ComputePool(sky.Spec(provider=unreachable, nodes=1), sky.Spec(provider=sky.Local(root=tmp_path),
                                                                           nodes=2),
                         name="fallback") as pool:
        assert pool.provider.name == "local" and len(pool.workers) == 2
        assert nap(0) >> pool == "awake"


@pytest.fixture
def a_key_file(tmp_path):
    """A private key for the SSH provider's checks (the host it is for never answers)."""
    import subprocess

    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


def test_cheapest_first_and_a_cost_ceiling(tmp_path):
    big, small = sky.Spec(provider=aws(), accelerator="A100", nodes=2), sky.Spec(provider=aws(), accelerator="T4")
    local = sky.Spec(provider=sky.Local(root=tmp_path))
    pool = sky.ComputePool(big, small, local, selection="cheapest", name="cheap")
    assert pool._candidates() == [small, big, local]  # priced ones cheapest first; unknown (free) last
    assert sky.ComputePool(big, small, local, name="ordered")._candidates() == [big, small, local]
    capped = sky.ComputePool(big, small, max_hourly_cost=0.1, name="capped")
    with pytest.raises(sky.ConfigError, match=r"max_hourly_cost=\$0.1/h: every spec costs more"):
        capped.start()  # refused before anything is started
    assert not capped.running


def test_allocation_sets_the_market_and_provision_timeout_the_boot_wait():
    pool = sky.ComputePool(aws(), allocation="spot-if-available", provision_timeout=90, name="market")
    assert (pool.provider.spot, pool.provider.on_demand_fallback, pool.provider.boot_timeout) == (True, True, 90)
    pool = sky.ComputePool(aws(spot=True), allocation="on-demand", name="market2")
    assert pool.provider.spot is False


def test_ttl_shuts_the_pool_down_and_default_compute_timeout_bounds_every_task(tmp_path):
    with sky.ComputePool(sky.Local(root=tmp_path), default_compute_timeout=1, name="bounded") as pool:
        with pytest.raises(TimeoutError, match="ran longer than its timeout of 1 s"):
            nap(30) >> pool
        assert nap(0) >> pool == "awake"
    pool = sky.ComputePool(sky.Local(root=tmp_path), ttl=1.5, name="short-lived").start()
    wait_for(lambda: not pool.running, timeout=15, what="the pool to shut down after its ttl of 1.5 s")


def test_what_is_not_supported_says_so():
    with pytest.raises(sky.ConfigError, match=r"nodes=\(1, 4\): a range of nodes \(autoscaling\) is not supported"):
        sky.ComputePool(sky.Local(), nodes=(1, 4))
    with pytest.raises(sky.ConfigError, match="allocation must be one of"):
        sky.Spec(provider=sky.Local(), allocation="cheap")
    with pytest.raises(sky.ConfigError, match="selection must be 'first' or 'cheapest'"):
        sky.ComputePool(sky.Spec(provider=sky.Local()), selection="fastest")
    with pytest.raises(sky.ConfigError, match="architecture must be"):
        sky.ComputePool(sky.Local(), architecture="riscv")


def test_skyward_style_pool_and_the_module_as_the_right_side(tmp_path):
    with sky.pool(sky.Local(root=tmp_path), nodes=2, name="as-sky"):
        assert nap(0) >> sky == "awake"  # the innermost pool entered with `with`
        assert nap(0) @ sky == ["awake", "awake"]
        assert sky.gather(nap(0), nap(0)) >> sky == ("awake", "awake")

    @sky.pool(provider=sky.Local(root=tmp_path), name="decorated")
    def main() -> str:
        return nap(0) >> sky

    assert main() == "awake"
    with pytest.raises(TypeError, match=r"needs a pool entered with `with sky.ComputePool"):
        nap(0) >> sky


@sky.compute
def slot_work(seconds: float, label: str) -> tuple[str, int, float, float]:
    import os
    import time

    started = time.time()
    print(f"{label} starts", flush=True)
    time.sleep(seconds)
    print(f"{label} ends", flush=True)
    return label, os.getpid(), started, time.time()


@sky.compute
def spin(started: str) -> None:
    """Say it started (a marker file), then run pure Python until interrupted: the interrupt lands at its next
    instruction."""
    open(started, "w").close()
    while True:
        pass


def test_worker_concurrency_runs_tasks_side_by_side_in_one_process(tmp_path, capsys):
    with sky.ComputePool(sky.Local(root=tmp_path), worker=sky.Worker(concurrency=3), name="slots") as pool:
        results = sky.gather(*(slot_work(1.0, f"t{i}") for i in range(3))) >> pool
        pids = {pid for _, pid, _, _ in results}
        assert len(pids) == 1  # one worker process...
        starts, ends = [s for *_, s, _ in results], [e for *_, e in results]
        assert max(starts) < min(ends)  # ...running the three at once
        out = capsys.readouterr().out
        assert all(f"t{i} starts" in out and f"t{i} ends" in out for i in range(3))
        # Each task's output is its own: no line mixes two tasks' text.
        import re

        assert all(re.fullmatch(r"t\d (starts|ends)", line) for line in out.splitlines() if line), out

        spinning = tmp_path / "spinning"
        call = pool.submit(spin(str(spinning)))
        wait_for(spinning.exists, what="the task to start in a slot")
        call.interrupt()
        with pytest.raises(KeyboardInterrupt):
            call.wait(10)
        assert slot_work(0, "after") >> pool
    with pytest.raises(sky.ConfigError, match="takes 'thread' or 'process', got 'fiber'"):
        sky.Worker(concurrency=2, executor="fiber")


@sky.compute
def burn(n: int) -> tuple[int, int, float, float]:
    import os
    import time

    started, total = time.time(), 0
    for i in range(n):  # pure Python: one interpreter lock per process
        total += i * i
    print(f"burned {n}", flush=True)
    return os.getpid(), total, started, time.time()


def test_process_slots_run_pure_python_in_processes_of_their_own(tmp_path, capsys):
    with sky.ComputePool(sky.Local(root=tmp_path), worker=sky.Worker(concurrency=2, executor="process"),
                         name="forks") as pool:
        worker_pid = pool.workers[0].handle.pid
        first, second = sky.gather(burn(3_000_000), burn(3_000_000)) >> pool
        (pid_a, total, start_a, end_a), (pid_b, _, start_b, end_b) = first, second
        assert total == sum(i * i for i in range(3_000_000))
        assert len({pid_a, pid_b, worker_pid}) == 3  # two children of the one worker
        assert max(start_a, start_b) < min(end_a, end_b)  # side by side
        assert capsys.readouterr().out.count("burned 3000000") == 2  # their output, through their own pipes

        @sky.compute
        def fails() -> None:
            raise KeyError("from a child")

        with pytest.raises(KeyError, match="from a child") as info:
            fails() >> pool
        assert "raise KeyError" in str(info.value.__cause__)  # the child's traceback came back

        spinning = tmp_path / "spinning"
        call = pool.submit(spin(str(spinning)))
        wait_for(spinning.exists, what="the task to start in a child process")
        call.interrupt()
        with pytest.raises(KeyboardInterrupt):
            call.wait(10)
        assert burn(10) >> pool
