"""How a remote failure becomes an exception here."""

from __future__ import annotations

from sky_jupyter import protocol as P
from sky_jupyter.errors import RemoteError, RemoteTraceback, WorkerLostError
from sky_jupyter.node import remote_exception

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_a_rebuildable_exception_keeps_its_type_and_gets_the_remote_traceback():
    exc = remote_exception({"type": "ValueError", "message": "bad", "traceback": "Traceback ...\nValueError: bad\n"},
                           P.dumps(ValueError("bad")), "node 1 (gpu2)")
    assert type(exc) is ValueError and isinstance(exc.__cause__, RemoteTraceback)
    assert exc.__notes__ == ["(raised on node 1 (gpu2))"]


def test_an_exception_that_cannot_be_rebuilt_is_a_remote_error():
    exc = remote_exception({"type": "mylib.Boom", "message": "it broke", "traceback": "tb"}, [], "node 0 (local)")
    assert isinstance(exc, RemoteError) and exc.type_name == "mylib.Boom" and exc.node == "node 0 (local)"


def test_a_restarted_worker_is_reported_as_lost():
    exc = remote_exception({"type": "KeyboardInterrupt", "message": "restarted after 10 s", "restarted": True}, [],
                           "node 3 (gpu4)")
    assert isinstance(exc, WorkerLostError) and "node 3 (gpu4)" in str(exc)
