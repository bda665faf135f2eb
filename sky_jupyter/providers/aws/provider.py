"""The :class:`AWS` provider: EC2 instances started for a pool, then driven as SSH nodes (see the package's doc)."""

from __future__ import annotations

import atexit
import datetime as _dt
import hashlib
import ipaddress
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError, WaiterError

from ... import accelerators, state
from ...bootstrap import BootstrapPlan
from ...errors import ConfigError, ProvisionError
from ...image import Image
from ...transport import Connection, KnownHosts, load_key
from ..base import Cost, Host, NodeStart, PoolSpec, Progress, Provider, WorkerHandle
from ..local import sky_home
from ..ssh import SSH, parse_host
from . import network
from .common import (
    CAPACITY_ERRORS,
    DLAMI_PARAMETER,
    LIVE_STATES,
    QUOTA_ERRORS,
    SPOT_ERRORS,
    TAG_LAUNCH,
    TAG_OWNER,
    TAG_POOL,
    UBUNTU_PARAMETER,
    CapacityError,
    Instance,
    QuotaError,
    client_for,
    default_owner,
    error_code,
    error_message,
    session_for,
    tag_map,
)
from .prices import list_price, quota_for


class AWS(Provider):
    """EC2 instances as pool nodes: ``sky.ComputePool(provider=sky.AWS(), nodes=4, accelerator="A100")``.

    Credentials, region and profile come from boto3's standard chain (environment, ``~/.aws``, SSO, instance
    role); ``region`` wins over it (default ``us-east-1``).

    - ``spot``: ask for spot instances; ``on_demand_fallback`` allows on demand when spot is refused.
    - ``ami``: an image id instead of the Deep Learning AMI that ``ami_parameter`` (an SSM parameter) names.
    - ``ssh_cidr``: where SSH may come from (default: this machine's public address, /32). Never 0.0.0.0/0
      unless you pass it.
    - ``key_file``: the private key to log in with; its public half (``key_file + ".pub"``, or ``public_key``, a
      key line or a path) is imported as an EC2 key pair. Without either, ``~/.ssh/id_ed25519.pub`` or
      ``~/.ssh/id_rsa.pub`` is used, else a key generated once under ``~/.sky_jupyter/keys``. ``key_name`` names an
      EC2 key pair that already exists instead.
    - ``instance_types``: ``{"A100": "p4de.24xlarge", "mine": "g5.12xlarge"}`` overrides or extends the
      accelerator table.
    - ``user``: the login of the image (``ubuntu`` for the Deep Learning AMI on Ubuntu).
    - ``connect_via``: how this client reaches an instance: a callable ``(instance_description, rank) ->
      "user@addr:port"`` (or an ``~/.ssh/config`` alias) given the instance's ``describe_instances`` entry. The
      default is its public IP, port 22, as ``user``. Use it for private subnets (return
      ``f"ubuntu@{d['PrivateIpAddress']}"`` when this machine is inside the VPC), bastions (forward a local port
      through the bastion and return ``"ubuntu@127.0.0.1:PORT"``, or name an ssh-config alias), or tests (the
      suite maps instances onto its own sshd nodes). Peers find each other at the address the node sees its SSH
      connection arrive on (its private address on EC2).
    - ``subnet_id``: launch there (one zone) instead of the default VPC's subnets; ``availability_zones``: the
      zones to try, in order.
    - ``disk_gib``: root volume size (default: the image's). ``poweroff_command``: what an orphaned node runs.
    - ``session``: a ``boto3.Session`` to use (a profile, or event hooks in tests).
    """

    name = "aws"

    def __init__(self, region: str | None = None, spot: bool = False, on_demand_fallback: bool = True,
                 ami: str | None = None, ssh_cidr: str | None = None, key_name: str | None = None,
                 public_key: str | os.PathLike[str] | None = None, instance_types: Mapping[str, str] | None = None,
                 user: str = "ubuntu", connect_via: Callable[[dict[str, Any], int], str] | None = None, *,
                 key_file: str | os.PathLike[str] | None = None, python: str | None = None,
                 subnet_id: str | None = None, availability_zones: list[str] | None = None,
                 disk_gib: int | None = None, ami_parameter: str = DLAMI_PARAMETER,
                 session: boto3.Session | None = None, owner: str | None = None,
                 poweroff_command: str | None = None, boot_timeout: float = 600.0, poll: float = 5.0,
                 ssh_config: str | os.PathLike[str] | None = None, connect_timeout: float = 10.0) -> None:
        # The SSH half (connections, bootstrap, workers, logs) starts with no hosts: provision() gives it one target
        # per instance it starts.
        self.ssh = SSH(["unset"], user=user, key_file=key_file, python=python, ssh_config=ssh_config,
                       connect_timeout=connect_timeout)
        self.ssh.hosts, self.ssh.targets = [], []
        if connect_via is not None and not callable(connect_via):
            raise ConfigError("connect_via must be a callable (instance_description, rank) -> 'user@addr:port'.")
        if instance_types is not None and not isinstance(instance_types, Mapping):
            raise ConfigError(f"instance_types must map accelerator names to instance types, e.g. "
                              f"{{'A100': 'p4de.24xlarge'}}, not {instance_types!r}.")
        if disk_gib is not None and (isinstance(disk_gib, bool) or not isinstance(disk_gib, int) or disk_gib < 8):
            raise ConfigError(f"disk_gib must be a whole number of GiB, at least 8, not {disk_gib!r}.")
        self.session, self.region = session_for(region, session)
        self.spot = bool(spot)
        self.on_demand_fallback = bool(on_demand_fallback)
        self.ami = ami
        self.ami_parameter = ami_parameter
        self.ssh_cidr = self._check_cidr(ssh_cidr) if ssh_cidr is not None else None
        self.key_name = key_name
        self.public_key = public_key
        self.instance_types = {accelerators.canonical(k): v for k, v in (instance_types or {}).items()}
        self.login_user = user
        self.connect_via = connect_via
        self.subnet_id = subnet_id
        self.availability_zones = list(availability_zones) if availability_zones else None
        self.disk_gib = disk_gib
        self.owner = owner or default_owner()
        self.poweroff_command = poweroff_command
        self.boot_timeout = boot_timeout
        self.poll = poll
        self.events: list[str] = []  # what provisioning did and decided, in order (also printed)
        self._ec2: Any = None
        self._ssm: Any = None
        self._lock = threading.RLock()
        self._instances: dict[str, Instance] = {}  # id -> instance, while it may exist
        self._order: dict[str, list[str]] = {}  # pool -> instance ids in rank order
        self._launches: dict[str, list[str]] = {}  # pool -> launch ids (tags)
        self._groups: dict[str, list[str]] = {}  # pool -> security group ids
        self._zone: dict[str, str] = {}  # pool -> availability zone
        self._private_key: str | None = None

    def __repr__(self) -> str:
        extra = ", spot=True" if self.spot else ""
        return f"AWS(region={self.region!r}{extra})"

    # -- the SSH half --------------------------------------------------------------------------------------------
    # Once an instance answers SSH it is a node like any other: connections, host-key pins, bootstrap, workers and
    # logs are the SSH provider's, reached through ``self.ssh``.
    @property
    def key_file(self) -> str | None:
        return self.ssh.key_file

    def connection(self, host: Host) -> Connection:
        return self.ssh.connection(host)

    def known_hosts(self, pool: str) -> KnownHosts:
        return self.ssh.known_hosts(pool)

    def plan(self, image: Image, plugin_phases: list[tuple[str, str]]) -> BootstrapPlan:
        return self.ssh.plan(image, plugin_phases)

    def bootstrap(self, host: Host, plan: BootstrapPlan, progress: Progress) -> None:
        self.ssh.bootstrap(host, plan, progress)

    def bring_up(self, host: Host, plan: BootstrapPlan, config: dict[str, Any], progress: Progress) -> NodeStart:
        return self.ssh.bring_up(host, plan, config, progress)

    def start_worker(self, host: Host, config: dict[str, Any]) -> WorkerHandle:
        return self.ssh.start_worker(host, config)

    def worker(self, host: Host, port: int, pid: int, local_rank: int = 0) -> WorkerHandle:
        return self.ssh.worker(host, port, pid, local_rank)

    def read_log(self, host: Host) -> str:
        return self.ssh.read_log(host)

    # -- configuration ---------------------------------------------------------------------------------------
    @staticmethod
    def _check_cidr(text: str) -> str:
        try:
            net = ipaddress.ip_network(str(text).strip(), strict=False)
        except ValueError:
            raise ConfigError(f"ssh_cidr {text!r} is not an address range like '203.0.113.7/32'.") from None
        return str(net)

    def accelerator(self, name: str | None) -> tuple[str, float | None]:
        """(instance type, on-demand USD per hour or None) for an accelerator name, overrides first."""
        key = accelerators.canonical(name) if name else "CPU"
        if key in self.instance_types:
            itype = self.instance_types[key]
            return itype, list_price(itype)
        return accelerators.instance_for(name)

    def check(self, spec: PoolSpec) -> None:
        self.accelerator(spec.accelerator)  # ConfigError listing the known names
        if self.key_file:
            load_key(self.key_file)  # ConfigError naming an unreadable key file
        if self.public_key is not None:
            self._public_key_line()

    def worker_options(self) -> dict[str, Any]:
        """Nodes power themselves off when the client falls silent; the shutdown behaviour terminates them."""
        options: dict[str, Any] = {"on_orphan": "poweroff"}
        if self.poweroff_command:
            options["poweroff_command"] = self.poweroff_command
        return options

    def _say(self, pool: str, text: str) -> None:
        self.events.append(text)
        print(f"[{pool}] aws: {text}", file=sys.stderr)

    # -- clients ---------------------------------------------------------------------------------------------
    @property
    def ec2(self) -> Any:
        if self._ec2 is None:
            self._ec2 = client_for(self.session, "ec2", self.region)
        return self._ec2

    @property
    def ssm(self) -> Any:
        if self._ssm is None:
            self._ssm = client_for(self.session, "ssm", self.region)
        return self._ssm

    # -- the pieces a launch needs ---------------------------------------------------------------------------
    def image_id(self, gpu: bool = True) -> str:
        """The AMI to launch: ``ami=``, else the one ``ami_parameter`` (the Deep Learning AMI) names in this
        region; CPU nodes get plain Ubuntu (:data:`UBUNTU_PARAMETER`) unless ``ami_parameter`` was chosen."""
        if self.ami:
            return self.ami
        parameter = self.ami_parameter if gpu or self.ami_parameter != DLAMI_PARAMETER else UBUNTU_PARAMETER
        what = "the Deep Learning AMI" if parameter == DLAMI_PARAMETER else "the AMI"
        try:
            return str(self.ssm.get_parameter(Name=parameter)["Parameter"]["Value"])
        except ClientError as exc:
            code = error_code(exc)
            if code in ("ParameterNotFound", "ParameterVersionNotFound"):
                raise ProvisionError(
                    f"the SSM parameter {parameter} ({what}) does not exist in {self.region}; pass "
                    f"ami='ami-...' (an Ubuntu image{' with NVIDIA drivers' if gpu else ''}) or ami_parameter='...' "
                    f"to sky.AWS.") from None
            raise ProvisionError(f"reading the SSM parameter {parameter} in {self.region} failed ({code}: "
                                 f"{error_message(exc)}); pass ami='ami-...' to sky.AWS to skip it.") from None

    def _public_key_line(self) -> str:
        given = self.public_key
        if given is not None:
            text = str(given).strip()
            path = Path(text).expanduser()
            if not text.startswith(("ssh-", "ecdsa-")) and path.is_file():
                text = path.read_text().strip()
            if not text.startswith(("ssh-", "ecdsa-")) or len(text.split()) < 2:
                raise ConfigError(f"public_key must be an OpenSSH public key line ('ssh-ed25519 AAAA...') or the "
                                  f"path of one, not {str(given)[:40]!r}.")
            return " ".join(text.split()[:2])
        raise AssertionError("no public key given")

    def key_material(self) -> tuple[str, str | None]:
        """(public key line to import, private key file to log in with; None: SSH's defaults and agent)."""
        if self.public_key is not None:
            private = self.key_file
            if private is None:
                text = str(self.public_key)
                if text.endswith(".pub") and Path(text[:-4]).expanduser().is_file():
                    private = str(Path(text[:-4]).expanduser())
            return self._public_key_line(), private
        if self.key_file:
            pub = Path(self.key_file + ".pub")
            if pub.is_file():
                return " ".join(pub.read_text().split()[:2]), self.key_file
            key = load_key(self.key_file)
            if key is None:
                raise ConfigError(f"{self.key_file} needs a passphrase and has no {pub.name} beside it; pass "
                                  f"public_key='ssh-ed25519 AAAA...' too.")
            return f"{key.get_name()} {key.get_base64()}", self.key_file
        for name in ("id_ed25519", "id_rsa"):
            default = Path.home() / ".ssh" / name
            pub = default.with_name(name + ".pub")
            if pub.is_file() and default.is_file():
                return " ".join(pub.read_text().split()[:2]), str(default)
        return self._generated_key()

    @staticmethod
    def _generated_key() -> tuple[str, str]:
        """An ed25519 key of this tool's own, made once under ``~/.sky_jupyter/keys`` (mode 0600)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        folder = sky_home() / "keys"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        private, public = folder / "aws_ed25519", folder / "aws_ed25519.pub"
        if not (private.is_file() and public.is_file()):
            key = ed25519.Ed25519PrivateKey.generate()
            body = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                     serialization.NoEncryption())
            line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            public.write_text(line.decode() + " sky-jupyter\n")
        return " ".join(public.read_text().split()[:2]), str(private)

    def ensure_key_pair(self, public_line: str) -> str:
        """The EC2 key pair holding ``public_line`` (imported once per region, named by its fingerprint)."""
        if self.key_name:
            return self.key_name
        name = "sky-jupyter-" + hashlib.sha256(public_line.split()[1].encode()).hexdigest()[:16]
        try:
            self.ec2.describe_key_pairs(KeyNames=[name])
            return name
        except ClientError as exc:
            if error_code(exc) != "InvalidKeyPair.NotFound":
                raise
        try:
            self.ec2.import_key_pair(KeyName=name, PublicKeyMaterial=public_line.encode(), TagSpecifications=[
                {"ResourceType": "key-pair", "Tags": [{"Key": TAG_OWNER, "Value": self.owner}]}])
        except ClientError as exc:
            if error_code(exc) != "InvalidKeyPair.Duplicate":  # another client imported it just now
                raise
        return name

    def caller_cidr(self) -> str:
        """Where SSH may come from: ``ssh_cidr``, else this machine's public address /32."""
        if self.ssh_cidr:
            return self.ssh_cidr
        return self._check_cidr(network.public_address())

    def subnets(self) -> dict[str, str]:
        """Availability zone -> subnet to launch in: ``subnet_id``'s, or the default VPC's per zone."""
        if self.subnet_id:
            found = self.ec2.describe_subnets(SubnetIds=[self.subnet_id])["Subnets"]
            return {found[0]["AvailabilityZone"]: self.subnet_id}
        found = self.ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        if not found:
            raise ProvisionError(f"{self.region} has no default VPC subnets to launch in; pass subnet_id='subnet-...' "
                                 f"(a subnet whose instances get a public address, or use connect_via=...).")
        return {s["AvailabilityZone"]: s["SubnetId"] for s in sorted(found, key=lambda s: s["AvailabilityZone"])}

    def zones_for(self, instance_type: str, subnets: dict[str, str]) -> list[str]:
        """The zones to try, in order: those offering ``instance_type`` that we have a subnet in."""
        zones = list(subnets)
        try:
            pages = self.ec2.get_paginator("describe_instance_type_offerings").paginate(
                LocationType="availability-zone", Filters=[{"Name": "instance-type", "Values": [instance_type]}])
            offered = {o["Location"] for page in pages for o in page["InstanceTypeOfferings"]}
        except ClientError:
            offered = set(zones)  # not allowed to ask: try them all
        if not offered:
            raise ProvisionError(f"{instance_type} is not offered in {self.region}; pick another region "
                                 f"(sky.AWS(region=...)) or accelerator.")
        zones = [z for z in zones if z in offered]
        if self.availability_zones:
            zones = [z for z in self.availability_zones if z in zones]
        if not zones:
            raise ProvisionError(f"{instance_type} is offered in {self.region} only in {', '.join(sorted(offered))}, "
                                 f"where no usable subnet was found; pass subnet_id=... in one of those zones.")
        return zones

    def security_group(self, pool: str, launch: str, vpc: str, cidr: str) -> str:
        """A group of the pool's own: SSH from ``cidr`` only, everything between members of the group."""
        tags = [{"Key": TAG_POOL, "Value": pool}, {"Key": TAG_OWNER, "Value": self.owner},
                {"Key": TAG_LAUNCH, "Value": launch}]
        group = self.ec2.create_security_group(
            GroupName=f"sky-jupyter-{pool}-{launch[:8]}", VpcId=vpc,
            Description=f"sky_jupyter pool {pool}: SSH from {cidr}, all traffic inside the group",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])["GroupId"]
        with self._lock:
            self._groups.setdefault(pool, []).append(group)
        self._persist(pool)
        ssh_rule: dict[str, Any] = {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22}
        if ipaddress.ip_network(cidr).version == 6:
            ssh_rule["Ipv6Ranges"] = [{"CidrIpv6": cidr, "Description": "sky_jupyter client"}]
        else:
            ssh_rule["IpRanges"] = [{"CidrIp": cidr, "Description": "sky_jupyter client"}]
        self.ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
            ssh_rule, {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group, "Description": "pool members"}]}])
        return group

    # -- provisioning ----------------------------------------------------------------------------------------
    def provision(self, spec: PoolSpec) -> list[Host]:
        """Start the instances the pool lacks (all of them, or the new ones when it grows), wait until they run
        and answer SSH, and hand them to the SSH machinery. Whatever this call started is terminated again if it
        fails or is interrupted."""
        pool = spec.name
        with self._lock:
            have = list(self._order.get(pool, []))
        if not have:  # new machines: keys pinned for an earlier pool of this name (same addresses) are void
            self.known_hosts(pool).path.unlink(missing_ok=True)
        ids = self.launch(spec)
        try:
            return self._connect(spec, ids)
        except BaseException:
            self._cleanup(pool, ids=ids[len(have):])
            raise

    def launch(self, spec: PoolSpec) -> list[str]:
        """Start the instances the pool lacks and wait until they run; the pool's instance ids in rank order.
        What this call started is terminated again (and waited for) if it fails or is interrupted."""
        pool = spec.name
        with self._lock:
            have = len(self._order.get(pool, []))
        if spec.nodes > have:
            launch = secrets.token_hex(8)
            try:
                self._launch(spec, launch, spec.nodes - have)
            except BaseException:
                self._cleanup(pool, launch=launch)
                raise
        with self._lock:
            return list(self._order[pool][: spec.nodes])

    def terminate(self, pool: str) -> None:
        """Terminate every instance of ``pool`` this provider started and wait until they are gone; then
        delete the pool's security group."""
        self._terminate(pool)

    def _launch(self, spec: PoolSpec, launch: str, count: int) -> None:
        pool = spec.name
        itype, _ = self.accelerator(spec.accelerator)
        public_line, self._private_key = self.key_material()
        row = next((a for a in accelerators.TABLE if a.instance_type == itype), None)
        ami = self.image_id(gpu=row is None or row.gpus > 0)
        key_name = self.ensure_key_pair(public_line)
        subnets = self.subnets()
        grow_zone = self._zone.get(pool)
        zones = [grow_zone] if grow_zone else self.zones_for(itype, subnets)  # grown nodes join the pool's zone
        vpc = self.ec2.describe_subnets(SubnetIds=[subnets[zones[0]]])["Subnets"][0]["VpcId"]
        group = self._groups[pool][0] if grow_zone else self.security_group(pool, launch, vpc, self.caller_cidr())
        tags = [{"Key": TAG_POOL, "Value": pool}, {"Key": TAG_OWNER, "Value": self.owner},
                {"Key": TAG_LAUNCH, "Value": launch}, {"Key": "Name", "Value": f"sky-jupyter {pool}"}]
        params: dict[str, Any] = {
            "ImageId": ami, "InstanceType": itype, "MinCount": count, "MaxCount": count, "KeyName": key_name,
            "SecurityGroupIds": [group], "InstanceInitiatedShutdownBehavior": "terminate",
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 2},
            "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
        }
        if self.disk_gib:
            root = self.ec2.describe_images(ImageIds=[ami])["Images"][0]["RootDeviceName"]
            params["BlockDeviceMappings"] = [{"DeviceName": root, "Ebs": {"VolumeSize": self.disk_gib,
                                                                           "VolumeType": "gp3"}}]
        with self._lock:
            self._launches.setdefault(pool, []).append(launch)
        self._persist(pool)
        markets = ["spot", "on-demand"] if self.spot and self.on_demand_fallback else \
            ["spot"] if self.spot else ["on-demand"]
        refused: list[str] = []
        last = ""
        attempt = 0
        for market in markets:
            for zone in zones:
                attempt += 1
                run = dict(params, SubnetId=subnets[zone], ClientToken=f"{launch}-{attempt}")
                if market == "spot":
                    run["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                        "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
                self._say(pool, f"launching {count}x {itype} ({spec.accelerator or 'CPU'}, {market}) in {zone}")
                try:
                    started = self.ec2.run_instances(**run)["Instances"]
                except ClientError as exc:
                    code, message = error_code(exc), error_message(exc)
                    if code in QUOTA_ERRORS:
                        error = self._quota_error(itype, count, market == "spot", code, message)
                        if market == "spot" and "on-demand" in markets:
                            self._say(pool, f"spot refused: {error}; trying on demand")
                            refused.append(f"{market} in {zone}: {code}")
                            break
                        raise error from None
                    if code in CAPACITY_ERRORS or (market == "spot" and code in SPOT_ERRORS):
                        self._say(pool, f"{zone} has no {market} capacity for {itype} ({code}); trying the next option")
                        refused.append(f"{market} in {zone}: {code}")
                        last = message
                        continue
                    raise ProvisionError(f"EC2 refused to start {count}x {itype} in {zone} ({code}: {message}).") \
                        from None
                self._adopt(pool, launch, started, itype, zone, market)
                self._wait_running(pool, [i["InstanceId"] for i in started])
                return
        raise CapacityError(
            f"no capacity for {count}x {itype} in {self.region} ({'; '.join(refused)}; last: {last}); try again "
            f"later, another "
            f"region (sky.AWS(region=...)), fewer nodes" + (", or spot=False" if self.spot else
                                                           ", or spot=True") + ".")

    def _quota_error(self, itype: str, count: int, spot: bool, code: str, message: str) -> QuotaError:
        quota, quota_code = quota_for(itype, spot)
        row = next((a for a in accelerators.TABLE if a.instance_type == itype), None)
        need = f"{row.vcpus * count} vCPUs" if row else f"{count} instances"
        how = (f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {quota_code} "
               f"--desired-value {row.vcpus * count if row else 'N'} --region {self.region}") if quota_code else \
            f"search the Service Quotas console (EC2) for {quota!r}"
        return QuotaError(
            f"EC2 quota {quota!r}{f' ({quota_code})' if quota_code else ''} in {self.region} is too low for "
            f"{count}x {itype} ({need}): {code}: {message} Raise it in the Service Quotas console (Amazon EC2, "
            f"{quota!r}) or with `{how}`; or ask for fewer nodes or a smaller accelerator.", quota, quota_code)

    def _adopt(self, pool: str, launch: str, started: list[dict[str, Any]], itype: str, zone: str, market: str
               ) -> None:
        """Remember instances (and write their ids to the pool's state file) before anything waits on them."""
        started = sorted(started, key=lambda i: i.get("AmiLaunchIndex", 0))
        price, spot_priced = self._hourly_price(itype, zone, market)
        with self._lock:
            for inst in started:
                when = inst.get("LaunchTime")
                launched = when.timestamp() if isinstance(when, _dt.datetime) else time.time()
                self._instances[inst["InstanceId"]] = Instance(inst["InstanceId"], pool, launch, itype, zone,
                                                                market, launched, price, spot_priced)
                self._order.setdefault(pool, []).append(inst["InstanceId"])
            self._zone.setdefault(pool, zone)
            _LIVE[id(self)] = self
        self._persist(pool)
        self._say(pool, f"started {', '.join(i['InstanceId'] for i in started)}")

    def _wait_running(self, pool: str, ids: list[str]) -> None:
        attempts = max(1, int(self.boot_timeout / max(self.poll, 0.1)))
        try:
            self.ec2.get_waiter("instance_running").wait(
                InstanceIds=ids, WaiterConfig={"Delay": self.poll, "MaxAttempts": attempts})
        except WaiterError as exc:
            reasons = []
            for inst in self._describe(ids):
                if inst["State"]["Name"] != "running":
                    reason = inst.get("StateReason", {}).get("Message", "")
                    reasons.append(f"{inst['InstanceId']} is {inst['State']['Name']}" + (f" ({reason})" if reason
                                                                                          else ""))
            raise ProvisionError(f"pool {pool!r}: instances did not reach 'running' ({'; '.join(reasons) or exc}); "
                                 f"they are being terminated.") from None

    def _hourly_price(self, itype: str, zone: str, market: str) -> tuple[float | None, bool]:
        """What an instance costs per hour, and whether that is its spot price: a spot instance's spot price in its
        zone when EC2 gives it, else the table's on-demand list price (None for a type the table lacks)."""
        spot_price = self._spot_price(itype, zone) if market == "spot" else None
        return (list_price(itype), False) if spot_price is None else (spot_price, True)

    def _spot_price(self, itype: str, zone: str) -> float | None:
        """The spot price per hour of ``itype`` in ``zone`` now (Linux), or None when EC2 does not say (no
        permission for DescribeSpotPriceHistory, no history): its cost is then counted at the list price."""
        try:
            history = self.ec2.describe_spot_price_history(
                InstanceTypes=[itype], AvailabilityZone=zone, StartTime=_dt.datetime.now(_dt.UTC),
                ProductDescriptions=["Linux/UNIX", "Linux/UNIX (Amazon VPC)"])["SpotPriceHistory"]
        except (ClientError, BotoCoreError):
            return None
        prices = [h for h in history if h.get("AvailabilityZone") == zone and h.get("InstanceType") == itype]
        if not prices:
            return None
        latest = max(prices, key=lambda h: str(h.get("Timestamp", "")))
        try:
            return float(latest["SpotPrice"])
        except (KeyError, TypeError, ValueError):
            return None

    def _describe(self, ids: list[str]) -> list[dict[str, Any]]:
        if not ids:
            return []
        pages = self.ec2.get_paginator("describe_instances").paginate(InstanceIds=ids)
        found = {i["InstanceId"]: i for page in pages for r in page["Reservations"] for i in r["Instances"]}
        return [found[i] for i in ids if i in found]

    def _target(self, description: dict[str, Any], rank: int) -> str:
        if self.connect_via is not None:
            target = self.connect_via(description, rank)
            if not isinstance(target, str):
                raise ConfigError(f"connect_via returned {target!r} for rank {rank}; it must return "
                                  f"'user@addr:port' (a string).")
            return target
        addr = description.get("PublicIpAddress")
        if not addr:
            raise ProvisionError(f"instance {description['InstanceId']} has no public address; launch in a subnet "
                                 f"that assigns one, or pass connect_via=lambda d, rank: f\"ubuntu@{{d['Private"
                                 f"IpAddress']}}\" when this machine can reach the VPC.")
        return f"{self.login_user}@{addr}:22"

    def _connect(self, spec: PoolSpec, ids: list[str]) -> list[Host]:
        """Point the SSH half at the instances, wait for their SSH servers, and let it connect (pinning keys)."""
        descriptions = self._describe(ids)
        if [d["InstanceId"] for d in descriptions] != ids:
            missing = sorted(set(ids) - {d["InstanceId"] for d in descriptions})
            raise ProvisionError(f"pool {spec.name!r}: instances {', '.join(missing)} are gone.")
        strings = [self._target(d, rank) for rank, d in enumerate(descriptions)]
        for text in strings:
            parse_host(text)  # ConfigError naming a malformed connect_via result
        targets = [self.ssh._resolve(text) for text in strings]
        if not self.key_file and self._private_key:  # the key imported as the key pair logs in
            targets = [replace(t, key_files=(self._private_key, *t.key_files)) for t in targets]
        deadline = time.monotonic() + self.boot_timeout
        for rank, target in enumerate(targets):
            self._wait_for_ssh(spec.name, rank, target.addr, target.port, deadline)
        for description, target in zip(descriptions, targets):
            self._pin_console_keys(spec.name, description["InstanceId"], target.addr, target.port)
        with self._lock:
            self.ssh.hosts, self.ssh.targets = strings, targets
            hosts = self.ssh.provision(spec)
        out = []
        for host, description in zip(hosts, descriptions):
            inst = self._instances.get(description["InstanceId"])
            seen = self._address_seen_by(host) or description.get("PrivateIpAddress") or host.addr
            extra = {**host.extra, "instance_id": description["InstanceId"],
                     "instance_type": description.get("InstanceType", ""), "region": self.region,
                     "zone": description.get("Placement", {}).get("AvailabilityZone", ""),
                     "market": inst.market if inst else "", "launched": str(inst.launched if inst else "")}
            out.append(replace(host, private_addr=seen, instance_id=description["InstanceId"], extra=extra))
        self._say(spec.name, "nodes: " + ", ".join(f"{h.rank}={h.display} ({h.instance_id})" for h in out))
        return out

    def _wait_for_ssh(self, pool: str, rank: int, addr: str, port: int, deadline: float) -> None:
        """A booting instance runs before its SSH server answers: wait for the server's banner."""
        while True:
            try:
                with socket.create_connection((addr, port), timeout=5) as sock:
                    sock.settimeout(5)
                    if sock.recv(4) == b"SSH-":
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise ProvisionError(
                    f"pool {pool!r} node {rank}: no SSH server answered on {addr}:{port} within "
                    f"{self.boot_timeout:.0f} s; check that the security group admits your address "
                    f"({self.ssh_cidr or 'your public address'}) and that the instance booted (EC2 console output).")
            time.sleep(min(2.0, self.poll))

    def _pin_console_keys(self, pool: str, instance_id: str, addr: str, port: int) -> None:
        """Pin the host keys cloud-init printed on the console, when it did: then even the first connection
        is verified. Only an ed25519 key is pinned from there (the type paramiko negotiates first)."""
        known = self.known_hosts(pool)
        if known.pinned(addr, port):
            return
        try:
            output = self.ec2.get_console_output(InstanceId=instance_id).get("Output") or ""
        except (ClientError, BotoCoreError):
            return
        if "BEGIN SSH HOST KEY KEYS" not in output:
            return
        section = output.split("-----BEGIN SSH HOST KEY KEYS-----", 1)[1].split("-----END SSH HOST KEY KEYS", 1)[0]
        lines = [ln.split()[:2] for ln in section.splitlines() if ln.startswith("ssh-ed25519 ")]
        if not lines:
            return
        from ...transport import host_id

        known.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(known.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{host_id(addr, port)} {lines[0][0]} {lines[0][1]}\n")

    def _address_seen_by(self, host: Host) -> str | None:
        """The address the node sees this SSH connection arrive on: how its peers reach it (private on EC2)."""
        try:
            code, out, _ = self.connection(host).run('echo "$SSH_CONNECTION"', timeout=30)
        except (ProvisionError, OSError):
            return None
        parts = out.split()
        return parts[2] if code == 0 and len(parts) >= 4 else None

    # -- state, cost ------------------------------------------------------------------------------------------
    def pool_state(self, pool: str) -> dict[str, Any]:
        with self._lock:
            return {"provider": "aws", "region": self.region, "owner": self.owner,
                    "launches": list(self._launches.get(pool, [])),
                    "instances": [i for i in self._order.get(pool, []) if i in self._instances],
                    "security_groups": list(self._groups.get(pool, []))}

    def _persist(self, pool: str) -> None:
        """Write the pool's cloud ids into its state file now (the pool rewrites it later with the same key)."""
        current = state.load(pool) or {}
        state.save(pool, {**current, "cloud": self.pool_state(pool)})

    def cost(self, hosts: list[Host]) -> Cost | None:
        now = time.time()
        per_hour = so_far = 0.0
        unknown: list[str] = []
        spot_zones: set[str] = set()
        listed = unpriced_spot = 0
        with self._lock:
            for host in hosts:
                inst = self._instances.get(host.instance_id or "")
                if inst is None:
                    continue
                if inst.price is None:
                    unknown.append(inst.instance_type)
                    continue
                if inst.spot_priced:
                    spot_zones.add(inst.az)
                else:
                    listed += 1
                    unpriced_spot += inst.market == "spot"
                per_hour += inst.price
                so_far += inst.price * max(0.0, now - inst.launched) / 3600.0
        parts = []
        if spot_zones:
            parts.append(f"spot prices EC2 gave for {', '.join(sorted(spot_zones))}")
        if listed:
            parts.append(f"on-demand list prices, {accelerators.PRICES_REGION}, {accelerators.PRICES_DATE}")
        if unpriced_spot:
            parts.append("spot nodes whose spot price EC2 did not give are counted at the list price (they bill "
                         "less)")
        if unknown:
            parts.append(f"no price known for {', '.join(sorted(set(unknown)))}")
        basis = "; ".join(parts)
        return Cost(per_hour=per_hour, so_far=so_far, basis=basis)

    def reattach(self, pool: str, hosts: list[Host], cloud: dict[str, Any]) -> list[Host]:
        """Take over the instances of a pool that an earlier client launched (ids from its state file), so that
        this provider bills and terminates them, then reconnect to them over SSH."""
        ids = [h.instance_id for h in hosts if h.instance_id]
        found = {d["InstanceId"]: d for d in self._describe(ids)}
        gone = [i for i in ids if found.get(i, {}).get("State", {}).get("Name") != "running"]
        if gone:
            raise ProvisionError(f"pool {pool!r}: instances {', '.join(gone)} are no longer running, so the pool "
                                 f"is gone; `%sky down {pool}` terminates what is left of it.")
        adopted = {}
        for instance_id in ids:  # prices asked of EC2 before the lock is taken
            d = found[instance_id]
            itype = d.get("InstanceType", "")
            when = d.get("LaunchTime")
            launched = when.timestamp() if isinstance(when, _dt.datetime) else time.time()
            zone = d.get("Placement", {}).get("AvailabilityZone", "")
            market = "spot" if d.get("InstanceLifecycle") == "spot" else "on-demand"
            adopted[instance_id] = Instance(instance_id, pool, tag_map(d.get("Tags")).get(TAG_LAUNCH, ""), itype,
                                             zone, market, launched, *self._hourly_price(itype, zone, market))
        with self._lock:
            self._instances.update(adopted)
            self._order[pool] = list(ids)
            self._launches[pool] = list(cloud.get("launches") or ())
            self._groups[pool] = list(cloud.get("security_groups") or ())
            _LIVE[id(self)] = self
        return self.ssh.reattach(pool, hosts, cloud)

    def disconnect(self, hosts: list[Host]) -> None:
        """Close the connections and stop tracking the pools' instances, without terminating them."""
        self.ssh.disconnect(hosts)
        with self._lock:
            for pool in {str(h.extra.get("pool", "")) for h in hosts}:
                for i in self._order.pop(pool, []):
                    self._instances.pop(i, None)
                self._launches.pop(pool, None)
                self._groups.pop(pool, None)
            if not self._instances:
                _LIVE.pop(id(self), None)

    # -- teardown ---------------------------------------------------------------------------------------------
    def release(self, hosts: list[Host]) -> None:
        """Close the SSH connections, terminate the pools' instances and wait until they are gone, then delete
        their security groups. Safe to call more than once."""
        try:
            self.ssh.release(hosts)
        finally:
            by_pool: dict[str, list[str]] = {}
            for host in hosts:
                if host.extra.get("pool"):
                    by_pool.setdefault(str(host.extra["pool"]), []).extend([host.instance_id] if host.instance_id
                                                                           else [])
            for pool, ids in sorted(by_pool.items()):
                self._terminate(pool, extra_ids=ids)

    def _cleanup(self, pool: str, launch: str | None = None, ids: list[str] | None = None) -> None:
        """Terminate what a failed or interrupted provision started; the original error is what propagates."""
        try:
            self._terminate(pool, launch=launch, only=ids)
        except Exception as exc:  # noqa: BLE001 - the launch error matters more; say what is left
            print(f"[{pool}] aws: could not terminate what a failed launch started ({exc}); run "
                  f"sky_jupyter.providers.aws.gc() or terminate the instances tagged {TAG_POOL}={pool} in the "
                  f"EC2 console.", file=sys.stderr)

    def _terminate(self, pool: str, launch: str | None = None, extra_ids: tuple[str, ...] | list[str] = (),
                   only: list[str] | None = None, wait: bool = True) -> None:
        """Terminate the pool's instances (only one launch's, or the ids in ``only``, when given) and wait;
        delete its security groups once no instance of the pool is left."""
        with self._lock:
            launches = [launch] if launch else [] if only is not None else list(self._launches.get(pool, []))
            ids = {i for i, inst in self._instances.items() if inst.pool == pool and inst.launch in launches}
            ids |= set(only or ())
        if launches:  # instances a launch started but whose ids never came back (interrupted call)
            found = self.ec2.describe_instances(Filters=[
                {"Name": f"tag:{TAG_LAUNCH}", "Values": launches},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
            ids |= {i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]}
        ids |= set(extra_ids)  # the hosts' own instances, tracked here or not
        ids_list = sorted(ids)
        if ids_list:
            self._say(pool, f"terminating {', '.join(ids_list)}")
            self.ec2.terminate_instances(InstanceIds=ids_list)
            if wait:
                attempts = max(1, int(self.boot_timeout / max(self.poll, 0.1)))
                self.ec2.get_waiter("instance_terminated").wait(
                    InstanceIds=ids_list, WaiterConfig={"Delay": self.poll, "MaxAttempts": attempts})
        with self._lock:
            for i in ids_list:
                self._instances.pop(i, None)
            left = [i for i in self._order.pop(pool, []) if i in self._instances]
            groups: list[str] = []
            if left:
                self._order[pool] = left
                if launch is not None and launch in self._launches.get(pool, []):
                    self._launches[pool].remove(launch)
            else:
                groups = self._groups.pop(pool, [])
                self._zone.pop(pool, None)
                self._launches.pop(pool, None)
            if not self._instances:
                _LIVE.pop(id(self), None)
        if wait:
            for group in groups:
                self._delete_group(pool, group)
        if state.load(pool) is not None:
            self._persist(pool)

    def _delete_group(self, pool: str, group: str) -> None:
        """Delete a security group; EC2 takes a moment to release it from terminated instances."""
        for delay in (0, 1, 2, 4, 8, 15):
            time.sleep(delay * (self.poll / 5.0))
            try:
                self.ec2.delete_security_group(GroupId=group)
                return
            except ClientError as exc:
                if error_code(exc) == "InvalidGroup.NotFound":
                    return
                if error_code(exc) != "DependencyViolation":
                    raise
        print(f"[{pool}] aws: security group {group} is still in use; `%sky gc` deletes it later.", file=sys.stderr)

    def terminate_all(self) -> None:
        """Terminate every instance this provider still tracks (the atexit hook)."""
        with self._lock:
            pools = sorted({inst.pool for inst in self._instances.values()})
        for pool in pools:
            self._terminate(pool)


#: Providers with instances that may still exist, for the atexit hook.
_LIVE: dict[int, AWS] = {}


@atexit.register
def _terminate_leftovers() -> None:
    """At interpreter exit, terminate instances of pools nobody closed (the dead-man switch is the last resort)."""
    for provider in list(_LIVE.values()):
        try:
            provider.terminate_all()
        except Exception as exc:  # noqa: BLE001 - at exit, tell the user and go on with the others
            print(f"sky_jupyter: could not terminate instances at exit ({exc}); run `%sky gc` or "
                  f"sky_jupyter.providers.aws.gc() to clean up.", file=sys.stderr)
