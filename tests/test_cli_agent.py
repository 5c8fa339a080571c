"""A live agent (issue 9): it follows its configuration while mounts run, a broken provider blocks nothing else,
provider remove refuses while folders use the provider, agent stop while mounts use the agent."""

import glob
import json
import os
import shutil
import signal

import pytest

from support import VmfsEnv, mounted
from support.kmip import KmipCluster, add_kmip_provider, wait_until
from kmip_tls import Pki
from vmfs_crypt.config import load_config
from vmfs_crypt.errors import ExitCode
from vmfs_crypt.providers.native import NativeKeyProvider

pytestmark = [pytest.mark.cli,
              pytest.mark.filterwarnings("ignore::DeprecationWarning:kmip"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:sqlalchemy"),
              pytest.mark.filterwarnings("ignore:.*(TripleDES|Camellia|ARC4|CFB|OFB|cache_ok|MovedIn20|PROTOCOL_TLS).*")]

DATA = os.urandom(64 << 10)


def agent_pid(env) -> int:
    return json.loads(env.run("status", "--json", check=False).stdout)["agent"]["pid"]


def agent_log(env) -> str:
    text = ""
    for path in glob.glob(os.path.join(env.runtime, "vmfs-crypt", "agent-*.log")):
        with open(path, errors="replace") as f:
            text += f.read()
    return text


@pytest.mark.fuse
@pytest.mark.kmip
def test_provider_added_while_mounted_serves_create_without_an_agent_restart(venv_env, tmp_path):
    """The issue's sequence: mount, provider add kmip kms, create --provider kms, use the disk in the mount."""
    cluster = KmipCluster(str(tmp_path / "kmip"))
    try:
        cluster.ensure_up()
        os.makedirs(os.path.join(venv_env.datastore, "vm1"))
        venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
        with mounted(venv_env) as mnt:
            before = agent_pid(venv_env)
            add_kmip_provider(venv_env, "kms", [s.port for s in cluster.servers], cluster.pki)
            os.makedirs(os.path.join(venv_env.datastore, "vm2"))
            made = venv_env.run("create", os.path.join(venv_env.datastore, "vm2", "disk.vmdk"), "--size", "1M",
                                "--provider", "kms")
            assert b"of provider kms" in made.stdout
            assert agent_pid(venv_env) == before, "the agent was restarted"
            info = json.loads(venv_env.run("info", "--json", os.path.join(venv_env.datastore, "vm2")).stdout)
            assert info["kek"]["provider"] == "kms"
            with open(os.path.join(mnt, "vm2", "disk-flat.vmdk"), "r+b") as f:
                f.write(DATA)
            with open(os.path.join(mnt, "vm2", "disk-flat.vmdk"), "rb") as f:
                assert f.read(len(DATA)) == DATA
        with open(os.path.join(venv_env.datastore, "vm2", "disk-flat.vmdk"), "rb") as f:
            assert DATA[:4096] not in f.read()
    finally:
        cluster.stop_all()


def add_native_by_hand(env, name: str) -> str:
    """Edit the configuration file the way an administrator would (no CLI): a new native provider."""
    key_file = os.path.join(os.path.dirname(env.config), f"native-{name}.key")
    NativeKeyProvider.generate(name, key_file)
    config = load_config(env.config)
    config.providers[name] = {"type": "native", "key_file": key_file}
    config.save()
    return key_file


def test_agent_follows_a_hand_edited_config_and_reloads_on_request_and_on_sighup(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    pid = int(venv_env.run("agent", "start").stdout.split()[1])
    add_native_by_hand(venv_env, "second")
    made = venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M",
                        "--provider", "second")
    assert b"of provider second" in made.stdout
    assert agent_pid(venv_env) == pid
    assert venv_env.run("agent", "reload").stdout.strip() == b"no change"
    # SIGHUP: the agent reads the file at once, before any request could make it notice the change
    add_native_by_hand(venv_env, "third")
    os.kill(pid, signal.SIGHUP)
    wait_until(lambda: "reload: loaded provider third" in agent_log(venv_env), 20, "the reload after SIGHUP")
    names = [p["name"] for p in json.loads(venv_env.run("status", "--json").stdout)["providers"]]
    assert names == ["local", "second", "third"]


def test_broken_kmip_provider_is_reported_when_used_and_blocks_nothing_else(venv_env, tmp_path):
    pki = Pki.create(str(tmp_path / "pki"))
    cert = str(tmp_path / "client-copy.pem")
    shutil.copy(pki.client_cert, cert)
    venv_env.run("provider", "add", "kmip", "kms", "--server", "127.0.0.1:9", "--cert", cert, "--key", pki.client_key,
                 "--ca", pki.ca_path, "--no-check")
    os.unlink(cert)  # the certificate file goes missing
    venv_env.run("agent", "start")  # the agent starts all the same
    doc = json.loads(venv_env.run("status", "--json").stdout)
    broken = {p["name"]: p for p in doc["providers"]}
    assert broken["kms"]["broken"] and cert in broken["kms"]["error"] and not broken["local"]["broken"]
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    os.makedirs(os.path.join(venv_env.datastore, "vm2"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M", "--provider", "local")
    failed = venv_env.run("create", os.path.join(venv_env.datastore, "vm2", "disk.vmdk"), "--size", "1M",
                          "--provider", "kms", check=False)
    err = failed.stderr.decode()
    assert failed.returncode == ExitCode.CONFIG and "provider kms cannot be used" in err and cert in err, err
    assert "Traceback" not in err and os.listdir(os.path.join(venv_env.datastore, "vm2")) == []
    # and without a running agent (a private one per command) the same holds
    venv_env.run("agent", "stop")
    venv_env.run("create", os.path.join(venv_env.datastore, "vm2", "other.vmdk"), "--size", "1M", "--provider", "local")


@pytest.mark.fuse
def test_provider_remove_refuses_while_folders_use_it_and_lists_them(venv_env, tmp_path):
    venv_env.run("provider", "add", "native", "second")
    venv_env.run("provider", "add", "native", "spare")
    for vm in ("vm1", "vm2"):
        os.makedirs(os.path.join(venv_env.datastore, vm))
        venv_env.run("create", os.path.join(venv_env.datastore, vm, "disk.vmdk"), "--size", "1M", "--provider", "second")
    refused = venv_env.run("provider", "remove", "second", "--datastore", venv_env.datastore, check=False)
    err = refused.stderr.decode()
    assert refused.returncode == ExitCode.IN_USE, err
    assert "in use by 2 folder(s)" in err and os.path.join(venv_env.datastore, "vm1") in err \
        and os.path.join(venv_env.datastore, "vm2") in err, err
    assert "second" in load_config(venv_env.config).providers
    with mounted(venv_env):  # a mounted datastore is searched without --datastore
        refused = venv_env.run("provider", "remove", "second", check=False)
        assert refused.returncode == ExitCode.IN_USE and b"vm1" in refused.stderr
        removed = venv_env.run("provider", "remove", "spare")  # one nobody uses goes
        assert b"removed provider spare" in removed.stdout
    venv_env.run("provider", "remove", "second", "--datastore", venv_env.datastore, "--force")
    assert set(load_config(venv_env.config).providers) == {"local"}


@pytest.mark.fuse
def test_agent_stop_refuses_while_a_mount_uses_it_and_names_the_mount(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
    pid = int(venv_env.run("agent", "start").stdout.split()[1])
    with mounted(venv_env) as mnt:
        refused = venv_env.run("agent", "stop", check=False)
        err = refused.stderr.decode()
        assert refused.returncode == ExitCode.IN_USE and mnt in err and venv_env.datastore in err and "--force" in err, err
        assert agent_pid(venv_env) == pid  # still serving the mount
        with open(os.path.join(mnt, "vm1", "new.nvram"), "wb") as f:  # a new file still gets its key
            f.write(b"after the refused stop")
    venv_env.run("agent", "stop")  # no mount left: it stops
    assert venv_env.run("status", check=False).returncode == ExitCode.AGENT
