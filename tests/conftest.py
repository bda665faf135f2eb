"""Shared fixtures. Real parts only: worker processes, sshd nodes, a local Hub server, moto's EC2 server."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `tests.fixtures...` importable

# The sshd test cluster (session scope, started on first use): real OpenSSH nodes in network namespaces.
pytest_plugins = [
    "tests.fixtures.sshd_cluster",
    "tests.fixtures.hub",
    "tests.fixtures.moto_ec2",
    "tests.fixtures.pkg_index",
    "tests.fixtures.rootfs",
]


@pytest.fixture(scope="session", autouse=True)
def sky_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session gets its own ~/.sky_jupyter, so nothing touches the real one."""
    home = tmp_path_factory.mktemp("sky_home")
    os.environ["SKY_JUPYTER_HOME"] = str(home)
    # Nodes never reach for the public index: those that need uv get this client's, or fetch it from the test
    # index an image names.
    os.environ["SKY_JUPYTER_DEFAULT_INDEX"] = ""
    return home


@pytest.fixture(scope="module")
def shell():
    """A real IPython shell with the extension loaded and bare %%sky cells on one Local node; the module's
    pools are shut down afterwards."""
    from IPython.core.interactiveshell import InteractiveShell

    from sky_jupyter.notebook.manager import manager

    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext sky_jupyter", store_history=False)
    manager().configure(provider="local", nodes=1, pool="default", torch=False)
    yield ip
    ip.run_cell("%sky down --all")


@pytest.fixture(scope="module")
def local_pool():
    import sky_jupyter as sky

    with sky.ComputePool(provider=sky.Local(), nodes=2, name="test-local") as pool:
        yield pool
