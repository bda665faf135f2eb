from __future__ import annotations

import pytest

import sky_jupyter as sky


def test_shard_is_strided_and_disjoint():
    data = list(range(10))
    parts = [sky.shard(data, rank=r, world_size=3) for r in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert sky.shard(tuple(data), rank=1, world_size=2) == (1, 3, 5, 7, 9)
    assert sky.shard("abcdef", rank=0, world_size=2) == "ace"


def test_shard_shuffle_is_the_same_on_every_node_and_drop_last_evens_out():
    parts = [sky.shard(list(range(10)), shuffle=True, seed=3, rank=r, world_size=3, drop_last=True)
             for r in range(3)]
    assert all(len(p) == 3 for p in parts)
    assert len(set().union(*map(set, parts))) == 9


def test_shard_keeps_arrays_and_tensors():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    assert isinstance(sky.shard(np.arange(6), rank=1, world_size=2), np.ndarray)
    t = sky.shard(torch.arange(6), rank=1, world_size=2)
    assert isinstance(t, torch.Tensor) and t.tolist() == [1, 3, 5]


@sky.compute
def where():
    info = sky.instance_info()
    return info.node, info.total_nodes, info.is_head, info.head_addr, bool(info.hostname), info.pool_name, \
        sky.shard(list(range(6)))


def test_instance_info_on_nodes(local_pool):
    results = where() @ local_pool
    assert results == [(0, 2, True, "127.0.0.1", True, "test-local", [0, 2, 4]),
                       (1, 2, False, "127.0.0.1", True, "test-local", [1, 3, 5])]
