"""Pending computations without a pool: building, chaining, pickling, running here."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

import sky_jupyter as sky


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
