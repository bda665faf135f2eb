"""Host keys of AWS instances: pinned by instance id in one store all pools share, verified from the console output.

EC2 gives a released public address to a later instance. Here two pools in sequence get instances that
``connect_via`` maps onto the same test node (the same address and port), and the node's host key is regenerated
between them, as a new machine at a reused address would have it. moto's GetConsoleOutput returns a fixed text
without host keys; tests that want cloud-init's key block answer that one call with a botocore ``before-call``
hook (:func:`console_shows`), built from the node's real current key.
"""

from __future__ import annotations

import base64
import datetime as _dt
import stat
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko
import pytest

from sky_jupyter.errors import ConfigError
from sky_jupyter.providers.base import PoolSpec
from sky_jupyter.transport import HostKeyError
from tests.test_aws import key_file, make, only_test_nodes  # noqa: F401 - fixtures

if TYPE_CHECKING:
    from tests.fixtures.moto_ec2 import MotoEC2
    from tests.fixtures.sshd_cluster import Cluster, SshNode

pytestmark = pytest.mark.usefixtures("no_address_lookup")

aws = pytest.importorskip("sky_jupyter.providers.aws")
hostkeys = aws.hostkeys


def console_text(keys: list[str]) -> str:
    """What cloud-init prints on an Ubuntu instance's console, with ``keys`` (``type base64``) in its block."""
    lines = [f"{k} root@ip-172-31-0-5" for k in keys]
    block = "\n".join([hostkeys.BEGIN, *lines, hostkeys.END]) if keys else ""
    return ("[   12.3] cloud-init[901]: Cloud-init v. 24.1 running 'modules:final'\n"
            "<14>Jan  1 00:00:01 cloud-init: #############################################################\n"
            f"{block}\n<14>Jan  1 00:00:01 cloud-init: ###############################################\n"
            "[   13.0] cloud-init[901]: Cloud-init v. 24.1 finished\n")


def console_shows(session: Any, keys_for: Any) -> list[dict[str, Any]]:
    """Answer GetConsoleOutput on clients of ``session`` with ``console_text(keys_for(instance_id))``, base64 as
    EC2 sends it (botocore decodes it after the call); the request bodies seen, for assertions."""
    from botocore.awsrequest import AWSResponse

    seen: list[dict[str, Any]] = []

    def hook(params: dict[str, Any], **_: Any) -> tuple[AWSResponse, dict[str, Any]]:
        body = dict(params.get("body") or {})
        seen.append(body)
        text = console_text(keys_for(body["InstanceId"]) or [])
        response = AWSResponse(url="http://127.0.0.1/console", status_code=200, headers={}, raw=None)
        return response, {"InstanceId": body["InstanceId"], "Timestamp": _dt.datetime.now(_dt.UTC),
                          "Output": base64.b64encode(text.encode()).decode(),
                          "ResponseMetadata": {"HTTPStatusCode": 200}}

    session.events.register("before-call.ec2.GetConsoleOutput", hook)
    return seen


def node_key(node: SshNode) -> str:
    """The node's host key as ``type base64``."""
    return " ".join(node.host_key_line.split()[1:3])


def new_key(path: Path) -> paramiko.PKey:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


@pytest.fixture
def user_home(monkeypatch, tmp_path: Path) -> Path:
    """A HOME of the test's own: nothing may be written to its ~/.ssh."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


# -- the store and the check, without a server ---------------------------------------------------------------------
def test_console_keys_come_from_the_last_complete_block():
    first = ["ssh-ed25519 " + base64.b64encode(b"first").decode()]
    second = ["ecdsa-sha2-nistp256 " + base64.b64encode(b"e").decode(),
              "ssh-ed25519 " + base64.b64encode(b"second").decode()]
    text = console_text(first) + console_text(second) + hostkeys.BEGIN + "\nssh-ed25519 AAAA-cut-off"
    assert hostkeys.console_keys(text) == second
    assert hostkeys.console_keys("no keys here\n") == []
    assert hostkeys.console_keys(f"{hostkeys.BEGIN}\nssh-ed25519 !!notbase64\n{hostkeys.END}\n") == []


def test_the_store_is_private_and_keyed_by_instance_id(tmp_path, sky_home):
    store = hostkeys.HostKeyStore()
    key = new_key(tmp_path / "k")
    pin = store.pin("i-0123456789abcdef0", [f"{key.get_name()} {key.get_base64()}"], "console", "203.0.113.9",
                    "us-east-1")
    path = store.path("i-0123456789abcdef0")
    assert path.parent == sky_home / "hostkeys" / "aws"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == stat.S_IMODE(path.parent.parent.stat().st_mode) == 0o700
    assert store.load("i-0123456789abcdef0") == pin and pin.holds(key)
    assert [p.instance_id for p in store.at("203.0.113.9")] == ["i-0123456789abcdef0"]
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")
    store.forget(["i-0123456789abcdef0"])
    assert store.load("i-0123456789abcdef0") is None


def test_instance_pins_decide_and_the_users_known_hosts_is_only_read(tmp_path, user_home, capsys):
    store = hostkeys.HostKeyStore(tmp_path / "store")
    old, new = new_key(tmp_path / "old"), new_key(tmp_path / "new")
    # The user's known_hosts holds the address's key from an earlier machine there: no reason to refuse.
    (user_home / ".ssh").mkdir()
    user_file = user_home / ".ssh" / "known_hosts"
    user_file.write_text(f"203.0.113.9 {old.get_name()} {old.get_base64()}\n")
    before = user_file.read_text()
    first = hostkeys.InstanceKnownHosts(tmp_path / "a.known_hosts", store, "tofu")
    first.assign("203.0.113.9", 22, "i-00000000000000aaa")
    assert first.check("203.0.113.9", 22, old, "node 0") is True  # trusted on first use
    assert first.check("203.0.113.9", 22, old, "node 0") is False  # and held to it
    with pytest.raises(HostKeyError, match=r"i-00000000000000aaa.*pinned for it \(first use\)"):
        first.check("203.0.113.9", 22, new, "node 0")
    second = hostkeys.InstanceKnownHosts(tmp_path / "b.known_hosts", store, "tofu")
    second.assign("203.0.113.9", 22, "i-00000000000000bbb")  # a later instance at the same address
    assert second.check("203.0.113.9", 22, new, "node 0") is True
    warning = capsys.readouterr().err
    assert "trusting the host key of instance i-00000000000000bbb" in warning
    assert "belonged to instance i-00000000000000aaa before" in warning and "strict" in warning
    strict = hostkeys.InstanceKnownHosts(tmp_path / "c.known_hosts", store, "strict", timeout=3)
    strict.assign("203.0.113.9", 22, "i-00000000000000ccc")
    with pytest.raises(HostKeyError, match="could not be verified.*within 3 s.*strict"):
        strict.check("203.0.113.9", 22, new, "node 0")
    assert store.load("i-00000000000000ccc") is None
    # A host that is no instance (a jump host) is pinned per pool, as the SSH provider does.
    assert second.check("198.51.100.1", 22, old, "bastion") is True
    assert "198.51.100.1" in (tmp_path / "b.known_hosts").read_text()
    assert user_file.read_text() == before  # never written
    # @revoked in the user's file still refuses an instance key.
    user_file.write_text(f"@revoked * {new.get_name()} {new.get_base64()}\n")
    with pytest.raises(HostKeyError, match="@revoked"):
        second.check("203.0.113.9", 22, new, "node 0")


def test_host_key_check_is_tofu_or_strict(moto_ec2, key_file):  # noqa: F811
    assert make(moto_ec2, key_file).host_key_check == "tofu"
    assert make(moto_ec2, key_file, host_key_check="strict").host_key_check == "strict"
    with pytest.raises(ConfigError, match="host_key_check must be 'tofu'.*or 'strict'"):
        make(moto_ec2, key_file, host_key_check="yes")


# -- on the sshd test nodes -----------------------------------------------------------------------------------------
def _provider(moto: MotoEC2, cluster: Cluster, name: str, session: Any = None, **kw: Any) -> Any:
    """An AWS provider whose every instance is the test node ``name`` (its current address and port)."""
    return make(moto, str(cluster.key_file), session=session,
                connect_via=lambda description, rank: cluster.node(name).host_string, **kw)


def _run(provider: Any, moto: MotoEC2, pool: str) -> str:
    """Start a 1-node pool (launch, wait for SSH, connect, check the host key), release it; its instance id."""
    hosts = provider.provision(PoolSpec(pool, 1, "T4"))
    try:
        return str(hosts[0].instance_id)
    finally:
        provider.release(hosts)
        assert moto.alive(pool) == []


@pytest.mark.ssh
def test_a_new_key_at_a_reused_address_is_verified_from_the_console(moto_ec2, sshd_cluster, only_test_nodes,  # noqa: F811
                                                                   user_home, capsys):
    """Pool A's instance and then pool B's are the same node (address and port), whose host key changes in
    between. B starts under host_key_check='strict' when the console output shows the new key, and is refused
    when it shows none or shows the old one."""
    name = sshd_cluster.nodes[2].name
    session = moto_ec2.session()
    seen = console_shows(session, lambda iid: [node_key(sshd_cluster.node(name))])  # the node's current key
    store = hostkeys.HostKeyStore()

    first = _run(_provider(moto_ec2, sshd_cluster, name, session), moto_ec2, "hk-first")
    assert seen and seen[0]["InstanceId"] == first and seen[0].get("Latest") == "true"
    old = sshd_cluster.node(name)
    assert store.load(first).keys == (node_key(old),) and store.load(first).source == "console"
    assert "trusting" not in capsys.readouterr().err

    new = sshd_cluster.restart_sshd(old, new_host_key=True)  # a new machine at the same address
    assert (new.addr, new.port) == (old.addr, old.port) and node_key(new) != node_key(old)

    # The console shows no keys: strict refuses, and the instance is terminated.
    bare = moto_ec2.session()
    console_shows(bare, lambda iid: [])
    with pytest.raises(HostKeyError, match="could not be verified.*strict"):
        _provider(moto_ec2, sshd_cluster, name, bare, host_key_check="strict").provision(
            PoolSpec("hk-unverified", 1, "T4"))
    assert moto_ec2.alive("hk-unverified") == []

    # The console shows the old key, not the one the instance presents: refused under either policy.
    wrong = moto_ec2.session()
    console_shows(wrong, lambda iid: [node_key(old)])
    with pytest.raises(HostKeyError, match="console output showed"):
        _provider(moto_ec2, sshd_cluster, name, wrong).provision(PoolSpec("hk-wrong", 1, "T4"))
    assert moto_ec2.alive("hk-wrong") == []

    # The console shows the new key: verified, so even strict connects; the old instance's pin stays its own.
    second = _run(_provider(moto_ec2, sshd_cluster, name, session, host_key_check="strict"), moto_ec2, "hk-second")
    assert store.load(second).keys == (node_key(new),) and store.load(second).source == "console"
    assert store.load(first).keys == (node_key(old),)
    assert "trusting" not in capsys.readouterr().err
    assert not (user_home / ".ssh").exists()


@pytest.mark.ssh
def test_tofu_trusts_a_new_instance_at_a_reused_address_with_a_warning(moto_ec2, sshd_cluster, only_test_nodes,  # noqa: F811
                                                                       user_home, capsys):
    """No key on the console (moto's own text): the first key is trusted with a one-line warning that names the
    instance that held the address before with another key; the pool starts."""
    name = sshd_cluster.nodes[2].name
    store = hostkeys.HostKeyStore()
    first = _run(_provider(moto_ec2, sshd_cluster, name), moto_ec2, "hk-tofu-first")
    assert store.load(first).source == "first use"
    capsys.readouterr()
    sshd_cluster.restart_sshd(sshd_cluster.node(name), new_host_key=True)
    second = _run(_provider(moto_ec2, sshd_cluster, name), moto_ec2, "hk-tofu-second")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "trusting the host key" in line]
    assert len(warnings) == 1
    assert f"instance {second}" in warnings[0] and f"belonged to instance {first} before" in warnings[0]
    assert store.load(second).keys == (node_key(sshd_cluster.node(name)),)
    assert not (user_home / ".ssh").exists()


@pytest.mark.ssh
def test_a_changed_key_of_a_pinned_instance_is_refused_on_reconnect(moto_ec2, sshd_cluster,
                                                                    only_test_nodes):  # noqa: F811
    """Instance keys are not in the pool's own known_hosts file; a reconnect is held to the instance's pin."""
    name = sshd_cluster.nodes[2].name
    provider = _provider(moto_ec2, sshd_cluster, name)
    hosts = provider.provision(PoolSpec("hk-reconnect", 1, "T4"))
    try:
        node = sshd_cluster.node(name)
        pool_file = provider.known_hosts("hk-reconnect").path
        assert not pool_file.exists() or node.addr not in pool_file.read_text()
        assert provider.known_hosts("hk-reconnect").pinned(hosts[0].addr, hosts[0].port) == node_key(node)
        sshd_cluster.restart_sshd(node, new_host_key=True)
        provider.ssh.disconnect(hosts)  # the next use connects again
        with pytest.raises(HostKeyError, match=f"instance {hosts[0].instance_id}.*presents the host key"):
            provider.connection(hosts[0]).connect()
    finally:
        provider.release(hosts)
    assert moto_ec2.alive("hk-reconnect") == []


@pytest.mark.ssh
def test_attaching_to_a_pool_an_older_version_started_pins_the_key_it_recorded(moto_ec2, sshd_cluster,
                                                                               only_test_nodes):  # noqa: F811
    """Such a pool's instance has no pin in the store; the key its client accepted is in the state file's hosts
    (``host_key``), and becomes the instance's pin, so that even host_key_check='strict' attaches."""
    name = sshd_cluster.nodes[2].name
    store = hostkeys.HostKeyStore()
    first = _provider(moto_ec2, sshd_cluster, name)
    hosts = first.provision(PoolSpec("hk-attach", 1, "T4"))
    cloud = first.pool_state("hk-attach")
    instance_id = str(hosts[0].instance_id)
    first.disconnect(hosts)
    store.forget([instance_id])
    second = _provider(moto_ec2, sshd_cluster, name, host_key_check="strict")
    try:
        again = second.reattach("hk-attach", hosts, cloud)
        assert store.load(instance_id).source == "attach"
        assert store.load(instance_id).keys == (node_key(sshd_cluster.node(name)),)
        assert second.connection(again[0]).run("true")[0] == 0
    finally:
        second.release(hosts)
    assert moto_ec2.alive("hk-attach") == []
