from __future__ import annotations

from sky_jupyter.remote import Remote, human_size

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_remote_handle_says_what_where_and_how_to_fetch():
    handle = Remote("model", "BertModel", 418_200_000, 0, "default", "over the pull budget")
    text = repr(handle)
    assert "model: BertModel, 418.2 MB, on node 0 of pool 'default'" in text
    assert "%sky pull model" in text and "over the pull budget" in text


def test_human_size():
    assert human_size(None) == "size unknown"
    assert human_size(512) == "512 B"
    assert human_size(4_200_000) == "4.2 MB"
