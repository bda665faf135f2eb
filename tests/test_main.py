"""`python -m sky_jupyter`: the console entry points."""

from __future__ import annotations

import os
import subprocess
import sys

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_status_lists_no_pools_in_a_fresh_home(tmp_path):
    env = {**os.environ, "SKY_JUPYTER_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "sky_jupyter", "status"], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "no pools on record"


def test_unknown_command_is_a_usage_error():
    out = subprocess.run([sys.executable, "-m", "sky_jupyter", "launch-rockets"], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 2 and "invalid choice" in out.stderr
