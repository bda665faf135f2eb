"""``sky.AWS()``: EC2 instances started for a pool, then driven exactly like ``sky.SSH`` hosts.

Provisioning (:mod:`.provider`, with :mod:`.network` and :mod:`.prices`): the accelerator name maps to an instance
type (:mod:`sky_jupyter.accelerators`); the image is the AWS Deep Learning AMI found through its public SSM
parameter; the user's public key is imported as an EC2 key pair; a security group of the pool's own lets SSH in from
the caller's address only (/32) and all traffic between the pool's members; all nodes start in one call, hence in
one availability zone, spot first when asked, on demand when spot is refused and that is allowed, the next zone when
a zone lacks capacity or does not offer the type (``Unsupported``). Before launching, the vCPUs asked for plus those
running instances use are compared with the EC2 quota of the instance type's family (Service Quotas; skipped, with a
note, when it cannot be read); quota errors stop at once and name the quota to raise. A spot request refused for
want of the Spot service-linked role says how to create it (and goes on demand when allowed). Calls that follow a
create retry, for a bounded time, the "not found" EC2 answers while it catches up (:mod:`.retry`). Instances require
IMDSv2, terminate
when shut down (which backs the workers' dead-man switch: a node whose client went silent powers itself off, and so
stops billing), and carry the tags ``sky-jupyter:pool``, ``sky-jupyter:owner`` and ``sky-jupyter:launch``.

Everything after provisioning (SSH connections, host-key pinning, bootstrap, workers, logs) is the SSH provider's
code: :class:`AWS` holds an :class:`~sky_jupyter.providers.ssh.SSH` for its instances and hands them to it once they
answer SSH, so there is one code path for both.

Teardown always happens: a failed or interrupted launch terminates what it started before the error propagates;
``release`` (pool exit, exceptions, ``%sky down``) terminates and waits; instances still alive at interpreter exit
are terminated by an ``atexit`` hook; instance ids are written to the pool's state file before anything waits on
them, so :func:`gc` (``%sky gc``, :mod:`.gc`) finds whatever a killed client left behind. Termination always
finishes (:mod:`.teardown`): instances EC2 no longer knows count as terminated, waits cope with pending or stopping
instances, and every AWS error reaching the user is a ``ProvisionError`` naming the instances, the region and what
to do next.

IAM permissions used: ec2:RunInstances, ec2:CreateTags, ec2:DescribeInstances, ec2:TerminateInstances,
ec2:DescribeSubnets, ec2:DescribeInstanceTypeOfferings, ec2:CreateSecurityGroup,
ec2:AuthorizeSecurityGroupIngress, ec2:DescribeSecurityGroups, ec2:DeleteSecurityGroup, ec2:ImportKeyPair,
ec2:DescribeKeyPairs, ec2:GetConsoleOutput, ssm:GetParameter (not with ``ami=``), ec2:DescribeImages (only with
``disk_gib=``), ec2:DescribeSpotPriceHistory (only with ``spot=True``), servicequotas:GetServiceQuota and
ec2:DescribeInstanceTypes (the quota check; without them it is skipped, with a note).
"""

from __future__ import annotations

from . import network
from .common import (
    DLAMI_PARAMETER,
    TAG_LAUNCH,
    TAG_OWNER,
    TAG_POOL,
    UBUNTU_PARAMETER,
    CapacityError,
    QuotaError,
    default_owner,
)
from .gc import gc
from .network import public_address
from .prices import quota_for
from .provider import AWS

__all__ = [
    "AWS",
    "DLAMI_PARAMETER",
    "TAG_LAUNCH",
    "TAG_OWNER",
    "TAG_POOL",
    "UBUNTU_PARAMETER",
    "CapacityError",
    "QuotaError",
    "default_owner",
    "gc",
    "network",
    "public_address",
    "quota_for",
]
