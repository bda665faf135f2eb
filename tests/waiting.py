"""Waiting in tests: poll a condition until a deadline instead of sleeping a fixed time and hoping it held.

A fixed sleep is too long on an idle machine and too short on a loaded one (CI has two cores); a deadline is only
reached when something is wrong.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.02,
             what: str = "the condition") -> T:
    """Call ``predicate`` until it returns something truthy, and return that. Past ``timeout`` seconds (after one
    last call), fail with an AssertionError that names ``what`` was awaited and for how long. Exceptions from
    ``predicate`` are not caught: a check that breaks fails at once."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        value = predicate()
        if value:
            return value
        now = time.monotonic()
        if now >= deadline:
            raise AssertionError(f"waited {now - started:.1f} s for {what}; it did not happen (last: {value!r})")
        time.sleep(min(interval, deadline - now))
