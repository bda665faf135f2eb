"""Bounded retries for EC2's eventual consistency.

EC2's API is eventually consistent: a security group, key pair or instance that one call just created can be
unknown to the next call for a few seconds (``InvalidGroup.NotFound`` from AuthorizeSecurityGroupIngress right
after CreateSecurityGroup, ``InvalidInstanceID.NotFound`` from DescribeInstances right after RunInstances, ...).
AWS's advice is to retry such calls with a backoff for a bounded time; :func:`eventually` does that at each call
site that follows a create. botocore's own retries do not cover these codes (they are not throttling or transient
errors for botocore), and must not: elsewhere the same code means "really gone" (an instance terminated an hour
ago), which the teardown counts as terminated.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection
from typing import TypeVar

from botocore.exceptions import ClientError

from .common import error_code

T = TypeVar("T")

#: "Not found" codes that, right after the create that made the resource, mean "not visible yet".
NOT_YET_VISIBLE = frozenset({
    "InvalidGroup.NotFound",
    "InvalidSecurityGroupID.NotFound",
    "InvalidKeyPair.NotFound",
    "InvalidInstanceID.NotFound",
})


def eventually(call: Callable[[], T], codes: Collection[str] = NOT_YET_VISIBLE, deadline: float = 60.0, *,
               first: float = 0.5, most: float = 5.0,
               on_retry: Callable[[ClientError, float], None] | None = None,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """``call()``, called again while it raises a :class:`ClientError` whose code is in ``codes``, for at most
    ``deadline`` seconds after the first try; the last such error propagates once the time is up (any other
    error at once).

    The waits double from ``first`` up to ``most`` seconds, each with jitter (50-100 % of its nominal length), and
    never run past the deadline. ``on_retry(error, wait)`` is told about each retry (for a progress line).
    """
    end = clock() + max(0.0, deadline)
    delay = max(0.0, first)
    while True:
        try:
            return call()
        except ClientError as exc:
            if error_code(exc) not in codes:
                raise
            left = end - clock()
            if left <= 0:
                raise
            wait = min(left, delay * (0.5 + random.random() / 2))
            if on_retry is not None:
                on_retry(exc, wait)
            sleep(wait)
            delay = min(max(most, 0.0), delay * 2 if delay else 0.01)
