"""Pool state files: private, atomic, listed, removed."""

from __future__ import annotations

import os

from sky_jupyter import state
from tests.waiting import wait_for

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_state_files_are_private_and_round_trip(sky_home):
    path = state.save(state.PoolRecord("state-test", nodes=2, secret="not-shown-anywhere"))
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o077 == 0
    loaded = state.load("state-test")
    assert loaded is not None and loaded.nodes == 2 and loaded.client_pid == os.getpid()
    assert any(p.name == "state-test" for p in state.all_pools())
    state.update("state-test", cloud={"region": "r"})
    assert state.load("state-test") == state.PoolRecord(
        "state-test", nodes=2, secret="not-shown-anywhere", cloud={"region": "r"}, client_pid=os.getpid(),
        updated=state.load("state-test").updated)
    state.remove("state-test")
    assert state.load("state-test") is None
    state.remove("state-test")  # removing twice is fine


def test_a_killed_client_counts_as_gone_before_it_is_reaped():
    """A kernel killed by the OOM killer stays a zombie until Jupyter reaps it: its pools are detached already."""
    import signal
    import subprocess

    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert state.pid_alive(proc.pid)
        proc.send_signal(signal.SIGKILL)
        wait_for(lambda: not state.pid_alive(proc.pid), timeout=5,  # not waited for: a zombie
                 what="the killed, unreaped client to count as gone")
        assert state.PoolRecord("gone", client_pid=proc.pid).detached
        assert not state.PoolRecord("mine", client_pid=os.getpid()).detached
    finally:
        proc.wait()


def test_a_record_written_by_another_version_still_loads(sky_home):
    """Keys a newer client added are left out; keys an older one lacked take their defaults; a broken file is
    no record."""
    import json

    folder = state.pools_dir()
    (folder / "newer.json").write_text(json.dumps({"name": "newer", "provider": "ssh", "nodes": 3,
                                                   "hosts": [{"addr": "10.0.0.1"}], "shiny": {"new": 1}}))
    (folder / "older.json").write_text(json.dumps({"provider": "local", "secret": "s"}))
    (folder / "broken.json").write_text("{not json")
    newer, older = state.load("newer"), state.load("older")
    assert newer is not None and (newer.provider, newer.nodes, newer.hosts) == ("ssh", 3, [{"addr": "10.0.0.1"}])
    assert older is not None and (older.name, older.workers, older.cloud) == ("older", [], {})
    assert state.load("broken") is None
    assert {"newer", "older"} <= {p.name for p in state.all_pools()}
    for name in ("newer", "older", "broken"):
        state.remove(name)
