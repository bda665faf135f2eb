"""What every provider shares: running per-node work in parallel, and the default bootstrap plan."""

from __future__ import annotations

import threading
import time

import sky_jupyter as sky
from sky_jupyter.providers.base import in_parallel

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_in_parallel_returns_values_and_exceptions_in_order():
    def fail() -> int:
        raise ValueError("node 1 broke")

    results = in_parallel([lambda: 0, fail, lambda: 2])
    assert results[0] == 0 and isinstance(results[1], ValueError) and results[2] == 2
    assert in_parallel([]) == []
    assert isinstance(in_parallel([fail])[0], ValueError)


def test_in_parallel_runs_nodes_at_once():
    barrier = threading.Barrier(3, timeout=5)  # deadlocks (BrokenBarrierError) if they ran one after another
    start = time.monotonic()
    assert in_parallel([lambda: barrier.wait() >= 0] * 3) == [True, True, True]
    assert time.monotonic() - start < 5


def test_default_plan_holds_only_the_plugin_phases():
    plan = sky.Local().plan(sky.Image(env={"A": "1"}), [("hf", "echo login")])
    assert [(p.name, p.script) for p in plan.phases] == [("hf", "echo login")]
    assert plan.image.environ == {"A": "1"}
