"""Pending computations without a pool: building, chaining, pickling, running here."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


@sky.compute
def add(a: int, b: int = 1) -> int:
    return a + b


def test_calling_builds_a_pending_computation():
    pending = add(2, b=5)
    assert isinstance(pending, sky.PendingCompute)
    assert (pending.args, pending.kwargs) == ((2,), {"b": 5})
    assert pending.local() == 7 and add.local(2) == 3
    assert add.__name__ == "add" and "sky.compute" in repr(add)


def test_and_chains_into_one_group_in_order():
    group = add(1) & add(2) & (add(3) & add(4))
    assert isinstance(group, sky.PendingGroup)
    assert [p.args[0] for p in group.items] == [1, 2, 3, 4]
    assert sky.gather(add(1), add(2)).items == (add(1), add(2))
    with pytest.raises(TypeError, match="both sides must be sky.compute calls"):
        add(1) & 5


def test_a_compute_travels_as_its_function():
    again = pickle.loads(cloudpickle.dumps(add))
    assert isinstance(again, sky.Compute) and again.local(1, 2) == 3


def test_every_public_name_resolves_and_a_worker_imports_only_what_it_needs():
    """The package imports its client machinery on first use; a node's worker must not pull it in, and importing a
    submodule named like a public function (``sky_jupyter.compute``) must not hide the function."""
    import subprocess
    import sys

    code = """
import sys
import sky_jupyter.worker
heavy = sorted(m for m in ("sky_jupyter.pool", "sky_jupyter.providers", "paramiko", "boto3", "IPython")
               if m in sys.modules)
assert not heavy, heavy
import sky_jupyter as sky
import sky_jupyter.compute
assert callable(sky.compute) and sky.compute.__name__ == "compute", sky.compute
missing = [n for n in sky.__all__ if n != "panel" and getattr(sky, n, None) is None]
assert not missing, missing
assert set(sky.__all__) <= set(dir(sky))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
