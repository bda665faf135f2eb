"""The worker side of a cell, in process: notebook functions are rebound to the node's namespace."""

from __future__ import annotations

from sky_jupyter.worker.cells import CellRunner, rebind

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_rebound_functions_write_globals_into_the_node_namespace():
    shipped: dict = {"__name__": "__main__"}
    exec("def bump():\n    global counter\n    counter = counter + 1\n    return counter\n", shipped)
    node = {"__name__": "__main__", "counter": 10}
    bump = rebind(shipped["bump"], node)
    assert bump() == 11 and node["counter"] == 11


def test_cells_run_in_a_persistent_namespace_and_return_what_they_bound():
    runner = CellRunner({"__name__": "__main__"})
    runner._shell = __import__("sky_jupyter.worker.cells", fromlist=["_NO_SHELL"])._NO_SHELL  # plain Python path
    first = runner.run({"code": "a = 2\nb = a * 3", "binds": ["a", "b"]}, [])
    assert first["bound"] == ["a", "b"] and set(first["values"]) == {"a", "b"}
    second = runner.run({"code": "a + b"}, [])
    assert second == {"has_value": True, "value": 8}
