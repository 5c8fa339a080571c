"""The CLI as a user meets it: encrypt/decrypt, info, cat, backups, the agent, and every error case."""

import json
import os
import shutil
import subprocess

import pytest

from support import mounted, sha256_file, tree_hashes

pytestmark = [pytest.mark.cli, pytest.mark.fuse, pytest.mark.qemu]

PATTERN = b"\x5a\xc3\x96\x3c" * 128


def make_plain_vm(env, name="vm1") -> str:
    """A plain VM folder as QEMU users have it: a flat disk with data, an nvram file, a log."""
    vm = os.path.join(env.datastore, name)
    os.makedirs(vm)
    disk = os.path.join(vm, "disk.vmdk")
    env.tool("qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", disk, "8M")
    env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x33 4M 1000", disk)
    env.tool("qemu-img", "create", "-f", "vmdk", os.path.join(vm, "sparse.vmdk"), "8M")
    env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x44 1M 64k", os.path.join(vm, "sparse.vmdk"))
    with open(os.path.join(vm, f"{name}.nvram"), "wb") as f:
        f.write(PATTERN * 17 + b"tail")  # 8708 bytes: not a multiple of 512
    with open(os.path.join(vm, "vmware.log"), "wb") as f:
        f.write(b"booted\n")
    return vm


def assert_clean_error(proc, *needles, code=None):
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, "the command should have failed"
    if code is not None:
        assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def test_encrypt_then_decrypt_a_folder(venv_env, tmp_path):
    vm = make_plain_vm(venv_env)
    original = tree_hashes(vm)
    plain_copy = str(tmp_path / "plain.raw")
    venv_env.tool("qemu-img", "convert", "-O", "raw", os.path.join(vm, "disk.vmdk"), plain_copy)
    venv_env.run("encrypt", vm)
    at_rest = tree_hashes(vm)
    for name in ("disk-flat.vmdk", "sparse.vmdk", "vm1.nvram"):
        assert at_rest[name] != original[name], f"{name} was not encrypted"
    assert at_rest["vmware.log"] == original["vmware.log"]
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        assert b"\x5a" * 512 not in f.read()
    with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
        assert b"encryption.keySafe" in f.read()  # a single-extent disk keeps its key in its descriptor
    info = json.loads(venv_env.run("info", "--json", vm).stdout)
    roles = {f["name"]: f for f in info["files"]}
    assert info["encrypted"] and roles["disk-flat.vmdk"]["key_in"] == "disk.vmdk"
    assert roles["vm1.nvram"]["key_in"] == ".vmfs-crypt.json" and roles["vmware.log"]["role"] == "plaintext"
    nvram = venv_env.run("cat", os.path.join(vm, "vm1.nvram")).stdout
    assert nvram == PATTERN * 17 + b"tail"
    with mounted(venv_env) as mnt:
        venv_env.tool("qemu-img", "compare", "-F", "vmdk", "-f", "raw", plain_copy, os.path.join(mnt, "vm1", "disk.vmdk"))
        venv_env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x44 1M 64k", os.path.join(mnt, "vm1", "sparse.vmdk"))
    venv_env.run("decrypt", vm)
    assert not os.path.exists(os.path.join(vm, ".vmfs-crypt.json"))
    restored = tree_hashes(vm)
    for name in ("disk-flat.vmdk", "sparse.vmdk", "vm1.nvram", "vmware.log", "disk.vmdk"):
        assert restored[name] == original[name], f"{name} differs after encrypt + decrypt"
    st = os.stat(os.path.join(vm, "disk-flat.vmdk"))
    assert st.st_blocks * 512 < 4 << 20, "encrypt/decrypt filled the holes of a thin disk"


def test_interrupted_encrypt_leaves_old_or_new_state(venv_env):
    from vmfs_crypt.format.folder import TMP_PREFIX, VmFolder
    from vmfs_crypt.format.journal import recover
    vm = make_plain_vm(venv_env)
    original = tree_hashes(vm)
    # Before the commit point: a half-written temporary copy is all an interruption leaves.
    with open(os.path.join(vm, TMP_PREFIX + "vm1.nvram"), "wb") as f:
        f.write(b"partial ciphertext")
    with mounted(venv_env) as mnt:  # mounting recovers: removes the stray copy
        with open(os.path.join(mnt, "vm1", "vm1.nvram"), "rb") as f:
            assert f.read() == PATTERN * 17 + b"tail"
    assert tree_hashes(vm) == original
    # After the commit point: the journal rolls forward to the new state.
    venv_env.run("encrypt", vm)
    encrypted = tree_hashes(vm)
    venv_env.run("decrypt", vm)
    folder = VmFolder(vm)
    renames = []
    backup = {}
    for name, digest in encrypted.items():
        if name != ".vmfs-crypt.json" and digest != original.get(name):
            backup[name] = name
    assert backup, "encrypt changed nothing?"
    # Rebuild the committed-but-not-applied state by hand: the journal plus the new files.
    venv_env.run("encrypt", vm)
    with open(os.path.join(vm, ".vmfs-crypt.json"), "rb") as f:
        keys_doc = f.read()
    new_files = {}
    for name in backup:
        with open(os.path.join(vm, name), "rb") as f:
            new_files[name] = f.read()
    venv_env.run("decrypt", vm)
    for name, data in new_files.items():
        with open(os.path.join(vm, TMP_PREFIX + name), "wb") as f:
            f.write(data)
        renames.append((TMP_PREFIX + name, name))
    with open(os.path.join(vm, ".vmfs-crypt-journal.json"), "w") as f:
        json.dump({"version": 1, "renames": renames, "keys": keys_doc.decode()}, f)
    assert recover(folder) is not None
    assert not os.path.exists(os.path.join(vm, ".vmfs-crypt-journal.json"))
    assert venv_env.run("cat", os.path.join(vm, "vm1.nvram")).stdout == PATTERN * 17 + b"tail"


def test_wrong_key_is_refused_and_nothing_changes(venv_env):
    vm = make_plain_vm(venv_env)
    venv_env.run("encrypt", vm)
    before = tree_hashes(venv_env.datastore)
    cfg_dir = os.path.dirname(venv_env.config)
    venv_env.run("provider", "add", "native", "other")
    shutil.copy(os.path.join(cfg_dir, "native-other.key"), os.path.join(cfg_dir, "native-local.key"))
    key_id = json.loads(venv_env.run("info", "--json", vm).stdout)["kek"]["keyId"]
    proc = venv_env.run("cat", os.path.join(vm, "vm1.nvram"), check=False)
    assert_clean_error(proc, "vm1.nvram", "local", key_id, code=5)
    assert proc.stdout == b""
    with mounted(venv_env) as mnt:
        with pytest.raises(PermissionError):
            open(os.path.join(mnt, "vm1", "vm1.nvram"), "rb")
        with open(os.path.join(mnt, "vm1", "vmware.log"), "rb") as f:
            assert f.read() == b"booted\n"  # the rest of the datastore still works
    assert tree_hashes(venv_env.datastore) == before


def test_missing_provider_is_named(venv_env):
    vm = make_plain_vm(venv_env)
    venv_env.run("encrypt", vm)
    with open(venv_env.config) as f:
        text = f.read()
    with open(venv_env.config, "w") as f:
        f.write(text.replace("[providers.local]", "[providers.renamed]").replace('default_provider = "local"',
                                                                                  'default_provider = "renamed"'))
    proc = venv_env.run("cat", os.path.join(vm, "disk-flat.vmdk"), check=False)
    assert_clean_error(proc, "provider 'local' is not configured", "disk-flat.vmdk")


def test_tampered_descriptor_is_refused(venv_env):
    vm = make_plain_vm(venv_env)
    venv_env.run("encrypt", vm)
    desc = os.path.join(vm, "disk.vmdk")
    with open(desc, "rb") as f:
        raw = f.read()
    start = raw.index(b'encryption.data = "') + len(b'encryption.data = "') + 10
    tampered = raw[:start] + bytes([raw[start] ^ 0x01]) + raw[start + 1:]
    with open(desc, "wb") as f:
        f.write(tampered)
    before = tree_hashes(vm)
    proc = venv_env.run("cat", os.path.join(vm, "disk-flat.vmdk"), check=False)
    assert_clean_error(proc, "disk")
    assert proc.stdout == b""
    # A keySafe pasted from another disk (other encryption.data) does not unwrap either.
    make_plain_vm(venv_env, "vm2")
    venv_env.run("encrypt", os.path.join(venv_env.datastore, "vm2"))
    with open(os.path.join(venv_env.datastore, "vm2", "disk.vmdk"), "rb") as f:
        other = f.read()
    ks_line = [l for l in other.splitlines(True) if l.startswith(b"encryption.keySafe")][0]
    with open(desc, "wb") as f:
        f.write(b"".join(ks_line if l.startswith(b"encryption.keySafe") else l for l in raw.splitlines(True)))
    proc = venv_env.run("cat", os.path.join(vm, "disk-flat.vmdk"), check=False)
    assert_clean_error(proc, "does not unwrap", code=5)
    assert tree_hashes(vm)["disk-flat.vmdk"] == before["disk-flat.vmdk"]


def test_truncated_extent_gives_eio_and_a_log_line(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "4M")
    extent = os.path.join(venv_env.datastore, "vm1", "disk-flat.vmdk")
    os.truncate(extent, (2 << 20) + 100)
    digest = sha256_file(extent)
    with mounted(venv_env) as mnt:
        with pytest.raises(OSError) as exc:
            open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb")
        assert exc.value.errno == 5  # EIO: a data fault
        assert "truncated" in venv_env.mount_logs()
        proc = venv_env.tool("qemu-img", "info", os.path.join(mnt, "vm1", "disk.vmdk"), check=False)
        assert proc.returncode != 0
    assert sha256_file(extent) == digest


def test_key_file_with_loose_permissions_is_refused(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    key_file = os.path.join(os.path.dirname(venv_env.config), "native-local.key")
    os.chmod(key_file, 0o644)
    proc = venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M", check=False)
    err = assert_clean_error(proc, key_file, "chmod 600", code=3)
    assert os.listdir(os.path.join(venv_env.datastore, "vm1")) == [], err
    mnt = os.path.join(venv_env.base, "mnt")
    os.makedirs(mnt)
    # A broken provider is reported where it is used and never blocks the mount (issue 9).
    with mounted(venv_env, mnt) as mp:
        status = venv_env.run("status").stdout.decode()
        assert "BROKEN" in status and "chmod 600" in status, status
        assert os.listdir(mp) == ["vm1"]
    assert "chmod 600" in venv_env.mount_logs()


def test_backup_and_restore(venv_env):
    vm = make_plain_vm(venv_env)
    venv_env.run("encrypt", vm)
    assert b"no backup" in venv_env.run("provider", "list").stderr
    backup = os.path.join(venv_env.base, "local.backup")
    venv_env.run("provider", "backup", "local", backup, input=b"correct horse battery\n")
    assert b"no backup" not in venv_env.run("provider", "list").stderr
    with open(backup, "rb") as f:
        sealed = f.read()
    key_file = os.path.join(os.path.dirname(venv_env.config), "native-local.key")
    with open(key_file, "rb") as f:
        assert json.loads(f.read())["key"].encode() not in sealed
    os.unlink(key_file)
    assert_clean_error(venv_env.run("cat", os.path.join(vm, "vm1.nvram"), check=False), "restore")
    proc = venv_env.run("provider", "restore", "local", backup, input=b"wrong passphrase\n", check=False)
    assert_clean_error(proc, "wrong passphrase")
    venv_env.run("provider", "restore", "local", backup, input=b"correct horse battery\n")
    assert os.stat(key_file).st_mode & 0o777 == 0o600
    assert venv_env.run("cat", os.path.join(vm, "vm1.nvram")).stdout == PATTERN * 17 + b"tail"


def proc_limits_core(pid: int) -> str:
    with open(f"/proc/{pid}/limits") as f:
        return [l for l in f if l.startswith("Max core file size")][0].split()[4]


def test_agent_restart_and_hardening(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
    out = venv_env.run("agent", "start").stdout.decode()
    agent_pid = int(out.split()[1])
    assert proc_limits_core(agent_pid) == "0"
    sock_dir = os.path.join(venv_env.runtime, "vmfs-crypt")
    assert os.stat(sock_dir).st_mode & 0o777 == 0o700
    socks = [n for n in os.listdir(sock_dir) if n.endswith(".sock")]
    assert socks and all(os.stat(os.path.join(sock_dir, s)).st_mode & 0o777 == 0o600 for s in socks)
    with mounted(venv_env) as mnt:
        mount_pid = int(subprocess.run(["pgrep", "-f", f"vmfs_crypt.cli.mountd .*{mnt}"], capture_output=True,
                                       text=True).stdout.split()[0])
        assert proc_limits_core(mount_pid) == "0"
        with open(f"/proc/{mount_pid}/cmdline", "rb") as f:
            assert b"key" not in f.read().lower()
        path = os.path.join(mnt, "vm1", "disk-flat.vmdk")
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, PATTERN, 4096)
            # The mount uses the agent: a plain stop is refused and names it (issue 9); --force stops it.
            refused = venv_env.run("agent", "stop", check=False)
            assert_clean_error(refused, "in use", "mount of", code=11)
            venv_env.run("agent", "stop", "--force")
            os.pwrite(fd, PATTERN, 8192)  # an open disk keeps working without the agent
            assert os.pread(fd, len(PATTERN), 4096) == PATTERN
            with pytest.raises(PermissionError):  # a new file needs a key from the agent
                open(os.path.join(mnt, "vm1", "new.nvram"), "wb")
            venv_env.run("agent", "start")
            with open(os.path.join(mnt, "vm1", "new.nvram"), "wb") as f:
                f.write(b"after restart")
        finally:
            os.close(fd)
    with mounted(venv_env) as mnt:
        with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
            f.seek(4096)
            assert f.read(len(PATTERN)) == PATTERN
            f.seek(8192)
            assert f.read(len(PATTERN)) == PATTERN
        with open(os.path.join(mnt, "vm1", "new.nvram"), "rb") as f:
            assert f.read() == b"after restart"


def test_user_errors_are_one_line(venv_env):
    proc = venv_env.run("create", os.path.join(venv_env.datastore, "nofolder", "d.vmdk"), "--size", "1M", check=False)
    assert_clean_error(proc, "no such folder", code=2)
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    proc = venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "d.vmdk"), "--size", "1000", check=False)
    assert_clean_error(proc, "multiple of 512", code=2)
    proc = venv_env.run("mount", venv_env.datastore, os.path.join(venv_env.base, "missing"), check=False)
    assert_clean_error(proc, "mount point", code=2)
    proc = venv_env.run("--config", os.path.join(venv_env.base, "none.toml"), "create",
                        os.path.join(venv_env.datastore, "vm1", "d.vmdk"), "--size", "1M", check=False)
    assert_clean_error(proc, "no key provider is configured", code=3)


@pytest.mark.parametrize("deep", [False, True])
def test_rekey(venv_env, tmp_path, deep):
    vm = make_plain_vm(venv_env)
    venv_env.run("encrypt", vm)
    before = json.loads(venv_env.run("info", "--json", vm).stdout)
    at_rest = tree_hashes(vm)
    plain_copy = str(tmp_path / "plain.raw")
    with mounted(venv_env) as mnt:
        venv_env.tool("qemu-img", "convert", "-O", "raw", os.path.join(mnt, "vm1", "disk.vmdk"), plain_copy)
    venv_env.run("rekey", vm, *(["--deep"] if deep else []))
    after = json.loads(venv_env.run("info", "--json", vm).stdout)
    assert after["kek"]["keyId"] != before["kek"]["keyId"]
    assert {f["kek"]["keyId"] for f in after["files"] if f["kek"]} == {after["kek"]["keyId"]}
    rekeyed = tree_hashes(vm)
    for name in ("disk-flat.vmdk", "sparse.vmdk", "vm1.nvram"):
        # shallow: same DEKs, data untouched; deep: new DEKs, every data file rewritten
        assert (rekeyed[name] != at_rest[name]) == deep, name
    assert venv_env.run("cat", os.path.join(vm, "vm1.nvram")).stdout == PATTERN * 17 + b"tail"
    with mounted(venv_env) as mnt:
        venv_env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", plain_copy, os.path.join(mnt, "vm1", "disk.vmdk"))


def test_sidecar_agent_lives_with_the_mount_and_a_named_agent_outlives_it(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
    with mounted(venv_env):
        assert venv_env.run("agent", "status", check=False).returncode == 0  # the sidecar
    assert venv_env.run("agent", "status", check=False).returncode != 0, "the sidecar outlived its mount"
    out = venv_env.run("agent", "start").stdout.decode()
    sock = out.split(" on ")[1].strip()
    with mounted(venv_env, None, "--agent", sock) as mnt:
        with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
            assert f.read(512) == bytes(512)
    assert venv_env.run("agent", "status", check=False).returncode == 0, "a named agent must outlive the mount"
    proc = venv_env.run("mount", venv_env.datastore, os.path.join(venv_env.base, "mnt"), "--agent",
                        os.path.join(venv_env.runtime, "none.sock"), check=False)
    assert_clean_error(proc, "no key agent answers", code=8)
