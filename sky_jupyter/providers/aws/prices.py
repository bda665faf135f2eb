"""Prices and quotas: the accelerator table's list prices, spot prices EC2 gives, and which vCPU quota an instance
type counts against."""

from __future__ import annotations

from ... import accelerators


def quota_for(instance_type: str, spot: bool) -> tuple[str, str | None]:
    """(Service Quotas name, quota code) of the regional vCPU quota that covers ``instance_type``."""
    family = instance_type.split(".")[0].lower()
    if family.startswith("p"):
        return ("All P Spot Instance Requests", "L-7212CCBC") if spot else \
            ("Running On-Demand P instances", "L-417A185B")
    if family.startswith(("g", "vt")):
        return ("All G and VT Spot Instance Requests", "L-3819A6DF") if spot else \
            ("Running On-Demand G and VT instances", "L-DB2E81BA")
    if family[0] in "acdhimrtz":
        return ("All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests", "L-34B43A08") if spot else \
            ("Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", "L-1216C47A")
    letters = "".join(c for c in family if c.isalpha()).capitalize()
    return (f"All {letters} Spot Instance Requests" if spot else f"Running On-Demand {letters} instances"), None


def list_price(instance_type: str) -> float | None:
    return next((a.price_per_hour for a in accelerators.TABLE if a.instance_type == instance_type), None)
