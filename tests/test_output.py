"""Cell output routing without nodes: plain mode groups per node and collapses progress bars."""

from __future__ import annotations

from sky_jupyter import protocol as P
from sky_jupyter.notebook.output import CellOutput, plain_mode

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_plain_mode_groups_per_node_in_rank_order(capsys):
    out = CellOutput([0, 1], plain=True)
    out.sink(1)(P.STREAM, {"name": "stdout", "text": "from one\n"})
    out.sink(0)(P.STREAM, {"name": "stdout", "text": "from zero\n"})
    out.sink(0)(P.STREAM, {"name": "stdout", "text": "\rstep 1\rstep 2\rstep 3\n"})
    out.finish()
    assert capsys.readouterr().out == "[node 0]\nfrom zero\nstep 3\n[node 1]\nfrom one\n"


def test_live_mode_prefixes_lines_as_they_come(capsys):
    out = CellOutput([0, 1], plain=False)
    out.sink(1)(P.STREAM, {"name": "stdout", "text": "partial "})
    out.sink(1)(P.STREAM, {"name": "stdout", "text": "line\nnext\n"})
    out.finish()
    assert capsys.readouterr().out == "[node 1] partial line\n[node 1] next\n"


def test_plain_mode_follows_the_environment(monkeypatch):
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "1")
    assert plain_mode()
    monkeypatch.setenv("SKY_JUPYTER_PLAIN", "0")
    assert not plain_mode()
