"""The standard key provider against real PyKMIP servers (real TLS) on loopback: create, encrypt, failover,
outages (cached keys, cold start, unlock), TLS refusals, revoked/destroyed/unknown keys, a silent server."""

import errno
import mmap
import os
import re
import subprocess
import time

import pytest

from support import VmfsEnv, mounted
from support.kmip import HungListener, KmipCluster, add_kmip_provider, edit_config, key_id_of, wait_until
from kmip_tls import CertificateAuthority

pytestmark = [
    pytest.mark.cli, pytest.mark.fuse, pytest.mark.kmip,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:kmip"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:sqlalchemy"),
    pytest.mark.filterwarnings("ignore:.*(TripleDES|Camellia|ARC4|CFB|OFB|cache_ok|MovedIn20|PROTOCOL_TLS).*"),
]

DATA = os.urandom(256 << 10) + b"tail of a disk"
FAST = ["--connect-timeout", "1", "--request-timeout", "2"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = KmipCluster(str(tmp_path_factory.mktemp("kmip")))
    try:
        c.ensure_up()
        yield c
    finally:
        c.stop_all()


@pytest.fixture
def kenv(tmp_path, cluster):
    """An environment whose default provider 'prod' is the two-server cluster (both servers up)."""
    cluster.ensure_up()
    env = VmfsEnv(str(tmp_path))
    add_kmip_provider(env, "prod", [s.port for s in cluster.servers], cluster.pki, *FAST)
    yield env
    env.cleanup()


def make_disk(env, rel: str, size: str = "1M") -> str:
    path = os.path.join(env.datastore, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    env.run("create", path, "--size", size)
    return path


def write_through(mnt: str, rel: str, data: bytes = DATA) -> None:
    with open(os.path.join(mnt, rel), "r+b") as f:
        f.write(data)


def read_through(mnt: str, rel: str, n: int = len(DATA)) -> bytes:
    with open(os.path.join(mnt, rel), "rb") as f:
        return f.read(n)


def locked_status(env) -> str:
    """`status` while disks are locked: its report, and exit 13 (issue 9: scripts can tell)."""
    proc = env.run("status", check=False)
    assert proc.returncode == 13, (proc.returncode, proc.stderr)
    return proc.stdout.decode()


def cat(env, path: str, check=True) -> subprocess.CompletedProcess:
    return env.run("cat", path, check=check, timeout=60)


# -- the happy path -----------------------------------------------------------------------------
def test_provider_add_writes_config_and_first_is_default(kenv, cluster):
    text = open(kenv.config).read()
    assert 'default_provider = "prod"' in text and 'type = "kmip"' in text
    assert f"127.0.0.1:{cluster.a.port}" in text and f"127.0.0.1:{cluster.b.port}" in text
    assert "connect_timeout = 1.0" in text and 'on_revoke = "keep"' in text
    add_kmip_provider(kenv, "second", [cluster.b.port], cluster.pki)
    assert 'default_provider = "prod"' in open(kenv.config).read()
    out = kenv.run("provider", "list").stdout.decode()
    assert "prod\tkmip (default)" in out and "second\tkmip" in out


def test_create_encrypt_and_read_back_under_kmip(kenv, cluster):
    disk = make_disk(kenv, "vm1/disk.vmdk")
    key = key_id_of(kenv, disk)
    admin = cluster.admin()
    try:
        state = admin.key_state(key)
        assert state.name == "ACTIVE"
    finally:
        admin.close()
    # encrypt an existing plaintext folder under a named provider
    add_kmip_provider(kenv, "other", [cluster.b.port], cluster.pki, *FAST)
    vm2 = os.path.join(kenv.datastore, "vm2")
    os.makedirs(vm2)
    with open(os.path.join(vm2, "vm2.nvram"), "wb") as f:
        f.write(DATA)
    kenv.run("encrypt", vm2, "--provider", "other")
    assert open(os.path.join(vm2, "vm2.nvram"), "rb").read() != DATA
    assert "(provider other)" in kenv.run("info", vm2).stdout.decode()
    assert cat(kenv, os.path.join(vm2, "vm2.nvram")).stdout == DATA
    with mounted(kenv) as mnt:
        write_through(mnt, "vm1/disk-flat.vmdk")
        assert read_through(mnt, "vm1/disk-flat.vmdk") == DATA
        assert read_through(mnt, "vm2/vm2.nvram") == DATA
        status = kenv.run("status").stdout.decode()
        assert "2 key(s) cached, 0 locked" in status
    assert cat(kenv, os.path.join(kenv.datastore, "vm1/disk-flat.vmdk")).stdout[:len(DATA)] == DATA
    raw = open(os.path.join(kenv.datastore, "vm1/disk-flat.vmdk"), "rb").read(len(DATA))
    assert raw != DATA


# -- failover and outages -----------------------------------------------------------------------
def test_failover_when_first_server_is_down(kenv, cluster):
    disk = make_disk(kenv, "vm1/disk.vmdk")
    with mounted(kenv) as mnt:
        write_through(mnt, "vm1/disk-flat.vmdk")
        cluster.a.kill()  # the agent's open connection to a breaks
        # a new KEK (Create on the cluster) and a fetch: both fail over to b
        disk2 = make_disk(kenv, "vm2/disk.vmdk")
        write_through(mnt, "vm2/disk-flat.vmdk", DATA[::-1])
        assert read_through(mnt, "vm2/disk-flat.vmdk") == DATA[::-1]
        assert read_through(mnt, "vm1/disk-flat.vmdk") == DATA
    # a cold agent (this command's sidecar) with the first server down
    start = time.monotonic()
    assert cat(kenv, disk2.replace("disk.vmdk", "disk-flat.vmdk")).stdout[:len(DATA)] == DATA[::-1]
    assert time.monotonic() - start < 15
    assert key_id_of(kenv, disk) != key_id_of(kenv, disk2)


def test_outage_with_keys_cached_keeps_disks_working(kenv, cluster):
    make_disk(kenv, "vm1/disk.vmdk")
    make_disk(kenv, "vm2/disk.vmdk")
    with mounted(kenv) as mnt:
        f = open(os.path.join(mnt, "vm1/disk-flat.vmdk"), "r+b")
        try:
            f.write(DATA)
            cluster.a.kill()
            cluster.b.kill()
            # the open disk keeps working, and so does any disk whose KEK the agent prefetched
            f.seek(0)
            f.write(DATA[::-1])
            f.flush()
            f.seek(0)
            assert f.read(len(DATA)) == DATA[::-1]
        finally:
            f.close()
        assert read_through(mnt, "vm1/disk-flat.vmdk") == DATA[::-1]
        write_through(mnt, "vm2/disk-flat.vmdk")
        assert read_through(mnt, "vm2/disk-flat.vmdk") == DATA
        assert "0 locked" in kenv.run("status").stdout.decode()


def test_cold_start_with_kms_down_locks_then_unlock_without_remount(kenv, cluster):
    disk1 = make_disk(kenv, "vm1/disk.vmdk")
    make_disk(kenv, "vm2/disk.vmdk")
    key1 = key_id_of(kenv, disk1)
    edit_config(kenv, retry_interval=600)  # only 'unlock' retries here (the periodic retry has its own test)
    cluster.a.kill()
    cluster.b.kill()
    with mounted(kenv) as mnt:  # the mount comes up although no KEK can be fetched
        assert sorted(os.listdir(mnt)) == ["vm1", "vm2"]
        with pytest.raises(PermissionError) as exc:
            open(os.path.join(mnt, "vm1/disk-flat.vmdk"), "rb")
        assert exc.value.errno == errno.EACCES
        status = locked_status(kenv)
        assert "2 locked" in status
        assert f"LOCKED key {key1} of provider prod: vm1/disk-flat.vmdk" in status
        assert f"127.0.0.1:{cluster.a.port}: connection refused" in status
        logs = kenv.mount_logs()
        line = next(ln for ln in logs.splitlines() if "vm1/disk-flat.vmdk: open refused" in ln)
        assert f"key {key1}" in line and "servers tried" in line
        assert f"127.0.0.1:{cluster.a.port}" in line and f"127.0.0.1:{cluster.b.port}" in line
        assert kenv.run("unlock", check=False).returncode == 7  # still down: says so
        cluster.ensure_up()
        out = kenv.run("unlock").stdout.decode()
        assert f"unlocked key {key1} of provider prod" in out
        write_through(mnt, "vm1/disk-flat.vmdk")
        assert read_through(mnt, "vm1/disk-flat.vmdk") == DATA
        assert "0 locked" in kenv.run("status").stdout.decode()


def test_periodic_retry_unlocks_by_itself(kenv, cluster):
    make_disk(kenv, "vm1/disk.vmdk")
    edit_config(kenv, retry_interval=1)
    cluster.a.kill()
    cluster.b.kill()
    with mounted(kenv) as mnt:
        assert "1 locked" in locked_status(kenv)
        cluster.ensure_up()
        wait_until(lambda: "0 locked" in kenv.run("status", check=False).stdout.decode(), 15, "the agent's periodic retry")
        write_through(mnt, "vm1/disk-flat.vmdk")
        assert read_through(mnt, "vm1/disk-flat.vmdk") == DATA


def test_agent_restart_fetches_keys_again_by_id(kenv, cluster):
    make_disk(kenv, "vm1/disk.vmdk")
    kenv.run("agent", "start")
    with mounted(kenv) as mnt:
        write_through(mnt, "vm1/disk-flat.vmdk")
    kenv.run("agent", "stop")
    kenv.run("agent", "start")  # a host reboot: nothing cached
    assert "0 key(s) cached" in kenv.run("status").stdout.decode()
    with mounted(kenv) as mnt:
        assert read_through(mnt, "vm1/disk-flat.vmdk") == DATA
        assert "1 key(s) cached" in kenv.run("status").stdout.decode()


# -- TLS ----------------------------------------------------------------------------------------
def test_server_with_certificate_from_another_ca_is_refused(kenv, cluster):
    rogue = cluster.odd_server("rogue-ca", CertificateAuthority.create("rogue CA"), ["127.0.0.1", "localhost"])
    try:
        proc = add_kmip_provider(kenv, "rogue", [rogue.port], cluster.pki, *FAST, check=False)
        err = proc.stderr.decode()
        assert proc.returncode != 0
        assert f"127.0.0.1:{rogue.port}: server certificate refused" in err
        assert "unable to get local issuer certificate" in err
        # configured anyway, every fetch is refused with the server and the reason
        add_kmip_provider(kenv, "rogue", [rogue.port], cluster.pki, *FAST, "--no-check")
        vm = os.path.join(kenv.datastore, "vm1")
        os.makedirs(vm)
        proc = kenv.run("create", os.path.join(vm, "d.vmdk"), "--size", "1M", "--provider", "rogue", check=False)
        assert proc.returncode == 4
        assert f"127.0.0.1:{rogue.port}: server certificate refused" in proc.stderr.decode()
    finally:
        rogue.kill()


def test_server_certificate_for_another_host_name_is_refused(kenv, cluster):
    other = cluster.odd_server("other-name", cluster.pki.ca, ["kms.elsewhere.example"])
    try:
        proc = add_kmip_provider(kenv, "other", [other.port], cluster.pki, *FAST, check=False)
        err = proc.stderr.decode()
        assert proc.returncode != 0
        assert f"127.0.0.1:{other.port}: server certificate refused: IP address mismatch, certificate is not valid for '127.0.0.1'" in err
        # the same CA and the right name: accepted (by name, not only by IP address)
        add_kmip_provider(kenv, "byname", [cluster.a.port], cluster.pki, *FAST, host="localhost")
        make_disk(kenv, "vm1/disk.vmdk")
    finally:
        other.kill()


# -- keys taken out of service --------------------------------------------------------------------
def test_revoked_key_gives_a_clear_error_and_open_disks_keep_serving(kenv, cluster):
    disk = make_disk(kenv, "vm1/disk.vmdk")
    key = key_id_of(kenv, disk)
    admin = cluster.admin()
    try:
        with mounted(kenv) as mnt:
            write_through(mnt, "vm1/disk-flat.vmdk")
            f = open(os.path.join(mnt, "vm1/disk-flat.vmdk"), "rb")
            admin.revoke(key)
            try:
                assert f.read(len(DATA)) == DATA  # on_revoke = "keep": serve until unmount
            finally:
                f.close()
        proc = cat(kenv, disk.replace("disk.vmdk", "disk-flat.vmdk"), check=False)
        assert proc.returncode == 4
        assert f"key {key} was revoked on provider prod" in proc.stderr.decode()
    finally:
        admin.close()


def test_destroyed_key(kenv, cluster):
    disk = make_disk(kenv, "vm1/disk.vmdk")
    key = key_id_of(kenv, disk)
    admin = cluster.admin()
    try:
        admin.revoke(key)
        admin.destroy(key)
    finally:
        admin.close()
    proc = cat(kenv, disk.replace("disk.vmdk", "disk-flat.vmdk"), check=False)
    assert proc.returncode == 4
    assert f"key {key} is gone from provider prod: it was destroyed there" in proc.stderr.decode()
    with mounted(kenv) as mnt:
        with pytest.raises(PermissionError):
            read_through(mnt, "vm1/disk-flat.vmdk")
        status = locked_status(kenv)
        assert f"LOCKED key {key} of provider prod: vm1/disk-flat.vmdk" in status and "destroyed" in status


def test_unknown_key_id(kenv, cluster):
    disk = make_disk(kenv, "vm1/disk.vmdk")
    key = key_id_of(kenv, disk)
    text = open(disk).read()
    edited = re.sub(rf"(fqid/[^/]+/prod/){key},", r"\g<1>424242,", text)
    assert edited != text
    with open(disk, "w") as f:
        f.write(edited)
    proc = cat(kenv, disk.replace("disk.vmdk", "disk-flat.vmdk"), check=False)
    assert proc.returncode == 4
    assert "key 424242 is gone from provider prod" in proc.stderr.decode()


def test_silent_server_times_out_bounded_and_says_so(kenv, cluster):
    hung = HungListener()
    try:
        disk = make_disk(kenv, "vm1/disk.vmdk")
        config = open(kenv.config).read()
        # only the silent server: bounded by the connect time-out (1 s), and the error says what happened
        with open(kenv.config, "w") as f:
            f.write(config.replace(f'"127.0.0.1:{cluster.a.port}",\n    "127.0.0.1:{cluster.b.port}",',
                                   f'"127.0.0.1:{hung.port}",'))
        start = time.monotonic()
        proc = cat(kenv, disk.replace("disk.vmdk", "disk-flat.vmdk"), check=False)
        elapsed = time.monotonic() - start
        assert proc.returncode == 4
        assert f"127.0.0.1:{hung.port}: no TLS handshake within 1 s" in proc.stderr.decode()
        assert elapsed < 10
        # silent server first, then a good one: fails over after the time-out
        with open(kenv.config, "w") as f:
            f.write(config.replace(f'"127.0.0.1:{cluster.a.port}",', f'"127.0.0.1:{hung.port}",'))
        assert cat(kenv, disk.replace("disk.vmdk", "disk-flat.vmdk")).returncode == 0
    finally:
        hung.close()


def test_on_revoke_lock_locks_open_disks_now(kenv, cluster):
    add_kmip_provider(kenv, "strict", [s.port for s in cluster.servers], cluster.pki, *FAST, "--on-revoke", "lock")
    edit_config(kenv, retry_interval=1)
    vm = os.path.join(kenv.datastore, "vm1")
    os.makedirs(vm)
    disk = os.path.join(vm, "disk.vmdk")
    kenv.run("create", disk, "--size", "1M", "--provider", "strict")
    make_disk(kenv, "vm2/disk.vmdk")  # under 'prod' (on_revoke = "keep"): unaffected
    key = key_id_of(kenv, disk)
    admin = cluster.admin()
    try:
        with mounted(kenv) as mnt:
            write_through(mnt, "vm1/disk-flat.vmdk")
            write_through(mnt, "vm2/disk-flat.vmdk")
            # O_DIRECT (as QEMU's cache=none): reads reach the FUSE process, not the kernel's page cache
            fd = os.open(os.path.join(mnt, "vm1/disk-flat.vmdk"), os.O_RDWR | os.O_DIRECT)
            buf = mmap.mmap(-1, 4096)
            try:
                assert os.preadv(fd, [buf], 0) == 4096 and buf[:] == DATA[:4096]
                admin.revoke(key)

                def refused():
                    try:
                        os.preadv(fd, [buf], 0)
                        return False
                    except PermissionError:
                        return True
                # the agent re-checks every retry_interval (1 s); the mount asks the agent every 2 s
                wait_until(refused, 20, "the open disk to lock after its KEK was revoked")
                with pytest.raises(PermissionError):
                    os.pwritev(fd, [buf], 0)
            finally:
                os.close(fd)
                buf.close()
            with pytest.raises(PermissionError):
                read_through(mnt, "vm1/disk-flat.vmdk")
            assert read_through(mnt, "vm2/disk-flat.vmdk") == DATA
            status = locked_status(kenv)
            assert f"LOCKED key {key} of provider strict" in status and "was revoked" in status
            assert "was revoked" in kenv.mount_logs()
    finally:
        admin.close()
