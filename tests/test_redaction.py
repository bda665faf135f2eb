from __future__ import annotations

from sky_jupyter.redaction import redact, register

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_registered_secrets_are_hidden_longest_first():
    register("hf_skytestABCDEFGHIJ")
    register("hf_skytestABCDEFGHIJKLMNOP")
    assert redact("token=hf_skytestABCDEFGHIJKLMNOP; other=hf_skytestABCDEFGHIJ") == "token=***; other=***"


def test_short_or_empty_values_are_not_secrets():
    register("")
    register(None)
    register("abc")
    assert redact("abc def") == "abc def"
