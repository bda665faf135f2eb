"""The bootstrap script: phases, markers, env file quoting, progress parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sky_jupyter.bootstrap import (
    ENV_SOURCE_LINE,
    BootstrapPlan,
    Phase,
    env_file,
    env_phase,
    follow,
    remote_plan,
)
from sky_jupyter.errors import BootstrapError, ConfigError
from sky_jupyter.image import Image, PipIndex

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def _run(script: str, home) -> list[str]:
    out = subprocess.run(["bash", "-c", script], check=False, env={**os.environ, "HOME": str(home)},
                         capture_output=True, text=True, timeout=30)
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


def test_secret_values_are_masked_in_the_nodes_log_and_output(tmp_path):
    """A phase that prints a secret (a tool echoing its config, say): the node's log and what the client reads
    show it masked, wherever and however often it appears; other output, glob characters included, is intact."""
    token = "hf_[fake]*token?value"  # glob characters must match literally
    (tmp_path / ".sky_jupyter").mkdir()
    (tmp_path / ".sky_jupyter" / "env.sh").write_text(env_file({"HF_TOKEN": token, "SHORT": "abc"}))
    noisy = Phase("noisy", 'echo "login with $HF_TOKEN"; echo "twice: $HF_TOKEN/$HF_TOKEN" >&2\n'
                           'printf "no newline at the end $HF_TOKEN"')
    plan = BootstrapPlan(Image(), (noisy, Phase("quiet", 'echo "a*b \\$x $SHORT"')), secrets=("HF_TOKEN", "UNSET"))
    assert token not in plan.script()
    out = "".join(_run(plan.script(), tmp_path))
    log = (tmp_path / ".sky_jupyter" / "bootstrap.log").read_text()
    for text in (out, log):
        assert token not in text and "hf_" not in text
        assert "login with ***" in text and "twice: ***/***" in text and "no newline at the end ***" in text
        assert "a*b $x abc" in text
    assert plan.key != BootstrapPlan(Image(), plan.phases).key


def test_env_file_quotes_values(tmp_path):
    text = env_file({"A": "it's $HOME `x`", "B": "plain"})
    path = tmp_path / "env.sh"
    path.write_text(text)
    out = subprocess.run(["bash", "-c", f". {path}; printf '%s|%s' \"$A\" \"$B\""], capture_output=True,
                         text=True, check=True)
    assert out.stdout == "it's $HOME `x`|plain"


# -- the remote plan's phases, run here with bash against a scratch HOME --------------------------------------------
def _phase(phase, home, env=None):
    plan = BootstrapPlan(Image(), (phase,), home="$HOME/.sky_jupyter")
    env = {**os.environ, "HOME": str(home), **(env or {})}
    return subprocess.run(["bash", "-c", plan.script()], check=False, env=env, capture_output=True, text=True,
                          timeout=60)


def test_env_phase_puts_the_source_line_first_once(tmp_path):
    (tmp_path / ".bashrc").write_text("# distro bashrc\ncase $- in *i*) ;; *) return;; esac\nexport LATE=1\n")
    (tmp_path / ".bashrc").chmod(0o640)
    (tmp_path / ".sky_jupyter").mkdir()
    (tmp_path / ".sky_jupyter" / "env.sh").write_text(env_file({"SKY_X": "a b 'c'"}))
    for _ in range(2):
        done = _phase(env_phase(), tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        for marker in tmp_path.glob(".sky_jupyter/bootstrap-*.done"):  # so that the phase runs again
            marker.unlink()
    lines = (tmp_path / ".bashrc").read_text().splitlines()
    assert lines[0] == ENV_SOURCE_LINE and lines[1:] == ["# distro bashrc", "case $- in *i*) ;; *) return;; esac",
                                                          "export LATE=1"]
    assert oct((tmp_path / ".bashrc").stat().st_mode & 0o777) == oct(0o640)
    assert (tmp_path / ".profile").read_text().splitlines() == [ENV_SOURCE_LINE]
    assert oct((tmp_path / ".sky_jupyter" / "env.sh").stat().st_mode & 0o777) == oct(0o600)
    sourced = subprocess.run(["bash", "-c", f". {tmp_path}/.bashrc; printf %s \"$SKY_X\""], check=True,
                             env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]}, capture_output=True, text=True)
    assert sourced.stdout == "a b 'c'"


@pytest.mark.parametrize("without_packaging", [False, True])
def test_pip_phase_hands_uv_only_what_the_interpreter_lacks(without_packaging):
    import cloudpickle

    import sky_jupyter.bootstrap as B

    reqs = [f"cloudpickle=={cloudpickle.__version__}", "cloudpickle>=1,<99", "cloudpickle>=99",
            "sky-jupyter-no-such-package", "pytest", "pytest!=0.1", "pytest==0.0.*", "pkg @ https://x.invalid/p.whl"]
    prefix = "import sys; sys.modules['packaging'] = None\n" if without_packaging else ""
    out = subprocess.run([sys.executable, "-c", prefix + B._UNSATISFIED, json.dumps(reqs)], capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert out == ["cloudpickle>=99", "sky-jupyter-no-such-package", "pytest==0.0.*", "pkg @ https://x.invalid/p.whl"]


def test_remote_plan_phases_and_the_cloudpickle_pin():
    image = Image(pip=["numpy", "cloudpickle>=2"], env={"TOKEN": "hf_secret_value"})
    plan = remote_plan(image, [("login", "echo login")], "3.11", {"cloudpickle": "3.1.1"})
    assert [p.name for p in plan.phases] == ["env", "uv", "venv", "pip", "login"]
    pip = plan.phases[3].script
    assert '["numpy", "cloudpickle==3.1.1"]' in pip and "cloudpickle>=2" not in pip
    assert "--system-site-packages" in plan.phases[2].script and "3.11" in plan.phases[2].script
    assert "hf_secret_value" not in plan.script()
    with_apt = remote_plan(Image(apt=["curl"]), [], "3.11", {})
    assert [p.name for p in with_apt.phases][:2] == ["env", "apt"]
    subprocess.run(["bash", "-n"], input=with_apt.script(), text=True, check=True)


# -- user strings never reach apt-get, dpkg or uv as options --------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"pip": ["numpy", "--index-url=http://127.0.0.1:9/x"]}, ["Image(pip=...)", "'--index-url=http://127.0.0.1:9/x'",
                                                             "Image(index_url=...)"]),
    ({"pip": ["--extra-index-url=https://bob:s3cret-pw@127.0.0.1:9/x"]}, ["bob:***@", "index_url"]),
    ({"apt": ["curl", "-oFoo=1"]}, ["Image(apt=...)", "'-oFoo=1'"]),
    ({"pip_indexes": lambda: [PipIndex("http://127.0.0.1:9/simple", ["-e"])]}, ["PipIndex(packages=...)", "'-e'"]),
    ({"python": "-c"}, ["Image(python=...)", "'-c'"]),
])
def test_option_like_names_are_refused_when_the_image_is_made(kwargs, words):
    with pytest.raises(ConfigError) as info:
        Image(**{k: v() if callable(v) else v for k, v in kwargs.items()})
    message = str(info.value)
    assert "\n" not in message and "s3cret-pw" not in message
    for word in words:
        assert word in message, message


def test_option_like_names_are_refused_when_added_later():
    with pytest.raises(ConfigError, match="'-oFoo=1'"):
        Image(apt=["curl"]).with_apt("-oFoo=1")
    with pytest.raises(ConfigError, match="'--pre'"):
        Image().with_pip("torch", "--pre")
    assert Image(pip=["numpy>=1", "my-pkg"], apt=["curl"]).pip == ("numpy>=1", "my-pkg")  # dashes inside are fine


def _recorder(path, log, code=1):
    """A stand-in for a command: records its name and arguments (one per line) in ``log`` and exits with ``code``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\n{{ echo "== $(basename "$0")"; for a in "$@"; do echo "$a"; done; }} >> {log}\n'
                    f"exit {code}\n")
    path.chmod(0o755)


def _calls(log):
    return [c.split("\n")[:-1] for c in log.read_text().split("== ")[1:]]


def test_apt_dpkg_and_uv_get_names_after_a_double_dash(tmp_path):
    """The phases themselves, fed names that look like options (as if validation were bypassed): apt-get, dpkg and
    uv (stand-ins recording their arguments) see every name after ``--``."""
    import sky_jupyter.bootstrap as B

    log = tmp_path / "argv.log"
    fake = tmp_path / "fake-bin"
    for name in ("apt-get", "dpkg", "sudo", "id"):
        _recorder(fake / name, log)
    (fake / "id").write_text("#!/bin/sh\necho 0\n")  # as root: no sudo
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    done = _phase(B.apt_phase(("-oFoo=1", "curl")), tmp_path, env)
    assert done.returncode != 0
    dpkg = [c[1:] for c in _calls(log) if c[0] == "dpkg"]
    assert dpkg == [["-s", "--", "-oFoo=1"], ["-s", "--", "curl"]]
    assert [c[1:] for c in _calls(log) if c[0] == "apt-get"] == [["-o", "DPkg::Lock::Timeout=300", "update", "-q"]]
    log.unlink()
    _recorder(fake / "apt-get", log, code=0)
    assert _phase(B.apt_phase(("-oFoo=1", "curl")), tmp_path, env).returncode == 0
    install = [c[1:] for c in _calls(log) if c[0] == "apt-get"][1]
    assert install[-4:] == ["--no-install-recommends", "--", "-oFoo=1", "curl"]

    home = tmp_path / "home"
    sky = home / ".sky_jupyter"
    (sky / "venv" / "bin").mkdir(parents=True)
    (sky / "venv" / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (sky / "venv" / "bin" / "python").chmod(0o755)
    _recorder(sky / "bin" / "uv", log, code=0)
    log.unlink()
    done = _phase(B.pip_phase([("", "", ("--index-url=http://127.0.0.1:9/x",)),
                               ("SKY_PIP_INDEX_0", "http://127.0.0.1:9/i", ("-e",))]), home,
                  {"SKY_PIP_INDEX_0": "http://127.0.0.1:9/i"})
    assert done.returncode == 0, done.stdout + done.stderr
    py = f"{sky}/venv/bin/python"
    assert _calls(log) == [["uv", "pip", "install", "--python", py, "--", "--index-url=http://127.0.0.1:9/x"],
                           ["uv", "pip", "install", "--python", py, "--", "-e"]]

    _recorder(sky / "bin" / "uv", log)
    (sky / "venv" / "bin" / "python").unlink()
    log.unlink()
    nothing = {"SKY_PREINSTALLED_PYTHONS": "/nonexistent/python3"}
    assert _phase(B.venv_phase("3.99"), home, nothing).returncode != 0
    calls = _calls(log)
    assert ["uv", "python", "find", "--", "3.99"] in calls and ["uv", "python", "install", "--", "3.99"] in calls
    log.unlink()
    assert _phase(B.venv_phase("-9.99"), home, nothing).returncode != 0  # not a version: an interpreter path
    assert _calls(log)[-1][:3] == ["uv", "venv", "--python=-9.99"]
