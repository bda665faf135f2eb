"""Shared by the benchmarks: timing helpers and the JSON report."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], Any], n: int, warmup: int = 20) -> list[float]:
    """Seconds per call for ``n`` calls after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": statistics.median(ordered) * 1e3, "p90_ms": ordered[int(len(ordered) * 0.9)] * 1e3,
            "min_ms": ordered[0] * 1e3, "n": len(ordered)}


def seconds(samples: list[float]) -> dict[str, float]:
    """:func:`summary` in seconds instead of milliseconds."""
    return {k.replace("_ms", "_s"): (round(v / 1e3, 4) if k.endswith("_ms") else v)
            for k, v in summary(samples).items()}


def report(name: str, figures: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    data = {"bench": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
            **figures}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2))
    print(f"written to {path}")
    return path
