"""The client side of a cell, without nodes: content hashes and the globals notebook functions need."""

from __future__ import annotations

from sky_jupyter import protocol as P
from sky_jupyter.notebook.session import notebook_globals
from sky_jupyter.protocol import content_hash

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_content_hash_follows_content_not_identity():
    assert content_hash(P.dumps([1, 2, 3])) == content_hash(P.dumps([1, 2, 3]))
    assert content_hash(P.dumps([1, 2, 3])) != content_hash(P.dumps([1, 2, 4]))


def test_globals_of_notebook_functions_are_found_transitively():
    ns: dict = {}
    exec("RATE = 3\nOFFSET = 1\ndef helper(v):\n    return v + OFFSET\ndef f(x):\n    return helper(x) * RATE\n"
         "unused = 5", ns)
    for fn in ("helper", "f"):
        ns[fn].__module__ = "__main__"
    assert notebook_globals({"f": ns["f"]}, ns) == {"helper", "RATE", "OFFSET"}
