"""Termination that always finishes, whatever state the instances are in.

:func:`terminate` asks EC2 to terminate instances and waits until each one is ``terminated`` or unknown to EC2.
EC2 forgets terminated instances after about an hour, so an id it does not know (``InvalidInstanceID.NotFound``
from TerminateInstances, or missing from DescribeInstances) counts as terminated; except an instance launched
moments ago, which EC2 may not show yet (eventual consistency): such ids (``recent``) are asked for again until
``settle`` seconds have passed. Instances still ``pending``, ``running``, ``stopping`` or ``stopped`` while it waits
are asked to terminate again every few polls (botocore's ``instance_terminated`` waiter gives up at once on
``pending`` or ``stopping``; this does not). Any AWS error, and a wait that runs out, becomes a
:class:`~sky_jupyter.errors.ProvisionError` naming the instances, the region and what to do next.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from ...errors import ProvisionError
from .common import error_code, error_message

#: What TerminateInstances answers for ids EC2 does not know (any more).
UNKNOWN_IDS = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})


def next_step(region: str, ids: Iterable[str]) -> str:
    """What the user can do about instances this tool could not terminate."""
    listed = " ".join(sorted(ids))
    return (f"They may still be running and billing: terminate them in the EC2 console ({region}) or with "
            f"`aws ec2 terminate-instances --region {region} --instance-ids {listed}`; `%sky gc` finds whatever this "
            f"tool tagged and left behind.")


def why(exc: BaseException) -> str:
    """An AWS error in a few words: ``Code: message`` for EC2's answers, the text of anything else."""
    if isinstance(exc, ClientError):
        return f"{error_code(exc)}: {error_message(exc)}"
    return str(exc) or type(exc).__name__


def failure(what: str, exc: BaseException | str, region: str, ids: Collection[str], pool: str | None = None
            ) -> ProvisionError:
    """The error the user sees when terminating ``ids`` failed: what failed, EC2's answer, the next step."""
    who = f"pool {pool!r}: " if pool else ""
    detail = exc if isinstance(exc, str) else why(exc)
    return ProvisionError(f"{who}{what} {', '.join(sorted(ids))} in {region} failed ({detail}). "
                          f"{next_step(region, ids)}")


def existing(ec2: Any, ids: Collection[str]) -> dict[str, dict[str, Any]]:
    """id -> description for those of ``ids`` EC2 knows now. A filter, unlike ``InstanceIds=``, does not fail on
    ids EC2 does not know: they are simply missing from the answer."""
    if not ids:
        return {}
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "instance-id", "Values": sorted(ids)}])
    return {i["InstanceId"]: i for page in pages for r in page["Reservations"] for i in r["Instances"]
            if i["InstanceId"] in ids}


def terminate(ec2: Any, ids: Iterable[str], *, region: str, pool: str | None = None, wait: bool = True,
              timeout: float = 600.0, poll: float = 5.0, recent: Collection[str] = (), settle: float = 60.0,
              say: Callable[[str], None] | None = None) -> list[str]:
    """Terminate ``ids`` and (with ``wait``) wait until each is terminated or unknown to EC2.

    Returns the ids EC2 did not know (counted as terminated). ``recent``: ids launched moments ago, which EC2 may
    not show yet; they are asked for again for ``settle`` seconds before they count as gone. Raises
    :class:`ProvisionError` (ids, region, next step) when EC2 refuses or the instances are not terminated within
    ``timeout`` seconds.
    """
    todo = sorted(set(ids))
    if not todo:
        return []
    start = time.monotonic()
    deadline, settled = start + timeout, start + settle
    resend = max(6 * poll, 0.05)  # ask again for instances that still are not shutting down
    sent: dict[str, float] = {}
    gone: set[str] = set()

    def send(batch: list[str]) -> None:
        now = time.monotonic()
        sent.update(dict.fromkeys(batch, now))
        try:
            try:
                ec2.terminate_instances(InstanceIds=batch)
            except ClientError as exc:
                code = error_code(exc)
                if code == "IncorrectInstanceState":
                    return  # asked again on a later round
                if code not in UNKNOWN_IDS:
                    raise
                known = sorted(existing(ec2, batch))  # some ids are gone: terminate the others
                if known:
                    try:
                        ec2.terminate_instances(InstanceIds=known)
                    except ClientError as again:
                        if error_code(again) not in UNKNOWN_IDS | {"IncorrectInstanceState"}:
                            raise
        except (ClientError, BotoCoreError) as exc:
            raise failure("terminating", exc, region, batch, pool) from None

    send(todo)
    if not wait:
        return []
    pending = set(todo)
    states: dict[str, str] = {}
    while True:
        try:
            found = existing(ec2, pending)
        except (ClientError, BotoCoreError) as exc:
            raise failure("waiting for the termination of", exc, region, pending, pool) from None
        now = time.monotonic()
        for i in sorted(pending):
            description = found.get(i)
            if description is None:
                if i in recent and now < settled:
                    states[i] = "not visible yet"
                    continue
                gone.add(i)
                pending.discard(i)
            elif description["State"]["Name"] == "terminated":
                pending.discard(i)
            else:
                states[i] = str(description["State"]["Name"])
        if not pending:
            break
        if now >= deadline:
            left = ", ".join(f"{i} ({states.get(i, '?')})" for i in sorted(pending))
            raise failure("waiting for the termination of", f"still not terminated after {timeout:.0f} s: {left}",
                          region, pending, pool)
        again = [i for i in sorted(pending) if states.get(i) != "shutting-down" and now - sent.get(i, 0.0) >= resend]
        if again:
            send(again)
        time.sleep(max(0.0, min(poll, deadline - now)))
    if gone and say is not None:
        say(f"{', '.join(sorted(gone))}: unknown to EC2 (terminated a while ago), counted as terminated")
    return sorted(gone)
