"""Pool state files: private, atomic, listed, removed."""

from __future__ import annotations

import os

from sky_jupyter import state


def test_state_files_are_private_and_round_trip(sky_home):
    path = state.save("state-test", {"nodes": 2, "secret": "not-shown-anywhere"})
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o077 == 0
    loaded = state.load("state-test")
    assert loaded["nodes"] == 2 and loaded["client_pid"] == os.getpid()
    assert any(p["name"] == "state-test" for p in state.all_pools())
    state.remove("state-test")
    assert state.load("state-test") is None
    state.remove("state-test")  # removing twice is fine


def test_a_killed_client_counts_as_gone_before_it_is_reaped():
    """A kernel killed by the OOM killer stays a zombie until Jupyter reaps it: its pools are detached already."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert state.pid_alive(proc.pid)
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while state.pid_alive(proc.pid) and time.monotonic() < deadline:  # not waited for: a zombie
            time.sleep(0.01)
        assert not state.pid_alive(proc.pid)
        assert state.detached({"client_pid": proc.pid})
        assert not state.detached({"client_pid": os.getpid()})
    finally:
        proc.wait()
