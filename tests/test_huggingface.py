"""The HuggingFace plugin's token handling, without a Hub: where the token comes from and what is refused."""

from __future__ import annotations

import pytest

import sky_jupyter as sky
from sky_jupyter.plugins.huggingface import find_token

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`

TOKEN = "hf_skytestUnitTokenAbcdefghijklmnopqrstuv"


def test_explicit_then_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN + "env")
    assert find_token(TOKEN) == TOKEN
    assert find_token(None) == TOKEN + "env"


def test_the_image_gets_the_libraries_and_the_token_as_a_secret(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    plugin = sky.plugins.huggingface(token=TOKEN)
    image = plugin.transform(sky.Image(pip=["transformers"]), None)
    assert image.pip.count("transformers") == 1
    assert {"datasets", "tokenizers", "accelerate", "huggingface_hub"} <= set(image.pip)
    assert image.environ["HF_TOKEN"] == TOKEN and "HF_TOKEN" in plugin.secrets
    assert TOKEN not in repr(image) and TOKEN not in "\n".join(plugin.bootstrap(None))


@pytest.mark.parametrize("bad", ["", "hf_has space", "hf_new\nline"])
def test_malformed_tokens_are_refused_without_echoing_them(bad):
    with pytest.raises(sky.ConfigError) as info:
        sky.plugins.huggingface(token=bad)
    assert (bad.strip() or "§") not in str(info.value)
