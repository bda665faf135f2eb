"""Shared collections (sky.dict, sky.set, sky.counter, sky.queue, sky.barrier, sky.lock) across the workers of a
pool: hosted by the head worker, reached over TCP after proving the pool secret."""

from __future__ import annotations

import socket
import time

import pytest

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


@pytest.fixture(scope="module")
def pool2x2(tmp_path_factory):
    with sky.ComputePool(provider=sky.Local(root=tmp_path_factory.mktemp("store")), nodes=2, workers_per_node=2,
                         name="store-2x2") as pool:
        yield pool


@sky.compute
def count_and_record(n: int) -> tuple[int, int]:
    info = sky.instance_info()
    hits = sky.counter("hits")
    for _ in range(n):
        hits.add()
    sky.dict("by_rank")[info.rank] = info.worker
    first = sky.set("seen").add("everyone")  # exactly one worker adds it first
    sky.barrier("counted", info.world_size).wait(timeout=30)  # all increments are in once every rank is here
    return hits.value, int(first)


def test_every_worker_shares_one_counter_dict_set_and_barrier(pool2x2):
    results = count_and_record(50) @ pool2x2
    assert [value for value, _ in results] == [200] * 4  # read after the barrier: every worker's 50 are in
    assert sum(first for _, first in results) == 1

    @sky.compute
    def snapshot() -> tuple[dict, int, int]:
        return dict(sky.dict("by_rank").items()), len(sky.set("seen")), sky.counter("hits").value

    assert snapshot() >> pool2x2 == ({0: 0, 1: 1, 2: 0, 3: 1}, 1, 200)


def test_a_lock_makes_read_modify_write_exact_and_a_queue_hands_out_each_item_once(pool2x2):
    @sky.compute
    def fill() -> None:
        q = sky.queue("work")
        for i in range(40):
            q.put(i)

    @sky.compute
    def drain_and_add() -> list[int]:
        import queue

        q, totals, mine = sky.queue("work"), sky.dict("totals"), []
        while True:
            try:
                mine.append(q.get(timeout=0.5))
            except queue.Empty:
                break
            with sky.lock("totals"):  # without it, concurrent read-modify-writes would lose updates
                totals["sum"] = totals.get("sum", 0) + mine[-1]
        return mine

    fill() >> pool2x2
    taken = drain_and_add() @ pool2x2
    assert sorted(i for part in taken for i in part) == list(range(40))  # each item once, none lost

    @sky.compute
    def total() -> int:
        return sky.dict("totals")["sum"]

    assert total() >> pool2x2 == sum(range(40))


def test_misuse_is_a_clear_error(pool2x2):
    @sky.compute
    def other_parties() -> None:
        sky.barrier("counted", 3).wait(timeout=1)  # made for 4 parties in the first test

    with pytest.raises(sky.SkyError, match="barrier 'counted' was made for 4 parties, not 3"):
        other_parties() >> pool2x2

    @sky.compute
    def lonely() -> None:
        sky.barrier("alone", 2).wait(timeout=0.5)

    with pytest.raises(TimeoutError, match="not every party arrived within 0.5 s"):
        lonely() >> pool2x2
    with pytest.raises(sky.ConfigError, match="use them in code that runs on a pool"):
        sky.dict("here")["x"]  # not on a pool


def test_the_head_serves_only_whoever_proves_the_pool_secret(pool2x2):
    head = pool2x2.hosts[0].private_addr
    with socket.create_connection((head, pool2x2.store_port), timeout=5) as sock:
        nonce = sock.recv(32)
        assert len(nonce) == 32
        sock.sendall(b"0" * 64)  # a wrong proof: the connection is closed, nothing is unpickled
        sock.settimeout(5)
        assert sock.recv(2) == b""
    time.sleep(0.1)

    @sky.compute
    def still() -> int:
        return sky.counter("hits").value

    assert still() >> pool2x2 == 200


@pytest.mark.ssh
def test_workers_on_two_ssh_nodes_meet_at_the_head(sshd_cluster):
    nodes = sshd_cluster.nodes[:2]
    with sky.ComputePool(provider=sky.SSH([n.host_string for n in nodes], key_file=sshd_cluster.key_file), nodes=2,
                         name="store-ssh") as pool:
        results = count_and_record(25) @ pool  # node 1 reaches node 0's address across the test network
        assert [value for value, _ in results] == [50, 50]
        assert sorted(first for _, first in results) == [0, 1]
        assert pool.hosts[0].private_addr != "127.0.0.1"


def test_collections_across_two_nodes_with_two_slots_each(tmp_path):
    """Slot threads of one worker each keep their own connection to the head; a lock and a counter stay exact."""
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, worker=sky.Worker(concurrency=2),
                         name="store-slots") as pool:

        @sky.compute
        def add_under_lock(n: int) -> int:
            import threading

            totals = sky.dict("slot-totals")
            for _ in range(n):
                with sky.lock("slot-totals"):
                    totals["sum"] = totals.get("sum", 0) + 1
                sky.counter("slot-hits").add()
            return threading.get_ident()

        idents = sky.gather(*(add_under_lock(25) for _ in range(4))) >> pool  # 2 nodes x 2 slots at once

        @sky.compute
        def read() -> tuple[int, int]:
            return sky.dict("slot-totals")["sum"], sky.counter("slot-hits").value

        assert read() >> pool == (100, 100)
        assert len(set(idents)) >= 2
