from __future__ import annotations

import pytest

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_every_exported_name_resolves():
    """`sky.Remote` went missing once when the package's imports became lazy: every name in __all__ must resolve."""
    for name in sky.__all__:
        assert getattr(sky, name) is not None, name
    assert sky.Remote.__name__ == "Remote"


def test_shard_gives_contiguous_blocks_as_even_as_possible():
    data = list(range(10))
    parts = [sky.shard(data, rank=r, world_size=3) for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert sky.shard(tuple(data), node=1, total_nodes=2) == (5, 6, 7, 8, 9)
    assert sky.shard("abcdef", node=0, total_nodes=2) == "abc"
    assert [sky.shard([1, 2], node=k, total_nodes=3) for k in range(3)] == [[1], [2], []]


def test_several_sequences_are_cut_at_the_same_indices():
    """Skyward's shard(x_train, y_train): aligned parts, as a tuple (the second argument is not `shuffle`)."""
    x, y = list(range(10)), [f"label{i}" for i in range(10)]
    for node in range(3):
        xs, ys = sky.shard(x, y, shuffle=True, seed=7, node=node, total_nodes=3)
        assert [f"label{i}" for i in xs] == ys
    together = [sky.shard(x, y, node=k, total_nodes=3)[0] for k in range(3)]
    assert sorted(v for part in together for v in part) == x
    with pytest.raises(ValueError, match=r"equally long; got lengths \[10, 3\]"):
        sky.shard(x, [1, 2, 3], node=0, total_nodes=2)
    with pytest.raises(TypeError, match="at least one sequence"):
        sky.shard()


def test_shard_shuffle_is_the_same_on_every_node_and_drop_last_evens_out():
    parts = [sky.shard(list(range(10)), shuffle=True, seed=3, rank=r, world_size=3, drop_last=True)
             for r in range(3)]
    assert all(len(p) == 3 for p in parts)
    assert len(set().union(*map(set, parts))) == 9


@pytest.mark.torch
def test_shard_keeps_arrays_and_tensors():
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    assert isinstance(sky.shard(np.arange(6), rank=1, world_size=2), np.ndarray)
    t = sky.shard(torch.arange(6), rank=1, world_size=2)
    assert isinstance(t, torch.Tensor) and t.tolist() == [3, 4, 5]


@sky.compute
def where():
    info = sky.instance_info()
    return info.node, info.total_nodes, info.is_head, info.head_addr, bool(info.hostname), info.pool_name, \
        sky.shard(list(range(6)))


def test_instance_info_on_nodes(local_pool):
    results = where() @ local_pool
    assert results == [(0, 2, True, "127.0.0.1", True, "test-local", [0, 1, 2]),
                       (1, 2, False, "127.0.0.1", True, "test-local", [3, 4, 5])]


def test_instance_info_names_a_worker_among_the_workers_of_its_node():
    from sky_jupyter.info import InstanceInfo, _set_current

    info = InstanceInfo(rank=5, world_size=8, head_addr="10.0.0.1", node_addrs=("10.0.0.1", "10.0.0.2"),
                        accelerator="A100", pool_name="p", node=1, worker=1, workers_per_node=4, accelerators=4)
    assert (info.node, info.worker, info.total_nodes, info.workers_per_node, info.accelerators) == (1, 1, 2, 4, 4)
    assert (info.global_worker_index, info.total_workers, info.is_head, info.addr) == (5, 8, False, "10.0.0.2")
    one = InstanceInfo(rank=1, world_size=2, head_addr="a", node_addrs=("a", "b"), accelerator=None, pool_name="p")
    assert (one.node, one.worker, one.workers_per_node, one.addr) == (1, 0, 1, "b")  # one worker per node
    _set_current(info)
    try:
        assert sky.shard(list(range(16))) == [10, 11]  # over all 8 workers, not the 2 nodes
    finally:
        _set_current(None)


def test_stdout_and_silent_decorators_quiet_what_a_function_prints(capsys):
    from sky_jupyter.info import InstanceInfo, _set_current

    @sky.stdout(only="head")
    def chatty(x: int) -> int:
        print("out", x)
        import sys

        print("err", x, file=sys.stderr)
        return x

    @sky.silent
    def quiet() -> str:
        print("never")
        return "done"

    assert chatty(1) == 1 and quiet() == "done"  # outside a pool: the head
    assert capsys.readouterr() == ("out 1\n", "err 1\n")
    _set_current(InstanceInfo(rank=3, world_size=4, head_addr="a", node_addrs=("a",), accelerator=None,
                              pool_name="p", node=0, worker=3, workers_per_node=4))
    try:
        assert chatty(2) == 2 and quiet() == "done"
    finally:
        _set_current(None)
    assert capsys.readouterr() == ("", "err 2\n")
    assert chatty.__name__ == "chatty"
    with pytest.raises(ValueError, match="'head', 'all' or a function of sky.InstanceInfo, got 'rank0'"):
        sky.stdout(only="rank0")


def test_output_decorators_take_a_predicate_and_stderr_has_its_own(capsys):
    import sys

    from sky_jupyter.info import InstanceInfo, _set_current

    @sky.stdout(only=lambda info: info.worker == 0)  # one line per node
    @sky.stderr(only="head")
    def report() -> None:
        print("out")
        print("err", file=sys.stderr)

    for rank in range(4):
        _set_current(InstanceInfo(rank=rank, world_size=4, head_addr="a", node_addrs=("a", "b"), accelerator=None,
                                  pool_name="p", node=rank // 2, worker=rank % 2, workers_per_node=2))
        try:
            report()
            assert sky.is_head() is (rank == 0)
        finally:
            _set_current(None)
    assert capsys.readouterr() == ("out\nout\n", "err\n")  # ranks 0 and 2 print out; only rank 0 err
    assert sky.is_head(InstanceInfo(rank=1, world_size=2, head_addr="a", node_addrs=("a",), accelerator=None,
                                    pool_name="p")) is False
