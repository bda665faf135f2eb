"""``%sky gc``: instances and security groups this tool tagged whose pool is gone, found and removed."""

from __future__ import annotations

import datetime as _dt
import sys
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from ... import state
from ...errors import ProvisionError
from . import teardown
from .common import (
    LIVE_STATES,
    TAG_LAUNCH,
    TAG_OWNER,
    TAG_POOL,
    client_for,
    default_owner,
    error_code,
    session_for,
    tag_map,
)


def _live_pool_owns(instance: dict[str, Any]) -> bool:
    """Does a live pool of this client (state file + running client process) own the instance?"""
    tags = tag_map(instance.get("Tags"))
    recorded = state.load(tags.get(TAG_POOL, "")) if tags.get(TAG_POOL) else None
    if not recorded or not state.pid_alive(recorded.client_pid):
        return False
    cloud = recorded.cloud
    ids = set(cloud.get("instances") or ()) | {h.get("instance_id") for h in recorded.hosts}
    return instance["InstanceId"] in ids or tags.get(TAG_LAUNCH) in set(cloud.get("launches") or ())


def _confirm(question: str) -> bool | None:
    """Ask on the terminal or the notebook; None when nobody can answer."""
    if not (sys.stdin is not None and sys.stdin.isatty()) and "ipykernel" not in sys.modules:
        return None
    try:
        return input(question).strip().lower() in ("y", "yes")
    except (EOFError, OSError, NotImplementedError, RuntimeError):
        return None


def gc(region: str | None = None, interactive: bool = False, dry_run: bool = False, *,
       session: boto3.Session | None = None, owner: str | None = None, timeout: float = 600.0,
       poll: float = 5.0) -> list[str]:
    """Find instances this tool tagged (for this client's owner) whose pool is gone, show them, terminate them.

    A pool is gone when its state file is missing, its client process is dead, or it does not list the
    instance. With ``interactive`` the user confirms first (on a terminal or in a notebook); ``dry_run`` only
    shows. Security groups left by gone pools are deleted too. Returns the ids terminated (or, dry, found).
    Waits up to ``timeout`` seconds for the terminations (asking every ``poll`` seconds); instances EC2 no longer
    knows count as terminated. An AWS error is a :class:`~sky_jupyter.errors.ProvisionError` naming the region,
    the instances and what to do next.
    """
    session, region = session_for(region, session)
    ec2 = client_for(session, "ec2", region)
    owner = owner or default_owner()
    try:
        pages = ec2.get_paginator("describe_instances").paginate(Filters=[
            {"Name": "tag-key", "Values": [TAG_POOL]},
            {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
        tagged = [i for page in pages for r in page["Reservations"] for i in r["Instances"]]
    except (ClientError, BotoCoreError) as exc:
        raise ProvisionError(f"sky gc ({region}): listing the instances this tool tagged failed "
                             f"({teardown.why(exc)}); it needs ec2:DescribeInstances in {region}. Nothing was "
                             f"terminated.") from None
    mine = [i for i in tagged if tag_map(i.get("Tags")).get(TAG_OWNER) == owner]
    orphans = [i for i in mine if not _live_pool_owns(i)]
    others = len(tagged) - len(mine)
    if not orphans:
        print(f"sky gc ({region}): no orphaned instances of {owner}"
              + (f" ({others} of other owners left alone)" if others else "") + ".")
    else:
        print(f"sky gc ({region}): {len(orphans)} instance(s) of {owner} whose pool is gone:")
        for inst in orphans:
            tags = tag_map(inst.get("Tags"))
            launched = inst.get("LaunchTime")
            when = launched.strftime("%Y-%m-%d %H:%M") if isinstance(launched, _dt.datetime) else "?"
            zone = inst.get("Placement", {}).get("AvailabilityZone", "")
            pool = tags.get(TAG_POOL)
            attachable = "  (its kernel died: %sky attach " + str(pool) + " would take it over)" \
                if pool and state.load(pool) is not None else ""
            print(f"  {inst['InstanceId']}  {inst.get('InstanceType', '?'):<14} {inst['State']['Name']:<9} "
                  f"pool={pool}  launched {when}  {zone}{attachable}")
        if others:
            print(f"  ({others} instance(s) of other owners left alone)")
    ids = [i["InstanceId"] for i in orphans]
    if dry_run:
        return ids
    if ids and interactive:
        answer = _confirm(f"Terminate these {len(ids)} instance(s)? [y/N] ")
        if answer is None:
            print("nobody can confirm here; run sky_jupyter.providers.aws.gc(interactive=False) to terminate them.")
            return []
        if not answer:
            print("nothing terminated.")
            return []
    if ids:
        gone = teardown.terminate(ec2, ids, region=region, timeout=timeout, poll=poll, say=print)
        done = [i for i in ids if i not in gone]
        if done:
            print(f"terminated {', '.join(done)}.")
    _gc_groups(ec2, owner, region)
    return ids


def _gc_groups(ec2: Any, owner: str, region: str) -> None:
    """Delete security groups of this owner's gone pools that no instance uses any more. Groups cost nothing:
    one that cannot be listed or deleted now is reported, not raised."""
    try:
        groups = ec2.describe_security_groups(Filters=[{"Name": f"tag:{TAG_OWNER}", "Values": [owner]}])
    except (ClientError, BotoCoreError) as exc:
        print(f"sky gc ({region}): security groups not listed ({teardown.why(exc)}); none deleted.")
        return
    for group in groups["SecurityGroups"]:
        tags = tag_map(group.get("Tags"))
        recorded = state.load(tags.get(TAG_POOL, "")) if tags.get(TAG_POOL) else None
        if recorded and state.pid_alive(recorded.client_pid) and \
                group["GroupId"] in (recorded.cloud.get("security_groups") or ()):
            continue
        try:
            users = ec2.describe_instances(Filters=[{"Name": "instance.group-id", "Values": [group["GroupId"]]},
                                                    {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
            if any(r["Instances"] for r in users["Reservations"]):
                continue
            ec2.delete_security_group(GroupId=group["GroupId"])
            print(f"deleted security group {group['GroupId']} ({group.get('GroupName', '')}).")
        except ClientError as exc:
            if error_code(exc) in ("InvalidGroup.NotFound", "InvalidSecurityGroupID.NotFound"):
                continue
            print(f"security group {group['GroupId']} not deleted yet ({error_code(exc)}); run gc again later.")
        except BotoCoreError as exc:
            print(f"security group {group['GroupId']} not deleted yet ({exc}); run gc again later.")
