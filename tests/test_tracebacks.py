"""Remote tracebacks are mapped back to the user's files and lines."""

from __future__ import annotations

from sky_jupyter.tracebacks import localize

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def helper_that_fails(v):
    return v / 0  # the line the traceback should show


def test_dynamic_code_frames_get_file_and_source():
    lineno = helper_that_fails.__code__.co_firstlineno + 1
    remote = (f'Traceback (most recent call last):\n  File "<dynamic-code>", line {lineno}, in helper_that_fails\n'
              "ZeroDivisionError: division by zero\n")
    text = localize(remote, [helper_that_fails])
    assert f'File "{__file__}", line {lineno}, in helper_that_fails' in text
    assert "return v / 0  # the line the traceback should show" in text


def test_unknown_frames_and_plain_tracebacks_are_left_alone():
    remote = 'Traceback (most recent call last):\n  File "<dynamic-code>", line 3, in elsewhere\nValueError: x\n'
    assert localize(remote, [helper_that_fails]) == remote
    plain = 'Traceback (most recent call last):\n  File "/srv/app.py", line 3, in f\nValueError: x\n'
    assert localize(plain, [helper_that_fails]) == plain
