from __future__ import annotations

import pytest

from sky_jupyter import accelerators
from sky_jupyter.errors import ConfigError

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`


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


def test_skywards_constructors_build_names_the_table_knows():
    import sky_jupyter as sky

    acc = sky.accelerators
    assert acc.H100(count=8) == "H100" and accelerators.lookup(acc.H100(count=8)).instance_type == "p5.48xlarge"
    assert acc.H100(count=1) == "H100:1" and accelerators.lookup(acc.H100(count=1)).instance_type == "p5.4xlarge"
    assert acc.A100(memory="80GB") == "A100-80GB" and acc.T4() == "T4" and acc.L4().gpus == 1
    assert repr(acc.H100(count=8)) == "sky.accelerators.H100(count=8)"
    with pytest.raises(sky.ConfigError, match=r"EC2 offers A100 as 8 \(p4d.24xlarge\), 8 \(p4de.24xlarge\) per "
                                              r"machine, not 4"):
        acc.A100(count=4)
    with pytest.raises(sky.ConfigError, match="A100 with 24GB per GPU is not in the table; it has 40GB, 80GB"):
        acc.A100(memory="24GB")
    pool = sky.ComputePool(sky.Local(), accelerator=acc.L4(), name="named-accelerator")  # wherever a name goes
    assert pool.accelerator == "L4"
