"""Prices and quotas: the accelerator table's list prices, spot prices EC2 gives, which vCPU quota an instance type
counts against, how much of that quota is in use, and the account-level role the spot market needs.

EC2's regional vCPU quotas are per instance family class and market (Service Quotas, service code ``ec2``):
"Running On-Demand P instances" counts the vCPUs of every running on-demand p* instance in the region, "All P Spot
Instance Requests" those of the spot ones, and so on. :func:`quota_for` maps an instance type to its quota;
:func:`quota_value` reads the quota's value (``servicequotas:GetServiceQuota``), :func:`vcpus_of` the vCPUs of
types (the accelerator table, else ``ec2:DescribeInstanceTypes``), :func:`running_vcpus` what the account's
running instances already use of a quota.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ... import accelerators

# (quota name, on-demand code, spot name, spot code) per family class, by the instance family prefixes that
# belong to it; longer prefixes are tried first ("inf" before "i", "dl" before "d", "vt" before "v").
_STANDARD = "Standard (A, C, D, H, I, M, R, T, Z)"
_CLASSES: tuple[tuple[tuple[str, ...], str, str | None, str | None], ...] = (
    (("inf",), "Inf", "L-1945791B", "L-B5D1601B"),
    (("trn",), "Trn", "L-2C3B7624", "L-6B0D517C"),
    (("dl",), "DL", "L-6E869C2A", "L-85EED4F7"),
    (("hpc",), "HPC", None, None),
    (("u-", "u7"), "High Memory", "L-43DA4232", None),
    (("vt", "g"), "G and VT", "L-DB2E81BA", "L-3819A6DF"),
    (("p",), "P", "L-417A185B", "L-7212CCBC"),
    (("f",), "F", "L-74FC7D96", "L-88CF9481"),
    (("x",), "X", "L-7295265B", "L-E3A00192"),
    (tuple("acdhimrtz"), _STANDARD, "L-1216C47A", "L-34B43A08"),
)


def family_class(instance_type: str) -> str:
    """The quota class of an instance type: ``"P"`` for p5.4xlarge, ``"G and VT"`` for g5.xlarge, ``"Inf"`` for
    inf2.xlarge, the Standard class for m7i.xlarge; the family's letters, capitalised, for classes not listed."""
    family = instance_type.split(".")[0].lower()
    for prefixes, name, _, _ in _CLASSES:
        if family.startswith(prefixes):
            return name
    return "".join(c for c in family if c.isalpha()).capitalize() or family


def quota_for(instance_type: str, spot: bool) -> tuple[str, str | None]:
    """(Service Quotas name, quota code) of the regional vCPU quota that covers ``instance_type``; the code is None
    where it is not known here."""
    name = family_class(instance_type)
    row = next((c for c in _CLASSES if c[1] == name), None)
    if spot:
        return f"All {name} Spot Instance Requests", row[3] if row else None
    return f"Running On-Demand {name} instances", row[2] if row else None


def list_price(instance_type: str) -> float | None:
    return next((a.price_per_hour for a in accelerators.TABLE if a.instance_type == instance_type), None)


def quota_value(quotas: Any, code: str) -> float:
    """The value (vCPUs) of EC2 quota ``code`` for this account and region, from a Service Quotas client; raises
    what the client raises (``ClientError``: AccessDenied, NoSuchResource, ...)."""
    return float(quotas.get_service_quota(ServiceCode="ec2", QuotaCode=code)["Quota"]["Value"])


#: vCPUs per instance type EC2 described (they do not change).
_VCPUS: dict[str, int] = {}


def vcpus_of(ec2: Any, instance_types: Iterable[str], known: dict[str, int] | None = None) -> dict[str, int]:
    """vCPUs per instance type: the accelerator table's, ``known`` ones (default: those EC2 described before), else
    EC2's (DescribeInstanceTypes, one call per 100 types). Types EC2 does not describe are missing from the answer;
    ``ClientError`` propagates."""
    known = _VCPUS if known is None else known
    out: dict[str, int] = {}
    ask: list[str] = []
    table = {a.instance_type: a.vcpus for a in accelerators.TABLE}
    for itype in dict.fromkeys(instance_types):
        if itype in known:
            out[itype] = known[itype]
        elif itype in table:
            out[itype] = table[itype]
        else:
            ask.append(itype)
    for start in range(0, len(ask), 100):
        answer = ec2.describe_instance_types(InstanceTypes=ask[start:start + 100])
        for info in answer.get("InstanceTypes", ()):
            vcpus = (info.get("VCpuInfo") or {}).get("DefaultVCpus")
            if vcpus:
                out[info["InstanceType"]] = int(vcpus)
    known.update(out)
    return out


def running_vcpus(ec2: Any, code: str, known: dict[str, int] | None = None) -> int:
    """vCPUs that pending and running instances of this account and region use of quota ``code`` (spot instances
    count against the spot quotas, the others against the on-demand ones). ``ClientError`` propagates."""
    pages = ec2.get_paginator("describe_instances").paginate(
        Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}])
    counted = [i for page in pages for r in page["Reservations"] for i in r["Instances"]
               if quota_for(i.get("InstanceType", ""), i.get("InstanceLifecycle") == "spot")[1] == code]
    # Counted at each type's default vCPUs (CPU options that start an instance with fewer cores are ignored).
    per_type = vcpus_of(ec2, [i["InstanceType"] for i in counted], known) if counted else {}
    return sum(per_type.get(i["InstanceType"], 0) for i in counted)


#: What RunInstances answers for a spot request when the account lacks the Spot service-linked role and these
#: credentials may not create it.
SPOT_ROLE_ERROR = "AuthFailure.ServiceLinkedRoleCreationNotPermitted"


def spot_role_message(message: str = "") -> str:
    """What :data:`SPOT_ROLE_ERROR` means and how to fix it, in two sentences."""
    said = f" ({message.strip().rstrip('.')})" if message.strip() else ""
    return (f"EC2 refused the spot request{said}: spot instances need the service-linked role "
            "AWSServiceRoleForEC2Spot, which EC2 creates on an account's first spot request, and these credentials "
            "may not create it (iam:CreateServiceLinkedRole). Someone allowed to do so creates it once per account "
            "with `aws iam create-service-linked-role --aws-service-name spot.amazonaws.com`.")


#: Instance families for CPU nodes asked for by size (``vcpus``, ``memory_gb``, ``architecture``): their GiB of
#: memory per vCPU, and their price per vCPU relative to the compute-optimised family's (AWS's us-east-1 list
#: prices: compute-optimised, then general-purpose about 12% more, memory-optimised about 48% more).
CPU_FAMILIES: dict[str, tuple[tuple[str, int, float], ...]] = {
    "x86_64": (("c7i", 2, 1.0), ("m7i", 4, 1.12), ("r7i", 8, 1.48)),
    "arm64": (("c7g", 2, 1.0), ("m7g", 4, 1.12), ("r7g", 8, 1.48)),
}
#: vCPUs of the sizes these families come in.
CPU_SIZES: tuple[tuple[str, int], ...] = (("large", 2), ("xlarge", 4), ("2xlarge", 8), ("4xlarge", 16),
                                          ("8xlarge", 32), ("12xlarge", 48), ("16xlarge", 64))


def cpu_instance(vcpus: float | None, memory_gb: float | None, architecture: str | None) -> str:
    """The cheapest CPU instance type with at least ``vcpus`` and ``memory_gb`` for ``architecture`` (default
    x86_64): in each family the smallest size that fits, then the family where that costs least."""
    from ...errors import ConfigError

    arch = architecture or "x86_64"
    want_cpu, want_mem = vcpus or 1, memory_gb or 0
    fits = [(weight * cpus, f"{family}.{size}")
            for family, per_vcpu, weight in CPU_FAMILIES[arch]
            for size, cpus in [next(((s, c) for s, c in CPU_SIZES if c >= want_cpu and c * per_vcpu >= want_mem),
                                    ("", 0))] if cpus]
    if fits:
        return min(fits)[1]
    largest = CPU_SIZES[-1][1]
    raise ConfigError(f"no {arch} CPU instance type here has {want_cpu:g} vCPUs and {want_mem:g} GiB (the largest: "
                      f"{largest} vCPUs, {largest * CPU_FAMILIES[arch][-1][1]} GiB); ask for less, or name one with "
                      f"AWS(instance_types={{'CPU': '...'}}).")
