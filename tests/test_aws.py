"""``sky.AWS`` against moto's EC2 server on 127.0.0.1, with instances mapped onto the sshd test cluster.

Nothing here reaches AWS: the ``moto_ec2`` fixture points boto3 at the local server with fake credentials and fails
any botocore request bound elsewhere; tests that run code on nodes also refuse TCP connections to anything but
loopback and the test nodes, so moto's invented instance addresses are never contacted (``connect_via`` maps
instance k onto test node k). moto has no capacity or quota errors: those are injected on ``RunInstances`` alone
with a botocore ``before-call`` hook (``inject_error``), every other call still goes to moto.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import sky_jupyter as sky
from sky_jupyter import accelerators, state
from sky_jupyter import protocol as P
from sky_jupyter.providers.base import Host, PoolSpec
from tests.fixtures.moto_ec2 import inject_error

if TYPE_CHECKING:
    from tests.fixtures.moto_ec2 import MotoEC2
    from tests.fixtures.sshd_cluster import Cluster


aws = pytest.importorskip("sky_jupyter.providers.aws")
OWNER = "sky-test@aws-tests"
CIDR = "203.0.113.7/32"  # TEST-NET-3: what the security group must admit, and only that
HARMLESS = 'touch "$HOME/sky-poweroff-ran"'  # what an orphaned test node runs instead of powering off


pytestmark = pytest.mark.usefixtures("no_address_lookup")


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


def make(moto: MotoEC2, key: str, session: Any = None, **kw: Any) -> aws.AWS:
    kw.setdefault("ami", moto.image_id())
    kw.setdefault("console_timeout", 0.5)  # moto's console output never shows host keys: trusted on first use
    return aws.AWS(ssh_cidr=CIDR, key_file=key, session=session or moto.session(), owner=OWNER, poll=0.1,
                   poweroff_command=HARMLESS, **kw)


def aws_client(moto: MotoEC2, cluster: Cluster, extra: str = "") -> str:
    """The start of a client process's code (``tests.test_attach.abandon``): ``provider``, an AWS against moto
    whose instance k is test node k, with ``extra`` keyword arguments (source text, each followed by a comma)."""
    targets = [n.host_string for n in cluster.nodes[:2]]
    return f"""
        import boto3
        import sky_jupyter as sky
        from tests.fixtures.moto_ec2 import only_loopback
        session = boto3.Session()
        session.events.register("before-send", only_loopback)
        targets = {targets!r}
        provider = sky.AWS(ami={moto.image_id()!r}, ssh_cidr={CIDR!r}, key_file={str(cluster.key_file)!r},
                           owner={OWNER!r}, poll=0.1, poweroff_command={HARMLESS!r}, session=session, {extra}
                           connect_via=lambda description, rank: targets[rank], console_timeout=0.5)
    """


def zones(moto: MotoEC2) -> list[tuple[str, str]]:
    """(zone, default subnet) pairs in the order the provider tries them."""
    subnets = moto.client().describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    return sorted((s["AvailabilityZone"], s["SubnetId"]) for s in subnets)


def tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


@sky.compute
def rank_and_hostname() -> tuple[int, str]:
    return sky.instance_info().rank, socket.gethostname()


@sky.compute
def divide(a: int, b: int) -> float:
    return a / b


# -- the accelerator table (no server) ------------------------------------------------------------------------------
def test_table_maps_names_case_insensitively_to_dated_prices():
    assert accelerators.instance_for("a100") == ("p4d.24xlarge", accelerators.lookup("A100").price_per_hour)
    assert accelerators.lookup("a100_80gb").instance_type == "p4de.24xlarge"
    assert accelerators.lookup(" h100 ").gpus == 8
    assert accelerators.lookup("A100-40GB") is accelerators.lookup("A100")
    assert accelerators.lookup(None).gpus == 0
    names = {a.name for a in accelerators.TABLE}
    assert {"T4", "A10G", "L4", "L40S", "A100", "A100-80GB", "H100", "H200"} <= names
    assert all((a.price_per_hour is None or a.price_per_hour > 0) and a.instance_type for a in accelerators.TABLE)
    assert accelerators.PRICES_DATE[:2] == "20" and accelerators.PRICES_REGION == "us-east-1"


def test_unknown_accelerator_lists_the_known_ones():
    with pytest.raises(sky.ConfigError) as info:
        accelerators.lookup("TPUv9")
    for name in ("T4", "A10G", "L4", "L40S", "A100", "A100-80GB", "H100", "H200"):
        assert name in str(info.value)


def test_unknown_accelerator_is_refused_before_anything_starts(moto_ec2, key_file):
    with pytest.raises(sky.ConfigError, match="unknown accelerator 'TPUv9'.*H100"):
        sky.ComputePool(provider=make(moto_ec2, key_file), nodes=1, accelerator="TPUv9", name="aws-unknown").start()
    assert moto_ec2.instances("aws-unknown") == [] and state.load("aws-unknown") is None


def test_instance_types_override_the_table(moto_ec2, key_file):
    provider = make(moto_ec2, key_file, instance_types={"A100": "p4de.24xlarge", "tiny": "t3.micro"})
    assert provider.accelerator("a100") == ("p4de.24xlarge", accelerators.lookup("A100-80GB").price_per_hour)
    assert provider.accelerator("TINY") == ("t3.micro", None)


def test_quota_names_per_family():
    assert aws.quota_for("p5.48xlarge", spot=False) == ("Running On-Demand P instances", "L-417A185B")
    assert aws.quota_for("g5.xlarge", spot=True) == ("All G and VT Spot Instance Requests", "L-3819A6DF")
    assert aws.quota_for("m7i.xlarge", spot=False)[1] == "L-1216C47A"


def test_import_sky_jupyter_does_not_import_boto3():
    code = "import sys, sky_jupyter, sky_jupyter.providers; assert 'boto3' not in sys.modules, 'boto3 imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


# -- launching against moto -----------------------------------------------------------------------------------------
def test_missing_dlami_parameter_names_it_and_the_override(moto_ec2, key_file):
    provider = make(moto_ec2, key_file, ami=None)
    with pytest.raises(sky.ProvisionError) as info:
        provider.launch(PoolSpec("aws-noparam", 1, "T4"))
    assert aws.DLAMI_PARAMETER in str(info.value) and "ami=" in str(info.value)
    assert moto_ec2.alive("aws-noparam") == [] and moto_ec2.groups("aws-noparam") == []


def test_cpu_nodes_ask_for_plain_ubuntu(moto_ec2, key_file):
    with pytest.raises(sky.ProvisionError, match=aws.UBUNTU_PARAMETER):
        make(moto_ec2, key_file, ami=None).launch(PoolSpec("aws-cpu", 1, None))
    assert moto_ec2.alive("aws-cpu") == []


def test_ami_comes_from_the_ssm_parameter(moto_ec2, key_file):
    image = moto_ec2.image_id()
    moto_ec2.client("ssm").put_parameter(Name="/sky-test/dlami", Value=image, Type="String", Overwrite=True)
    provider = make(moto_ec2, key_file, ami=None, ami_parameter="/sky-test/dlami")
    assert provider.image_id() == image


def test_generated_key_is_kept_under_sky_home_0600(moto_ec2, monkeypatch, tmp_path, sky_home):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh keys here
    provider = aws.AWS(ssh_cidr=CIDR, session=moto_ec2.session(), owner=OWNER)
    public, private = provider.key_material()
    assert Path(private) == sky_home / "keys" / "aws_ed25519"
    assert Path(private).stat().st_mode & 0o777 == 0o600 and public.startswith("ssh-ed25519 ")
    assert provider.key_material() == (public, private)  # made once
    name = provider.ensure_key_pair(public)
    pairs = moto_ec2.client().describe_key_pairs(KeyNames=[name])["KeyPairs"]
    assert tags(pairs[0])[aws.TAG_OWNER] == OWNER
    assert provider.ensure_key_pair(public) == name  # imported once


def test_capacity_error_tries_the_next_zone(moto_ec2, key_file):
    session = moto_ec2.session()
    (first_zone, first_subnet), (second_zone, _) = zones(moto_ec2)[:2]
    seen = inject_error(session, "RunInstances", "InsufficientInstanceCapacity",
                        when=lambda body: body.get("SubnetId") == first_subnet)
    provider = make(moto_ec2, key_file, session=session, availability_zones=[first_zone, second_zone])
    ids = provider.launch(PoolSpec("aws-nextaz", 2, "A10G"))
    try:
        assert len(seen) == 2
        running = moto_ec2.alive("aws-nextaz")
        assert sorted(i["InstanceId"] for i in running) == sorted(ids)
        assert {i["Placement"]["AvailabilityZone"] for i in running} == {second_zone}  # one zone for all nodes
    finally:
        provider.terminate("aws-nextaz")
    assert moto_ec2.alive("aws-nextaz") == [] and moto_ec2.groups("aws-nextaz") == []


def test_spot_falls_back_to_on_demand(moto_ec2, key_file):
    session = moto_ec2.session()
    seen = inject_error(session, "RunInstances", "InsufficientInstanceCapacity",
                        when=lambda body: body.get("InstanceMarketOptions.MarketType") == "spot")
    provider = make(moto_ec2, key_file, session=session, spot=True, availability_zones=[z for z, _ in
                                                                                        zones(moto_ec2)[:2]])
    provider.launch(PoolSpec("aws-spot", 1, "T4"))
    try:
        markets = [b.get("InstanceMarketOptions.MarketType", "on-demand") for b in seen]
        assert markets == ["spot", "spot", "on-demand"]
        (instance,) = moto_ec2.alive("aws-spot")
        assert instance.get("InstanceLifecycle") != "spot"
        assert any("on-demand" in e for e in provider.events)
    finally:
        provider.terminate("aws-spot")


def test_spot_without_fallback_gives_up_naming_the_options(moto_ec2, key_file):
    session = moto_ec2.session()
    inject_error(session, "RunInstances", "InsufficientInstanceCapacity")
    provider = make(moto_ec2, key_file, session=session, spot=True, on_demand_fallback=False,
                    availability_zones=[zones(moto_ec2)[0][0]])
    with pytest.raises(aws.CapacityError, match="spot in us-east-1a: InsufficientInstanceCapacity.*spot=False"):
        provider.launch(PoolSpec("aws-spot-only", 1, "T4"))
    assert moto_ec2.alive("aws-spot-only") == [] and moto_ec2.groups("aws-spot-only") == []


def _hosts(instances: list[dict[str, Any]]) -> list[Host]:
    return [Host(rank=r, addr="127.0.0.1", private_addr="127.0.0.1", instance_id=i["InstanceId"])
            for r, i in enumerate(instances)]


def test_spot_launches_spot_instances_and_counts_their_spot_price(moto_ec2, key_file):
    provider = make(moto_ec2, key_file, spot=True)
    provider.launch(PoolSpec("aws-spot-ok", 2, "L4"))
    try:
        instances = moto_ec2.alive("aws-spot-ok")
        assert {(i["InstanceLifecycle"], i["InstanceType"]) for i in instances} == {("spot", "g6.xlarge")}
        zone = instances[0]["Placement"]["AvailabilityZone"]
        (quote,) = [h for h in moto_ec2.client().describe_spot_price_history(InstanceTypes=["g6.xlarge"])[
            "SpotPriceHistory"] if h["AvailabilityZone"] == zone]
        cost = provider.cost(_hosts(instances))
        assert cost.per_hour == pytest.approx(2 * float(quote["SpotPrice"]))
        assert cost.per_hour < accelerators.lookup("L4").price_per_hour  # not the on-demand list price
        assert cost.basis == f"spot prices EC2 gave for {zone}"
    finally:
        provider.terminate("aws-spot-ok")


def test_a_spot_price_ec2_does_not_give_is_counted_at_the_list_price_and_said_so(moto_ec2, key_file):
    session = moto_ec2.session()
    inject_error(session, "DescribeSpotPriceHistory", "UnauthorizedOperation")
    provider = make(moto_ec2, key_file, session=session, spot=True)
    provider.launch(PoolSpec("aws-spot-noprice", 1, "L4"))
    try:
        cost = provider.cost(_hosts(moto_ec2.alive("aws-spot-noprice")))
        assert cost.per_hour == pytest.approx(accelerators.lookup("L4").price_per_hour)
        assert accelerators.PRICES_DATE in cost.basis and "spot price EC2 did not give" in cost.basis
    finally:
        provider.terminate("aws-spot-noprice")


@pytest.mark.parametrize("spot, code, quota, quota_code", [
    (False, "VcpuLimitExceeded", "Running On-Demand P instances", "L-417A185B"),
    (True, "MaxSpotInstanceCountExceeded", "All P Spot Instance Requests", "L-7212CCBC"),
])
def test_quota_errors_fail_fast_naming_the_quota(moto_ec2, key_file, spot, code, quota, quota_code):
    session = moto_ec2.session()
    seen = inject_error(session, "RunInstances", code, "You have requested more vCPU capacity than allowed.")
    provider = make(moto_ec2, key_file, session=session, spot=spot, on_demand_fallback=False)
    with pytest.raises(aws.QuotaError) as info:
        provider.launch(PoolSpec("aws-quota", 2, "A100"))
    message = str(info.value)
    assert len(seen) == 1  # no other zone tried: a quota is regional
    assert quota in message and quota_code in message and "request-service-quota-increase" in message
    assert "--desired-value 192" in message  # 2 x 96 vCPUs
    assert (info.value.quota, info.value.code) == (quota, quota_code)
    assert moto_ec2.alive("aws-quota") == [] and moto_ec2.groups("aws-quota") == []


def test_spot_quota_with_fallback_goes_on_demand(moto_ec2, key_file):
    session = moto_ec2.session()
    inject_error(session, "RunInstances", "MaxSpotInstanceCountExceeded",
                 when=lambda body: body.get("InstanceMarketOptions.MarketType") == "spot")
    provider = make(moto_ec2, key_file, session=session, spot=True)
    provider.launch(PoolSpec("aws-spot-quota", 1, "T4"))
    try:
        assert any("All G and VT Spot Instance Requests" in e for e in provider.events)
        (instance,) = moto_ec2.alive("aws-spot-quota")
        assert instance.get("InstanceLifecycle") != "spot"
    finally:
        provider.terminate("aws-spot-quota")


def test_keyboard_interrupt_during_provisioning_leaves_nothing_running(moto_ec2, key_file):
    """Ctrl-C while the pool waits for its instances to run: the ids were already in the state file, and the
    instances are terminated (and waited for) before the interrupt reaches the caller."""
    session = moto_ec2.session()
    recorded: list[list[str]] = []

    def interrupt_once(**_: Any) -> None:
        if not recorded:
            recorded.append(list((r.cloud if (r := state.load("aws-ctrlc")) else {}).get("instances", [])))
            raise KeyboardInterrupt

    session.events.register("before-call.ec2.DescribeInstances", interrupt_once)
    pool = sky.ComputePool(provider=make(moto_ec2, key_file, session=session), nodes=2, accelerator="A100",
                           name="aws-ctrlc")
    with pytest.raises(KeyboardInterrupt):
        pool.start()
    launched = moto_ec2.instances("aws-ctrlc")
    assert len(launched) == 2 and sorted(recorded[0]) == sorted(i["InstanceId"] for i in launched)
    assert {i["State"]["Name"] for i in launched} == {"terminated"}
    assert moto_ec2.groups("aws-ctrlc") == [] and state.load("aws-ctrlc") is None


def test_atexit_terminates_pools_nobody_closed(moto_ec2, key_file, sky_home):
    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
import boto3
from sky_jupyter.providers.aws import AWS
from sky_jupyter.providers.base import PoolSpec
from tests.fixtures.moto_ec2 import only_loopback
session = boto3.Session()
session.events.register("before-send", only_loopback)
aws = AWS(ami={moto_ec2.image_id()!r}, ssh_cidr={CIDR!r}, key_file={key_file!r}, owner={OWNER!r}, poll=0.1,
          session=session)
print(aws.launch(PoolSpec("aws-atexit", 1, "T4")))
"""  # exits without terminating: the atexit hook must
    assert os.environ["AWS_ENDPOINT_URL"] == moto_ec2.endpoint  # the child inherits the fixture's environment
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "SKY_JUPYTER_HOME": str(sky_home)})
    assert done.returncode == 0, done.stderr
    (instance,) = moto_ec2.instances("aws-atexit")
    assert instance["State"]["Name"] == "terminated" and instance["InstanceId"] in done.stdout
    assert "terminating" in done.stderr


def test_gc_terminates_orphans_and_leaves_live_pools_alone(moto_ec2):
    ec2 = moto_ec2.client()
    image = moto_ec2.image_id()
    session = moto_ec2.session()

    def start(pool: str, owner: str = OWNER) -> str:
        spec = [{"ResourceType": "instance", "Tags": [{"Key": aws.TAG_POOL, "Value": pool},
                                                      {"Key": aws.TAG_OWNER, "Value": owner}]}]
        return ec2.run_instances(ImageId=image, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                                 TagSpecifications=spec)["Instances"][0]["InstanceId"]

    orphan = start("gc-gone")  # no state file
    dead = start("gc-dead")  # its client process is gone
    state.save(state.PoolRecord("gc-dead", cloud={"instances": [dead]}))
    path = state.pools_dir() / "gc-dead.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "client_pid": 2 ** 22 + 12345}))
    live = start("gc-live")  # this process, which lists it
    state.save(state.PoolRecord("gc-live", cloud={"instances": [live]}))
    foreign = start("gc-gone", owner="someone-else@elsewhere")
    try:
        found = aws.gc(interactive=False, dry_run=True, owner=OWNER, session=session)
        assert sorted(found) == sorted([orphan, dead])
        assert all(i["State"]["Name"] == "running" for i in moto_ec2.instances("gc-gone"))
        assert sorted(aws.gc(interactive=False, owner=OWNER, session=session)) == sorted([orphan, dead])
        states = {i["InstanceId"]: i["State"]["Name"] for i in moto_ec2.instances()}
        assert states[orphan] == states[dead] == "terminated"
        assert states[live] == states[foreign] == "running"
        assert aws.gc(interactive=False, owner=OWNER, session=session) == []
    finally:
        ec2.terminate_instances(InstanceIds=[live, foreign])
        state.remove("gc-dead")
        state.remove("gc-live")


# -- pools on the sshd test cluster ---------------------------------------------------------------------------------
@pytest.fixture
def only_test_nodes(monkeypatch, sshd_cluster: Cluster):
    """Refuse TCP connections to anything but loopback and the test nodes (moto's addresses included)."""
    _only(monkeypatch, sshd_cluster)


@pytest.fixture
def only_fresh_nodes(monkeypatch, bookworm_cluster: Cluster):
    """The same guard for the fresh Debian nodes (their own root filesystem: bootstrap from nothing)."""
    _only(monkeypatch, bookworm_cluster)


def _only(monkeypatch: pytest.MonkeyPatch, cluster: Cluster) -> None:
    allowed = {node.addr for node in cluster.nodes}
    original = socket.create_connection

    def guarded(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        host = address[0]
        if host not in allowed and not ipaddress.ip_address(host).is_loopback:
            raise AssertionError(f"a test tried to connect to {host}:{address[1]}, which is not a test node")
        return original(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)


def on_cluster(moto: MotoEC2, cluster: Cluster, **kw: Any) -> aws.AWS:
    """An AWS provider whose instance k is test node k (the documented ``connect_via`` seam)."""
    return make(moto, str(cluster.key_file), connect_via=lambda description, rank: cluster.nodes[rank].host_string,
                **kw)


@pytest.mark.ssh
def test_two_node_a100_pool_runs_on_the_nodes_and_terminates_on_exit(moto_ec2, bookworm_cluster, only_fresh_nodes):
    """Instances stood in for by fresh Debian machines (no pip, no uv): bootstrapped from nothing."""
    sshd_cluster = bookworm_cluster
    for node in sshd_cluster.nodes:
        sshd_cluster.reset_home(node)
    image = moto_ec2.image_id()
    provider = on_cluster(moto_ec2, sshd_cluster, ami=image)
    with sky.ComputePool(provider=provider, nodes=2, accelerator="A100", name="aws-a100",
                         image=sky.Image(index_url=sshd_cluster.index_url)) as pool:
        assert all((n.home / ".sky_jupyter" / "venv" / "bin" / "python").exists() for n in sshd_cluster.nodes[:2])
        running = moto_ec2.alive("aws-a100")
        assert len(running) == 2
        for instance in running:
            assert instance["InstanceType"] == "p4d.24xlarge" and instance["ImageId"] == image
            assert instance["MetadataOptions"]["HttpTokens"] == "required"
            assert tags(instance)[aws.TAG_OWNER] == OWNER and tags(instance)[aws.TAG_LAUNCH]
            behaviour = moto_ec2.client().describe_instance_attribute(
                InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior")
            assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        assert len({i["Placement"]["AvailabilityZone"] for i in running}) == 1
        (group,) = moto_ec2.groups("aws-a100")
        # EC2 lists an instance's groups on it; moto, for one launched with network interfaces (2 x p4d: EFA), only
        # on its interfaces
        assert {g["GroupId"] for i in running for g in [*i["SecurityGroups"], *(
            x for n in i["NetworkInterfaces"] for x in n["Groups"])]} == {group["GroupId"]}
        rules = {(r["IpProtocol"], r.get("FromPort")): r for r in group["IpPermissions"]}
        assert [x["CidrIp"] for x in rules[("tcp", 22)]["IpRanges"]] == [CIDR]
        assert [p["GroupId"] for p in rules[("-1", None)]["UserIdGroupPairs"]] == [group["GroupId"]]
        assert not any(x["CidrIp"] == "0.0.0.0/0" for r in group["IpPermissions"] for x in r["IpRanges"])
        recorded = state.load("aws-a100")
        assert recorded is not None and sorted(recorded.cloud["instances"]) == sorted(i["InstanceId"] for i in running)
        assert sorted(h["instance_id"] for h in recorded.hosts) == sorted(i["InstanceId"] for i in running)

        assert rank_and_hostname() @ pool == [(0, sshd_cluster.nodes[0].hostname),
                                              (1, sshd_cluster.nodes[1].hostname)]
        assert [h.private_addr for h in pool.hosts] == [n.addr for n in sshd_cluster.nodes[:2]]
        cost = pool.cost()
        assert cost.per_hour == pytest.approx(2 * accelerators.lookup("A100").price_per_hour)
        assert 0 <= cost.so_far < cost.per_hour and accelerators.PRICES_DATE in cost.basis
    states = {i["State"]["Name"] for i in moto_ec2.instances("aws-a100")}
    assert states == {"terminated"} and moto_ec2.groups("aws-a100") == [] and state.load("aws-a100") is None


@pytest.mark.ssh
def test_exception_inside_the_with_block_terminates(moto_ec2, sshd_cluster, only_test_nodes):
    pool = sky.ComputePool(provider=on_cluster(moto_ec2, sshd_cluster), nodes=2, accelerator="T4", name="aws-raise")
    with pytest.raises(ZeroDivisionError), pool:
        assert len(moto_ec2.alive("aws-raise")) == 2
        divide(1, 0) >> pool
    assert {i["State"]["Name"] for i in moto_ec2.instances("aws-raise")} == {"terminated"}
    assert moto_ec2.groups("aws-raise") == []


@pytest.mark.ssh
def test_dead_man_switch_runs_the_poweroff_action(moto_ec2, sshd_cluster, only_test_nodes):
    """A node whose client falls silent runs the poweroff action (here a harmless stand-in) after the grace."""
    node = sshd_cluster.nodes[0]
    marker = "$HOME/sky-poweroff-ran"
    sshd_cluster.ssh(node, f'rm -f "{marker}"', check=True)
    provider = on_cluster(moto_ec2, sshd_cluster)
    options = provider.worker_options()
    assert (options["on_orphan"], options["poweroff_command"], options["watchdog"]) == ("poweroff", HARMLESS,
                                                                                       {"command": HARMLESS})
    with sky.ComputePool(provider=provider, nodes=1, accelerator="T4", name="aws-deadman", grace=3.0) as pool:
        assert (rank_and_hostname() >> pool)[0] == 0
        pool._stop.set()  # the client falls silent: no more heartbeats
        deadline = time.monotonic() + 20
        while sshd_cluster.ssh(node, f'test -f "{marker}"').returncode != 0:
            assert time.monotonic() < deadline, "the worker did not run its poweroff action"
            time.sleep(0.3)
    sshd_cluster.ssh(node, f'rm -f "{marker}"', check=True)
    assert {i["State"]["Name"] for i in moto_ec2.instances("aws-deadman")} == {"terminated"}


@pytest.mark.ssh
def test_growing_adds_instances_in_the_pools_zone(moto_ec2, sshd_cluster, only_test_nodes):
    with sky.ComputePool(provider=on_cluster(moto_ec2, sshd_cluster), nodes=1, accelerator="L4",
                         name="aws-grow") as pool:
        pool.grow(2)
        running = moto_ec2.alive("aws-grow")
        assert len(running) == 2 and len({i["Placement"]["AvailabilityZone"] for i in running}) == 1
        assert len({tags(i)[aws.TAG_LAUNCH] for i in running}) == 2  # two launches, one security group
        assert len(moto_ec2.groups("aws-grow")) == 1
        assert [r for r, _ in rank_and_hostname() @ pool] == [0, 1]
        first, second = state.load("aws-grow").cloud["launches"]
        launch_of = {i["InstanceId"]: tags(i)[aws.TAG_LAUNCH] for i in running}
        assert [launch_of[h.instance_id] for h in pool.hosts] == [first, second]  # the new node is rank 1
    assert {i["State"]["Name"] for i in moto_ec2.instances("aws-grow")} == {"terminated"}


@pytest.mark.ssh
def test_a_pool_whose_kernel_died_is_attached_to_billed_and_terminated(moto_ec2, sshd_cluster, only_test_nodes,
                                                                     tmp_path):
    from tests.test_attach import abandon

    assert os.environ["AWS_ENDPOINT_URL"] == moto_ec2.endpoint  # the client process inherits the fixture's environment
    abandon(aws_client(moto_ec2, sshd_cluster) + """
        from sky_jupyter import protocol as P
        pool = sky.ComputePool(provider=provider, nodes=2, accelerator="A10G", name="aws-attach").start()
        pool.workers[1].submit(P.CELL, {"code": "kept = 'on the GPU node'"}).wait(30)
    """, tmp_path)  # the client dies (SIGKILL): nothing tears the pool down
    assert len(moto_ec2.alive("aws-attach")) == 2

    again = sky.ComputePool.attach("aws-attach", provider=make(moto_ec2, str(sshd_cluster.key_file)))
    try:
        assert again.workers[1].submit(P.CELL, {"code": "kept"}).wait(30)["value"] == "on the GPU node"
        assert again.cost().per_hour == pytest.approx(2 * accelerators.lookup("A10G").price_per_hour)
        assert len(moto_ec2.alive("aws-attach")) == 2
    finally:
        again.close()
    assert {i["State"]["Name"] for i in moto_ec2.instances("aws-attach")} == {"terminated"}
    assert moto_ec2.groups("aws-attach") == [] and state.load("aws-attach") is None


def test_cpu_nodes_sized_by_vcpus_memory_and_architecture(moto_ec2, key_file):
    from sky_jupyter.providers.aws.prices import cpu_instance

    assert cpu_instance(None, None, None) == "c7i.large"
    assert cpu_instance(16, 64, "arm64") == "m7g.4xlarge"  # 4 GiB per vCPU: the general-purpose family
    assert cpu_instance(4, 100, None) == "r7i.4xlarge"
    with pytest.raises(sky.ConfigError, match="no x86_64 CPU instance type here has 500 vCPUs"):
        cpu_instance(500, None, None)
    provider = make(moto_ec2, key_file)
    ids = provider.launch(PoolSpec("aws-sized", 1, None, vcpus=8, memory_gb=30, architecture="x86_64"))
    try:
        assert moto_ec2.client().describe_instances(InstanceIds=ids)["Reservations"][0]["Instances"][0][
            "InstanceType"] == "m7i.2xlarge"
    finally:
        provider.terminate("aws-sized")
    assert provider.instance_type(PoolSpec("p", 1, "T4", vcpus=64)) == "g4dn.xlarge"  # a named accelerator wins
