"""The network side of a pool: the caller's address that may SSH in."""

from __future__ import annotations

import ipaddress

from ...errors import ConfigError


def public_address(timeout: float = 5.0) -> str:
    """This machine's public IPv4 address as AWS sees it, for the SSH rule of the security group.

    The one step that contacts something other than the EC2 API; ``AWS(ssh_cidr=...)`` skips it.
    """
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=timeout) as answer:
            text = answer.read(64).decode().strip()
        return str(ipaddress.ip_address(text))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not learn this machine's public address to let SSH in ({exc}); pass "
                          f"ssh_cidr='x.x.x.x/32' (the address your traffic leaves from) to sky.AWS.") from None
