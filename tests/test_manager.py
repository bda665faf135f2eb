"""Notebook settings: parsing `%sky config` values and keeping the token out of sight."""

from __future__ import annotations

import pytest

from sky_jupyter.errors import ConfigError
from sky_jupyter.notebook.manager import PoolManager, Settings, torch_by_default

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_config_text_is_parsed_and_checked():
    mgr = PoolManager()
    settings = mgr.configure_text(["nodes=3", "hf=yes", "hosts=a, b@c:2", "idle_timeout=90", "torch=auto"])
    assert (settings.nodes, settings.hf, settings.hosts, settings.idle_timeout, settings.torch) == (
        3, True, ("a", "b@c:2"), 90.0, None)
    for bad, words in [("nodes=0", "at least 1"), ("provider=gcp", "provider must be"),
                       ("spot=perhaps", "true or false"), ("pull_budget=-1", "positive"),
                       ("nope=1", "unknown setting")]:
        with pytest.raises(ConfigError, match=words):
            mgr.configure_text([bad])
    mgr.shutdown_all()


def test_the_token_is_never_shown():
    settings = Settings(hf_token="hf_skytestNEVERSHOWNxxxxxxxxxxxxxxxx")
    assert "NEVERSHOWN" not in repr(settings)
    assert settings.public()["hf_token"] == "set"


def test_torch_is_on_by_default_only_for_several_nodes():
    assert not torch_by_default("aws", 1)
    assert torch_by_default("aws", 2) and torch_by_default("ssh", 4)
