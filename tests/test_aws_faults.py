"""``sky.AWS`` against AWS as it behaves for real: moto behind a fault-injecting proxy (tests/fixtures/ec2_faults.py).

Eventual consistency (a group, key pair or instance unknown right after it was created), capacity and ``Unsupported``
per zone, the spot service-linked role, quotas read from Service Quotas, instances that are gone, still pending or
stuck while they are terminated, and AWS errors that must reach the user as SkyErrors. Everything goes through the
real provider code; the proxy and moto listen on 127.0.0.1 only, and no SSH is involved (pools are launched and
released, not connected to).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError

import sky_jupyter as sky
from sky_jupyter import accelerators, state
from sky_jupyter.providers.base import Host, PoolSpec
from tests.fixtures.ec2_faults import FaultProxy, fault_proxy, instance_ids, set_state

if TYPE_CHECKING:
    from tests.fixtures.moto_ec2 import MotoEC2

aws = pytest.importorskip("sky_jupyter.providers.aws")
from sky_jupyter.providers.aws import prices  # noqa: E402 - after the importorskip
from sky_jupyter.providers.aws.retry import eventually  # noqa: E402

OWNER = "sky-test@aws-faults"
CIDR = "203.0.113.7/32"
HARMLESS = 'touch "$HOME/sky-poweroff-ran"'
P_QUOTA, P_SPOT_QUOTA, G_QUOTA = "L-417A185B", "L-7212CCBC", "L-DB2E81BA"


pytestmark = pytest.mark.usefixtures("no_address_lookup")


@pytest.fixture
def faults(moto_ec2: MotoEC2, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    """The proxy in front of moto; clients created while it runs (the provider's) go through it. The fixture's own
    client, for looking at moto, is made first, so it keeps talking to moto directly."""
    moto_ec2.client()
    moto_ec2.image_id()
    with fault_proxy(moto_ec2.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return str(path)


def make(moto: MotoEC2, key: str, **kw: Any) -> aws.AWS:
    kw.setdefault("ami", moto.image_id())
    return aws.AWS(ssh_cidr=CIDR, key_file=key, session=moto.session(), owner=OWNER, poll=0.1,
                   poweroff_command=HARMLESS, **kw)


def zones(moto: MotoEC2) -> list[tuple[str, str]]:
    subnets = moto.client().describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
    return sorted((s["AvailabilityZone"], s["SubnetId"]) for s in subnets)


def subnet_of(params: dict[str, Any]) -> str | None:
    return params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId")


def spot(params: dict[str, Any]) -> bool:
    return params.get("InstanceMarketOptions.MarketType") == "spot"


def by_id(params: dict[str, Any]) -> bool:
    """DescribeInstances asking for instances by id (the waits), not by tag or state."""
    return params.get("Filter.1.Name") == "instance-id"


def quota(code: str, value: float) -> dict[str, Any]:
    return {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "QuotaName": code, "Value": value}}


def hosts_of(moto: MotoEC2, pool: str) -> list[Host]:
    return [Host(rank=r, addr="127.0.0.1", private_addr="127.0.0.1", instance_id=i["InstanceId"],
                 extra={"pool": pool}) for r, i in enumerate(moto.alive(pool))]


def finish(moto: MotoEC2, pool: str) -> None:
    """Terminate what a test left of a pool, straight at moto."""
    ids = [i["InstanceId"] for i in moto.alive(pool)]
    if ids:
        moto.client().terminate_instances(InstanceIds=ids)


# -- the retry helper -------------------------------------------------------------------------------------------------
def _error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}}, "AuthorizeSecurityGroupIngress")


def test_eventually_retries_listed_codes_within_its_deadline_only():
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    answers = [_error("InvalidGroup.NotFound"), _error("InvalidGroup.NotFound"), "done"]

    def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert eventually(call, deadline=10, first=1, most=4, sleep=sleep, clock=lambda: now[0]) == "done"
    assert len(waits) == 2 and 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2  # doubling, with jitter

    def never() -> None:
        raise _error("InvalidGroup.NotFound")

    now[0], waits[:] = 0.0, []
    with pytest.raises(ClientError):
        eventually(never, deadline=10, first=1, most=4, sleep=sleep, clock=lambda: now[0])
    assert now[0] == pytest.approx(10) and max(waits) <= 4  # bounded: gives up at the deadline

    def other() -> None:
        raise _error("UnauthorizedOperation")

    waits[:] = []
    with pytest.raises(ClientError, match="UnauthorizedOperation"):
        eventually(other, sleep=sleep, clock=lambda: now[0])
    assert waits == []  # not a listed code: at once


# -- eventual consistency after creates -------------------------------------------------------------------------------
def test_ingress_rules_wait_for_the_new_group_to_become_visible(moto_ec2, faults, key_file):
    faults.fail("AuthorizeSecurityGroupIngress", "InvalidGroup.NotFound", "The security group does not exist",
                times=2)
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-sg", 1, "T4"))
    try:
        assert [c.injected for c in faults.calls("AuthorizeSecurityGroupIngress")] == \
            ["InvalidGroup.NotFound", "InvalidGroup.NotFound", None]
        (group,) = moto_ec2.groups("faults-sg")
        rules = {(r["IpProtocol"], r.get("FromPort")): r for r in group["IpPermissions"]}
        assert [x["CidrIp"] for x in rules[("tcp", 22)]["IpRanges"]] == [CIDR]
        assert any("InvalidGroup.NotFound right after it was created" in e for e in provider.events)
    finally:
        provider.terminate("faults-sg")
    assert moto_ec2.alive("faults-sg") == [] and moto_ec2.groups("faults-sg") == []


def test_run_instances_waits_for_the_new_key_pair_and_group(moto_ec2, faults, key_file):
    faults.fail("RunInstances", "InvalidKeyPair.NotFound", "The key pair does not exist", times=1)
    faults.fail("RunInstances", "InvalidGroup.NotFound", "The security group does not exist", times=1)
    provider = make(moto_ec2, key_file)
    (instance_id,) = provider.launch(PoolSpec("faults-key", 1, "T4"))
    try:
        calls = faults.calls("RunInstances")
        assert [c.injected for c in calls] == ["InvalidKeyPair.NotFound", "InvalidGroup.NotFound", None]
        assert len({c.params["ClientToken"] for c in calls}) == 3  # a refused call started nothing: fresh tokens
        assert [i["InstanceId"] for i in moto_ec2.alive("faults-key")] == [instance_id]
    finally:
        provider.terminate("faults-key")


def test_a_key_pair_of_the_users_own_that_does_not_exist_is_not_waited_for(moto_ec2, faults, key_file):
    faults.fail("RunInstances", "InvalidKeyPair.NotFound", "The key pair 'mine' does not exist")
    provider = make(moto_ec2, key_file, key_name="mine")
    with pytest.raises(sky.ProvisionError, match="InvalidKeyPair.NotFound"):
        provider.launch(PoolSpec("faults-ownkey", 1, "T4"))
    assert len(faults.calls("RunInstances")) == 1
    assert moto_ec2.alive("faults-ownkey") == [] and moto_ec2.groups("faults-ownkey") == []


def test_waiting_for_running_copes_with_instances_not_visible_yet(moto_ec2, faults, key_file):
    faults.fail("DescribeInstances", "InvalidInstanceID.NotFound", "The instance ID does not exist", times=2,
                when=by_id)
    faults.rewrite("DescribeInstances", lambda xml: re.sub(r"<reservationSet>.*</reservationSet>",
                                                           "<reservationSet/>", xml, flags=re.S),
                   times=2, when=by_id)  # visible to nothing yet
    faults.rewrite("DescribeInstances", lambda xml: set_state(xml, "pending"), times=2, when=by_id)
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-visible", 2, "T4"))
    try:
        assert [c.injected for c in faults.calls("DescribeInstances") if by_id(c.params)][:7] == \
            ["InvalidInstanceID.NotFound"] * 2 + ["rewrite"] * 4 + [None]
        assert len(moto_ec2.alive("faults-visible")) == 2
    finally:
        provider.terminate("faults-visible")


def test_an_instance_that_terminates_while_booting_fails_the_launch_at_once(moto_ec2, faults, key_file):
    faults.rewrite("DescribeInstances", lambda xml: set_state(xml, "terminated"), times=1, when=by_id)
    provider = make(moto_ec2, key_file, boot_timeout=60)
    with pytest.raises(sky.ProvisionError, match=r"did not reach 'running' in us-east-1 \(i-\w+ is terminated\)"):
        provider.launch(PoolSpec("faults-died", 1, "T4"))
    assert moto_ec2.alive("faults-died") == [] and moto_ec2.groups("faults-died") == []


# -- zones and markets ------------------------------------------------------------------------------------------------
def test_capacity_in_one_zone_unsupported_in_the_next_then_the_third(moto_ec2, faults, key_file):
    (a, subnet_a), (b, subnet_b), (c, _) = zones(moto_ec2)[:3]
    faults.fail("RunInstances", "InsufficientInstanceCapacity", "We currently do not have sufficient capacity",
                when=lambda p: subnet_of(p) == subnet_a)
    faults.fail("RunInstances", "Unsupported", "Your requested instance type is not supported in your requested "
                "Availability Zone", when=lambda p: subnet_of(p) == subnet_b)
    provider = make(moto_ec2, key_file, availability_zones=[a, b, c])
    provider.launch(PoolSpec("faults-zones", 1, "A10G"))
    try:
        assert [subnet_of(x.params) for x in faults.calls("RunInstances")][:2] == [subnet_a, subnet_b]
        (instance,) = moto_ec2.alive("faults-zones")
        assert instance["Placement"]["AvailabilityZone"] == c
        (unsupported,) = [e for e in provider.events if f"in {b}" in e and "Unsupported" not in e and "launching"
                          not in e]
        assert "is not offered in" in unsupported and "capacity" not in unsupported
        assert any(f"{a} has no on-demand capacity" in e for e in provider.events)
    finally:
        provider.terminate("faults-zones")


def test_a_type_offered_in_no_zone_tried_is_not_called_a_capacity_problem(moto_ec2, faults, key_file):
    faults.fail("RunInstances", "Unsupported", "Your requested instance type is not supported in your requested "
                "Availability Zone")
    provider = make(moto_ec2, key_file, availability_zones=[z for z, _ in zones(moto_ec2)[:2]])
    with pytest.raises(sky.ProvisionError) as info:
        provider.launch(PoolSpec("faults-nowhere", 1, "L4"))
    assert not isinstance(info.value, aws.CapacityError)
    assert "not offered there" in str(info.value) and "capacity" not in str(info.value)
    assert moto_ec2.alive("faults-nowhere") == [] and moto_ec2.groups("faults-nowhere") == []


ROLE = "AuthFailure.ServiceLinkedRoleCreationNotPermitted"


def test_spot_without_its_service_linked_role_goes_on_demand_and_says_how_to_create_it(moto_ec2, faults, key_file):
    faults.fail("RunInstances", ROLE, "The provided credentials do not have permission to create the service-linked "
                "role for EC2 Spot Instances.", when=spot)
    provider = make(moto_ec2, key_file, spot=True, availability_zones=[z for z, _ in zones(moto_ec2)[:3]])
    provider.launch(PoolSpec("faults-slr", 1, "T4"))
    try:
        markets = ["spot" if spot(x.params) else "on-demand" for x in faults.calls("RunInstances")]
        assert markets == ["spot", "on-demand"]  # the role is the account's: no other zone is tried for spot
        (instance,) = moto_ec2.alive("faults-slr")
        assert instance.get("InstanceLifecycle") != "spot"
        (said,) = [e for e in provider.events if "AWSServiceRoleForEC2Spot" in e]
        assert "aws iam create-service-linked-role --aws-service-name spot.amazonaws.com" in said
        assert "on demand" in said and "capacity" not in said
    finally:
        provider.terminate("faults-slr")


def test_spot_without_its_role_and_without_fallback_stops_with_the_fix(moto_ec2, faults, key_file):
    faults.fail("RunInstances", ROLE, "not permitted", when=spot)
    provider = make(moto_ec2, key_file, spot=True, on_demand_fallback=False)
    with pytest.raises(sky.ProvisionError) as info:
        provider.launch(PoolSpec("faults-slr-only", 1, "T4"))
    message = str(info.value)
    assert not isinstance(info.value, aws.CapacityError)
    assert "AWSServiceRoleForEC2Spot" in message and "--aws-service-name spot.amazonaws.com" in message
    assert "spot=False" in message and len(faults.calls("RunInstances")) == 1
    assert moto_ec2.alive("faults-slr-only") == [] and moto_ec2.groups("faults-slr-only") == []


# -- quotas -----------------------------------------------------------------------------------------------------------
def test_the_quota_check_refuses_before_launching_naming_the_quota_and_the_numbers(moto_ec2, faults, key_file):
    faults.reply("GetServiceQuota", quota(P_QUOTA, 16.0), when=lambda p: p.get("QuotaCode") == P_QUOTA)
    running = prices.running_vcpus(moto_ec2.client(), P_QUOTA)
    provider = make(moto_ec2, key_file)
    with pytest.raises(aws.QuotaError) as info:
        provider.launch(PoolSpec("faults-quota", 2, "H100:1"))
    message = str(info.value)
    assert (info.value.quota, info.value.code) == ("Running On-Demand P instances", P_QUOTA)
    assert "p5.4xlarge" in message and "32 vCPUs" in message and "the quota is 16 vCPUs" in message
    assert f"--desired-value {running + 32} " in message and "request-service-quota-increase" in message
    assert faults.calls("RunInstances") == []  # refused before anything was started
    assert moto_ec2.alive("faults-quota") == [] and moto_ec2.groups("faults-quota") == []


def test_a_quota_that_fits_lets_the_launch_go_and_an_h100_1_is_a_p5_4xlarge(moto_ec2, faults, key_file):
    faults.reply("GetServiceQuota", quota(P_QUOTA, 100000.0), when=lambda p: p.get("QuotaCode") == P_QUOTA)
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-h100-1", 1, "h100:1"))
    try:
        (instance,) = moto_ec2.alive("faults-h100-1")
        assert instance["InstanceType"] == "p5.4xlarge"
        assert any(re.search(r"quota 'Running On-Demand P instances' \(L-417A185B\): \d+ vCPUs in use \+ 16 asked "
                             r"for <= 100000", e) for e in provider.events)
        cost = provider.cost(hosts_of(moto_ec2, "faults-h100-1"))
        assert cost.per_hour == 0 and "no price known for p5.4xlarge" in cost.basis  # no list price of that date
    finally:
        provider.terminate("faults-h100-1")


def test_the_quota_checked_is_the_family_of_the_type_actually_chosen(moto_ec2, faults, key_file):
    faults.reply("GetServiceQuota", quota(G_QUOTA, 8.0), when=lambda p: p.get("QuotaCode") == G_QUOTA)
    provider = make(moto_ec2, key_file, instance_types={"mine": "g5.12xlarge"})
    with pytest.raises(aws.QuotaError) as info:
        provider.launch(PoolSpec("faults-quota-g", 1, "mine"))
    assert [c.params.get("QuotaCode") for c in faults.calls("GetServiceQuota")] == [G_QUOTA]
    assert info.value.quota == "Running On-Demand G and VT instances" and G_QUOTA in str(info.value)
    assert "48 vCPUs" in str(info.value)  # g5.12xlarge is not in the table: EC2 said how many vCPUs it has
    assert moto_ec2.groups("faults-quota-g") == []


def test_a_spot_quota_too_low_goes_on_demand(moto_ec2, faults, key_file):
    faults.reply("GetServiceQuota", quota(P_SPOT_QUOTA, 0.0), when=lambda p: p.get("QuotaCode") == P_SPOT_QUOTA)
    faults.reply("GetServiceQuota", quota(P_QUOTA, 100000.0), when=lambda p: p.get("QuotaCode") == P_QUOTA)
    provider = make(moto_ec2, key_file, spot=True)
    provider.launch(PoolSpec("faults-spot-quota", 1, "H100:1"))
    try:
        assert [spot(c.params) for c in faults.calls("RunInstances")] == [False]
        assert any("spot refused" in e and "All P Spot Instance Requests" in e for e in provider.events)
    finally:
        provider.terminate("faults-spot-quota")


def test_a_quota_that_cannot_be_read_is_said_and_skipped(moto_ec2, faults, key_file):
    faults.fail("GetServiceQuota", "AccessDeniedException", "User is not authorized to perform: "
                "servicequotas:GetServiceQuota")
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-noquota", 1, "T4"))
    try:
        (said,) = [e for e in provider.events if e.startswith("no quota check")]
        assert "AccessDeniedException" in said and "Running On-Demand G and VT instances" in said
        assert len(moto_ec2.alive("faults-noquota")) == 1
    finally:
        provider.terminate("faults-noquota")


# -- teardown that always finishes ------------------------------------------------------------------------------------
def test_terminate_answering_not_found_still_terminates_what_exists(moto_ec2, faults, key_file):
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-gone", 1, "T4"))
    hosts = hosts_of(moto_ec2, "faults-gone")
    ghost = "i-0123456789abcdef0"  # an instance EC2 forgot long ago
    faults.fail("TerminateInstances", "InvalidInstanceID.NotFound", f"The instance ID '{ghost}' does not exist",
                times=1)
    provider.release([*hosts, Host(rank=1, addr="127.0.0.2", private_addr="127.0.0.2", instance_id=ghost,
                                   extra={"pool": "faults-gone"})])
    assert {i["State"]["Name"] for i in moto_ec2.instances("faults-gone")} == {"terminated"}
    assert moto_ec2.groups("faults-gone") == []
    assert any(ghost in e and "counted as terminated" in e for e in provider.events)


def test_termination_right_after_launch_waits_for_the_instance_to_become_visible(moto_ec2, faults, key_file):
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-early", 1, "T4"))
    (instance,) = moto_ec2.alive("faults-early")
    faults.fail("TerminateInstances", "InvalidInstanceID.NotFound", "The instance ID does not exist", times=2)
    faults.rewrite("DescribeInstances", lambda xml: re.sub(r"<reservationSet>.*</reservationSet>",
                                                           "<reservationSet/>", xml, flags=re.S),
                   times=3, when=by_id)  # EC2 does not show it yet: it was launched moments ago
    provider.terminate("faults-early")
    assert moto_ec2.client().describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"][0][
        "Instances"][0]["State"]["Name"] == "terminated"
    assert [c.injected for c in faults.calls("TerminateInstances")][-1] is None  # asked again until it took


def test_waiting_for_termination_copes_with_stopping_and_pending(moto_ec2, faults, key_file):
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-states", 1, "T4"))
    faults.rewrite("DescribeInstances", lambda xml: set_state(xml, "stopping"), times=6, when=by_id)
    faults.rewrite("DescribeInstances", lambda xml: set_state(xml, "pending"), times=6, when=by_id)
    provider.release(hosts_of(moto_ec2, "faults-states"))
    assert {i["State"]["Name"] for i in moto_ec2.instances("faults-states")} == {"terminated"}
    assert len(faults.calls("TerminateInstances")) >= 2  # asked again while it did not shut down
    assert moto_ec2.groups("faults-states") == []


def test_an_instance_stuck_stopping_ends_the_wait_with_a_sky_error_naming_it(moto_ec2, faults, key_file):
    provider = make(moto_ec2, key_file, boot_timeout=1.0)
    provider.launch(PoolSpec("faults-stuck", 1, "T4"))
    hosts = hosts_of(moto_ec2, "faults-stuck")
    faults.rewrite("DescribeInstances", lambda xml: set_state(xml, "stopping"), when=by_id)
    try:
        with pytest.raises(sky.ProvisionError) as info:
            provider.release(hosts)
        message = str(info.value)
        assert f"{hosts[0].instance_id} (stopping)" in message and "us-east-1" in message
        assert f"aws ec2 terminate-instances --region us-east-1 --instance-ids {hosts[0].instance_id}" in message
    finally:
        faults.reset()
        provider.release(hosts)  # safe again, and now it finishes
    assert moto_ec2.groups("faults-stuck") == []


def test_aws_errors_in_teardown_reach_the_user_as_sky_errors(moto_ec2, faults, key_file):
    provider = make(moto_ec2, key_file)
    provider.launch(PoolSpec("faults-denied", 1, "T4"))
    hosts = hosts_of(moto_ec2, "faults-denied")
    faults.fail("TerminateInstances", "UnauthorizedOperation", "You are not authorized to perform this operation.")
    try:
        with pytest.raises(sky.SkyError) as info:
            provider.release(hosts)
        assert isinstance(info.value, sky.ProvisionError) and not isinstance(info.value, ClientError)
        message = str(info.value)
        assert hosts[0].instance_id in message and "us-east-1" in message and "UnauthorizedOperation" in message
        assert "aws ec2 terminate-instances" in message and "%sky gc" in message
        assert len(moto_ec2.alive("faults-denied")) == 1  # still tracked: a later release (or exit) tries again
    finally:
        faults.reset()
        provider.release(hosts)
    assert moto_ec2.alive("faults-denied") == [] and moto_ec2.groups("faults-denied") == []


def test_down_of_an_old_pool_whose_instances_are_gone_finishes(moto_ec2, faults):
    """`%sky down NAME` of a pool a dead kernel left an hour ago: its instances are unknown to EC2 by now."""
    name = "faults-old"
    vpc = moto_ec2.client().describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    group = moto_ec2.client().create_security_group(
        GroupName=f"sky-jupyter-{name}-{secrets.token_hex(4)}", Description="old pool", VpcId=vpc,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [{"Key": aws.TAG_POOL, "Value": name},
                                                                         {"Key": aws.TAG_OWNER, "Value": OWNER}]}]
    )["GroupId"]
    gone = ["i-0aaaaaaaaaaaaaaa1", "i-0aaaaaaaaaaaaaaa2"]
    state.save(state.PoolRecord(name, **{
        "provider": "aws", "secret": "0" * 32, "nodes": 2,
        "hosts": [{"rank": r, "addr": f"198.51.100.{r + 1}", "private_addr": f"10.0.0.{r + 1}", "user": "ubuntu",
                   "instance_id": i, "extra": {"pool": name}} for r, i in enumerate(gone)],
        "workers": [{"rank": r, "node": r, "local_rank": 0, "port": 40000, "pid": 4242} for r in range(2)],
        "cloud": {"provider": "aws", "region": moto_ec2.region, "owner": OWNER, "instances": gone,
                  "launches": ["00000000deadbeef"], "security_groups": [group]}}))
    path = state.pools_dir() / f"{name}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "client_pid": 2 ** 22 + 54321}))  # its kernel died
    sky.ComputePool.release_detached(name)  # what `%sky down faults-old` runs: a provider rebuilt from the file
    assert state.load(name) is None
    assert [c.status for c in faults.calls("TerminateInstances")] == [400]  # EC2: InvalidInstanceID.NotFound
    assert sorted(instance_ids(faults.calls("TerminateInstances")[0].params)) == gone
    assert moto_ec2.client().describe_security_groups(Filters=[{"Name": "group-id", "Values": [group]}])[
        "SecurityGroups"] == []


def test_gc_counts_gone_instances_as_terminated_and_reports_aws_errors_as_sky_errors(moto_ec2, faults):
    owner = "sky-test@aws-faults-gc"
    instance = moto_ec2.client().run_instances(
        ImageId=moto_ec2.image_id(), InstanceType="t3.micro", MinCount=1, MaxCount=1,
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": aws.TAG_POOL, "Value": "faults-gc-gone"},
                                                                 {"Key": aws.TAG_OWNER, "Value": owner}]}]
    )["Instances"][0]["InstanceId"]
    try:
        faults.fail("TerminateInstances", "UnauthorizedOperation", "You are not authorized to perform this operation.")
        with pytest.raises(sky.ProvisionError) as info:
            aws.gc(owner=owner, session=moto_ec2.session(), poll=0.1)
        assert instance in str(info.value) and "us-east-1" in str(info.value)
        assert "aws ec2 terminate-instances" in str(info.value)

        faults.reset()
        faults.fail("DescribeInstances", "UnauthorizedOperation", "not authorized")
        with pytest.raises(sky.ProvisionError, match="listing the instances.*ec2:DescribeInstances"):
            aws.gc(owner=owner, session=moto_ec2.session(), poll=0.1)

        faults.reset()
        faults.fail("TerminateInstances", "InvalidInstanceID.NotFound", "The instance ID does not exist", times=1)
        assert aws.gc(owner=owner, session=moto_ec2.session(), poll=0.1) == [instance]
        state_name = moto_ec2.client().describe_instances(InstanceIds=[instance])["Reservations"][0]["Instances"][0][
            "State"]["Name"]
        assert state_name == "terminated"
    finally:
        moto_ec2.client().terminate_instances(InstanceIds=[instance])


# -- the accelerator table --------------------------------------------------------------------------------------------
def test_h100_1_is_one_h100_without_a_list_price_and_v100_is_refused_naming_an_alternative(moto_ec2, key_file):
    row = accelerators.lookup("H100:1")
    assert (row.instance_type, row.gpus, row.gpu_memory_gib, row.vcpus, row.price_per_hour) == \
        ("p5.4xlarge", 1, 80, 16, None)
    assert "no list price known" in row.summary and accelerators.lookup("h100:8") is accelerators.lookup("H100")
    for name in ("V100", "v100", "V100:1"):
        with pytest.raises(sky.ConfigError) as info:
            accelerators.lookup(name)
        assert "Deep Learning AMI" in str(info.value) and "L4" in str(info.value)
        assert "\n" not in str(info.value)
    provider = make(moto_ec2, key_file)
    with pytest.raises(sky.ConfigError, match="V100"):
        provider.check(PoolSpec("faults-v100", 1, "V100"))
    # A p3 with an image of one's own is still allowed, by name.
    assert make(moto_ec2, key_file, instance_types={"V100": "p3.2xlarge"}).accelerator("V100") == ("p3.2xlarge", None)
    assert prices.quota_for("p5.4xlarge", spot=False) == ("Running On-Demand P instances", P_QUOTA)
    assert prices.quota_for("inf2.xlarge", spot=False)[1] == "L-1945791B"  # not the Standard class ("i")
    assert prices.quota_for("dl1.24xlarge", spot=True)[0] == "All DL Spot Instance Requests"
