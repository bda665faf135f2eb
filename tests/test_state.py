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
