"""The :class:`AWS` provider: EC2 instances started for a pool, then driven as SSH nodes (see the package's doc)."""

from __future__ import annotations

import atexit
import datetime as _dt
import functools
import hashlib
import ipaddress
import itertools
import os
import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from ... import accelerators, state
from ...bootstrap import BootstrapPlan
from ...errors import ConfigError, ProvisionError
from ...image import Image
from ...state import sky_home
from ...transport import Connection, KnownHosts, load_key
from ..base import Cost, Host, NodeStart, PoolSpec, Progress, Provider, WorkerHandle, in_parallel
from ..ssh import parse_host
from . import hostkeys, network, teardown
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
from .gc import gc as _gc
from .prices import (
    SPOT_ROLE_ERROR,
    cpu_instance,
    list_price,
    quota_for,
    quota_value,
    running_vcpus,
    spot_role_message,
    vcpus_of,
)
from .retry import NOT_YET_VISIBLE, eventually
from .teardown import why


class AWS(Provider):
    """EC2 instances as pool nodes: ``sky.ComputePool(provider=sky.AWS(), nodes=4, accelerator="A100")``.

    Credentials, region and profile come from boto3's standard chain (environment, ``~/.aws``, SSO, instance
    role); ``region`` wins over it (default ``us-east-1``).

    - ``spot``: ask for spot instances; ``on_demand_fallback`` allows on demand when spot is refused.
    - ``ami``: an image id instead of the Deep Learning AMI that ``ami_parameter`` (an SSM parameter) names.
    - ``ssh_cidr``: where SSH may come from (default: this machine's public address, /32 or /128, asked of
      ``address_source``, a URL answering with the address; else ``$SKY_JUPYTER_ADDRESS_SOURCE``, else
      https://checkip.amazonaws.com). IPv4 or IPv6. A range open to everyone (``0.0.0.0/0``, ``::/0``) also needs
      ``allow_open_ssh=True``. Without ``ssh_cidr`` the rule follows you: attaching to the pool later from another
      address replaces it.
    - ``host_key_check``: instance host keys are pinned by instance id (``~/.sky_jupyter/hostkeys/aws``), verified
      from the instance's console output when cloud-init prints them there within ``console_timeout`` seconds;
      otherwise ``"tofu"`` (default) trusts the first key with a warning and ``"strict"`` refuses the instance.
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
      zones to try, in order. A subnet that does not give instances a public IPv4 address gets one asked for per
      instance (unless ``connect_via`` is given: then you reach private addresses). A pool keeps its zone, subnet
      and security group (in its state file): nodes added later, also after ``%sky attach``, join them.
    - ``disk_gib``: root volume size (default: the image's). ``poweroff_command``: what an orphaned node runs.
    - ``metadata_endpoint``: the instance metadata service spot nodes poll for reclaim notices (default: the node's
      ``SKY_JUPYTER_METADATA_ENDPOINT``, else ``http://169.254.169.254``).
    - ``session``: a ``boto3.Session`` to use (a profile, or event hooks in tests).
    """

    name = "aws"

    #: ``sky.AWS.gc(region=None, interactive=False, dry_run=False)``: find and terminate instances this tool started
    #: whose pool is gone (``%sky gc``); see :func:`sky_jupyter.providers.aws.gc.gc`.
    gc = staticmethod(_gc)

    def __init__(self, region: str | None = None, spot: bool = False, on_demand_fallback: bool = True,
                 ami: str | None = None, ssh_cidr: str | None = None, key_name: str | None = None,
                 public_key: str | os.PathLike[str] | None = None, instance_types: Mapping[str, str] | None = None,
                 user: str = "ubuntu", connect_via: Callable[[dict[str, Any], int], str] | None = None, *,
                 key_file: str | os.PathLike[str] | None = None, python: str | None = None,
                 subnet_id: str | None = None, availability_zones: list[str] | None = None,
                 disk_gib: int | None = None, ami_parameter: str = DLAMI_PARAMETER,
                 session: boto3.Session | None = None, owner: str | None = None,
                 poweroff_command: str | None = None, boot_timeout: float = 600.0, poll: float = 5.0,
                 ssh_config: str | os.PathLike[str] | None = None, connect_timeout: float = 10.0,
                 host_key_check: str = "tofu", console_timeout: float = 60.0, address_source: str | None = None,
                 allow_open_ssh: bool = False, metadata_endpoint: str | None = None,
                 retry_on_interruption: bool = False) -> None:
        # The SSH half (connections, bootstrap, workers, logs) starts with no hosts: provision() gives it one target
        # per instance it starts. Its host keys are pinned per instance id (hostkeys.py), in a store all pools share.
        self.host_key_check = hostkeys.check_policy(host_key_check)
        self.console_timeout = float(console_timeout)
        self.ssh = hostkeys.InstanceSSH(hostkeys.HostKeyStore(), self.host_key_check, ["unset"], user=user,
                                        key_file=key_file, python=python, ssh_config=ssh_config,
                                        connect_timeout=connect_timeout, timeout=self.console_timeout)
        self.ssh.hosts, self.ssh.targets = [], []
        if connect_via is not None and not callable(connect_via):
            raise ConfigError("connect_via must be a callable (instance_description, rank) -> 'user@addr:port'.")
        if instance_types is not None and not isinstance(instance_types, Mapping):
            raise ConfigError(f"instance_types must map accelerator names to instance types, e.g. "
                              f"{{'A100': 'p4de.24xlarge'}}, not {instance_types!r}.")
        if disk_gib is not None and (isinstance(disk_gib, bool) or not isinstance(disk_gib, int) or disk_gib < 8):
            raise ConfigError(f"disk_gib must be a whole number of GiB, at least 8, not {disk_gib!r}.")
        self.session, self.region = session_for(region, session)
        self.ssh.region = self.region
        self.spot = bool(spot)
        self.on_demand_fallback = bool(on_demand_fallback)
        self.ami = ami
        self.ami_parameter = ami_parameter
        self.allow_open_ssh = bool(allow_open_ssh)
        self.ssh_cidr = network.check_cidr(ssh_cidr, self.allow_open_ssh) if ssh_cidr is not None else None
        self.address_source = network.address_source(address_source) if address_source is not None else None
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
        # Where spot nodes ask for reclaim notices (the instance metadata service; tests name a stand-in).
        self.metadata_endpoint = metadata_endpoint
        self.retry_on_interruption = bool(retry_on_interruption)
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
        self._subnet_info: dict[str, dict[str, Any]] = {}  # subnet id -> its DescribeSubnets entry
        # pool -> where it lives besides its zone: "subnets" (zone -> subnet), "vpc", "ssh_cidr" (what its group
        # admits), "placement_group"; kept in its state file so that growing it, also after an attach, joins them.
        self._net: dict[str, dict[str, Any]] = {}
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
    def accelerator(self, name: str | None) -> tuple[str, float | None]:
        """(instance type, on-demand USD per hour or None) for an accelerator name, overrides first."""
        key = accelerators.canonical(name) if name else "CPU"
        if key in self.instance_types:
            itype = self.instance_types[key]
            return itype, list_price(itype)
        return accelerators.instance_for(name)

    def instance_type(self, spec: PoolSpec) -> str:
        """What to launch for ``spec``: its accelerator's type; with none named, a CPU type sized by its ``vcpus``,
        ``memory_gb`` and ``architecture`` when it gives any (an ``instance_types`` entry for "CPU" wins)."""
        sized = any(v is not None for v in (spec.vcpus, spec.memory_gb, spec.architecture))
        if spec.accelerator or not sized or "CPU" in self.instance_types:
            return self.accelerator(spec.accelerator)[0]
        return cpu_instance(spec.vcpus, spec.memory_gb, spec.architecture)

    def check(self, spec: PoolSpec) -> None:
        self.instance_type(spec)  # ConfigError listing the known names, or naming a size no type has
        if self.key_file:
            load_key(self.key_file)  # ConfigError naming an unreadable key file
        if self.public_key is not None:
            self._public_key_line()

    def worker_options(self) -> dict[str, Any]:
        """Nodes power themselves off when the client falls silent (the shutdown behaviour terminates them): the
        workers' own dead-man switch, and a watchdog beside them that fires even when every worker is dead or hung
        (:mod:`sky_jupyter.worker.watchdog`). Spot nodes (the pool keeps ``spot`` for those alone) watch the instance
        metadata for EC2's reclaim notice."""
        options: dict[str, Any] = {"on_orphan": "poweroff", "watchdog": {"command": self.poweroff_command},
                                   "spot": {"endpoint": self.metadata_endpoint, "interval": 5.0}}
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
        """Where SSH may come from: ``ssh_cidr``, else this machine's public address (/32, /128) as
        ``address_source`` (or ``$SKY_JUPYTER_ADDRESS_SOURCE``, or AWS's checkip service) tells it."""
        if self.ssh_cidr:
            return self.ssh_cidr
        return network.host_cidr(network.public_address(source=self.address_source))

    def subnets(self) -> dict[str, str]:
        """Availability zone -> subnet to launch in: ``subnet_id``'s, or the default VPC's per zone."""
        if self.subnet_id:
            found = self.ec2.describe_subnets(SubnetIds=[self.subnet_id])["Subnets"]
            self._subnet_info[self.subnet_id] = found[0]
            return {found[0]["AvailabilityZone"]: self.subnet_id}
        found = self.ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])["Subnets"]
        if not found:
            raise ProvisionError(f"{self.region} has no default VPC subnets to launch in; pass subnet_id='subnet-...' "
                                 f"(a subnet whose instances get a public address, or use connect_via=...).")
        self._subnet_info.update({s["SubnetId"]: s for s in found})
        return {s["AvailabilityZone"]: s["SubnetId"] for s in sorted(found, key=lambda s: s["AvailabilityZone"])}

    def _subnet(self, subnet: str) -> dict[str, Any]:
        """A subnet's DescribeSubnets entry (VPC, whether it maps public addresses, its IPv6 ranges)."""
        if subnet not in self._subnet_info:
            self._subnet_info[subnet] = self.ec2.describe_subnets(SubnetIds=[subnet])["Subnets"][0]
        return self._subnet_info[subnet]

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

    def security_group(self, pool: str, launch: str, vpc: str, cidr: str, efa: bool = False) -> str:
        """A group of the pool's own: SSH from ``cidr`` only (IPv4 or IPv6), everything between members of the group
        (with ``efa``, outbound to them as well: EFA needs both directions named)."""
        tags = [{"Key": TAG_POOL, "Value": pool}, {"Key": TAG_OWNER, "Value": self.owner},
                {"Key": TAG_LAUNCH, "Value": launch}]
        group = self.ec2.create_security_group(
            GroupName=f"sky-jupyter-{pool}-{launch[:8]}", VpcId=vpc,
            Description=f"sky_jupyter pool {pool}: SSH from its client, all traffic inside the group",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tags}])["GroupId"]
        with self._lock:
            self._groups.setdefault(pool, []).append(group)
            self._net.setdefault(pool, {})["ssh_cidr"] = cidr
        self._persist(pool)
        if network.is_open(cidr):
            self._say(pool, f"warning: SSH to the pool's nodes is open to the whole internet ({cidr}, "
                            f"allow_open_ssh=True); only their keys keep others out")
        # Right after CreateSecurityGroup, EC2 may answer InvalidGroup.NotFound for a while (eventual consistency).
        self._eventually(pool, lambda: self.ec2.authorize_security_group_ingress(GroupId=group, IpPermissions=[
            network.ssh_permission(cidr), network.self_permission(group)]))
        if efa:
            self._eventually(pool, lambda: self.ec2.authorize_security_group_egress(GroupId=group, IpPermissions=[
                network.self_permission(group, "pool members (EFA)")]))
        return group

    def refresh_ssh_rule(self, pool: str) -> None:
        """Let SSH into the pool's group from where this client is now (``ssh_cidr`` or its public address), and
        drop the rules this tool added for where an earlier client was (``%sky attach`` from another network).
        A failure is a warning: the old rule may still be the right one."""
        with self._lock:
            groups = list(self._groups.get(pool, []))
        if not groups:
            return
        try:
            cidr = self.caller_cidr()
        except ConfigError as exc:
            self._say(pool, f"warning: the SSH rule of {', '.join(groups)} is left as it was: {exc}")
            return
        for group in groups:
            try:
                found = self.ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
                ranges = network.client_ranges(found[0]) if found else []
                if cidr not in ranges:
                    self.ec2.authorize_security_group_ingress(GroupId=group,
                                                              IpPermissions=[network.ssh_permission(cidr)])
                stale = [r for r in ranges if r != cidr]
                if stale:
                    self.ec2.revoke_security_group_ingress(GroupId=group, IpPermissions=[
                        network.ssh_permission(r, described=False) for r in stale])
            except ClientError as exc:
                self._say(pool, f"warning: could not update the SSH rule of {group} to admit {cidr} "
                                f"({error_code(exc)}: {error_message(exc)})")
                continue
            if stale or cidr not in ranges:
                self._say(pool, f"{group} now admits SSH from {cidr}" + (f" (not {', '.join(stale)})" if stale else ""))
        with self._lock:
            self._net.setdefault(pool, {})["ssh_cidr"] = cidr
        self._persist(pool)

    def _placement(self, pool: str, launch: str, itype: str, nodes: int
                   ) -> tuple[list[str], Callable[[str], dict[str, Any]]]:
        """Where a launch goes: the zones to try, in order, and per zone the network part of RunInstances
        (subnet, security group, a public address or EFA interface, the placement group).

        A pool with instances (growing, replacing a node, after an attach) keeps its zone, subnet, group and
        placement group; a new one gets a group of its own (and, for several nodes of an EFA instance type, a
        cluster placement group)."""
        with self._lock:
            zone = self._zone.get(pool) if self._order.get(pool) else None
            groups = list(self._groups.get(pool, []))
            net = dict(self._net.get(pool, {}))
        if zone and groups:  # grown or replacement nodes join the pool where it is
            subnet = (net.get("subnets") or {}).get(zone) or self.subnets().get(zone)
            if not subnet:
                raise ProvisionError(f"pool {pool!r}: no subnet is known for its zone {zone}; pass subnet_id=... of "
                                     f"the pool's subnet.")
            zones, subnets, group = [zone], {zone: subnet}, groups[0]
            cidr = str(net.get("ssh_cidr") or self.ssh_cidr or "")
            placement_group = net.get("placement_group")
            efa = bool(placement_group) and network.efa_capable(itype)
        else:
            subnets = self.subnets()
            zones = self.zones_for(itype, subnets)
            cidr = self.caller_cidr()
            if ipaddress.ip_network(cidr).version == 6 and self.connect_via is None:
                zones = [z for z in zones if network.has_ipv6(self._subnet(subnets[z]))]
                if not zones:
                    raise ProvisionError(
                        f"ssh_cidr {cidr} is IPv6, but no subnet to launch in has an IPv6 range, so the instances "
                        f"would get no IPv6 address to SSH to; pass subnet_id=... of a subnet with one, an IPv4 "
                        f"ssh_cidr, or connect_via=....")
            vpc = self._subnet(subnets[zones[0]])["VpcId"]
            efa = nodes > 1 and network.efa_capable(itype)
            group = self.security_group(pool, launch, vpc, cidr, efa=efa)
            placement_group = self.placement_group(pool, launch) if efa else None
            with self._lock:
                self._net[pool] = {**self._net.get(pool, {}), "subnets": {z: subnets[z] for z in zones}, "vpc": vpc,
                                   "placement_group": placement_group}
            self._persist(pool)
        ipv6 = bool(cidr) and ipaddress.ip_network(cidr).version == 6 and self.connect_via is None
        for z in zones:
            if self.connect_via is None and not ipv6 and not network.maps_public_ip(self._subnet(subnets[z])):
                self._say(pool, f"subnet {subnets[z]} ({z}) gives instances no public IPv4 address: asking for one "
                                f"per instance (connect_via= reaches private addresses instead)")

        def parts(zone: str) -> dict[str, Any]:
            subnet = subnets[zone]
            public = self.connect_via is None and not ipv6 and not network.maps_public_ip(self._subnet(subnet))
            out: dict[str, Any]
            if public or efa:  # an interface of its own: a public address, or EFA
                nic: dict[str, Any] = {"DeviceIndex": 0, "SubnetId": subnet, "Groups": [group],
                                       "DeleteOnTermination": True}
                if public:
                    nic["AssociatePublicIpAddress"] = True
                if efa:
                    nic.update(InterfaceType="efa", NetworkCardIndex=0)
                if ipv6:
                    nic["Ipv6AddressCount"] = 1
                out = {"NetworkInterfaces": [nic]}
            else:
                out = {"SubnetId": subnet, "SecurityGroupIds": [group]}
                if ipv6:
                    out["Ipv6AddressCount"] = 1
            if placement_group:
                out["Placement"] = {"GroupName": placement_group}
            return out

        return zones, parts

    def placement_group(self, pool: str, launch: str) -> str:
        """A cluster placement group of the pool's own (EFA nodes close together), tagged like its other resources;
        :meth:`delete_placement_group` removes it once its instances are gone."""
        name = f"sky-jupyter-{pool}-{launch[:8]}"
        tags = [{"Key": TAG_POOL, "Value": pool}, {"Key": TAG_OWNER, "Value": self.owner},
                {"Key": TAG_LAUNCH, "Value": launch}]
        self.ec2.create_placement_group(GroupName=name, Strategy="cluster", TagSpecifications=[
            {"ResourceType": "placement-group", "Tags": tags}])
        with self._lock:
            self._net.setdefault(pool, {})["placement_group"] = name
        self._persist(pool)
        self._say(pool, f"cluster placement group {name} (EFA)")
        return name

    def delete_placement_group(self, pool: str, name: str | None = None) -> None:
        """Delete the pool's placement group (or ``name``), once none of its instances is left (teardown calls it
        after the instances terminated); a group still in use or already gone is left alone."""
        with self._lock:
            name = name or self._net.get(pool, {}).get("placement_group")
        if not name:
            return
        try:
            self.ec2.delete_placement_group(GroupName=name)
        except ClientError as exc:
            if error_code(exc) not in ("InvalidPlacementGroup.Unknown", "InvalidPlacementGroup.InUse"):
                raise
            if error_code(exc) == "InvalidPlacementGroup.InUse":
                self._say(pool, f"placement group {name} is still in use; `%sky gc` or the EC2 console removes it")
                return
        with self._lock:
            if self._net.get(pool, {}).get("placement_group") == name:
                self._net[pool]["placement_group"] = None

    # -- provisioning ----------------------------------------------------------------------------------------
    def provision(self, spec: PoolSpec) -> list[Host]:
        """Start the instances the pool lacks (all of them, or the new ones when it grows), wait until they run
        and answer SSH, and hand them to the SSH machinery. Whatever this call started is terminated again if it
        fails or is interrupted."""
        pool = spec.name
        with self._lock:
            have = list(self._order.get(pool, []))
        # Instance host keys are pinned by instance id (hostkeys.py), never by address: a new instance at an address
        # an earlier one held meets no stale pin. The pool's own known_hosts file holds only its jump hosts.
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
            except BaseException as exc:
                self._cleanup(pool, launch=launch)
                if isinstance(exc, (ClientError, BotoCoreError)):  # an AWS error no step above turned into words
                    what = exc.operation_name if isinstance(exc, ClientError) else "a call to AWS"
                    raise ProvisionError(f"pool {pool!r}: {what} failed in {self.region} ({why(exc)}) while "
                                         f"starting {spec.nodes - have} instance(s); what this launch started was "
                                         f"terminated.") from None
                raise
        with self._lock:
            return list(self._order[pool][: spec.nodes])

    def replace(self, spec: PoolSpec, host: Host) -> Host:
        """Launch one instance in the pool's placement (its zone, subnet and groups) to take ``host``'s rank, connect
        to it, and terminate the old one (a spot instance EC2 is reclaiming anyway); the new host."""
        pool, rank = spec.name, host.rank
        with self._lock:
            order = list(self._order.get(pool, []))
        if rank >= len(order):
            raise ProvisionError(f"pool {pool!r} has no node {rank} to replace")
        old = order[rank]
        launch = secrets.token_hex(8)
        self._say(pool, f"replacing node {rank} ({old}) in its zone")
        try:
            self._launch(replace(spec, nodes=len(order) + 1), launch, 1)
        except BaseException:
            self._cleanup(pool, launch=launch)
            raise
        with self._lock:
            current = self._order[pool]
            new = current.pop()  # launched last: it takes the old instance's rank
            current[rank] = new
            ids = list(current)
        self.ssh.disconnect([host])  # the old machine's connection: the rank's next one reaches the new
        try:
            hosts = self._connect(replace(spec, nodes=len(ids)), ids)
        except BaseException:
            self._cleanup(pool, ids=[new])
            raise
        self._terminate(pool, only=[old], wait=False)
        return hosts[rank]

    def terminate(self, pool: str) -> None:
        """Terminate every instance of ``pool`` this provider started and wait until they are gone; then
        delete the pool's security group."""
        self._terminate(pool)

    def _launch(self, spec: PoolSpec, launch: str, count: int) -> None:
        pool = spec.name
        itype = self.instance_type(spec)
        public_line, self._private_key = self.key_material()
        row = next((a for a in accelerators.TABLE if a.instance_type == itype), None)
        ami = self.image_id(gpu=row is None or row.gpus > 0)
        key_name = self.ensure_key_pair(public_line)
        markets = ["spot", "on-demand"] if self.spot and self.on_demand_fallback else \
            ["spot"] if self.spot else ["on-demand"]
        # Quotas first: a request no market can meet is refused before a group or placement group is made.
        quota = {market: self._quota_check(pool, itype, count, market == "spot") for market in markets}
        if all(error is not None for error in quota.values()):
            raise next(error for error in reversed(quota.values()) if error is not None)
        zones, network_parts = self._placement(pool, launch, itype, spec.nodes)  # grown: the pool's zone and group
        tags = [{"Key": TAG_POOL, "Value": pool}, {"Key": TAG_OWNER, "Value": self.owner},
                {"Key": TAG_LAUNCH, "Value": launch}, {"Key": "Name", "Value": f"sky-jupyter {pool}"}]
        params: dict[str, Any] = {
            "ImageId": ami, "InstanceType": itype, "MinCount": count, "MaxCount": count, "KeyName": key_name,
            "InstanceInitiatedShutdownBehavior": "terminate",
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
        refused: list[str] = []  # "market in zone: code", for the final message
        capacity = False  # whether a refusal was about capacity (not "not offered there")
        last = ""
        tokens = itertools.count(1)  # a fresh ClientToken per RunInstances call: a refused call started nothing
        # Right after the key pair was imported and the group created, EC2 may not know them yet.
        fresh = (NOT_YET_VISIBLE - {"InvalidInstanceID.NotFound"}) | {"InvalidPlacementGroup.Unknown"}
        if self.key_name:  # the user's own key pair: NotFound means it does not exist
            fresh = fresh - {"InvalidKeyPair.NotFound"}
        for market in markets:
            spot = market == "spot"
            fallback = spot and "on-demand" in markets
            too_low = quota[market]
            if too_low is not None:
                if not fallback:
                    raise too_low
                self._say(pool, f"spot refused: {too_low}; trying on demand")
                refused.append(f"spot: {too_low.quota} too low")
                continue
            for zone in zones:
                run = dict(params, **network_parts(zone))
                if spot:
                    run["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": {
                        "SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}}
                self._say(pool, f"launching {count}x {itype} ({spec.accelerator or 'CPU'}, {market}) in {zone}")
                try:
                    started = self._eventually(pool, functools.partial(self._run_instances, run, launch, tokens),
                                               fresh)
                except ClientError as exc:
                    code, message = error_code(exc), error_message(exc)
                    if code in QUOTA_ERRORS:
                        error = self._quota_error(itype, count, spot, code, message)
                        if fallback:
                            self._say(pool, f"spot refused: {error}; trying on demand")
                            refused.append(f"{market} in {zone}: {code}")
                            break
                        raise error from None
                    if spot and code == SPOT_ROLE_ERROR:
                        text = spot_role_message(message)
                        if fallback:
                            self._say(pool, f"{text} Trying on demand.")
                            refused.append(f"spot: {code}")
                            break
                        raise ProvisionError(f"pool {pool!r}: {text} Or pass on_demand_fallback=True (on demand when "
                                             f"spot is refused) or spot=False.") from None
                    if code == "Unsupported":  # the type (or this market for it) is not offered in this zone
                        self._say(pool, f"{itype} is not offered {'as spot ' if spot else ''}in {zone} ({message}); "
                                        f"trying the next zone")
                        refused.append(f"{market} in {zone}: {code} (not offered there)")
                        last = message
                        continue
                    if code in CAPACITY_ERRORS or (spot and code in SPOT_ERRORS):
                        self._say(pool, f"{zone} has no {market} capacity for {itype} ({code}); trying the next option")
                        refused.append(f"{market} in {zone}: {code}")
                        capacity = True
                        last = message
                        continue
                    raise ProvisionError(f"pool {pool!r}: EC2 refused to start {count}x {itype} ({market}) in {zone}, "
                                         f"{self.region} ({code}: {message}).") from None
                self._adopt(pool, launch, started, itype, zone, market)
                self._wait_running(pool, [i["InstanceId"] for i in started])
                return
        if capacity or not refused:
            raise CapacityError(
                f"no capacity for {count}x {itype} in {self.region} ({'; '.join(refused)}; last: {last}); try again "
                f"later, another region (sky.AWS(region=...)), fewer nodes"
                + (", or spot=False" if self.spot else ", or spot=True") + ".")
        raise ProvisionError(
            f"{count}x {itype} could not be started in {self.region}: {'; '.join(refused)}"
            + (f" (EC2: {last})" if last else "") + "; pick other availability_zones=..., another region "
            "(sky.AWS(region=...)) or another accelerator.")

    def _run_instances(self, run: dict[str, Any], launch: str, tokens: Iterator[int]) -> list[dict[str, Any]]:
        return list(self.ec2.run_instances(**run, ClientToken=f"{launch}-{next(tokens)}")["Instances"])

    def _eventually(self, pool: str, call: Callable[[], Any], codes: Collection[str] = NOT_YET_VISIBLE) -> Any:
        """``call()``, retried while EC2 answers that what was just created does not exist yet (eventual
        consistency): for up to a minute by default, paced with ``poll`` (``poll=0.1``: about a second)."""
        scale = max(self.poll, 0.01) / 5.0

        def note(exc: ClientError, wait: float) -> None:
            self._say(pool, f"{exc.operation_name}: {error_code(exc)} right after it was created (EC2 has not caught "
                            f"up yet); again in {wait:.1f} s")

        return eventually(call, codes, 60.0 * scale, first=0.5 * scale, most=5.0 * scale, on_retry=note)

    def _quota_check(self, pool: str, itype: str, count: int, spot: bool) -> QuotaError | None:
        """Before launching: do the vCPUs of ``count`` x ``itype``, plus those running instances already use, fit
        the EC2 quota of the type's family (Service Quotas)? The QuotaError to raise when they do not; None when
        they fit or the quota cannot be read (said, and the launch goes on without the check)."""
        quota, code = quota_for(itype, spot)
        if code is None:
            self._say(pool, f"no quota check: the Service Quotas code of {quota!r} is not known here")
            return None
        try:
            quotas = getattr(self, "_quotas", None) or client_for(self.session, "service-quotas", self.region)
            self._quotas = quotas
            value = quota_value(quotas, code)
        except (ClientError, BotoCoreError) as exc:
            self._say(pool, f"no quota check: reading {quota!r} ({code}) from Service Quotas failed ({why(exc)}); "
                            f"going on without it (needs servicequotas:GetServiceQuota)")
            return None
        try:
            per = vcpus_of(self.ec2, [itype]).get(itype)
            running = running_vcpus(self.ec2, code)
        except (ClientError, BotoCoreError) as exc:
            self._say(pool, f"no quota check: counting the vCPUs in use failed ({why(exc)}); going on without it")
            return None
        if per is None:
            self._say(pool, f"no quota check: EC2 does not say how many vCPUs {itype} has")
            return None
        if running + per * count <= value:
            self._say(pool, f"quota {quota!r} ({code}): {running} vCPUs in use + {per * count} asked for <= "
                            f"{value:g}")
            return None
        return self._quota_error(itype, count, spot, None, f"the quota is {value:g} vCPUs, {running} of them in use.",
                                 running=running)

    def _quota_error(self, itype: str, count: int, spot: bool, code: str | None, message: str,
                     running: int | None = None) -> QuotaError:
        """The QuotaError for ``count`` x ``itype``: the quota of the type's family (the type actually chosen,
        ``instance_types`` overrides included), the vCPUs asked for and in use, and how to raise it. ``code`` is
        EC2's error code (None: the quota check before launching refused)."""
        quota, quota_code = quota_for(itype, spot)
        try:
            per = vcpus_of(self.ec2, [itype]).get(itype)
        except (ClientError, BotoCoreError):
            per = None
        need = f"{per * count} vCPUs" if per else f"{count} instances"
        if per and running:
            need += f", {running} more in use"
        desired = per * count + (running or 0) if per else None
        how = (f"aws service-quotas request-service-quota-increase --service-code ec2 --quota-code {quota_code} "
               f"--desired-value {desired if desired is not None else 'N'} --region {self.region}") if quota_code \
            else f"search the Service Quotas console (EC2) for {quota!r}"
        answer = f"{code}: {message}" if code else message
        return QuotaError(
            f"EC2 quota {quota!r}{f' ({quota_code})' if quota_code else ''} in {self.region} is too low for "
            f"{count}x {itype} ({need}): {answer} Raise it in the Service Quotas console (Amazon EC2, "
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
        """Wait until every instance runs (at most ``boot_timeout`` s). One EC2 does not show yet (eventual
        consistency, right after RunInstances) is waited for like a pending one; one that stops or terminates on
        its way (spot capacity taken back, an image that does not boot) ends the wait at once."""
        deadline = time.monotonic() + self.boot_timeout
        while True:
            try:
                found = teardown.existing(self.ec2, ids)
            except ClientError as exc:
                if error_code(exc) not in NOT_YET_VISIBLE:
                    raise ProvisionError(f"pool {pool!r}: describing instances {', '.join(ids)} in {self.region} "
                                         f"failed ({why(exc)}); they are being terminated.") from None
                found = {}
            states = {i: str(found[i]["State"]["Name"]) if i in found else "not visible yet" for i in ids}
            if all(s == "running" for s in states.values()):
                return
            failed = [i for i in ids if states[i] in ("shutting-down", "terminated", "stopping", "stopped")]
            if failed or time.monotonic() >= deadline:
                reasons = []
                for i in failed or [i for i in ids if states[i] != "running"]:
                    reason = found.get(i, {}).get("StateReason", {}).get("Message", "")
                    reasons.append(f"{i} is {states[i]}" + (f" ({reason})" if reason else ""))
                within = "" if failed else f" within {self.boot_timeout:.0f} s"
                raise ProvisionError(f"pool {pool!r}: instances did not reach 'running'{within} in {self.region} "
                                     f"({'; '.join(reasons)}); they are being terminated.")
            time.sleep(max(0.0, min(self.poll, deadline - time.monotonic())))

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
        """The descriptions of those of ``ids`` EC2 knows, in the order given: an instance EC2 no longer knows is
        missing from the list (not an error, as ``InstanceIds=`` would make it); an AWS error is a ProvisionError."""
        try:
            found = teardown.existing(self.ec2, ids)
        except (ClientError, BotoCoreError) as exc:
            raise ProvisionError(f"describing instances {', '.join(ids)} in {self.region} failed ({why(exc)}); it "
                                 f"needs ec2:DescribeInstances there.") from None
        return [found[i] for i in ids if i in found]

    def _target(self, description: dict[str, Any], rank: int) -> str:
        if self.connect_via is not None:
            target = self.connect_via(description, rank)
            if not isinstance(target, str):
                raise ConfigError(f"connect_via returned {target!r} for rank {rank}; it must return "
                                  f"'user@addr:port' (a string).")
            return target
        pool = tag_map(description.get("Tags")).get(TAG_POOL, "")
        with self._lock:
            cidr = str(self._net.get(pool, {}).get("ssh_cidr") or self.ssh_cidr or "")
        if cidr and ipaddress.ip_network(cidr).version == 6:  # an IPv6 client reaches the instance's IPv6 address
            addr = description.get("Ipv6Address") or next((a["Ipv6Address"] for n in description.get(
                "NetworkInterfaces", []) for a in n.get("Ipv6Addresses", [])), None)
            if not addr:
                raise ProvisionError(f"instance {description['InstanceId']} has no IPv6 address for an IPv6 client "
                                     f"(ssh_cidr {cidr}); launch in a subnet with an IPv6 range.")
            return f"{self.login_user}@[{addr}]:22"
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
        known = self.ssh.known_hosts(spec.name)  # each address is held to its instance's pin
        for description, target in zip(descriptions, targets):
            known.assign(target.addr, target.port, description["InstanceId"])
        in_parallel([functools.partial(self._pin_console_keys, spec.name, d["InstanceId"], t.addr, t.port)
                     for d, t in zip(descriptions, targets)])
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
        """Pin the host keys cloud-init printed on the instance's console (``GetConsoleOutput``, latest output,
        polled for up to ``console_timeout`` seconds until they appear): then even the first connection is verified,
        by a key that came from EC2's API rather than the network. Keys the console does not show in time are left
        to the host-key check: trusted on first use with a warning, or refused under ``host_key_check="strict"``."""
        from ...transport import host_id

        store = self.ssh.store
        if store.load(instance_id) is not None:  # pinned already (a pool that grows, an attach)
            return
        latest = [True]

        def read() -> str | None:
            try:
                if latest[0]:
                    return self.ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output") or ""
                return self.ec2.get_console_output(InstanceId=instance_id).get("Output") or ""
            except ClientError as exc:
                code = error_code(exc)
                if code == "InvalidInstanceID.NotFound":  # launched a moment ago: EC2 does not know it everywhere yet
                    return ""
                if latest[0] and code in ("UnsupportedOperation", "InvalidParameterValue", "InvalidParameter",
                                          "InvalidParameterCombination"):
                    latest[0] = False  # not a Nitro instance: only the buffered output exists
                    return ""
                self._say(pool, f"cannot read the console output of {instance_id} ({code}: {error_message(exc)}); "
                                f"its host key cannot be verified from there")
                return None
            except BotoCoreError:
                return ""

        keys = hostkeys.verify_from_console(read, time.monotonic() + self.console_timeout, self.poll)
        if keys:
            store.pin(instance_id, keys, "console", host_id(addr, port), self.region)
            self._say(pool, f"{instance_id}: host keys verified from its console output")

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
        """The pool's cloud ids, and where it lives: zone, subnet, VPC, the range its group admits SSH from, its
        placement group (what a later attach and grow keep to)."""
        with self._lock:
            net = self._net.get(pool, {})
            zone = self._zone.get(pool)
            where = {"zone": zone, "subnet": (net.get("subnets") or {}).get(zone) if zone else None,
                     "vpc": net.get("vpc"), "ssh_cidr": net.get("ssh_cidr"),
                     "placement_group": net.get("placement_group")}
            return {"provider": "aws", "region": self.region, "owner": self.owner,
                    "launches": list(self._launches.get(pool, [])),
                    "instances": [i for i in self._order.get(pool, []) if i in self._instances],
                    "security_groups": list(self._groups.get(pool, [])),
                    **{key: value for key, value in where.items() if value}}

    def _persist(self, pool: str) -> None:
        """Write the pool's cloud ids and placement into its state file now (the pool rewrites it later with the
        same key)."""
        state.update(pool, cloud=self.pool_state(pool))

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
        # Where the pool lives, so that growing it joins its zone, subnet and group: the state file's record, else
        # (a file from an older version) what EC2 says of its first instance.
        first = found[ids[0]] if ids else {}
        zone = cloud.get("zone") or first.get("Placement", {}).get("AvailabilityZone")
        subnet = cloud.get("subnet") or first.get("SubnetId")
        groups = list(cloud.get("security_groups") or ()) or list(dict.fromkeys(
            g["GroupId"] for g in [*first.get("SecurityGroups", []),
                                   *(x for n in first.get("NetworkInterfaces", []) for x in n.get("Groups", []))]))
        with self._lock:
            self._instances.update(adopted)
            self._order[pool] = list(ids)
            self._launches[pool] = list(cloud.get("launches") or ())
            self._groups[pool] = groups
            if zone:
                self._zone[pool] = zone
            self._net[pool] = {"subnets": {zone: subnet} if zone and subnet else {},
                               "vpc": cloud.get("vpc") or first.get("VpcId"), "ssh_cidr": cloud.get("ssh_cidr"),
                               "placement_group": cloud.get("placement_group")}
            _LIVE[id(self)] = self
        self.refresh_ssh_rule(pool)  # this client may SSH in from another address than the one that started it
        from ...transport import host_id

        known = self.ssh.known_hosts(pool)
        for host in hosts:
            if host.instance_id:
                known.assign(host.addr, host.port, host.instance_id)
                recorded = str(host.extra.get("host_key") or "")
                if self.ssh.store.load(host.instance_id) is None and len(recorded.split()) == 2:
                    # A pool an older version started: the key its client accepted, kept in the state file.
                    self.ssh.store.pin(host.instance_id, [recorded], "attach", host_id(host.addr, host.port),
                                       self.region)
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
    # Teardown always finishes: instances EC2 no longer knows count as terminated, waits cope with any state
    # (teardown.py), and every AWS error reaching the user is a ProvisionError naming the instances, the region and
    # the next step.
    def release(self, hosts: list[Host]) -> None:
        """Close the SSH connections, terminate the pools' instances and wait until they are gone, then delete
        their security groups. Safe to call more than once, also for a pool whose instances are long gone."""
        try:
            self.ssh.release(hosts)
        finally:
            by_pool: dict[str, list[str]] = {}
            for host in hosts:
                if host.extra.get("pool"):
                    by_pool.setdefault(str(host.extra["pool"]), []).extend([host.instance_id] if host.instance_id
                                                                           else [])
            errors: list[ProvisionError] = []
            for pool, ids in sorted(by_pool.items()):
                try:
                    self._terminate(pool, extra_ids=ids)
                except ProvisionError as exc:  # the other pools still go
                    errors.append(exc)
            for extra in errors[1:]:
                print(f"sky_jupyter: {extra}", file=sys.stderr)
            if errors:
                raise errors[0]

    def _cleanup(self, pool: str, launch: str | None = None, ids: list[str] | None = None) -> None:
        """Terminate what a failed or interrupted provision started; the original error is what propagates."""
        try:
            self._terminate(pool, launch=launch, only=ids)
        except Exception as exc:  # noqa: BLE001 - the launch error matters more; say what is left
            print(f"[{pool}] aws: could not terminate what a failed launch started: {exc} Instances are tagged "
                  f"{TAG_POOL}={pool} in {self.region}.", file=sys.stderr)

    def _terminate(self, pool: str, launch: str | None = None, extra_ids: tuple[str, ...] | list[str] = (),
                   only: list[str] | None = None, wait: bool = True) -> None:
        """Terminate the pool's instances (only one launch's, or the ids in ``only``, when given) and wait;
        delete its security groups (and placement group) once no instance of the pool is left.

        A pool this provider does not track (``%sky down`` of a pool a dead kernel left, whose instances may be
        long gone) is terminated from its state file's record: its instances, launches and security groups."""
        with self._lock:
            tracked = pool in self._order or pool in self._groups or pool in self._launches
            launches = [launch] if launch else [] if only is not None else list(self._launches.get(pool, []))
            ids = {i for i, inst in self._instances.items() if inst.pool == pool and inst.launch in launches}
            ids |= set(only or ())
            now = time.time()  # instances launched moments ago may not be visible yet: asked for a while
            recent = {i for i, inst in self._instances.items() if inst.pool == pool and now - inst.launched < 600}
        recorded: dict[str, Any] = {}
        if not tracked and launch is None and only is None:
            recorded = self._recorded_cloud(pool)
            launches += [x for x in recorded.get("launches") or () if x not in launches]
            ids |= set(recorded.get("instances") or ())
        listing: ProvisionError | None = None
        if launches:  # instances a launch started but whose ids never came back (interrupted call)
            try:
                found = self.ec2.describe_instances(Filters=[
                    {"Name": f"tag:{TAG_LAUNCH}", "Values": launches},
                    {"Name": "instance-state-name", "Values": list(LIVE_STATES)}])
                ids |= {i["InstanceId"] for r in found["Reservations"] for i in r["Instances"]}
            except (ClientError, BotoCoreError) as exc:  # terminate what is known, then say what may be left
                listing = ProvisionError(
                    f"pool {pool!r}: listing the instances tagged {TAG_LAUNCH}={', '.join(launches)} in {self.region} "
                    f"failed ({why(exc)}), so some may still run; `%sky gc` finds them (tag {TAG_POOL}={pool}), or "
                    f"the EC2 console ({self.region}).")
        ids |= set(extra_ids)  # the hosts' own instances, tracked here or not
        ids_list = sorted(ids)
        if ids_list:
            self._say(pool, f"terminating {', '.join(ids_list)}")
            scale = max(self.poll, 0.01) / 5.0
            teardown.terminate(self.ec2, ids_list, region=self.region, pool=pool, wait=wait,
                               timeout=self.boot_timeout, poll=self.poll, recent=recent, settle=60.0 * scale,
                               say=functools.partial(self._say, pool))
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
                groups += [g for g in recorded.get("security_groups") or () if g not in groups]
                self._zone.pop(pool, None)
                self._launches.pop(pool, None)
            if not self._instances:
                _LIVE.pop(id(self), None)
        if wait and not left:
            for group in groups:
                self._delete_group(pool, group)
            if recorded.get("placement_group") or self._net.get(pool, {}).get("placement_group"):
                try:
                    self.delete_placement_group(pool, recorded.get("placement_group"))
                except (ClientError, BotoCoreError) as exc:  # costs nothing; gc and the console remove it
                    self._say(pool, f"placement group not deleted ({why(exc)}); the EC2 console removes it")
        if state.load(pool) is not None:
            self._persist(pool)
        if listing is not None:
            raise listing

    def _recorded_cloud(self, pool: str) -> dict[str, Any]:
        """The cloud record of ``pool``'s state file when it is one of this region's AWS pools, else {}."""
        recorded = state.load(pool)
        cloud = recorded.cloud if recorded is not None else {}
        if cloud.get("provider") not in (None, "aws") or cloud.get("region", self.region) != self.region:
            return {}
        return dict(cloud)

    def _delete_group(self, pool: str, group: str) -> None:
        """Delete a security group; EC2 takes a moment to release it from terminated instances. A group that cannot
        be deleted is reported, not raised: it costs nothing, and `%sky gc` deletes it later."""
        for delay in (0, 1, 2, 4, 8, 15):
            time.sleep(delay * (self.poll / 5.0))
            try:
                self.ec2.delete_security_group(GroupId=group)
                return
            except ClientError as exc:
                if error_code(exc) in ("InvalidGroup.NotFound", "InvalidSecurityGroupID.NotFound"):
                    return
                if error_code(exc) != "DependencyViolation":
                    self._say(pool, f"security group {group} not deleted ({why(exc)}); `%sky gc` deletes it later")
                    return
            except BotoCoreError as exc:
                self._say(pool, f"security group {group} not deleted ({exc}); `%sky gc` deletes it later")
                return
        print(f"[{pool}] aws: security group {group} is still in use; `%sky gc` deletes it later.", file=sys.stderr)

    def terminate_all(self) -> None:
        """Terminate every instance this provider still tracks (the atexit hook); every pool is tried, then the
        first failure is raised."""
        with self._lock:
            pools = sorted({inst.pool for inst in self._instances.values()})
        errors: list[ProvisionError] = []
        for pool in pools:
            try:
                self._terminate(pool)
            except ProvisionError as exc:
                errors.append(exc)
        for extra in errors[1:]:
            print(f"sky_jupyter: {extra}", file=sys.stderr)
        if errors:
            raise errors[0]


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
