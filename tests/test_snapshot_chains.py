"""Issue 10: a VM with snapshots (VMDK deltas, a qcow2 overlay, internal qcow2 snapshots) is encrypted and deep-rekeyed as a whole, and QEMU reads every layer.

The images are made by real qemu-img / qemu-io in a plain folder and copied aside in plaintext;
the real CLI encrypts the folder in place (small regions, so that each file has several), and
through a real mount `qemu-img compare` checks every chain, every layer alone and every internal
snapshot against the plaintext copy. At rest, the independent reader of FORMAT.md
(test_format_independent.py) finds each file's key, and after `rekey --deep` the old DEKs decrypt
no sector of the result.
"""

import json
import os
import shutil

import pytest

from support import mounted
from test_format_independent import SECTOR, decrypt_file, find_key, is_encrypted, read_plaintext
from test_reencrypt import assert_old_dek_decrypts_nothing, dek_of, key_file

REGION = 256 << 10
MiB = 1 << 20
# (image, format, backing or None, [qemu-io writes]); every write has its own pattern byte, so a
# layer that was read from the wrong place (or decrypted with the wrong key) cannot match.
LAYERS = [
    ("base.vmdk", "vmdk", None, ["write -P 0x11 0 1M", "write -P 0x12 3M 64k"]),
    ("snap1.vmdk", "vmdk", "base.vmdk", ["write -P 0x21 1M 512k", "write -P 0x22 0 4k"]),
    ("snap2.vmdk", "vmdk", "snap1.vmdk", ["write -P 0x31 1536k 256k", "write -P 0x32 2047k 2k"]),
    ("base.qcow2", "qcow2", None, ["write -P 0x41 0 1M"]),
    ("over.qcow2", "qcow2", "base.qcow2", ["write -P 0x51 512k 1M", "write -P 0x52 3M 4k"]),
]
# snaps.qcow2: each internal snapshot holds other data than the one before and the current state.
SNAPSHOTS = [("s1", "write -P 0x61 0 1M"), ("s2", "write -P 0x71 0 512k"), (None, "write -P 0x81 256k 128k")]
PATTERNS = [0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x41, 0x51, 0x52, 0x61, 0x71, 0x81]
SIZE = 4 * MiB


def _apply(buf: bytearray, command: str) -> None:
    """What `write -P PAT OFF LEN` leaves in a raw image (to check QEMU's reads with no QEMU involved)."""
    _, _, pat, off, length = command.split()

    def n(s: str) -> int:
        return int(s[:-1]) * {"k": 1 << 10, "M": MiB}[s[-1]] if s[-1] in "kM" else int(s)
    buf[n(off):n(off) + n(length)] = bytes([int(pat, 16)]) * n(length)


def build_vm(env, vm: str) -> dict[str, bytes]:
    """The folder's images; returns what each chain top (and each internal snapshot) reads as, in raw bytes."""
    os.makedirs(vm)
    expected: dict[str, bytes] = {}
    for name, fmt, backing, writes in LAYERS:
        path = os.path.join(vm, name)
        if backing is None:
            opts = ["-o", "subformat=monolithicFlat"] if fmt == "vmdk" else []
            env.tool("qemu-img", "create", "-q", "-f", fmt, *opts, path, str(SIZE))
            raw = bytearray(SIZE)
        else:
            env.tool("qemu-img", "create", "-q", "-f", fmt, "-b", backing, "-F", fmt, path)
            raw = bytearray(expected[backing])
        for w in writes:
            env.tool("qemu-io", "-f", fmt, "-c", w, path)
            _apply(raw, w)
        expected[name] = bytes(raw)
    path = os.path.join(vm, "snaps.qcow2")
    env.tool("qemu-img", "create", "-q", "-f", "qcow2", path, str(SIZE))
    raw = bytearray(SIZE)
    for snap, w in SNAPSHOTS:
        env.tool("qemu-io", "-f", "qcow2", "-c", w, path)
        _apply(raw, w)
        expected[f"snaps.qcow2@{snap}" if snap else "snaps.qcow2"] = bytes(raw)
        if snap:
            env.tool("qemu-img", "snapshot", "-c", snap, path)
    with open(os.path.join(vm, "vm1.vmsd"), "wb") as f:  # VMware's snapshot list: plaintext by name
        f.write(b'.encoding = "UTF-8"\nsnapshot0.fileName = "snap1.vmdk"\n')
    with open(os.path.join(vm, "vm1.vmsn"), "wb") as f:  # a snapshot's memory state: encrypted
        f.write(bytes([0x91]) * 5000)
    return expected


def _layer_alone(path: str, fmt: str) -> str:
    """One layer without its backing file: its own clusters only (unallocated reads as zeros)."""
    return "json:" + json.dumps({"driver": fmt, "backing": None, "file": {"driver": "file", "filename": path}})


def check_through_mount(env, mvm: str, pvm: str, expected: dict[str, bytes], tmp: str) -> None:
    """QEMU reads every chain, every layer and every internal snapshot through the mount as in the plaintext copy."""
    for name in sorted(os.listdir(pvm)):  # first the bytes: every file's plaintext view is the copy's
        with open(os.path.join(mvm, name), "rb") as a, open(os.path.join(pvm, name), "rb") as b:
            assert a.read() == b.read(), f"{name} reads differently through the mount"
    for name, fmt, backing, _ in LAYERS:
        m, p = os.path.join(mvm, name), os.path.join(pvm, name)
        # the whole chain below this layer (QEMU opens each parent through the mount by its hint)
        out = env.tool("qemu-img", "compare", "-f", fmt, "-F", fmt, m, p)
        assert b"Images are identical" in out.stdout, (name, out.stdout)
        if backing is not None:  # this layer alone, strictly: the same clusters allocated
            out = env.tool("qemu-img", "compare", "-s", _layer_alone(m, fmt), _layer_alone(p, fmt))
            assert b"Images are identical" in out.stdout, (name, out.stdout)
        info = json.loads(env.tool("qemu-img", "info", "--output=json", "--backing-chain", m).stdout)
        assert [i.get("backing-filename") for i in info][:1] == [backing], (name, info)
        env.tool("qemu-img", "check", "-q", m)
        raw = os.path.join(tmp, "top.raw")
        env.tool("qemu-img", "convert", "-f", fmt, "-O", "raw", m, raw)
        with open(raw, "rb") as f:
            assert f.read() == expected[name], f"{name}: the chain does not read what qemu-io wrote"
    m, p = os.path.join(mvm, "snaps.qcow2"), os.path.join(pvm, "snaps.qcow2")
    env.tool("qemu-img", "check", "-q", m)
    listed = env.tool("qemu-img", "snapshot", "-l", m).stdout.decode()
    for snap, _ in SNAPSHOTS:
        if snap is None:
            out = env.tool("qemu-img", "compare", "-s", "-f", "qcow2", "-F", "qcow2", m, p)
            assert b"Images are identical" in out.stdout
            continue
        assert f" {snap} " in listed, listed
        got, want = os.path.join(tmp, f"{snap}-mnt.raw"), os.path.join(tmp, f"{snap}-plain.raw")
        env.tool("qemu-img", "convert", "-l", f"snapshot.name={snap}", "-O", "raw", m, got)
        env.tool("qemu-img", "convert", "-l", f"snapshot.name={snap}", "-O", "raw", p, want)
        out = env.tool("qemu-img", "compare", "-f", "raw", "-F", "raw", got, want)
        assert b"Images are identical" in out.stdout, (snap, out.stdout)
        with open(got, "rb") as f:
            assert f.read() == expected[f"snaps.qcow2@{snap}"], f"snapshot {snap} does not hold its own data"
    current = os.path.join(tmp, "current.raw")
    env.tool("qemu-img", "convert", "-O", "raw", m, current)
    with open(current, "rb") as f:
        assert f.read() == expected["snaps.qcow2"]


def check_at_rest(vm: str, pvm: str, keys: dict[str, bytes]) -> dict[str, bytes]:
    """Nothing of the images is plaintext at rest; the independent reader decrypts each file. Returns each DEK."""
    deks = {}
    for name in sorted(os.listdir(pvm)):
        with open(os.path.join(vm, name), "rb") as f:
            stored = f.read()
        with open(os.path.join(pvm, name), "rb") as f:
            plain = f.read()
        got, where = read_plaintext(vm, name, keys)
        assert got == plain, f"{name}: the independent reader does not decrypt it"
        if name.endswith(".vmsd") or name in ("base.vmdk",):
            assert not is_encrypted(vm, name), name  # the plaintext kinds (FORMAT.md 7.2)
            continue
        # Every image file is encrypted (FORMAT.md 7.2): .qcow2, sparse deltas, the flat extent, .vmsn.
        assert is_encrypted(vm, name), f"{name} is stored in plaintext"
        keysafe, data, _ = find_key(vm, name)
        deks[name] = dek_of({"keySafe": keysafe, "data": data}, keys)
        assert len(stored) == len(plain)
        for magic in (b"QFI\xfb", b"KDMV", b"# Disk DescriptorFile", b"base.vmdk", b"snap1.vmdk", b"base.qcow2"):
            assert magic not in stored, f"{name}: {magic!r} is readable at rest"
        for pat in PATTERNS + [0x91]:
            assert bytes([pat]) * 64 not in stored, f"{name}: the pattern {pat:#x} is readable at rest"
        for s in range(0, len(plain), SECTOR):
            if any(plain[s:s + SECTOR]):
                assert stored[s:s + SECTOR] != plain[s:s + SECTOR], f"{name}: sector {s // SECTOR} is plaintext"
    return deks


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_a_snapshot_chain_is_encrypted_and_deep_rekeyed_and_qemu_reads_every_layer(venv_env, tmp_path):
    env = venv_env
    env.env["VMFS_CRYPT_REGION_SIZE"] = str(REGION)  # several regions per image: the in-place engine's path
    vm = os.path.join(env.ds, "vm1")
    expected = build_vm(env, vm)
    pvm = os.path.join(env.base, "plain", "vm1")
    shutil.copytree(vm, pvm)
    keys = key_file(env)
    scratch = str(tmp_path / "raw")
    os.makedirs(scratch)
    for name, fmt, _, _ in LAYERS:  # the test's premise: QEMU reads the plaintext copy as expected
        env.tool("qemu-img", "convert", "-f", fmt, "-O", "raw", os.path.join(pvm, name), os.path.join(scratch, "p"))
        with open(os.path.join(scratch, "p"), "rb") as f:
            assert f.read() == expected[name], name

    env.run("encrypt", vm)
    assert not os.path.exists(os.path.join(vm, ".vmfs-crypt-region"))
    deks = check_at_rest(vm, pvm, keys)
    assert set(deks) == {"base-flat.vmdk", "snap1.vmdk", "snap2.vmdk", "base.qcow2", "over.qcow2", "snaps.qcow2",
                         "vm1.vmsn"}, deks.keys()
    assert len(set(deks.values())) == len(deks), "two files share a DEK"
    with mounted(env) as mnt:
        check_through_mount(env, os.path.join(mnt, "vm1"), pvm, expected, scratch)

    env.run("rekey", "--deep", vm)
    with open(os.path.join(vm, ".vmfs-crypt.json"), "rb") as f:
        assert "reencrypt" not in json.loads(f.read()), "the deep rekey did not commit"
    new = check_at_rest(vm, pvm, keys)
    assert set(new) == set(deks)
    for name, old_dek in deks.items():
        assert new[name] != old_dek, f"{name} kept its DEK through a deep rekey"
        with open(os.path.join(vm, name), "rb") as f:
            stored = f.read()
        with open(os.path.join(pvm, name), "rb") as f:
            plain = f.read()
        assert_old_dek_decrypts_nothing(old_dek, stored, plain, name)
        assert decrypt_file(new[name], stored) == plain
    with mounted(env) as mnt:
        check_through_mount(env, os.path.join(mnt, "vm1"), pvm, expected, scratch)
