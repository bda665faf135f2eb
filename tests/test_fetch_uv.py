"""Choosing the uv wheel for a node's platform (sky_jupyter.fetch_uv), and the index settings an image gives nodes."""

from __future__ import annotations

import json

import pytest

from sky_jupyter import fetch_uv as F
from sky_jupyter.bootstrap import BootstrapPlan, index_environ, remote_plan
from sky_jupyter.errors import ConfigError
from sky_jupyter.image import Image, PipIndex, shown_url
from sky_jupyter.redaction import redact

UNIT_TIER = True  # tests/conftest.py: the fast tier, `pytest -m unit`

X86 = "uv-0.9.5-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
ARM = "uv-0.9.5-py3-none-manylinux_2_17_aarch64.manylinux2014_aarch64.whl"
MUSL = "uv-0.9.5-py3-none-musllinux_1_1_x86_64.whl"
MAC = "uv-0.9.5-py3-none-macosx_11_0_arm64.whl"
NEW_GLIBC = "uv-0.9.6-py3-none-manylinux_2_28_x86_64.whl"


@pytest.mark.parametrize(("uname", "libc", "expected"), [
    (("Linux", "x86_64"), ("glibc", "2.36"), ("manylinux", "x86_64", (2, 36))),
    (("Linux", "aarch64"), ("glibc", "2.31"), ("manylinux", "aarch64", (2, 31))),
    (("Linux", "arm64"), ("glibc", "2.35"), ("manylinux", "aarch64", (2, 35))),
    (("Linux", "x86_64"), ("", ""), ("musllinux", "x86_64", None)),
])
def test_platform_tags_follow_uname_and_the_c_library(uname, libc, expected):
    assert F.platform_tags(*uname, libc) == expected


def test_a_node_that_is_not_linux_is_refused_by_name():
    with pytest.raises(LookupError, match="Darwin arm64"):
        F.platform_tags("Darwin", "arm64", ("", ""))


@pytest.mark.parametrize(("name", "kind", "arch", "libc", "ok"), [
    (X86, "manylinux", "x86_64", (2, 36), True),
    (X86, "manylinux", "aarch64", (2, 36), False),
    (ARM, "manylinux", "aarch64", (2, 31), True),
    (X86, "manylinux", "x86_64", (2, 12), False),  # an old glibc cannot run a manylinux2014 binary
    (MUSL, "manylinux", "x86_64", (2, 36), False),
    (MUSL, "musllinux", "x86_64", None, True),
    (X86, "musllinux", "x86_64", None, False),
    (MAC, "manylinux", "aarch64", (2, 36), False),
    ("uv-0.9.5.tar.gz", "manylinux", "x86_64", (2, 36), False),
])
def test_wheels_fit_by_platform_tag(name, kind, arch, libc, ok):
    assert F.fits(name, kind, arch, libc) is ok


def _files(*names, yanked=()):
    return [{"filename": n, "url": f"http://127.0.0.1:1/files/{n}", "sha256": None, "yanked": n in yanked}
            for n in names]


def test_choose_takes_the_clients_version_else_the_newest_release_that_fits():
    files = _files(X86, ARM, MUSL, MAC, NEW_GLIBC, "uv-0.10.0rc1-py3-none-manylinux_2_17_x86_64.whl")
    assert F.choose(files, "manylinux", "x86_64", (2, 36), "0.9.5")["filename"] == X86
    assert F.choose(files, "manylinux", "x86_64", (2, 36), None)["filename"] == NEW_GLIBC
    assert F.choose(files, "manylinux", "x86_64", (2, 17), None)["filename"] == X86  # 2.28 does not fit
    assert F.choose(files, "manylinux", "aarch64", (2, 36), "0.9.6")["filename"] == ARM  # 0.9.6: no arm wheel
    assert F.choose(_files(X86, yanked=(X86,)), "manylinux", "x86_64", (2, 36), "0.9.5") is None


def test_index_pages_parse_as_html_and_json():
    html = (b'<html><body><a href="../../files/' + X86.encode() + b'#sha256=abc">x</a>'
            b'<a href="https://files.example/' + ARM.encode() + b'" data-yanked="">y</a></body></html>')
    files = F.parse_page(html, "text/html", "http://127.0.0.1:8/simple/uv/")
    assert files[0] == {"filename": X86, "url": f"http://127.0.0.1:8/files/{X86}", "sha256": "abc", "yanked": False}
    assert files[1]["yanked"] is True
    body = json.dumps({"files": [{"filename": X86, "url": f"/f/{X86}", "hashes": {"sha256": "def"}}]}).encode()
    files = F.parse_page(body, F.JSON_TYPE, "http://127.0.0.1:8/simple/uv/")
    assert files == [{"filename": X86, "url": f"http://127.0.0.1:8/f/{X86}", "sha256": "def", "yanked": False}]


def test_credentials_move_into_a_header_and_stay_off_other_hosts():
    req = F._request("http://alice:s3cr3t-pw@127.0.0.1:8/simple/uv/")
    assert req.full_url == "http://127.0.0.1:8/simple/uv/"
    assert req.unredirected_hdrs["Authorization"].startswith("Basic ")
    index = "http://alice:s3cr3t-pw@127.0.0.1:8/simple"
    assert F._with_credentials("http://127.0.0.1:8/files/x.whl", index) == "http://alice:s3cr3t-pw@127.0.0.1:8/files/x.whl"
    assert F._with_credentials("http://127.0.0.2:8/files/x.whl", index) == "http://127.0.0.2:8/files/x.whl"
    assert F.shown(index) == "http://alice:***@127.0.0.1:8/simple"


# -- the image's index settings ------------------------------------------------------------------------------------
def test_index_urls_with_credentials_are_secrets_everywhere_they_show():
    url = "https://alice:idx-pass-9f8e7d@packages.example/simple"
    image = Image(pip=["numpy"], index_url=url, extra_index_urls=["https://mirror.example/simple"],
                  pip_indexes=[PipIndex("https://bob:torch-pass-1a2b3c@wheels.example/cu124", ["torch"])],
                  python_mirror="https://carol:py-pass-4d5e6f@python.example/releases")
    text = repr(image)
    for secret in ("idx-pass-9f8e7d", "torch-pass-1a2b3c", "py-pass-4d5e6f"):
        assert secret not in text
        assert redact(f"uv said: {secret}") == "uv said: ***"
    assert "https://alice:***@packages.example/simple" in text
    env, masked = index_environ(image)
    assert env["UV_DEFAULT_INDEX"] == env["PIP_INDEX_URL"] == url
    assert env["UV_INDEX"] == env["PIP_EXTRA_INDEX_URL"] == "https://mirror.example/simple"
    assert env["SKY_UV_INDEXES"].split() == [url, "https://mirror.example/simple"]
    assert env["SKY_PYTHON_MIRROR_SHOWN"] == "https://carol:***@python.example/releases"
    assert set(masked) == {"UV_DEFAULT_INDEX", "PIP_INDEX_URL", "SKY_UV_INDEXES", "SKY_PIP_INDEX_0",
                           "UV_PYTHON_INSTALL_MIRROR"}
    plan = remote_plan(image, [], "3.11", {"cloudpickle": "3.1.1"})
    script = plan.script()
    for secret in ("idx-pass-9f8e7d", "torch-pass-1a2b3c", "py-pass-4d5e6f"):
        assert secret not in script
    assert set(masked) <= set(plan.masked)
    assert plan.environ["UV_DEFAULT_INDEX"] == url


def test_pip_indexes_take_their_packages_and_the_rest_use_the_pools_index():
    image = Image(pip=["numpy", "torch==2.5.1", "tqdm"], pip_indexes=[PipIndex("http://127.0.0.1:9/cu", ["torch",
                                                                                                          "torchvision"])])
    pip = next(p for p in remote_plan(image, [], "3.11", {"cloudpickle": "3.1.1"}).phases if p.name == "pip").script
    assert """install '' '' '["numpy", "tqdm", "cloudpickle==3.1.1"]'""" in pip
    assert """install SKY_PIP_INDEX_0 http://127.0.0.1:9/cu '["torch==2.5.1", "torchvision"]'""" in pip


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"index_url": "packages.example/simple"}, "index_url"),
    ({"index_url": "https://u:leaky-pass-77@/x y"}, "index_url"),
    ({"extra_index_urls": "https://x.example/simple"}, "list of URLs"),
    ({"pip_indexes": ["https://x.example/simple"]}, "PipIndex"),
    ({"python_mirror": 3}, "python_mirror"),
])
def test_bad_index_settings_are_one_line_errors_naming_them(kwargs, words):
    with pytest.raises(ConfigError) as info:
        Image(**kwargs)
    assert words in str(info.value) and "\n" not in str(info.value) and "leaky-pass-77" not in str(info.value)


def test_shown_url_keeps_everything_but_the_password():
    assert shown_url("https://u:p4ssw0rd@h.example:8443/simple?x=1") == "https://u:***@h.example:8443/simple?x=1"
    assert shown_url("https://h.example/simple") == "https://h.example/simple"


def test_plan_key_does_not_change_with_the_index_password():
    a = remote_plan(Image(index_url="https://u:pw-one-123@h.example/simple"), [], "3.11", {})
    b = remote_plan(Image(index_url="https://u:pw-two-456@h.example/simple"), [], "3.11", {})
    assert isinstance(a, BootstrapPlan) and a.key == b.key
