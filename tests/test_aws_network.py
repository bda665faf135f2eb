"""The network side of ``sky.AWS`` against moto on 127.0.0.1: where the caller's address comes from, the SSH rule
(IPv4, IPv6, open only when asked, moved on attach), subnets without public addresses, a pool's placement kept as
state (attach, then grow), and EFA for several nodes of the large GPU types.

RunInstances requests are read with a botocore ``before-call`` hook that lets every call through
(``inject_error(..., when=lambda body: False)``): the flattened query parameters EC2 receives. moto keeps no
placement groups; the fixture's sessions answer those calls from a record (``moto_ec2.placement_groups``).
"""

from __future__ import annotations

import http.server
import ipaddress
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import sky_jupyter as sky
from sky_jupyter import state
from sky_jupyter.providers.base import PoolSpec
from tests.fixtures.moto_ec2 import inject_error
from tests.test_aws import CIDR, HARMLESS, OWNER, _only, aws_client

if TYPE_CHECKING:
    from tests.fixtures.moto_ec2 import MotoEC2
    from tests.fixtures.sshd_cluster import Cluster

aws = pytest.importorskip("sky_jupyter.providers.aws")
network = aws.network


@pytest.fixture(autouse=True)
def no_public_lookup(monkeypatch):
    """Where no test names an address source, the address comes from a URL nobody answers on: never from the
    public web service."""
    monkeypatch.setenv(network.ADDRESS_SOURCE_ENV, "http://127.0.0.1:9/nobody-here")


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


@pytest.fixture
def only_test_nodes(monkeypatch, sshd_cluster: Cluster) -> None:
    """No TCP connection but to loopback and the test nodes (moto's invented addresses included)."""
    _only(monkeypatch, sshd_cluster)


def provider(moto: MotoEC2, key: str, session: Any = None, **kw: Any) -> Any:
    kw.setdefault("ssh_cidr", CIDR)
    kw.setdefault("ami", moto.image_id())
    return aws.AWS(key_file=key, session=session or moto.session(), owner=OWNER, poll=0.1, console_timeout=0.5,
                   poweroff_command=HARMLESS, **kw)


def run_requests(session: Any) -> list[dict[str, Any]]:
    """The RunInstances requests made through ``session`` from now on (all of them go to moto)."""
    return inject_error(session, "RunInstances", "unused", when=lambda body: False)


def ssh_rule(moto: MotoEC2, pool: str) -> dict[str, Any]:
    (group,) = moto.groups(pool)
    rules = [r for r in group["IpPermissions"] if r["IpProtocol"] == "tcp" and r.get("FromPort") == 22]
    return rules[0] if rules else {"IpRanges": [], "Ipv6Ranges": []}


def new_vpc(moto: MotoEC2, cidr: str, ipv6: bool = False) -> tuple[str, str]:
    """A VPC of the test's own and one subnet in it that does not map public addresses: (vpc, subnet)."""
    ec2 = moto.client()
    vpc = ec2.create_vpc(CidrBlock=cidr, AmazonProvidedIpv6CidrBlock=ipv6)["Vpc"]["VpcId"]
    extra: dict[str, Any] = {}
    if ipv6:
        block = ec2.describe_vpcs(VpcIds=[vpc])["Vpcs"][0]["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"]
        extra["Ipv6CidrBlock"] = str(next(ipaddress.ip_network(block).subnets(new_prefix=64)))
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("/16", "/24"), AvailabilityZone="us-east-1b",
                               **extra)["Subnet"]
    assert subnet["MapPublicIpOnLaunch"] is False
    return vpc, subnet["SubnetId"]


# -- the caller's address -------------------------------------------------------------------------------------------
@pytest.fixture
def address_server() -> Iterator[tuple[str, list[str]]]:
    """A local stand-in for an address service: (its URL, a list whose first item is what it answers)."""
    answer = ["198.51.100.23\n"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = answer[0].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ip", answer
    finally:
        server.shutdown()
        server.server_close()


def test_the_callers_address_comes_from_a_configurable_source(moto_ec2, key_file, address_server, monkeypatch):
    url, answer = address_server
    given = provider(moto_ec2, key_file, ssh_cidr=None, address_source=url)
    assert given.caller_cidr() == "198.51.100.23/32"
    answer[0] = '{"ip": "2001:db8::23"}'  # JSON, IPv6
    assert given.caller_cidr() == "2001:db8::23/128"
    monkeypatch.setenv(network.ADDRESS_SOURCE_ENV, url)
    answer[0] = "203.0.113.99"
    assert provider(moto_ec2, key_file, ssh_cidr=None).caller_cidr() == "203.0.113.99/32"
    assert provider(moto_ec2, key_file, ssh_cidr="192.0.2.0/24").caller_cidr() == "192.0.2.0/24"  # the override
    monkeypatch.delenv(network.ADDRESS_SOURCE_ENV)
    assert network.address_source() == network.DEFAULT_ADDRESS_SOURCE
    with pytest.raises(sky.ConfigError, match="address_source must be an http"):
        provider(moto_ec2, key_file, address_source="file:///etc/passwd")
    answer[0] = "not an address"
    with pytest.raises(sky.ConfigError, match=f"from {url}.*ssh_cidr=.*address_source="):
        given.caller_cidr()


# -- the SSH rule -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cidr", ["0.0.0.0/0", "::/0"])
def test_ssh_open_to_everyone_needs_allow_open_ssh(moto_ec2, key_file, cidr):
    with pytest.raises(sky.ConfigError, match="allow_open_ssh=True") as info:
        provider(moto_ec2, key_file, ssh_cidr=cidr)
    assert "\n" not in str(info.value)


def test_allow_open_ssh_applies_the_rule_with_a_warning(moto_ec2, key_file):
    aws_ = provider(moto_ec2, key_file, ssh_cidr="0.0.0.0/0", allow_open_ssh=True)
    aws_.launch(PoolSpec("net-open", 1, "T4"))
    try:
        assert [r["CidrIp"] for r in ssh_rule(moto_ec2, "net-open")["IpRanges"]] == ["0.0.0.0/0"]
        assert any("open to the whole internet" in e for e in aws_.events)
    finally:
        aws_.terminate("net-open")


def test_an_ipv6_ssh_cidr_is_an_ipv6_rule_and_asks_for_an_ipv6_address(moto_ec2, key_file):
    _, subnet = new_vpc(moto_ec2, "10.77.0.0/16", ipv6=True)
    session = moto_ec2.session()
    seen = run_requests(session)
    aws_ = provider(moto_ec2, key_file, session, ssh_cidr="2001:db8:0:7::/64", subnet_id=subnet)
    aws_.launch(PoolSpec("net-v6", 1, "T4"))
    try:
        rule = ssh_rule(moto_ec2, "net-v6")
        assert [r["CidrIpv6"] for r in rule["Ipv6Ranges"]] == ["2001:db8:0:7::/64"] and rule["IpRanges"] == []
        assert seen[-1]["Ipv6AddressCount"] == 1
        (instance,) = moto_ec2.alive("net-v6")
        address = aws_._target(instance, 0)
        assert address.startswith("ubuntu@[") and ipaddress.ip_address(address[8:address.index("]")]).version == 6
    finally:
        aws_.terminate("net-v6")


def test_an_ipv6_ssh_cidr_without_an_ipv6_subnet_is_refused_before_launch(moto_ec2, key_file):
    session = moto_ec2.session()
    seen = run_requests(session)
    with pytest.raises(sky.ProvisionError, match="IPv6, but no subnet.*has an IPv6 range"):
        provider(moto_ec2, key_file, session, ssh_cidr="2001:db8::7/128").launch(PoolSpec("net-v6-none", 1, "T4"))
    assert seen == [] and moto_ec2.groups("net-v6-none") == []


# -- subnets without public addresses -------------------------------------------------------------------------------
def test_a_subnet_without_public_addresses_gets_one_asked_for(moto_ec2, key_file):
    _, subnet = new_vpc(moto_ec2, "10.78.0.0/16")
    session = moto_ec2.session()
    seen = run_requests(session)
    aws_ = provider(moto_ec2, key_file, session, subnet_id=subnet)
    aws_.launch(PoolSpec("net-private", 1, "T4"))
    try:
        body = seen[-1]
        (group,) = moto_ec2.groups("net-private")
        assert "SubnetId" not in body and not any(k.startswith("SecurityGroupId") for k in body)
        assert body["NetworkInterface.1.AssociatePublicIpAddress"] == "true"
        assert body["NetworkInterface.1.SubnetId"] == subnet
        assert body["NetworkInterface.1.SecurityGroupId.1"] == group["GroupId"]
        assert body["NetworkInterface.1.DeviceIndex"] == 0
        assert any(f"subnet {subnet}" in e and "no public IPv4 address" in e for e in aws_.events)
        (instance,) = moto_ec2.alive("net-private")
        assert instance.get("PublicIpAddress")
    finally:
        aws_.terminate("net-private")


def test_with_connect_via_a_private_subnet_is_left_private(moto_ec2, key_file):
    _, subnet = new_vpc(moto_ec2, "10.79.0.0/16")
    session = moto_ec2.session()
    seen = run_requests(session)
    aws_ = provider(moto_ec2, key_file, session, subnet_id=subnet,
                    connect_via=lambda d, rank: f"ubuntu@{d['PrivateIpAddress']}")
    aws_.launch(PoolSpec("net-via", 1, "T4"))
    try:
        assert seen[-1]["SubnetId"] == subnet and not any(k.startswith("NetworkInterface") for k in seen[-1])
        (instance,) = moto_ec2.alive("net-via")
        assert not instance.get("PublicIpAddress")
    finally:
        aws_.terminate("net-via")


# -- placement is state -----------------------------------------------------------------------------------------------
def test_the_pools_placement_is_in_its_state_file(moto_ec2, key_file):
    state.save(state.PoolRecord("net-state"))
    aws_ = provider(moto_ec2, key_file, availability_zones=["us-east-1c"])
    aws_.launch(PoolSpec("net-state", 1, "T4"))
    try:
        cloud = state.load("net-state").cloud
        (instance,) = moto_ec2.alive("net-state")
        (group,) = moto_ec2.groups("net-state")
        assert cloud["zone"] == "us-east-1c" == instance["Placement"]["AvailabilityZone"]
        assert cloud["subnet"] == instance["SubnetId"] and cloud["vpc"] == instance["VpcId"]
        assert cloud["security_groups"] == [group["GroupId"]] and cloud["ssh_cidr"] == CIDR
        assert "placement_group" not in cloud
    finally:
        aws_.terminate("net-state")
        state.remove("net-state")


@pytest.mark.ssh
def test_attach_then_grow_keeps_the_zone_and_group_and_moves_the_ssh_rule(moto_ec2, sshd_cluster, only_test_nodes,
                                                                          tmp_path):
    """A pool started in us-east-1c by a client that died is attached to from another address: the SSH rule moves
    to the new address (the old one is revoked), and a node added afterwards joins the same zone, subnet and
    security group (nodes reach each other)."""
    from tests.test_attach import abandon

    targets = [n.host_string for n in sshd_cluster.nodes[:2]]
    abandon(aws_client(moto_ec2, sshd_cluster, 'availability_zones=["us-east-1c"],') + """
        pool = sky.ComputePool(provider=provider, nodes=1, accelerator="A10G", name="net-attach").start()
    """, tmp_path)
    (first,) = moto_ec2.alive("net-attach")
    (group,) = moto_ec2.groups("net-attach")
    assert first["Placement"]["AvailabilityZone"] == "us-east-1c"
    assert [r["CidrIp"] for r in ssh_rule(moto_ec2, "net-attach")["IpRanges"]] == [CIDR]
    moved = "198.51.100.77/32"
    again = sky.ComputePool.attach("net-attach", provider=provider(
        moto_ec2, str(sshd_cluster.key_file), ssh_cidr=moved,
        connect_via=lambda description, rank: targets[rank]))  # default zones: us-east-1a comes first
    try:
        assert [r["CidrIp"] for r in ssh_rule(moto_ec2, "net-attach")["IpRanges"]] == [moved]
        assert state.load("net-attach").cloud["ssh_cidr"] == moved
        again.grow(2)
        running = moto_ec2.alive("net-attach")
        assert len(running) == 2
        assert {i["Placement"]["AvailabilityZone"] for i in running} == {"us-east-1c"}
        assert {i["SubnetId"] for i in running} == {first["SubnetId"]}
        assert [g["GroupId"] for g in moto_ec2.groups("net-attach")] == [group["GroupId"]]
        assert {g["GroupId"] for i in running for g in i["SecurityGroups"]} == {group["GroupId"]}
        cloud = state.load("net-attach").cloud
        assert (cloud["zone"], cloud["subnet"], cloud["security_groups"]) == (
            "us-east-1c", first["SubnetId"], [group["GroupId"]])
        assert len(again.workers) == 2
    finally:
        again.close()
    assert {i["State"]["Name"] for i in moto_ec2.instances("net-attach")} == {"terminated"}
    assert moto_ec2.groups("net-attach") == []


# -- EFA --------------------------------------------------------------------------------------------------------------
def test_several_efa_nodes_get_a_placement_group_efa_interfaces_and_the_group_rules(moto_ec2, key_file):
    session = moto_ec2.session()
    seen = run_requests(session)
    state.save(state.PoolRecord("net-efa"))
    aws_ = provider(moto_ec2, key_file, session)
    aws_.launch(PoolSpec("net-efa", 2, "A100"))  # p4d.24xlarge
    try:
        body = seen[-1]
        (group,) = moto_ec2.groups("net-efa")
        name = state.load("net-efa").cloud["placement_group"]
        assert moto_ec2.placement_groups[name]["Strategy"] == "cluster"
        assert {t["Key"]: t["Value"] for t in moto_ec2.placement_groups[name]["Tags"]}[aws.TAG_POOL] == "net-efa"
        assert body["Placement.GroupName"] == name and body["InstanceType"] == "p4d.24xlarge"
        assert body["NetworkInterface.1.InterfaceType"] == "efa" and body["NetworkInterface.1.NetworkCardIndex"] == 0
        assert body["NetworkInterface.1.SecurityGroupId.1"] == group["GroupId"] and "SubnetId" not in body
        inbound = [p["GroupId"] for r in group["IpPermissions"] if r["IpProtocol"] == "-1"
                   for p in r["UserIdGroupPairs"]]
        outbound = [p["GroupId"] for r in group["IpPermissionsEgress"] if r["IpProtocol"] == "-1"
                    for p in r["UserIdGroupPairs"]]
        assert inbound == outbound == [group["GroupId"]]
        aws_.launch(PoolSpec("net-efa", 3, "A100"))  # grown: the same placement group and security group
        assert seen[-1]["Placement.GroupName"] == name and len(moto_ec2.placement_groups) >= 1
        assert seen[-1]["NetworkInterface.1.SecurityGroupId.1"] == group["GroupId"]
    finally:
        aws_.terminate("net-efa")
        aws_.delete_placement_group("net-efa", name)
        state.remove("net-efa")
    assert name not in moto_ec2.placement_groups


@pytest.mark.parametrize("nodes, accelerator", [(1, "A100"), (2, "T4")])
def test_one_node_or_a_type_without_efa_gets_neither(moto_ec2, key_file, nodes, accelerator):
    session = moto_ec2.session()
    seen = run_requests(session)
    before = set(moto_ec2.placement_groups)
    aws_ = provider(moto_ec2, key_file, session)
    aws_.launch(PoolSpec("net-noefa", nodes, accelerator))
    try:
        assert not any(k.startswith(("Placement.GroupName", "NetworkInterface")) for k in seen[-1])
        assert set(moto_ec2.placement_groups) == before
    finally:
        aws_.terminate("net-noefa")


def test_the_torch_plugin_sets_efa_variables_only_where_an_efa_device_is(tmp_path):
    import importlib

    plugin = importlib.import_module("sky_jupyter.plugins.torch")

    root = tmp_path / "infiniband"
    assert plugin.efa_env({}, str(root)) == {}  # no RDMA devices at all
    (root / "mlx5_0" / "device").mkdir(parents=True)
    (tmp_path / "drivers" / "mlx5_core").mkdir(parents=True)
    (root / "mlx5_0" / "device" / "driver").symlink_to(tmp_path / "drivers" / "mlx5_core")
    assert plugin.efa_env({}, str(root)) == {}
    (root / "rdmap16s27" / "device").mkdir(parents=True)
    (tmp_path / "drivers" / "efa").mkdir()
    (root / "rdmap16s27" / "device" / "driver").symlink_to(tmp_path / "drivers" / "efa")
    assert plugin.efa_env({}, str(root)) == plugin.EFA_ENV
    assert plugin.efa_env({"FI_PROVIDER": "tcp"}, str(root)) == {k: v for k, v in plugin.EFA_ENV.items()
                                                                 if k != "FI_PROVIDER"}
