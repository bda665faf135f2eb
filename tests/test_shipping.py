"""Functions, classes and user modules travel by value when the node could not import them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import sky_jupyter as sky
from sky_jupyter.shipping import is_user_module

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`

ROOT = Path(__file__).resolve().parents[1]


def test_script_with_a_module_beside_it(tmp_path):
    (tmp_path / "helper.py").write_text(textwrap.dedent("""
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y

        def square(x):
            return x * x
    """))
    (tmp_path / "script.py").write_text(textwrap.dedent("""
        import sky_jupyter as sky
        from helper import Point, square

        @sky.compute
        def go(n):
            import importlib.util
            assert importlib.util.find_spec("helper") is None, "the node must not see helper.py"
            return [square(i) for i in range(n)], Point(1, 2)

        if __name__ == "__main__":
            with sky.ComputePool(nodes=1) as pool:
                squares, point = go(4) >> pool
                print(squares, type(point).__name__, point.x, isinstance(point, Point))
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "script.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[0, 1, 4, 9] Point 1 True"


def test_what_counts_as_a_user_module():
    import json

    import cloudpickle

    assert is_user_module(sys.modules[__name__])
    assert not is_user_module(json)
    assert not is_user_module(cloudpickle)
    assert not is_user_module(sky)


def helper_in_test_module(x: int) -> int:
    return x + 100


@sky.compute
def uses_helper(x: int) -> int:
    return helper_in_test_module(x)


def test_function_in_a_test_module_runs_remotely(local_pool):
    assert uses_helper(1) >> local_pool == 101
