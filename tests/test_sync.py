"""Image(includes=..., excludes=...): local files and packages synced to the nodes' working folders, only what
changed, on real Local and SSH nodes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def make_package(root: Path, answer: int) -> Path:
    pkg = root / "mypkg"
    (pkg / "data").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(f"ANSWER = {answer}\n")
    (pkg / "data" / "table.csv").write_text("a,b\n1,2\n")
    (pkg / "notes.tmp").write_text("scratch\n")
    (pkg / "__pycache__").mkdir(exist_ok=True)
    (pkg / "__pycache__" / "junk.pyc").write_bytes(b"\0")
    return pkg


@sky.compute
def use_package() -> tuple[int, str, bool, bool]:
    import importlib
    import os

    import mypkg

    importlib.reload(mypkg)
    return (mypkg.ANSWER, open("mypkg/data/table.csv").read(), os.path.exists("mypkg/notes.tmp"),
            os.path.exists("mypkg/__pycache__/junk.pyc"))


def test_an_included_package_is_importable_on_every_node_and_only_changes_travel(tmp_path):
    pkg = make_package(tmp_path / "src", 41)
    image = sky.Image(includes=[str(pkg)], excludes=["*.tmp"])
    root = tmp_path / "nodes"
    with sky.ComputePool(provider=sky.Local(root=root), nodes=2, image=image, name="sync-local") as pool:
        assert use_package() @ pool == [(41, "a,b\n1,2\n", False, False)] * 2  # excluded files stayed here
        assert pool.sync() == {}  # nothing changed: no round trip
        time.sleep(0.01)
        (pkg / "__init__.py").write_text("ANSWER = 42\n")
        assert pool.sync() == {0: 1, 1: 1}  # one file changed: one file sent to each node
        assert {answer for answer, *_ in use_package() @ pool} == {42}
        (pkg / "data" / "table.csv").unlink()
        assert pool.sync() == {0: 0, 1: 0}
        assert not (root / "sync-local" / "node-0" / "mypkg" / "data" / "table.csv").exists()  # removed there too
    on_node = root / "sync-local" / "node-0" / "mypkg" / "__init__.py"
    written_at = on_node.stat().st_mtime_ns
    with sky.ComputePool(provider=sky.Local(root=root), nodes=1, image=image, name="sync-local") as again:
        assert again.running and on_node.read_text() == "ANSWER = 42\n"
        assert on_node.stat().st_mtime_ns == written_at  # the node's manifest matched: nothing was sent again


def test_includes_are_checked_before_anything_starts(tmp_path):
    with pytest.raises(sky.ConfigError, match="does not exist here"):
        sky.Image(includes=[str(tmp_path / "missing")])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a").mkdir()
    with pytest.raises(sky.ConfigError, match="would both arrive as 'a'"):
        sky.Image(includes=[str(tmp_path / "a"), str(tmp_path / "b" / "a")])
    with pytest.raises(sky.ConfigError, match="take lists, not one string"):
        sky.Image(includes=str(tmp_path / "a"))


@pytest.mark.ssh
def test_an_included_package_reaches_an_ssh_node(sshd_cluster, tmp_path):
    pkg = make_package(tmp_path, 7)
    node = sshd_cluster.nodes[0]
    with sky.ComputePool(provider=sky.SSH([node.host_string], key_file=sshd_cluster.key_file),
                         image=sky.Image(includes=[str(pkg)], excludes=["*.tmp"]), name="sync-ssh") as pool:
        assert use_package() >> pool == (7, "a,b\n1,2\n", False, False)
    assert (node.home / "mypkg" / "__init__.py").read_text() == "ANSWER = 7\n"
