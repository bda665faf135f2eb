from __future__ import annotations

import dataclasses

import pytest

import sky_jupyter as sky

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


def test_image_is_frozen_and_hashable():
    image = sky.Image(pip=["numpy"], env={"A": "1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        image.pip = ()  # type: ignore[misc]
    assert hash(image) == hash(sky.Image(pip=("numpy",), env={"A": "1"}))
    assert image.with_pip("torch").pip == ("numpy", "torch")
    assert image.with_env(B="2").environ == {"A": "1", "B": "2"}
    assert dataclasses.replace(image, python="/usr/bin/python3").python == "/usr/bin/python3"


def test_repr_hides_env_values():
    assert "s3cr3t" not in repr(sky.Image(env={"HF_TOKEN": "s3cr3t"}))


@pytest.mark.parametrize("bad", [{"1A": "x"}, {"A-B": "x"}, {"": "x"}])
def test_bad_env_names(bad):
    with pytest.raises(sky.ConfigError, match="not a valid environment variable name"):
        sky.Image(env=bad)


def test_pip_must_be_a_list():
    with pytest.raises(sky.ConfigError, match="list of package names"):
        sky.Image(pip="numpy")
