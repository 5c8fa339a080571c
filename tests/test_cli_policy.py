"""The datastore policy (issue 9): folders made through the mount are encrypted before their first byte; encrypt of a new folder."""

import errno
import json
import os

import pytest

from support import mounted, sha256_file

pytestmark = [pytest.mark.cli, pytest.mark.fuse, pytest.mark.qemu]

PATTERN = bytes(range(256)) * 4096  # 1 MiB that no ciphertext looks like


@pytest.fixture
def plain_image(tmp_path, venv_env):
    raw = str(tmp_path / "guest.raw")
    with open(raw, "wb") as f:
        f.write(PATTERN * 4)
    qcow = str(tmp_path / "guest.qcow2")
    venv_env.tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow)
    return raw, qcow


def test_a_folder_made_through_the_mount_is_encrypted_before_its_first_byte(venv_env, plain_image):
    raw, qcow = plain_image
    ds = venv_env.datastore
    venv_env.run("provider", "add", "native", "vmkeys")
    # the form (a DATASTORE argument) and the subcommand form are the same command
    set_out = json.loads(venv_env.run("policy", ds, "--encrypt-new-folders", "--provider", "vmkeys", "--json").stdout)
    assert set_out == {"datastore": ds, "file": os.path.join(ds, ".vmfs-crypt-policy.json"),
                       "encrypt_new_folders": True, "provider": "vmkeys"}
    assert json.loads(venv_env.run("policy", "datastore", ds, "--json").stdout) == set_out
    assert venv_env.run("policy", "default-provider", "local").returncode == 0  # issue 11's commands still work
    with mounted(venv_env) as mnt:
        assert ".vmfs-crypt-policy.json" not in os.listdir(mnt)
        os.mkdir(os.path.join(mnt, "newvm"))
        assert os.path.exists(os.path.join(ds, "newvm", ".vmfs-crypt.json"))  # before any file was written
        disk = os.path.join(mnt, "newvm", "disk.vmdk")
        venv_env.tool("qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=monolithicFlat", qcow, disk)
        venv_env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", raw, disk)
        os.makedirs(os.path.join(mnt, "group", "vm2"))  # mkdir -p: each level is encrypted
    root = json.loads(venv_env.run("info", "--json", ds).stdout)
    assert root["policy"] == {"encrypt_new_folders": True, "provider": "vmkeys", "error": None}
    assert "new folders are encrypted (provider vmkeys)" in venv_env.run("info", ds).stdout.decode()
    info = json.loads(venv_env.run("info", "--json", os.path.join(ds, "newvm")).stdout)
    assert info["state"] == "encrypted" and info["kek"]["provider"] == "vmkeys"
    assert {f["name"]: f["role"] for f in info["files"]} == {"disk.vmdk": "descriptor", "disk-flat.vmdk": "encrypted"}
    with open(os.path.join(ds, "newvm", "disk-flat.vmdk"), "rb") as f:
        at_rest = f.read()
    assert len(at_rest) == len(PATTERN) * 4 and PATTERN[:4096] not in at_rest and PATTERN[-4096:] not in at_rest
    for sub in ("group", os.path.join("group", "vm2")):
        assert json.loads(venv_env.run("info", "--json", os.path.join(ds, sub)).stdout)["state"] == "encrypted"
    with mounted(venv_env) as mnt:  # it reads back after a remount
        with open(os.path.join(mnt, "newvm", "disk-flat.vmdk"), "rb") as f:
            assert f.read() == PATTERN * 4
    # off again: new folders are plaintext, the encrypted ones stay encrypted
    venv_env.run("policy", ds, "--no-encrypt-new-folders")
    with mounted(venv_env) as mnt:
        os.mkdir(os.path.join(mnt, "plainvm"))
    assert not os.path.exists(os.path.join(ds, "plainvm", ".vmfs-crypt.json"))


@pytest.mark.parametrize("damage", ["not json", "unknown member", "symlink", "unknown provider"])
def test_a_policy_that_cannot_be_followed_fails_the_mkdir_closed(venv_env, damage):
    ds = venv_env.datastore
    venv_env.run("policy", ds, "--encrypt-new-folders")
    path = os.path.join(ds, ".vmfs-crypt-policy.json")
    with open(path) as f:
        doc = json.load(f)
    os.unlink(path)
    if damage == "not json":
        with open(path, "w") as f:
            f.write("{encrypt_new_folders: true")
    elif damage == "unknown member":
        with open(path, "w") as f:
            json.dump(dict(doc, encrypt_new_folders=True, plaintext_ok=True), f)
    elif damage == "symlink":
        target = os.path.join(venv_env.base, "elsewhere.json")
        with open(target, "w") as f:
            json.dump(doc, f)
        os.symlink(target, path)
    else:
        with open(path, "w") as f:
            json.dump(dict(doc, provider="gone"), f)
    def names():
        return sorted(n for n in os.listdir(ds) if n != ".vmfs-crypt-mount.lock")  # made by every mount
    before = names()
    with mounted(venv_env) as mnt:
        with pytest.raises(OSError) as exc:
            os.mkdir(os.path.join(mnt, "newvm"))
        if damage != "unknown provider":
            assert exc.value.errno == errno.EIO, exc.value
    assert names() == before, "a folder was made although its policy could not be followed"
    if damage != "unknown provider":
        proc = venv_env.run("policy", ds, check=False)
        assert proc.returncode == 6 and b"Traceback" not in proc.stderr, proc.stderr
        assert json.loads(venv_env.run("info", "--json", ds).stdout)["policy"]["error"]


def test_encrypt_of_a_new_or_empty_folder_makes_an_encrypted_vm_folder(venv_env, plain_image):
    raw, qcow = plain_image
    ds = venv_env.datastore
    new = os.path.join(ds, "fresh")
    out = venv_env.run("encrypt", new)
    assert b"made the folder" in out.stdout and os.path.exists(os.path.join(new, ".vmfs-crypt.json"))
    os.makedirs(os.path.join(ds, "empty"))
    venv_env.run("encrypt", os.path.join(ds, "empty"))
    assert json.loads(venv_env.run("info", "--json", os.path.join(ds, "empty")).stdout)["state"] == "encrypted"
    missing_parent = venv_env.run("encrypt", os.path.join(ds, "no", "such"), check=False)
    assert missing_parent.returncode == 2 and b"existing parent" in missing_parent.stderr
    with mounted(venv_env) as mnt:
        disk = os.path.join(mnt, "fresh", "disk.vmdk")
        venv_env.tool("qemu-img", "convert", "-f", "qcow2", "-O", "vmdk", "-o", "subformat=monolithicFlat", qcow, disk)
        venv_env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", raw, disk)
    with open(os.path.join(new, "disk-flat.vmdk"), "rb") as f:
        assert PATTERN[:4096] not in f.read()
    assert sha256_file(os.path.join(new, "disk-flat.vmdk")) != sha256_file(raw)
