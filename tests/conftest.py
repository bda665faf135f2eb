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


#: The unit tier (``pytest -m unit``, under a minute on two cores): a module joins it with ``UNIT_TIER = True``. Its
#: tests that start a heavy part stay out of the tier by themselves: those using one of these fixtures, and those
#: marked ``ssh`` or ``torch``.
HEAVY_FIXTURES = frozenset({"sshd_cluster", "bookworm_cluster", "trixie_cluster", "hf_hub", "moto_ec2",
                            "package_index", "package_index_dir"})
HEAVY_MARKERS = ("ssh", "torch", "browser")


def in_unit_tier(item: pytest.Item) -> bool:
    module = getattr(item, "module", None)
    return (getattr(module, "UNIT_TIER", False) and not HEAVY_FIXTURES & set(getattr(item, "fixturenames", ()))
            and not any(item.get_closest_marker(name) for name in HEAVY_MARKERS))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects on the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if in_unit_tier(item):
            item.add_marker(pytest.mark.unit)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run of the unit tier alone must not have imported torch (it is what makes the other tiers slow)."""
    items = getattr(session, "items", [])
    if items and all(item.get_closest_marker("unit") for item in items) and "torch" in sys.modules:
        session.config.get_terminal_writer().line("the unit tier imported torch: mark the test that does `torch`",
                                                  red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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

    ip = InteractiveShell.instance()  # one per process: what a module's cells bind must not reach the next module
    before = set(ip.user_ns)
    ip.run_cell("%load_ext sky_jupyter", store_history=False)
    manager().configure(provider="local", nodes=1, pool="default", torch=False)
    yield ip
    ip.run_cell("%sky down --all")
    for name in set(ip.user_ns) - before:
        del ip.user_ns[name]


@pytest.fixture(scope="module")
def local_pool():
    import sky_jupyter as sky

    with sky.ComputePool(provider=sky.Local(), nodes=2, name="test-local") as pool:
        yield pool
