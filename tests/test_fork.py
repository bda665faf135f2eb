"""Tasks that fork: a fork Pool and torch DataLoader workers in a task must return, in Local and SSH workers.

A forked child inherits a copy of every lock as it was at the fork. A worker thread blocked reading stdin held the
stdin buffer's lock, and multiprocessing's child start closes stdin: the child blocked forever on that lock."""

from __future__ import annotations

import pytest

import sky_jupyter as sky


@sky.compute
def fork_pool_squares(n: int) -> list[int]:
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        return pool.map(abs, [-i * i for i in range(n)])


@sky.compute
def dataloader_sum() -> int:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.arange(16)), batch_size=4, num_workers=2,
                        multiprocessing_context="fork")
    return int(sum(batch[0].sum() for batch in loader))


def _run_both(pool) -> None:
    results = sky.gather(fork_pool_squares(5), fork_pool_squares(3)) >> pool
    assert results == ([0, 1, 4, 9, 16], [0, 1, 4])
    assert dataloader_sum() >> pool == sum(range(16))


@pytest.mark.timeout(120)
def test_tasks_that_fork_return_on_local_workers():
    pytest.importorskip("torch")
    with sky.ComputePool(provider=sky.Local(), nodes=1, name="fork-local") as pool:
        _run_both(pool)


@pytest.mark.ssh
@pytest.mark.timeout(120)
def test_tasks_that_fork_return_on_ssh_workers(sshd_cluster):
    pytest.importorskip("torch")
    node = sshd_cluster.nodes[0]
    with sky.ComputePool(provider=sky.SSH([node.host_string], key_file=sshd_cluster.key_file), nodes=1,
                         name="fork-ssh") as pool:
        _run_both(pool)
