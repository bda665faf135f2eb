"""Accelerator names, as users say them ("A100", "h100"), mapped to the EC2 instance type that provides them.

One explicit table, used by the AWS provider and by the panel (instance type and hourly price beside the name).
Prices are AWS's on-demand list prices for Linux in us-east-1, per instance and hour, as of :data:`PRICES_DATE`;
other regions cost somewhat more, spot instances less. They are for showing and estimating, not for billing: check
the EC2 pricing page before relying on them, and update the table (and the date) when AWS changes them. A row whose
type had no list price at that date has the price None ("no price known" in costs).

Skyward's constructors build names too: ``sky.accelerators.H100(count=8)`` is ``"H100"``, ``H100(count=1)`` is
``"H100:1"``, ``A100(memory="80GB")`` is ``"A100-80GB"`` (a count EC2 does not sell is refused, naming those it does).
A name may carry the GPU count of its row, ``"H100:8"`` is ``"H100"``; ``"H100:1"`` is a row of its own (one H100,
p5.4xlarge). V100 is refused (see :data:`RETIRED`): current Deep Learning AMIs do not support the p3 instances that
have it; ``AWS(instance_types={"V100": "p3.2xlarge"}, ami=...)`` still launches one with an image of your own.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

#: When the prices below were taken from AWS's EC2 on-demand price list (after AWS's June 2025 P4/P5 price cut).
PRICES_DATE = "2025-06-05"
#: The region the prices are for.
PRICES_REGION = "us-east-1"


@dataclass(frozen=True, slots=True)
class Accelerator:
    """One row of the table: what a node of this accelerator is on EC2, and what it costs."""

    name: str
    instance_type: str
    gpus: int  # per instance (per node)
    gpu_memory_gib: int  # per GPU
    vcpus: int
    memory_gib: int
    price_per_hour: float | None  # USD, on demand, one instance, us-east-1 Linux, as of PRICES_DATE; None: unknown

    @property
    def summary(self) -> str:
        """``"A100: p4d.24xlarge, 8x 40 GiB, $21.96/h"``, for messages and the panel."""
        gpus = f"{self.gpus}x {self.gpu_memory_gib} GiB" if self.gpus else "no GPU"
        price = f"${self.price_per_hour:.2f}/h" if self.price_per_hour is not None else "no list price known"
        return f"{self.name}: {self.instance_type}, {gpus}, {price}"


#: The smallest instance type that offers each accelerator (one node = one instance). A100 and H200 only come as
#: 8-GPU machines on EC2; H100 also as one GPU (p5.4xlarge, since August 2025: after PRICES_DATE, so its list price
#: of that date does not exist and is None here).
TABLE: tuple[Accelerator, ...] = (
    Accelerator("CPU", "m7i.xlarge", 0, 0, 4, 16, 0.2016),
    Accelerator("T4", "g4dn.xlarge", 1, 16, 4, 16, 0.526),
    Accelerator("A10G", "g5.xlarge", 1, 24, 4, 16, 1.006),
    Accelerator("L4", "g6.xlarge", 1, 24, 4, 16, 0.8048),
    Accelerator("L40S", "g6e.xlarge", 1, 48, 4, 32, 1.861),
    Accelerator("A100", "p4d.24xlarge", 8, 40, 96, 1152, 21.96),
    Accelerator("A100-80GB", "p4de.24xlarge", 8, 80, 96, 1152, 27.45),
    Accelerator("H100:1", "p5.4xlarge", 1, 80, 16, 256, None),
    Accelerator("H100", "p5.48xlarge", 8, 80, 192, 2048, 55.04),
    Accelerator("H200", "p5en.48xlarge", 8, 141, 192, 2048, 63.30),
)

#: Other spellings people use for the same rows.
ALIASES: dict[str, str] = {
    "A100-40GB": "A100",
    "A10": "A10G",
    "H100-80GB": "H100",
    "H200-141GB": "H200",
    "NONE": "CPU",
    "H100-1": "H100:1",
}

#: Names the table no longer offers, with why and what to use instead.
RETIRED: dict[str, str] = {
    "V100": "V100 (p3 instances) is not offered: current AWS Deep Learning AMIs do not support it; use L4 "
            "(g6.xlarge, 24 GiB) or A10G (g5.xlarge) instead.",
}


def canonical(name: str) -> str:
    """How names compare: case, spaces and underscores do not matter (``a100_80gb`` is ``A100-80GB``)."""
    return name.strip().upper().replace("_", "-").replace(" ", "-")


_BY_KEY = {canonical(a.name): a for a in TABLE}


def known() -> list[str]:
    """The accelerator names the table knows, in table order."""
    return [a.name for a in TABLE]


def lookup(name: str | None) -> Accelerator:
    """The table row for ``name`` (case-insensitive; None means a CPU node); ConfigError listing the known ones."""
    if name is None or not str(name).strip():
        return _BY_KEY["CPU"]
    if not isinstance(name, str):
        raise ConfigError(f"accelerator must be a name like 'A100', not {name!r}; known: {', '.join(known())}.")
    key = canonical(name)
    key = canonical(ALIASES.get(key, key))
    row = _BY_KEY.get(key)
    if row is None and ":" in key:  # "H100:8" is the H100 row: a count that is the row's own
        base, _, count = key.partition(":")
        base = canonical(ALIASES.get(base, base))
        if base in RETIRED:
            key = base
        elif base in _BY_KEY and count.isdigit() and int(count) == _BY_KEY[base].gpus:
            row = _BY_KEY[base]
    if key in RETIRED:
        raise ConfigError(RETIRED[key])
    if row is None:
        raise ConfigError(f"unknown accelerator {name!r}; known: {', '.join(known())} "
                          f"(or pass instance_types={{{name!r}: 'some.instance-type'}} to sky.AWS).")
    return row


def check(name: str | None, what: str = "accelerator") -> Accelerator:
    """:func:`lookup` where the table alone decides (the notebook's ``--accelerator``, the Local provider): an unknown
    name is a one-line ConfigError listing the known kinds, without lookup's hint about ``sky.AWS(instance_types=)``."""
    try:
        return lookup(name)
    except ConfigError:
        key = canonical(str(name)).partition(":")[0]
        if canonical(ALIASES.get(key, key)) in RETIRED:
            raise
        raise ConfigError(f"{what} {name!r} is not a kind this tool knows; use one of {', '.join(known())}") from None


class Named(str):
    """An accelerator as Skyward's ``sky.accelerators.H100(count=8)`` builds it: the table's name (a ``str``, so it
    goes wherever a name goes), with the count and memory asked for."""

    gpus: int  # per node (not ``count``: that is str's method)
    memory: str | None

    def __new__(cls, name: str, count: int, memory: str | None = None) -> Named:
        value = super().__new__(cls, name)
        value.gpus, value.memory = count, memory
        return value

    def __repr__(self) -> str:
        return f"sky.accelerators.{self.split(':')[0].split('-')[0]}(count={self.gpus}" + (
            f", memory={self.memory!r})" if self.memory else ")")


def _named(kind: str, count: int, memory: str | None = None) -> Named:
    """The table row for ``count`` GPUs of ``kind`` (and ``memory`` per GPU, like "80GB"), as a :class:`Named`."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ConfigError(f"sky.accelerators.{kind}(count=...) takes a whole number of GPUs from 1, got {count!r}")
    rows = [a for a in TABLE if canonical(a.name).split(":")[0].split("-")[0] == kind and a.gpus]
    if memory is not None:
        wanted = "".join(c for c in str(memory) if c.isdigit())
        rows = [a for a in rows if str(a.gpu_memory_gib) == wanted]
        if not rows:
            sizes = sorted({f"{a.gpu_memory_gib}GB" for a in TABLE if canonical(a.name).startswith(kind) and a.gpus})
            raise ConfigError(f"{kind} with {memory} per GPU is not in the table; it has {', '.join(sizes)}.")
    for row in rows:
        if row.gpus == count:
            return Named(row.name, count, memory)
    offered = ", ".join(dict.fromkeys(f"{a.gpus} ({a.instance_type})" for a in rows))
    raise ConfigError(f"EC2 offers {kind}{f' {memory}' if memory else ''} as {offered} per machine, not {count}; "
                      f"ask for one of those counts (more GPUs: more nodes).")


def T4(count: int = 1) -> Named:
    return _named("T4", count)


def A10G(count: int = 1) -> Named:
    return _named("A10G", count)


def L4(count: int = 1) -> Named:
    return _named("L4", count)


def L40S(count: int = 1) -> Named:
    return _named("L40S", count)


def A100(count: int = 8, memory: str | None = None) -> Named:
    return _named("A100", count, memory)


def H100(count: int = 8) -> Named:
    return _named("H100", count)


def H200(count: int = 8) -> Named:
    return _named("H200", count)


def instance_for(name: str | None) -> tuple[str, float | None]:
    """(instance type, on-demand USD per hour or None when unknown) for an accelerator name, e.g.
    ``("p4d.24xlarge", 21.96)``."""
    row = lookup(name)
    return row.instance_type, row.price_per_hour


__all__ = ["A10G", "A100", "ALIASES", "H100", "H200", "L4", "L40S", "PRICES_DATE", "PRICES_REGION", "RETIRED", "T4",
           "TABLE", "Accelerator", "Named", "canonical", "check", "instance_for", "known", "lookup"]
