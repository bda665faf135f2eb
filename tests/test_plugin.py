"""Plugin hooks run in the documented order, once each."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def recording_plugin(name: str, client_log: list[str]) -> sky.Plugin:
    @contextlib.contextmanager
    def around_app(info):
        with open(Path(os.getcwd()) / "app.log", "a") as f:
            f.write(f"enter {name} rank={info.rank}\n")
        yield
        with open(Path(os.getcwd()) / "app.log", "a") as f:
            f.write(f"exit {name}\n")

    def decorate(fn):
        def wrapped(*args, **kwargs):
            return [f"{name}>", *fn(*args, **kwargs), f"<{name}"]
        return wrapped

    @contextlib.contextmanager
    def around_client(pool):
        client_log.append(f"enter {name}")
        yield
        client_log.append(f"exit {name}")

    def transform(image, cluster):
        client_log.append(f"transform {name}")
        return image.with_env(**{f"SEEN_{name}": str(cluster.nodes)})

    return (sky.Plugin.create(name).with_transform(transform)
            .with_bootstrap(lambda cluster: [f"echo {name} >> bootstrap.log"])
            .with_around_app(around_app).with_decorate(decorate).with_around_client(around_client))


@sky.compute
def body() -> list[str]:
    return [os.environ.get("SEEN_a", "?"), os.environ.get("SEEN_b", "?")]


def test_hooks_run_in_order_once(tmp_path):
    log: list[str] = []
    plugins = [recording_plugin("a", log), recording_plugin("b", log)]
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, plugins=plugins, name="hooks") as pool:
        assert log == ["transform a", "transform b", "enter a", "enter b"]
        assert body() >> pool == ["a>", "b>", "2", "2", "<b", "<a"]
        assert body() >> pool == ["a>", "b>", "2", "2", "<b", "<a"]
    assert log[-2:] == ["exit b", "exit a"]
    for rank in range(2):
        node = tmp_path / "hooks" / f"node-{rank}"
        assert (node / "bootstrap.log").read_text() == "a\nb\n"
        assert (node / "app.log").read_text() == f"enter a rank={rank}\nenter b rank={rank}\nexit b\nexit a\n"

    # The same pool again: the bootstrap marker skips the phases; workers run around_app again.
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, plugins=plugins, name="hooks") as pool:
        body() >> pool
    assert (tmp_path / "hooks" / "node-0" / "bootstrap.log").read_text() == "a\nb\n"


def test_plugins_must_be_plugins():
    with pytest.raises(sky.ConfigError, match=r"plugins\[0\] is function"):
        sky.ComputePool(plugins=[lambda: None])


def test_failing_bootstrap_phase_names_phase_code_and_output_without_secrets(tmp_path):
    from sky_jupyter.redaction import register

    register("hf_skytestSECRETvalue1234567890abcd")
    plugin = sky.Plugin.create("broken").with_bootstrap(
        lambda c: ["echo working on it", "echo token hf_skytestSECRETvalue1234567890abcd", "exit 3"])
    with pytest.raises(sky.BootstrapError) as info:
        with sky.ComputePool(provider=sky.Local(root=tmp_path), plugins=[plugin], name="broken"):
            pass
    err = info.value
    assert (err.phase, err.exit_code) == ("broken", 3)
    assert "working on it" in str(err) and "node 0" in str(err)
    assert "SECRETvalue" not in str(err)


def test_local_provider_requires_image_packages_installed():
    image = sky.Image(pip=["surely-not-installed-package-xyz"])
    with pytest.raises(sky.ConfigError, match="surely-not-installed-package-xyz.*pip install"):
        with sky.ComputePool(image=image, name="missing-pkg"):
            pass


def test_what_a_plugin_prints_while_setting_up_shows_as_node_output(tmp_path, capfd):
    @contextlib.contextmanager
    def around_app(info):
        print(f"warming up rank {info.rank}")
        yield

    plugin = sky.Plugin.create("chatty").with_around_app(around_app)
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, plugins=[plugin], name="chatty"):
        pass
    out, err = capfd.readouterr()
    assert "[node 0] warming up rank 0" in out and "[node 1] warming up rank 1" in out
    assert "warming up" not in err  # not the unclaimed-output path, which writes to the process's stderr
