"""The node's share folder (sky_jupyter.worker.share): a payload stored once, one hard-linked copy per sibling."""

from __future__ import annotations

import os
import time

import pytest

from sky_jupyter.worker.share import ShareError, check, store, take

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_each_sibling_maps_its_own_copy_and_the_file_goes_with_the_last(tmp_path):
    frames = [bytearray(b"head"), bytearray(os.urandom(1 << 20)), bytearray()]
    store(str(tmp_path), "ab" * 8, frames, copies=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abababababababab.1", "abababababababab.2"]
    one = take(str(tmp_path), "ab" * 8, 1, wait=1, carrier="a sibling")
    assert [bytes(f) for f in one] == [bytes(f) for f in frames]
    one[1][0:4] = b"mine"  # copy-on-write: writable, and the other copy is untouched
    two = take(str(tmp_path), "ab" * 8, 2, wait=1, carrier="a sibling")
    assert bytes(two[1]) == bytes(frames[1]) and list(tmp_path.iterdir()) == []


def test_a_copy_that_never_arrives_is_a_one_line_error_after_the_wait(tmp_path):
    started = time.monotonic()
    with pytest.raises(ShareError, match="sent once to this node with worker 0's copy of the task, did not arrive "
                                         "within 0 s"):
        take(str(tmp_path), "cd" * 8, 1, wait=0.2, carrier="worker 0")
    assert time.monotonic() - started < 2


def test_share_fields_are_checked_before_they_name_a_file():
    check("0123abcd", 3, 0)
    for key in ("../etc/passwd", "ABCDEF01", "abc", 7):
        with pytest.raises(ShareError, match="key must be 8 to 64 hex digits"):
            check(key, 1, 0)
    with pytest.raises(ShareError, match="copies must be a whole number"):
        check("0123abcd", -1, 0)
    with pytest.raises(ShareError, match="copy must be a whole number"):
        check("0123abcd", 1, True)
