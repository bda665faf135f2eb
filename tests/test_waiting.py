"""The tests' own wait helper (tests/waiting.py): it returns what the condition gave, and a wait that never ends
fails naming what it waited for."""

from __future__ import annotations

import threading

import pytest

from tests.waiting import wait_for

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_returns_the_first_truthy_value_once_the_condition_holds():
    ready = threading.Event()
    threading.Timer(0.05, ready.set).start()
    calls: list[int] = []

    def check() -> int:
        calls.append(1)
        return len(calls) if ready.is_set() else 0

    assert wait_for(check, timeout=30, what="the event") == len(calls) >= 1
    assert wait_for(lambda: "now", timeout=0) == "now"  # a condition already true is not waited for


def test_a_condition_that_never_holds_fails_naming_it_and_the_time_waited():
    with pytest.raises(AssertionError, match=r"waited \d+\.\d s for the marker file; it did not happen \(last: ''\)"):
        wait_for(lambda: "", timeout=0.2, what="the marker file")


def test_an_error_in_the_condition_is_not_swallowed():
    def broken() -> bool:
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        wait_for(broken, timeout=30)
