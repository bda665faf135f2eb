"""``sky.AWS()``: EC2 instances started for a pool, then driven exactly like ``sky.SSH`` hosts.

Provisioning (:mod:`.provider`, with :mod:`.network` and :mod:`.prices`): the accelerator name maps to an instance
type (:mod:`sky_jupyter.accelerators`); the image is the AWS Deep Learning AMI found through its public SSM
parameter; the user's public key is imported as an EC2 key pair; a security group of the pool's own lets SSH in from
the caller's address only (/32) and all traffic between the pool's members; all nodes start in one call, hence in
one availability zone, spot first when asked, on demand when spot is refused and that is allowed, the next zone when
a zone lacks capacity. Quota errors stop at once and name the quota to raise. Instances require IMDSv2, terminate
when shut down (which backs the workers' dead-man switch: a node whose client went silent powers itself off, and so
stops billing), and carry the tags ``sky-jupyter:pool``, ``sky-jupyter:owner`` and ``sky-jupyter:launch``.

Everything after provisioning (SSH connections, host-key pinning, bootstrap, workers, logs) is the SSH provider's
code: :class:`AWS` holds an :class:`~sky_jupyter.providers.ssh.SSH` for its instances and hands them to it once they
answer SSH, so there is one code path for both.

Teardown always happens: a failed or interrupted launch terminates what it started before the error propagates;
``release`` (pool exit, exceptions, ``%sky down``) terminates and waits; instances still alive at interpreter exit
are terminated by an ``atexit`` hook; instance ids are written to the pool's state file before anything waits on
them, so :func:`gc` (``%sky gc``, :mod:`.gc`) finds whatever a killed client left behind.

IAM permissions used: ec2:RunInstances, ec2:CreateTags, ec2:DescribeInstances, ec2:TerminateInstances,
ec2:DescribeSubnets, ec2:DescribeInstanceTypeOfferings, ec2:CreateSecurityGroup,
ec2:AuthorizeSecurityGroupIngress, ec2:DescribeSecurityGroups, ec2:DeleteSecurityGroup, ec2:ImportKeyPair,
ec2:DescribeKeyPairs, ec2:GetConsoleOutput, ssm:GetParameter (not with ``ami=``), ec2:DescribeImages (only with
``disk_gib=``).
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
