"""What every part of the AWS provider shares: names and tags, the error codes it reacts to, its two error types,
boto3 sessions and clients, and the record of an instance it launched."""

from __future__ import annotations

import getpass
import socket
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from ...errors import ProvisionError

#: The AWS Deep Learning AMI (PyTorch, NVIDIA driver, Ubuntu 24.04, x86_64) as AWS publishes it in SSM Parameter
#: Store, per region. Override with ``AWS(ami="ami-...")`` or ``AWS(ami_parameter="...")``.
DLAMI_PARAMETER = "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.9-ubuntu-24.04/latest/ami-id"
#: Plain Ubuntu 24.04 (Canonical's public parameter) for CPU nodes: the GPU image's drivers are no use there.
UBUNTU_PARAMETER = "/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
TAG_POOL = "sky-jupyter:pool"
TAG_OWNER = "sky-jupyter:owner"
TAG_LAUNCH = "sky-jupyter:launch"
DEFAULT_REGION = "us-east-1"
#: The node dead-man switch's action: power off (the instance then terminates, see InstanceInitiatedShutdown...).
POWEROFF = "sudo -n shutdown -h now || shutdown -h now"

#: Errors that mean "not here, try another zone" (or, for spot, on demand).
CAPACITY_ERRORS = frozenset({"InsufficientInstanceCapacity", "InsufficientCapacity", "InsufficientHostCapacity",
                             "InsufficientFreeAddressesInSubnet", "Unsupported"})
SPOT_ERRORS = frozenset({"SpotMaxPriceTooLow", "InsufficientSpotCapacity"})
#: Errors that no other zone can fix: the account's regional quota.
QUOTA_ERRORS = frozenset({"VcpuLimitExceeded", "MaxSpotInstanceCountExceeded", "InstanceLimitExceeded"})
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


class QuotaError(ProvisionError):
    """EC2 refused the launch because an account quota is too low; no other zone can help."""

    def __init__(self, message: str, quota: str, code: str | None) -> None:
        super().__init__(message)
        self.quota, self.code = quota, code


class CapacityError(ProvisionError):
    """No zone (and no market allowed) had capacity for the pool."""


def default_owner() -> str:
    """Who started a pool, as tagged on its resources: ``user@host`` of this client."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def tag_map(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in items or ()}


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def error_message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", exc))


def session_for(region: str | None, session: boto3.Session | None) -> tuple[boto3.Session, str]:
    session = session or boto3.Session()
    return session, region or session.region_name or DEFAULT_REGION


def client_for(session: boto3.Session, service: str, region: str) -> Any:
    return session.client(service, region_name=region, config=Config(retries={"mode": "standard"}))


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance this provider launched, as long as it may still exist."""

    id: str
    pool: str
    launch: str
    instance_type: str
    az: str
    market: str  # "spot" or "on-demand"
    launched: float  # epoch seconds
    # Per hour: a spot instance's spot price in its zone (read when it was launched or adopted), else the on-demand
    # list price from the table; None when neither is known.
    price: float | None
    spot_priced: bool = False  # ``price`` is the spot price (False for a spot instance whose price was not readable)
