"""Where nodes come from: ``Local`` (worker processes here), ``SSH`` (machines you have), ``AWS`` (EC2)."""

from __future__ import annotations

from typing import Any

from .base import Host, Provider, WorkerHandle
from .local import Local

__all__ = ["AWS", "SSH", "Host", "Local", "Provider", "WorkerHandle"]


def __getattr__(name: str) -> Any:
    # SSH and AWS need paramiko/boto3: import them only when asked for.
    if name == "SSH":
        from .ssh import SSH

        return SSH
    if name == "AWS":
        from .aws import AWS

        return AWS
    raise AttributeError(name)
