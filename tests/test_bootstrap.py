"""The bootstrap script: phases, markers, env file quoting, progress parsing."""

from __future__ import annotations

import os
import subprocess

import pytest

from sky_jupyter.bootstrap import BootstrapPlan, Phase, env_file, follow
from sky_jupyter.errors import BootstrapError
from sky_jupyter.image import Image


def _run(script: str, home) -> list[str]:
    out = subprocess.run(["bash", "-c", script], env={**os.environ, "HOME": str(home)}, capture_output=True,
                         text=True, timeout=30)
    return out.stdout.splitlines(keepends=True)


def test_phases_run_in_order_and_marker_skips_second_run(tmp_path):
    plan = BootstrapPlan(Image(), (Phase("one", "echo first"), Phase("two", "echo second")))
    seen: list[tuple[str, str]] = []
    assert follow(iter(_run(plan.script(), tmp_path)), "n0", lambda p, line: seen.append((p, line))) is False
    assert seen == [("one", ""), ("one", "first"), ("two", ""), ("two", "second"), ("done", "")]
    assert (tmp_path / ".sky_jupyter" / f"bootstrap-{plan.key}.done").exists()
    assert "first" in (tmp_path / ".sky_jupyter" / "bootstrap.log").read_text()
    assert follow(iter(_run(plan.script(), tmp_path)), "n0", lambda p, line: None) is True


def test_failing_phase_stops_the_script(tmp_path):
    plan = BootstrapPlan(Image(), (Phase("ok", "echo fine"), Phase("bad", "echo about to fail\nfalse\necho never"),
                                   Phase("after", "echo not reached")))
    with pytest.raises(BootstrapError) as info:
        follow(iter(_run(plan.script(), tmp_path)), "node 3", lambda p, line: None)
    assert (info.value.phase, info.value.exit_code, info.value.node) == ("bad", 1, "node 3")
    assert "about to fail" in info.value.tail and "never" not in info.value.tail
    assert not list((tmp_path / ".sky_jupyter").glob("*.done"))


def test_key_changes_with_the_script_not_with_secret_values():
    a = BootstrapPlan(Image(env={"HF_TOKEN": "tok-value-1"}), (Phase("p", "true"),))
    b = BootstrapPlan(Image(env={"HF_TOKEN": "tok-value-2"}), (Phase("p", "true"),))
    c = BootstrapPlan(Image(env={"HF_TOKEN": "tok-value-1"}), (Phase("p", "echo"),))
    assert a.key == b.key != c.key
    assert "tok-value-1" not in a.script()


def test_env_file_quotes_values(tmp_path):
    text = env_file({"A": "it's $HOME `x`", "B": "plain"})
    path = tmp_path / "env.sh"
    path.write_text(text)
    out = subprocess.run(["bash", "-c", f". {path}; printf '%s|%s' \"$A\" \"$B\""], capture_output=True, text=True)
    assert out.stdout == "it's $HOME `x`|plain"
