"""The network side of a pool: the caller's address that may SSH in, how open that may be, the subnet's public
addresses, and EFA (the fast interconnect of the large GPU instances)."""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any
from urllib.parse import urlsplit

from ...errors import ConfigError

#: Where the caller's public address comes from unless ``AWS(address_source=...)`` or this environment variable
#: names another URL (one answering with the address as plain text, or JSON with an ``ip`` field).
ADDRESS_SOURCE_ENV = "SKY_JUPYTER_ADDRESS_SOURCE"
DEFAULT_ADDRESS_SOURCE = "https://checkip.amazonaws.com"
#: The description of the SSH rule this tool adds for its client (how a refresh finds the rules it owns).
CLIENT_RULE = "sky_jupyter client"
#: Instance families with EFA (Elastic Fabric Adapter) whose pools of several nodes get a cluster placement group,
#: an EFA network interface and the security group rules EFA needs.
EFA_FAMILIES = frozenset({"p4d", "p4de", "p5", "p5e", "p5en"})


def address_source(given: str | None = None) -> str:
    """The URL the caller's address is asked of: ``given``, else ``$SKY_JUPYTER_ADDRESS_SOURCE``, else AWS's
    checkip service."""
    url = (given or os.environ.get(ADDRESS_SOURCE_ENV) or DEFAULT_ADDRESS_SOURCE).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        where = "address_source" if given else ADDRESS_SOURCE_ENV
        raise ConfigError(f"{where} must be an http(s) URL that answers with this machine's public address, not "
                          f"{url!r}; or pass ssh_cidr='x.x.x.x/32' to sky.AWS.")
    return url


def public_address(timeout: float = 5.0, source: str | None = None) -> str:
    """This machine's public address as the internet sees it (IPv4 or IPv6), for the SSH rule of the security
    group, asked of :func:`address_source`.

    The one step that contacts something other than the EC2 API; ``AWS(ssh_cidr=...)`` skips it.
    """
    import urllib.request

    url = address_source(source)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            text = answer.read(256).decode().strip()
        if text.startswith("{"):
            text = str(json.loads(text).get("ip", ""))
        return str(ipaddress.ip_address(text.split()[0] if text else ""))
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError(f"could not learn this machine's public address from {url} to let SSH in ({exc}); pass "
                          f"ssh_cidr='x.x.x.x/32' (the address your traffic leaves from) to sky.AWS, or name another "
                          f"source with address_source= or ${ADDRESS_SOURCE_ENV}.") from None


def host_cidr(address: str) -> str:
    """One address as a range: /32 (IPv4) or /128 (IPv6)."""
    return str(ipaddress.ip_network(address))


def check_cidr(text: object, allow_open: bool = False) -> str:
    """``ssh_cidr`` normalised; a range open to everyone (``0.0.0.0/0``, ``::/0``) only with ``allow_open``."""
    try:
        net = ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ConfigError(f"ssh_cidr {text!r} is not an address range like '203.0.113.7/32' or "
                          f"'2001:db8::7/128'.") from None
    if net.prefixlen == 0 and not allow_open:
        raise ConfigError(f"ssh_cidr {net} lets the whole internet try to log in; pass allow_open_ssh=True as well "
                          f"if you mean it, or give your own address (/32).")
    return str(net)


def is_open(cidr: str) -> bool:
    return ipaddress.ip_network(cidr).prefixlen == 0


def ssh_permission(cidr: str, described: bool = True) -> dict[str, Any]:
    """The security group permission letting SSH in from ``cidr`` (IpRanges or Ipv6Ranges); ``described``: with
    the description that marks it as this tool's client rule (leave it out to revoke)."""
    rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
    entry = {"Description": CLIENT_RULE} if described else {}
    if ipaddress.ip_network(cidr).version == 6:
        rule["Ipv6Ranges"] = [{"CidrIpv6": cidr, **entry}]
    else:
        rule["IpRanges"] = [{"CidrIp": cidr, **entry}]
    return rule


def client_ranges(group: dict[str, Any]) -> list[str]:
    """The SSH ranges of a security group (a DescribeSecurityGroups entry) that this tool added for its client."""
    found = []
    for perm in group.get("IpPermissions", []):
        if perm.get("IpProtocol") != "tcp" or perm.get("FromPort") != 22:
            continue
        found += [r["CidrIp"] for r in perm.get("IpRanges", []) if r.get("Description") == CLIENT_RULE]
        found += [r["CidrIpv6"] for r in perm.get("Ipv6Ranges", []) if r.get("Description") == CLIENT_RULE]
    return found


def self_permission(group: str, what: str = "pool members") -> dict[str, Any]:
    """All traffic from (or to) the group's own members."""
    return {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group, "Description": what}]}


def efa_capable(instance_type: str) -> bool:
    return instance_type.split(".")[0].lower() in EFA_FAMILIES


def maps_public_ip(subnet: dict[str, Any]) -> bool:
    """Does the subnet (a DescribeSubnets entry) give its instances a public IPv4 address by itself?"""
    return bool(subnet.get("MapPublicIpOnLaunch"))


def has_ipv6(subnet: dict[str, Any]) -> bool:
    """Does the subnet (a DescribeSubnets entry) have an IPv6 range (associated, or on its way)?"""
    gone = ("disassociating", "disassociated", "failing", "failed")
    return any(a.get("Ipv6CidrBlock") and str(a.get("Ipv6CidrBlockState", {}).get("State", "")) not in gone
               for a in subnet.get("Ipv6CidrBlockAssociationSet", []))
