from __future__ import annotations

import pickle

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_remote_error_keeps_its_fields_through_pickling():
    err = sky.RemoteError("mylib.Boom", "it broke", "Traceback ...", "node 1")
    again = pickle.loads(pickle.dumps(err))
    assert (again.type_name, again.message, again.traceback, again.node) == ("mylib.Boom", "it broke",
                                                                             "Traceback ...", "node 1")
    assert str(again) == "mylib.Boom: it broke (raised on node 1)"


def test_bootstrap_error_names_node_phase_code_and_next_step():
    err = sky.BootstrapError("node 2 (gpu3)", "pip", 1, "No solution found")
    text = str(err)
    assert "'pip'" in text and "node 2 (gpu3)" in text and "exit code 1" in text and "bootstrap.log" in text
    assert isinstance(err, sky.SkyError)
