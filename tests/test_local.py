"""The Local provider's pieces: requirement checks, logs, how a worker ended."""

from __future__ import annotations

import os
import signal

import sky_jupyter as sky
from sky_jupyter.providers.local import missing_requirements

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_missing_requirements_checks_names_and_versions():
    assert missing_requirements(("cloudpickle", "cloudpickle>=1.0")) == []
    assert missing_requirements(("cloudpickle<1.0", "no-such-distribution-zz")) == ["cloudpickle<1.0",
                                                                                     "no-such-distribution-zz"]


def test_logs_and_exit_description(tmp_path):
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=1, name="local-logs") as pool:
        assert "serving node 0 worker 0" in pool.provider.read_log(pool.hosts[0])
        handle = pool.workers[0].handle
        os.kill(handle.pid, signal.SIGKILL)
        handle.proc.wait()
        assert handle.describe_exit() == f"(local pid {handle.pid}) was killed by SIGKILL"
