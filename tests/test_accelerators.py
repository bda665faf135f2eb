from __future__ import annotations

import pytest

from sky_jupyter import accelerators
from sky_jupyter.errors import ConfigError


@pytest.mark.parametrize("name", ["T4", "A10G", "L4", "L40S", "A100", "A100-80GB", "H100", "H200"])
def test_the_table_knows_the_common_gpus(name):
    acc = accelerators.lookup(name)
    instance, price = accelerators.instance_for(name.lower())
    assert instance and price > 0
    assert acc == accelerators.lookup(name.lower())


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ConfigError) as info:
        accelerators.lookup("TPUv9")
    assert "TPUv9" in str(info.value) and "H100" in str(info.value)
