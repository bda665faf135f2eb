"""The Python API on real worker processes (Local provider): results, errors, streaming, interrupts, faults."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

import sky_jupyter as sky
from sky_jupyter import protocol as P
from tests.waiting import wait_for


class CustomError(Exception):
    pass


class Unrebuildable(Exception):
    def __init__(self, a, b):  # pickles, but cannot be rebuilt from args
        super().__init__(f"{a}-{b}")


@sky.compute
def double(x: int) -> int:
    return 2 * x


@sky.compute
def whoami() -> tuple[int, int, int]:
    info = sky.instance_info()
    return info.rank, info.world_size, os.getpid()


@sky.compute
def fail(kind: str) -> None:
    if kind == "value":
        raise ValueError("bad value from the node")
    if kind == "custom":
        raise CustomError("custom failure")
    raise Unrebuildable(1, 2)


@sky.compute
def chatty(delay: float) -> float:
    print("first line", flush=True)
    time.sleep(delay)
    print("last line")
    return time.time()


@sky.compute
def sleeper(seconds: float, started: str = "") -> str:
    if started:  # a file the test waits for before it interrupts or kills the task
        open(started, "w").close()
    time.sleep(seconds)
    return "woke"


@sky.compute
def stubborn(seconds: float, started: str) -> str:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    open(started, "w").close()
    time.sleep(seconds)
    return "done"


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt here even in a pytest started with it ignored (a background job's lot)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_rshift_runs_on_one_node(local_pool):
    assert double(21) >> local_pool == 42


def test_matmul_runs_on_every_node_in_rank_order(local_pool):
    results = whoami() @ local_pool
    assert [r[0] for r in results] == [0, 1]
    assert {r[1] for r in results} == {2}
    assert len({r[2] for r in results}) == 2  # two distinct processes


def test_gather_and_chain_keep_order(local_pool):
    assert sky.gather(double(1), double(2), double(3)) >> local_pool == (2, 4, 6)
    assert (double(5) & double(6)) >> local_pool == (10, 12)
    assert (double(1) & double(2)) @ local_pool == [(2, 4), (2, 4)]


def test_local_runs_here():
    assert double.local(4) == 8
    assert double(4).local() == 8
    assert sky.instance_info().local


def test_remote_exception_keeps_type_and_traceback(local_pool):
    with pytest.raises(ValueError, match="bad value from the node") as info:
        fail("value") >> local_pool
    cause = info.value.__cause__
    assert isinstance(cause, sky.errors.RemoteTraceback)
    assert "in fail" in cause.tb and 'raise ValueError("bad value from the node")' in cause.tb
    assert any("node" in note for note in info.value.__notes__)


def test_exception_class_from_user_module_is_the_same_class(local_pool):
    with pytest.raises(CustomError):
        fail("custom") >> local_pool


def test_unrebuildable_exception_becomes_remote_error(local_pool):
    with pytest.raises(sky.RemoteError) as info:
        fail("other") >> local_pool
    assert info.value.type_name.endswith("Unrebuildable")
    assert "1-2" in info.value.message
    assert "Unrebuildable(1, 2)" in info.value.traceback


def test_errors_from_every_node_are_summarised(local_pool):
    with pytest.raises(ValueError) as info:
        fail("value") @ local_pool
    assert any("failed on 2 of 2 nodes" in note for note in info.value.__notes__)


def test_stdout_streams_while_the_task_runs(local_pool):
    seen: list[tuple[float, str]] = []
    call = local_pool.submit(chatty(1.5), sink=lambda kind, meta: seen.append((time.time(), meta["text"])))
    finished = call.wait()
    first = next(t for t, text in seen if "first line" in text)
    assert finished - first > 1.0, "the first line only arrived at the end"
    assert any("last line" in text for _, text in seen)


def test_interrupt_stops_remote_code_and_pool_keeps_working(local_pool, tmp_path):
    started = tmp_path / "started"
    call = local_pool.submit(sleeper(60, str(started)), node=local_pool.workers[0])
    wait_for(started.exists, what="the task to start on node 0")
    start = time.monotonic()
    call.interrupt()
    with pytest.raises(KeyboardInterrupt):
        call.wait(10)
    assert time.monotonic() - start < 2
    assert double(2) >> local_pool == 4


def test_keyboard_interrupt_while_waiting_reaches_the_node(local_pool, tmp_path, ctrl_c):
    started, sent = tmp_path / "started", []

    def ctrl_c_once_it_runs() -> None:
        wait_for(started.exists, what="the task to start on a node")
        sent.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=ctrl_c_once_it_runs, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        sleeper(30, str(started)) >> local_pool
    assert time.monotonic() - sent[0] < 5
    assert all(n.in_flight() == 0 for n in local_pool.workers)
    assert double(3) >> local_pool == 6


def test_code_ignoring_interrupt_gets_its_worker_restarted(tmp_path):
    with sky.ComputePool(nodes=1, interrupt_grace=1.0, name="test-restart") as pool:
        pool.workers[0].submit(P.CELL, {"code": "kept = 1"}).wait(10)
        ignoring = tmp_path / "ignoring"
        call = pool.submit(stubborn(60, str(ignoring)))
        wait_for(ignoring.exists, what="the task to ignore SIGINT")
        call.interrupt()
        with pytest.raises((KeyboardInterrupt, sky.WorkerLostError)) as info:
            call.wait(15)
        assert "restarted" in str(info.value)
        assert double(5) >> pool == 10
        with pytest.raises(NameError):
            pool.workers[0].submit(P.CELL, {"code": "kept"}).wait(10)
        assert any("namespace" in n for n in pool.workers[0].notices)


def test_sigkill_names_the_node_and_next_task_works(tmp_path):
    with sky.ComputePool(nodes=1, name="test-kill") as pool:
        _, _, pid = whoami() >> pool
        started = tmp_path / "started"
        call = pool.submit(sleeper(30, str(started)))
        wait_for(started.exists, what="the task to start on node 0")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(sky.WorkerLostError, match=r"node 0 .*SIGKILL"):
            call.wait(10)
        _, _, new_pid = whoami() >> pool
        assert new_pid != pid
        assert double(4) >> pool == 8


def test_unpicklable_argument_is_named_before_anything_runs(local_pool):
    lock = threading.Lock()
    with pytest.raises(sky.SerializationError, match=r"argument 0 \(lock\)"):
        double(lock) >> local_pool


def test_large_results_travel_out_of_band(local_pool):
    np = pytest.importorskip("numpy")

    @sky.compute
    def make(n: int):
        import numpy

        return numpy.arange(n, dtype=numpy.float64)

    arr = make(2_000_000) >> local_pool
    assert arr.shape == (2_000_000,) and arr[-1] == 1_999_999
    assert (sky.compute(lambda a: float(a.sum()))(np.ones(1_000_000)) >> local_pool) == 1_000_000.0


def test_pool_not_started_is_a_clear_error():
    pool = sky.ComputePool(nodes=1)
    with pytest.raises(sky.SkyError, match="not running"):
        double(1) >> pool


def test_right_side_must_be_a_pool():
    with pytest.raises(TypeError, match="ComputePool"):
        double(1) >> 3


def test_exception_in_with_block_tears_down(sky_home):
    pids = []
    with pytest.raises(RuntimeError):
        with sky.ComputePool(nodes=2, name="test-teardown") as pool:
            pids = [n.handle.pid for n in pool.workers]
            raise RuntimeError("user code failed")
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or _zombie(pid)
    assert not (sky_home / "pools" / "test-teardown.json").exists()


def test_keyboard_interrupt_during_provisioning_leaves_nothing(sky_home, ctrl_c):
    """A plugin's bootstrap op interrupts the client while the pool is being built."""
    plugin = sky.Plugin.create("interrupter").with_bootstrap(
        lambda cluster: [f"kill -INT {os.getpid()}", "sleep 5"])
    before = _workers()
    with pytest.raises(KeyboardInterrupt):
        with sky.ComputePool(nodes=1, plugins=[plugin], name="test-kbi"):
            pytest.fail("the pool should not have started")
    assert _workers() == before
    assert not (sky_home / "pools" / "test-kbi.json").exists()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] == "Z"
    except OSError:
        return True


def _workers() -> set[int]:
    """This process's own worker processes (not another test run's on the same machine)."""
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read()
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            parent = int(stat[stat.rfind(")") + 2:].split()[1])
            if b"sky_jupyter.worker" in cmdline and parent == os.getpid() and not _zombie(int(entry)):
                pids.add(int(entry))
    return pids


# -- streaming gather and compute timeouts --------------------------------------------------------------------------
@sky.compute
def after(seconds: float, label: str) -> tuple[str, float]:
    import time

    time.sleep(seconds)
    return label, time.time()


def test_a_streaming_gather_yields_the_first_result_before_the_slowest_task_ends(local_pool):
    import time

    started = time.time()
    stream = sky.gather(after(2.0, "slow"), after(0.2, "fast"), stream=True, ordered=False) >> local_pool
    label, finished = next(stream)
    got_at = time.time()
    assert label == "fast" and got_at - started < 1.5, "the fast result waited for the slow one"
    label, finished = next(stream)
    assert label == "slow" and finished - started >= 2.0
    with pytest.raises(StopIteration):
        next(stream)
    ordered = sky.gather(after(0.6, "a"), after(0.1, "b"), stream=True) >> local_pool
    assert [label for label, _ in ordered] == ["a", "b"]  # in order, each as soon as those before it are done


def test_leaving_a_stream_early_interrupts_what_still_runs(local_pool):
    import time

    stream = sky.gather(after(0.1, "quick"), after(30, "long"), stream=True, ordered=False) >> local_pool
    assert next(stream)[0] == "quick"
    stream.close()  # the 30 s task is interrupted where it runs
    wait_for(lambda: not any(w.in_flight() for w in local_pool.workers), timeout=5,
             what="the long task to be interrupted when the stream was closed")
    assert after(0, "next") >> local_pool == ("next", pytest.approx(time.time(), abs=5))


def test_a_compute_timeout_interrupts_the_task_and_says_so(local_pool):
    import time

    @sky.compute(timeout=1)
    def stuck() -> str:
        time.sleep(60)
        return "never"

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"stuck ran longer than its timeout of 1 s on node \d .* interrupted"):
        stuck() >> local_pool
    assert time.monotonic() - started < 10
    with pytest.raises(TimeoutError):
        stuck() @ local_pool
    assert after(0, "still works") >> local_pool
    with pytest.raises(TypeError, match="positive number of seconds"):
        sky.compute(timeout=0)


# -- generator functions stream their items ------------------------------------------------------------------------
@sky.compute
def countdown(n: int, pause: float = 0.0, fail_at: int | None = None):
    import time

    for i in range(n, 0, -1):
        if i == fail_at:
            raise ValueError(f"stopped at {i}")
        print("yielding", i, flush=True)
        yield i, time.time()
        time.sleep(pause)


def test_a_generator_streams_its_items_as_they_are_yielded(local_pool, capsys):
    import time

    started = time.time()
    items = countdown(3, pause=0.7) >> local_pool
    first, _ = next(items)
    assert first == 3 and time.time() - started < 1.2  # not after the whole generator (about 2.1 s)
    assert [i for i, _ in items] == [2, 1]
    assert capsys.readouterr().out.count("yielding") == 3
    assert [[i for i, _ in part] for part in countdown(2) @ local_pool] == [[2, 1], [2, 1]]  # @: lists


def test_a_generator_error_comes_after_its_items_and_leaving_early_stops_it(local_pool):
    got = []
    with pytest.raises(ValueError, match="stopped at 2"):
        for i, _ in countdown(5, fail_at=2) >> local_pool:
            got.append(i)
    assert got == [5, 4, 3]
    items = countdown(100, pause=0.5) >> local_pool
    assert next(items)[0] == 100
    items.close()  # interrupts it on the worker
    wait_for(lambda: not any(w.in_flight() for w in local_pool.workers), timeout=5,
             what="the generator to be interrupted when its items were closed")
