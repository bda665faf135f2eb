"""The plugins sky_jupyter ships, on real worker processes, a real local Hub and real sshd nodes.

``huggingface``: where the token comes from, what a missing, malformed or rejected token does, the login under a
hanging Hub, ``HF_ENDPOINT``, and that the login runs once; the token must show up nowhere. ``torch``: the
torchrun variables and a working process group on a 2-node pool, and a clear error when nodes cannot meet.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Self

import pytest

import sky_jupyter as sky
from sky_jupyter.plugins.huggingface import PACKAGES
from sky_jupyter.plugins.torch import RendezvousError

if TYPE_CHECKING:
    from tests.fixtures.hub import HubFixture
    from tests.fixtures.sshd_cluster import Cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = sky.Cluster(nodes=1, accelerator=None, provider="local", pool_name="t")
HF_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_TOKEN_PATH", "HF_OIDC_RESOURCE")


@pytest.fixture
def no_hf_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No HuggingFace settings in this process's environment; an empty HF_HOME. Returns that HF_HOME."""
    for name in HF_VARS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "client-hf-home"
    return home


def image_of(plugin: sky.Plugin, image: sky.Image | None = None) -> sky.Image:
    assert plugin.transform is not None
    return plugin.transform(image or sky.Image(), CLUSTER)


def chosen_token(plugin: sky.Plugin) -> str:
    return image_of(plugin).environ["HF_TOKEN"]


def in_fresh_python(code: str, env: dict[str, str]) -> dict:
    """Run ``code`` in a new interpreter (huggingface_hub reads HF_HOME at import) and return its last JSON line."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ProcessWatch:
    """Reads every process's command line on this machine while a block runs, looking for a secret."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.leaks: list[str] = []
        self.logins_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                try:
                    cmdline = (entry / "cmdline").read_bytes() if entry.name.isdigit() else b""
                except OSError:
                    continue
                if self.secret in cmdline:
                    self.leaks.append(cmdline.replace(b"\0", b" ").decode(errors="replace")[:200])
                if b'login(token=os.environ["HF_TOKEN"])' in cmdline:  # the login snippet runs
                    self.logins_seen += 1
            self._stop.wait(0.02)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def assert_nowhere(token: str, *texts: str, folders: tuple[Path, ...] = (), allowed: tuple[str, ...] = ()) -> None:
    """The token is in none of ``texts`` and in no file under ``folders`` except the Hub's own token files (and
    files named in ``allowed``)."""
    for text in texts:
        assert token not in text
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.name not in ("token", "stored_tokens", *allowed):
                assert token.encode() not in path.read_bytes(), f"the token is in {path}"


@sky.compute
def hf_environment() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in ("HF_ENDPOINT", "HF_HOME")} | {
        "token_sha": sha(os.environ.get("HF_TOKEN", ""))}


# -- where the token comes from -----------------------------------------------------------------------------------
def test_explicit_token_beats_the_environment(no_hf_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment123")
    assert chosen_token(sky.plugins.huggingface(token="hf_explicitToken123")) == "hf_explicitToken123"
    assert chosen_token(sky.plugins.huggingface()) == "hf_fromTheEnvironment123"


def test_the_panel_token_beats_hf_token_and_hf_token_is_next(no_hf_env, monkeypatch):
    from sky_jupyter.notebook.manager import PoolRequest, Settings, make_plugins

    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment123")
    request = PoolRequest(name="p", provider="local", nodes=1, accelerator=None, hf=True, torch=False)
    [plugin] = make_plugins(request, Settings(hf_token="hf_fromThePanel123"))
    assert chosen_token(plugin) == "hf_fromThePanel123"
    [plugin] = make_plugins(request, Settings(hf_token=None))
    assert chosen_token(plugin) == "hf_fromTheEnvironment123"


def test_the_local_credential_store_is_last(tmp_path):
    home = tmp_path / "hf"
    home.mkdir()
    (home / "token").write_text("hf_fromTheStore123\n")
    code = """
        import hashlib, json
        import sky_jupyter as sky
        image = sky.plugins.huggingface().transform(sky.Image(), sky.Cluster(1, None, "local", "t"))
        print(json.dumps({"sha": hashlib.sha256(image.environ["HF_TOKEN"].encode()).hexdigest()}))
    """
    assert in_fresh_python(code, {"HF_HOME": str(home)})["sha"] == sha("hf_fromTheStore123")
    assert in_fresh_python(code, {"HF_HOME": str(home), "HF_TOKEN": "hf_env456789"})["sha"] == sha("hf_env456789")


def test_the_store_is_read_without_huggingface_hub_installed(no_hf_env, monkeypatch):
    no_hf_env.mkdir()
    (no_hf_env / "token").write_text("hf_fromTheStoreFile123\n")
    monkeypatch.setenv("HF_HOME", str(no_hf_env))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` raises ImportError
    assert chosen_token(sky.plugins.huggingface()) == "hf_fromTheStoreFile123"


def test_no_token_anywhere_is_a_clear_error_before_anything_starts(tmp_path):
    code = f"""
        import json
        import sky_jupyter as sky
        try:
            sky.ComputePool(provider=sky.Local(root={str(tmp_path / "pools")!r}), plugins=[sky.plugins.huggingface()])
        except sky.ConfigError as exc:
            print(json.dumps({{"error": str(exc)}}))
    """
    error = in_fresh_python(code, {"HF_HOME": str(tmp_path / "empty-hf-home")})["error"]
    assert "needs a HuggingFace token and found none" in error
    assert "token=" in error and "HF_TOKEN" in error and "panel" in error and "Nothing was started" in error
    assert not (tmp_path / "pools").exists()


def test_the_notebook_layer_refuses_a_missing_token_before_provisioning(no_hf_env, monkeypatch, sky_home):
    from sky_jupyter.notebook.manager import PoolManager, PoolRequest

    monkeypatch.setenv("HF_HOME", str(no_hf_env))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    request = PoolRequest(name="hf-missing", provider="local", nodes=1, accelerator=None, hf=True, torch=False)
    with pytest.raises(sky.ConfigError, match="needs a HuggingFace token"):
        PoolManager().ensure(request)
    assert not (sky_home / "local" / "hf-missing").exists()
    assert not (sky_home / "pools" / "hf-missing.json").exists()


@pytest.mark.parametrize("bad, problem", [
    ("", "is empty"),
    ("   ", "is empty"),
    ("hf_abc defSECRETPART", "contains whitespace"),
    ("hf_abc\tdefSECRETPART", "contains whitespace"),
    ("hf_abc\x00defSECRETPART", "control or non-ASCII"),
    ("hf_abcédefSECRETPART", "control or non-ASCII"),
])
def test_malformed_tokens_are_config_errors_that_do_not_echo_them(no_hf_env, bad, problem):
    with pytest.raises(sky.ConfigError) as info:
        sky.plugins.huggingface(token=bad)
    assert problem in str(info.value)
    assert "SECRETPART" not in str(info.value)


def test_a_token_that_is_not_a_string_is_a_config_error(no_hf_env):
    with pytest.raises(sky.ConfigError, match="must be a string, not int"):
        sky.plugins.huggingface(token=12345)  # type: ignore[arg-type]


def test_surrounding_whitespace_is_dropped(no_hf_env):
    assert chosen_token(sky.plugins.huggingface(token="  hf_pasted123\n")) == "hf_pasted123"


# -- the image ----------------------------------------------------------------------------------------------------
def test_the_image_gains_the_libraries_once_and_hf_token_is_a_secret(no_hf_env):
    plugin = sky.plugins.huggingface(token="hf_imageToken123")
    image = image_of(plugin, sky.Image(pip=["numpy", "transformers>=4.50", "huggingface-hub"]))
    assert image.pip == ("numpy", "transformers>=4.50", "huggingface-hub", "datasets", "tokenizers", "accelerate")
    assert set(image_of(plugin).pip) == set(PACKAGES)
    assert image.environ == {"HF_TOKEN": "hf_imageToken123"}  # no endpoint given or set here
    assert plugin.secrets == ("HF_TOKEN",)
    assert "hf_imageToken123" not in repr(image) + repr(plugin)
    assert plugin.around_app is None and plugin.decorate is None  # nothing holding the token travels to workers


def test_hf_endpoint_comes_from_the_argument_or_this_machine(no_hf_env, monkeypatch):
    plugin = sky.plugins.huggingface(token="hf_endpointToken1", endpoint="http://mirror.test:8080/")
    assert image_of(plugin).environ["HF_ENDPOINT"] == "http://mirror.test:8080"
    assert image_of(plugin, sky.Image(env={"HF_ENDPOINT": "http://image.test"})).environ["HF_ENDPOINT"] == \
        "http://mirror.test:8080"
    monkeypatch.setenv("HF_ENDPOINT", "http://client.test")
    plugin = sky.plugins.huggingface(token="hf_endpointToken1")
    assert image_of(plugin).environ["HF_ENDPOINT"] == "http://client.test"
    # An HF_ENDPOINT the user put in the image beats the one this machine happens to have.
    assert image_of(plugin, sky.Image(env={"HF_ENDPOINT": "http://image.test"})).environ["HF_ENDPOINT"] == \
        "http://image.test"
    with pytest.raises(sky.ConfigError, match="must be an http"):
        sky.plugins.huggingface(token="hf_endpointToken1", endpoint="mirror.test")


def test_login_timeout_must_be_positive(no_hf_env):
    with pytest.raises(sky.ConfigError, match="login_timeout"):
        sky.plugins.huggingface(token="hf_timeoutToken1", login_timeout=0)


# -- the login on real nodes --------------------------------------------------------------------------------------
def test_login_writes_a_private_token_file_once_and_uses_hf_endpoint(hf_hub: HubFixture, no_hf_env, tmp_path):
    hf_home = tmp_path / "node-hf-home"
    image = sky.Image(env={"HF_HOME": str(hf_home)})
    plugins = [sky.plugins.huggingface(token=hf_hub.token, endpoint=hf_hub.url)]
    events: list[tuple[int, str, str]] = []
    hf_hub.hub.clear_requests()
    with (ProcessWatch(hf_hub.token) as watch,
          sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, image=image, plugins=plugins,
                          name="hf-once", progress=lambda *e: events.append(e)) as pool):
        remote = hf_environment() @ pool
    assert watch.leaks == [], "the token was on a command line"
    assert remote == [{"HF_ENDPOINT": hf_hub.url, "HF_HOME": str(hf_home), "token_sha": sha(hf_hub.token)}] * 2
    whoami = [r for r in hf_hub.requests if r.path == "/api/whoami-v2"]
    assert [(r.authorized, r.status) for r in whoami] == [(True, 200), (True, 200)]  # once per node
    assert {(rank, line) for rank, phase, line in events if phase == "huggingface" and "logged in" in line} == {
        (0, f"logged in to {hf_hub.url}"), (1, f"logged in to {hf_hub.url}")}
    token_file = hf_home / "token"
    assert token_file.read_text() == hf_hub.token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(hf_home.stat().st_mode) == 0o700
    for rank in range(2):
        node = tmp_path / "hf-once" / f"node-{rank}"
        assert "logged in to" in (node / ".sky_jupyter" / "bootstrap.log").read_text()
    assert_nowhere(hf_hub.token, *(line for _, _, line in events), folders=(tmp_path,))

    # The same pool again on the same nodes: the bootstrap marker skips the login; the Hub hears nothing.
    hf_hub.hub.clear_requests()
    events.clear()
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, image=image, plugins=plugins,
                         name="hf-once", progress=lambda *e: events.append(e)) as pool:
        assert hf_environment() @ pool == remote
    assert [r for r in hf_hub.requests if r.path == "/api/whoami-v2"] == []
    assert sorted((rank, phase) for rank, phase, line in events) == [(0, "cached"), (1, "cached")]


def test_a_new_token_logs_the_nodes_in_again(hf_hub: HubFixture, no_hf_env, tmp_path):
    """The token is not in the script, but its fingerprint is: a changed token changes the bootstrap."""
    image = sky.Image(env={"HF_HOME": str(tmp_path / "hf")})
    old = sky.plugins.huggingface(token=hf_hub.token, endpoint=hf_hub.url)
    new = sky.plugins.huggingface(token="hf_anotherValidLooking1", endpoint=hf_hub.url)
    scripts = [b(CLUSTER)[0] for b in (old.bootstrap, new.bootstrap)]  # type: ignore[misc]
    assert scripts[0] != scripts[1]
    assert hf_hub.token not in scripts[0] and "hf_anotherValidLooking1" not in scripts[1]
    with sky.ComputePool(provider=sky.Local(root=tmp_path), image=image, plugins=[old], name="hf-new"):
        pass
    hf_hub.hub.clear_requests()
    with pytest.raises(sky.BootstrapError, match="rejected the HF token"):
        sky.ComputePool(provider=sky.Local(root=tmp_path), image=image, plugins=[new], name="hf-new").start()
    assert [r.status for r in hf_hub.requests if r.path == "/api/whoami-v2"] == [401]


def test_a_rejected_token_fails_the_bootstrap_clearly_and_shows_nowhere(hf_hub: HubFixture, no_hf_env, tmp_path,
                                                                          capfd):
    from tests.fixtures.hub import fake_token

    wrong = fake_token()
    hf_hub.hub.clear_requests()
    pool = sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, name="hf-wrong",
                           image=sky.Image(env={"HF_HOME": str(tmp_path / "hf")}),
                           plugins=[sky.plugins.huggingface(token=wrong, endpoint=hf_hub.url)])
    with ProcessWatch(wrong) as watch, pytest.raises(sky.BootstrapError) as info:
        pool.start()
    error = info.value
    assert error.phase == "huggingface" and error.exit_code == 3
    assert f"the Hub at {hf_hub.url} rejected the HF token (HTTP 401)" in str(error)
    assert "settings/tokens" in str(error) and "sky.plugins.huggingface(token=...)" in str(error)
    assert [r.status for r in hf_hub.requests if r.path == "/api/whoami-v2"][:1] == [401]
    assert not (tmp_path / "hf" / "token").exists()
    out, err = capfd.readouterr()
    shown = "".join(traceback.format_exception(error))
    assert watch.logins_seen and watch.leaks == []
    assert_nowhere(wrong, shown, out, err, folders=(tmp_path,))


def test_a_hanging_hub_falls_back_to_the_token_file_with_a_warning(hf_hub: HubFixture, no_hf_env, tmp_path, capfd):
    hf_home = tmp_path / "hf"
    hf_hub.hub.hang_whoami = True
    try:
        started = time.monotonic()
        with (ProcessWatch(hf_hub.token) as watch,
              sky.ComputePool(provider=sky.Local(root=tmp_path), name="hf-hang",
                              image=sky.Image(env={"HF_HOME": str(hf_home)}),
                              plugins=[sky.plugins.huggingface(token=hf_hub.token, endpoint=hf_hub.url,
                                                               login_timeout=2)]) as pool):
            elapsed = time.monotonic() - started
            assert (hf_environment() >> pool)["token_sha"] == sha(hf_hub.token)
    finally:
        hf_hub.hub.hang_whoami = False
    assert 2 <= elapsed < 12, elapsed
    assert watch.logins_seen, "the login process was never seen"
    assert watch.leaks == [], "the token was on a command line"
    assert [r.status for r in hf_hub.requests if r.path == "/api/whoami-v2"][-1:] == [0]  # held, never answered
    token_file = hf_home / "token"
    assert token_file.read_text() == hf_hub.token
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(hf_home.stat().st_mode) == 0o700
    out, err = capfd.readouterr()
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "huggingface" in warning[0], err
    assert "did not answer within 2 s" in warning[0] and str(token_file) in warning[0]
    assert_nowhere(hf_hub.token, out, err, folders=(tmp_path / "hf-hang",))


def test_an_unavailable_hub_also_falls_back(hf_hub: HubFixture, no_hf_env, tmp_path):
    hf_home = tmp_path / "hf"
    events: list[tuple[int, str, str]] = []
    hf_hub.hub.unavailable = True
    try:
        with sky.ComputePool(provider=sky.Local(root=tmp_path), name="hf-503", progress=lambda *e: events.append(e),
                             image=sky.Image(env={"HF_HOME": str(hf_home)}),
                             plugins=[sky.plugins.huggingface(token=hf_hub.token, endpoint=hf_hub.url)]):
            pass
    finally:
        hf_hub.hub.unavailable = False
    assert any(line.startswith("warning:") and "HTTP 503" in line for _, _, line in events), events
    assert (hf_home / "token").read_text() == hf_hub.token


# -- torch --------------------------------------------------------------------------------------------------------
@sky.compute
def all_reduce_rank() -> tuple[float, dict[str, str | None], str]:
    import torch
    import torch.distributed as dist

    value = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(value)
    names = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "NODE_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
             "ACCELERATE_USE_CPU", "GLOO_SOCKET_IFNAME")
    return value.item(), {name: os.environ.get(name) for name in names}, dist.get_backend()


def test_torch_wires_the_process_group_at_pool_start(tmp_path):
    with sky.ComputePool(provider=sky.Local(root=tmp_path), nodes=2, plugins=[sky.plugins.torch()],
                         name="torch-two") as pool:
        assert "torch" in pool.image.pip
        (sum0, env0, backend0), (sum1, env1, backend1) = all_reduce_rank() @ pool
    assert sum0 == sum1 == 3.0 and backend0 == backend1 == "gloo"
    port = env0["MASTER_PORT"]
    assert port and port.isdigit() and port != "29500"
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_RANK": "0",
              "LOCAL_WORLD_SIZE": "1", "ACCELERATE_USE_CPU": "1", "GLOO_SOCKET_IFNAME": "lo"}
    assert env0 == {**common, "RANK": "0", "NODE_RANK": "0"}  # one worker per node: each its node's only one
    assert env1 == {**common, "RANK": "1", "NODE_RANK": "1"}


def test_torch_options_are_checked():
    with pytest.raises(sky.ConfigError, match="backend must be one of"):
        sky.plugins.torch(backend="tcp")
    with pytest.raises(sky.ConfigError, match="timeout"):
        sky.plugins.torch(timeout=-1)
    image = sky.plugins.torch().transform(sky.Image(pip=["torch==2.13.0"]), CLUSTER)  # type: ignore[misc]
    assert image.pip == ("torch==2.13.0",)


class UnreachableHead(sky.Local):
    """Local nodes that are told node 0's private address is ``head_addr``: a test node's namespace address,
    where nothing listens on MASTER_PORT (as when a security group or firewall stops the other nodes)."""

    def __init__(self, root: Path, head_addr: str) -> None:
        super().__init__(root)
        self.head_addr = head_addr

    def provision(self, spec):
        hosts = super().provision(spec)
        return [dataclasses.replace(hosts[0], private_addr=self.head_addr), *hosts[1:]]


def test_a_rendezvous_failure_is_a_clear_error_naming_the_node(sshd_cluster: Cluster, tmp_path):
    unreachable = sshd_cluster.nodes[-1].addr
    started = time.monotonic()
    with pytest.raises(RendezvousError) as info:
        sky.ComputePool(provider=UnreachableHead(tmp_path, unreachable), nodes=2, name="torch-apart",
                        plugins=[sky.plugins.torch(timeout=3)]).start()
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert elapsed < 30, elapsed
    assert isinstance(info.value, sky.ProvisionError)
    assert message.startswith("torch.distributed rendezvous failed on node 0 (")
    assert "the head: not every worker joined its gloo process group" in message
    assert f"MASTER_ADDR={unreachable} MASTER_PORT=" in message and "within 3 s" in message
    assert "security group, firewall" in message
    assert "failed on 2 of 2 nodes (ranks 0, 1)" in "\n".join(getattr(info.value, "__notes__", []))


def test_interface_of_finds_the_interface_carrying_an_address():
    from sky_jupyter.plugins.torch import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("not-an-address") is None
    assert interface_of("192.0.2.254") in (None, "eth0")  # TEST-NET: normally on no interface here


@pytest.mark.ssh
def test_a_node_that_cannot_reach_the_head_fails_the_pool_naming_it(sshd_cluster: Cluster):
    """Node 1 of two sshd nodes gets a blackhole route to node 0: SSH from here still works, the rendezvous not."""
    pytest.importorskip("paramiko")
    head, other = sshd_cluster.nodes[:2]
    if not sshd_cluster.netns:
        pytest.skip("needs the namespace test cluster (a route per node)")
    route = ["ip", "-n", other.netns, "route", "add", "blackhole", f"{head.addr}/32"]
    subprocess.run(route, check=True)
    try:
        provider = sky.SSH([head.host_string, other.host_string], key_file=sshd_cluster.key_file)
        with pytest.raises(RendezvousError) as info:
            sky.ComputePool(provider=provider, nodes=2, name="torch-blackhole",
                            plugins=[sky.plugins.torch(timeout=3)]).start()
    finally:
        subprocess.run([*route[:4], "del", *route[5:]], check=False)
    failed = str(info.value) + " " + " ".join(getattr(info.value, "__notes__", []))
    assert "rendezvous failed on node" in failed and f"MASTER_ADDR={head.addr}" in failed
    assert "ranks 0, 1" in failed or "node 1 (node1" in failed
