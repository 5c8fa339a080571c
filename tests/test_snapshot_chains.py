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
import signal
import subprocess
import sys
import time

import pytest

from support import mounted, sha256_file
from test_format_independent import (SECTOR, apply_journal, decrypt_file, find_key, is_encrypted, native_kek,
                                     parse_data, parse_locator, read_plaintext, unwrap)
from test_reencrypt import _stopped, assert_old_dek_decrypts_nothing, dek_of, key_file
from test_safety_ops import QemuIo

STOPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "support", "stopper.py")

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


# -- shallow rekey: every branch of a chain and a linked clone in another folder --------------------
# base/ holds a flat base disk with two branches (two deltas of the same parent) and an nvram file;
# clone/ is a linked clone: its delta's parent is ../base/base.vmdk, in the other encrypted folder.
BRANCHES = [("base/base.vmdk", None, ["write -P 0xa1 0 1M"]),
            ("base/branchA.vmdk", "base.vmdk", ["write -P 0xb1 1M 256k"]),
            ("base/branchB.vmdk", "base.vmdk", ["write -P 0xb2 1M 128k", "write -P 0xb3 0 4k"]),
            ("clone/clone.vmdk", "../base/base.vmdk", ["write -P 0xc1 2M 512k"])]
NVRAM = bytes(range(256)) * 33 + b"tail"  # a partial last sector


def build_linked_clone(env) -> dict[str, bytes]:
    """The two folders in plaintext; what each disk (with its chain) reads as."""
    expected: dict[str, bytes] = {}
    for rel, backing, writes in BRANCHES:
        path = os.path.join(env.ds, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if backing is None:
            env.tool("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, str(SIZE))
            raw = bytearray(SIZE)
        else:
            env.tool("qemu-img", "create", "-q", "-f", "vmdk", "-b", backing, "-F", "vmdk", path)
            raw = bytearray(expected[os.path.normpath(os.path.join(os.path.dirname(rel), backing))])
        for w in writes:
            env.tool("qemu-io", "-f", "vmdk", "-c", w, path)
            _apply(raw, w)
        expected[rel] = bytes(raw)
    for folder in ("base", "clone"):
        with open(os.path.join(env.ds, folder, f"{folder}.nvram"), "wb") as f:
            f.write(NVRAM)
    return expected


def compare_disks(env, mnt: str, plain: str, expected: dict[str, bytes], scratch: str) -> None:
    """Through the mount QEMU reads each disk's chain (the clone's crosses into base/) as the plaintext copy."""
    for rel, _, _ in BRANCHES:
        m, p = os.path.join(mnt, rel), os.path.join(plain, rel)
        out = env.tool("qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", m, p)
        assert b"Images are identical" in out.stdout, (rel, out.stdout)
        env.tool("qemu-img", "check", "-q", m)
        raw = os.path.join(scratch, "disk.raw")
        env.tool("qemu-img", "convert", "-f", "vmdk", "-O", "raw", m, raw)
        with open(raw, "rb") as f:
            assert f.read() == expected[rel], f"{rel} does not read what qemu-io wrote"
    for folder in ("base", "clone"):
        with open(os.path.join(mnt, folder, f"{folder}.nvram"), "rb") as f:
            assert f.read() == NVRAM


def keys_at_rest(folder: str) -> tuple[str, dict[str, tuple[str, str, str]]]:
    """(the folder's KEK id, {file: (provider, key id, where)}) for every encrypted file, by FORMAT.md 7.4 alone."""
    with open(os.path.join(folder, ".vmfs-crypt.json"), "rb") as f:
        folder_kek = json.loads(f.read())["kek"]["keyId"]
    out = {}
    for name in sorted(os.listdir(folder)):
        if is_encrypted(folder, name) and os.path.isfile(os.path.join(folder, name)):
            keysafe, _data, where = find_key(folder, name)
            provider, key_id, _ = parse_locator(keysafe)
            out[name] = (provider, key_id, where)
    return folder_kek, out


def assert_under_one_kek(folder: str, keys: dict[str, bytes], kek_id: str, other_id: str | None,
                         deks: dict[str, bytes]) -> None:
    """Every key of the folder is wrapped under `kek_id` and opens there to the same DEK; `other_id`'s KEK unwraps none."""
    folder_kek, found = keys_at_rest(folder)
    assert folder_kek == kek_id and {k for _, k, _ in found.values()} == {kek_id}, (kek_id, folder_kek, found)
    assert set(found) == set(deks), found
    for name in found:
        keysafe, data, _ = find_key(folder, name)
        provider, key_id, wrapped = parse_locator(keysafe)
        assert dek_of({"keySafe": keysafe, "data": data}, keys) == deks[name], f"{name}: the DEK changed"
        if other_id is not None:
            with pytest.raises(Exception) as err:
                unwrap(native_kek(keys[provider], other_id), wrapped, parse_data(data))
            assert type(err.value).__name__ == "InvalidUnwrap", f"{name}: the other KEK unwraps it"


def deks_at_rest(folder: str, keys: dict[str, bytes]) -> dict[str, bytes]:
    out = {}
    for name in keys_at_rest(folder)[1]:
        keysafe, data, _ = find_key(folder, name)
        out[name] = dek_of({"keySafe": keysafe, "data": data}, keys)
    return out


def data_hashes(folder: str) -> dict[str, str]:
    """Every encrypted file's bytes at rest: a shallow rekey changes none of them."""
    return {n: sha256_file(os.path.join(folder, n)) for n in keys_at_rest(folder)[1]}


@pytest.fixture
def linked_clone(venv_env):
    """Both folders encrypted, a plaintext copy of the datastore, the key file, the expected reads."""
    env = venv_env
    expected = build_linked_clone(env)
    plain = os.path.join(env.base, "plain")
    shutil.copytree(env.ds, plain)
    for folder in ("base", "clone"):
        env.run("encrypt", os.path.join(env.ds, folder))
    return env, plain, expected, key_file(env)


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_shallow_rekey_of_every_branch_and_a_linked_clone(linked_clone, tmp_path):
    env, plain, expected, keys = linked_clone
    scratch = str(tmp_path)
    for folder in ("base", "clone"):
        vm = os.path.join(env.ds, folder)
        old_id = keys_at_rest(vm)[0]
        deks, before = deks_at_rest(vm, keys), data_hashes(vm)
        assert set(deks) == ({"base-flat.vmdk", "branchA.vmdk", "branchB.vmdk", "base.nvram"} if folder == "base"
                             else {"clone.vmdk", "clone.nvram"}), deks.keys()
        assert_under_one_kek(vm, keys, old_id, None, deks)
        env.run("rekey", vm)
        new_id = keys_at_rest(vm)[0]
        assert new_id != old_id
        assert_under_one_kek(vm, keys, new_id, old_id, deks)  # the old KEK unwraps nothing of the folder
        assert data_hashes(vm) == before, "a shallow rekey rewrote data"
        assert apply_journal(vm) == "no journal" and not [n for n in os.listdir(vm) if n.startswith(".vmfs-crypt-")]
        for name in deks:  # the independent reader, under the new KEK only
            got, _ = read_plaintext(vm, name, keys)
            with open(os.path.join(plain, folder, name), "rb") as f:
                assert got == f.read(), name
        with mounted(env) as mnt:  # after each folder: the clone's chain spans a rekeyed and a not yet rekeyed folder
            compare_disks(env, mnt, plain, expected, scratch)


def _run_stopped(env, args: list[str], after: int) -> subprocess.Popen | None:
    """The real CLI, stopped at its `after`-th crash point (support/stopper.py) and SIGKILLed there; None if it finished first."""
    proc = subprocess.Popen([sys.executable, STOPPER, str(after)] + args, env=env.env, cwd=env.base,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _stopped(proc.pid):
            if proc.poll() is not None:
                assert proc.returncode == 0, proc.stderr.read().decode(errors="replace")
                return None
            assert time.monotonic() < deadline, "the stop point was not reached"
            time.sleep(0.005)  # polling a real condition (state T), with a deadline
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return proc


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.parametrize("folder", ["base", "clone"])
def test_a_shallow_rekey_killed_at_each_step_leaves_one_kek(linked_clone, tmp_path, folder):
    """SIGKILL before and after each rename of the shallow rekey's commit (the staged descriptors, the journal,
    the key file, each file put in place): after recovery every key of the folder is under the old KEK or under the
    new one, never some of each; the journal decides which (written: new, FORMAT.md 7.6)."""
    env, plain, expected, keys = linked_clone
    vm = os.path.join(env.ds, folder)
    pristine = str(tmp_path / "pristine")
    shutil.copytree(vm, pristine)
    old_id, deks = keys_at_rest(vm)[0], deks_at_rest(vm, keys)
    seen = {"old": 0, "new": 0}
    after = 0
    while True:
        after += 1
        shutil.rmtree(vm)
        shutil.copytree(pristine, vm)
        if _run_stopped(env, ["rekey", vm], after) is None:
            break  # the rekey made fewer renames: every step has been killed
        journal = os.path.exists(os.path.join(vm, ".vmfs-crypt-journal.json"))
        # The independent reader (FORMAT.md 7.6 then 7.4) on a copy of the killed folder ...
        copy = str(tmp_path / f"killed-{after}")
        shutil.copytree(vm, copy)
        assert apply_journal(copy) == ("rolled forward" if journal else "no journal")
        kek_id = keys_at_rest(copy)[0]
        assert (kek_id == old_id) != journal, (after, journal, kek_id)
        assert_under_one_kek(copy, keys, kek_id, None if kek_id == old_id else old_id, deks)
        # ... and the real mount's recovery agree, and QEMU reads every disk as before.
        with mounted(env) as mnt:
            compare_disks(env, mnt, plain, expected, str(tmp_path))
        assert keys_at_rest(vm) == keys_at_rest(copy), f"kill at point {after}: the mount recovered otherwise"
        assert_under_one_kek(vm, keys, kek_id, None if kek_id == old_id else old_id, deks)
        assert not [n for n in os.listdir(vm) if n.startswith(".vmfs-crypt-")], os.listdir(vm)
        seen["new" if journal else "old"] += 1
    assert seen["old"] >= 1 and seen["new"] >= 2, f"the kills did not straddle the commit point: {seen}"
    assert keys_at_rest(vm)[0] != old_id  # the last, unkilled run rekeyed it


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_shallow_rekey_while_qemu_holds_the_linked_clone_open_through_the_mount(linked_clone, tmp_path):
    """Online shallow rekey (FORMAT.md 10): both folders of the clone's chain get a new KEK while qemu-io
    has clone.vmdk, and through it base.vmdk and base-flat.vmdk, open through the mount."""
    env, plain, expected, keys = linked_clone
    ids = {f: keys_at_rest(os.path.join(env.ds, f))[0] for f in ("base", "clone")}
    deks = {f: deks_at_rest(os.path.join(env.ds, f), keys) for f in ("base", "clone")}
    extra = "write -P 0xd1 3M 64k"
    with mounted(env) as mnt:
        with QemuIo(env, "-t", "none", "-f", "vmdk", os.path.join(mnt, "clone", "clone.vmdk")) as q:
            q.wait_holds(os.path.join(mnt, "base", "base-flat.vmdk"))
            # base's data, the clone's own, and a range neither wrote (zeros of the base's flat extent)
            reads = [("read -P 0xa1 0 1M", "read 1048576/1048576"), ("read -P 0xc1 2M 512k", "read 524288/524288"),
                     ("read -P 0 1M 1M", "read 1048576/1048576")]
            for r, want in reads:
                q.run(r, want)
            for folder in ("base", "clone"):
                env.run("rekey", os.path.join(env.ds, folder))
            for r, want in reads:  # the open chain still reads its data ...
                q.run(r, want)
            q.run(extra, "wrote 65536/65536")  # ... and writes, which rewrites clone.vmdk's metadata too
            q.run("read -P 0xd1 3M 64k", "read 65536/65536")
            assert "Pattern verification failed" not in q.output.decode(errors="replace"), q.output
        for folder in ("base", "clone"):
            vm = os.path.join(env.ds, folder)
            new_id = keys_at_rest(vm)[0]
            assert new_id != ids[folder]
            assert_under_one_kek(vm, keys, new_id, ids[folder], deks[folder])
    env.tool("qemu-io", "-f", "vmdk", "-c", extra, os.path.join(plain, "clone", "clone.vmdk"))
    clone = bytearray(expected["clone/clone.vmdk"])
    _apply(clone, extra)
    expected = dict(expected, **{"clone/clone.vmdk": bytes(clone)})
    with mounted(env) as mnt:  # a fresh mount: only the new KEKs, and every disk as in the plaintext copy
        compare_disks(env, mnt, plain, expected, str(tmp_path))


def test_recovery_of_a_journal_also_removes_the_killed_writers_atomic_file(tmp_path):
    """The unit of what the kill test found: a writer killed while writing the key file of its journal
    leaves `.vmfs-crypt-atomic..vmfs-crypt.json.PID`; the recovery that applies the journal removes it."""
    from vmfs_crypt.format.folder import VmFolder
    from vmfs_crypt.format.journal import recover
    vm = tmp_path / "vm"
    vm.mkdir()
    golden = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "ds", "vm1")
    with open(os.path.join(golden, ".vmfs-crypt.json")) as f:
        keys = f.read()
    for name in os.listdir(golden):
        shutil.copy(os.path.join(golden, name), vm / name)
    (vm / ".vmfs-crypt-journal.json").write_text(json.dumps({"version": 1, "renames": [], "keys": keys}))
    (vm / ".vmfs-crypt-atomic..vmfs-crypt.json.4242").write_text(keys[:100])
    assert "finished" in recover(VmFolder(str(vm)))
    assert sorted(n for n in os.listdir(vm) if n.startswith(".vmfs-crypt")) == [".vmfs-crypt.json"]


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_a_deep_rekey_of_the_chain_killed_inside_a_region_reads_by_format_md_and_the_mount_finishes_it(venv_env,
                                                                                                    tmp_path):
    """SIGKILL of `rekey --deep` inside a region of a file in the middle of the folder: files finished, one in
    flight (with its sidecar) and files not started; the independent reader (FORMAT.md 7.8) reads every layer
    as the plaintext copy, and the next mount finishes the rekey before QEMU reads every layer through it."""
    from test_reencrypt import run_killed
    env = venv_env
    env.env["VMFS_CRYPT_REGION_SIZE"] = str(REGION)
    vm = os.path.join(env.ds, "vm1")
    expected = build_vm(env, vm)
    pvm = os.path.join(env.base, "plain", "vm1")
    shutil.copytree(vm, pvm)
    keys = key_file(env)
    env.run("encrypt", vm)
    deks = check_at_rest(vm, pvm, keys)
    st = run_killed(env, vm, ["rekey", "--deep"], 20, True, [0])
    states = {f["name"]: f for f in st["files"]}
    assert set(states) == set(deks)
    finished = [n for n, f in states.items() if f["boundary"] == f["size"]]
    current = next(f for f in st["files"] if f["boundary"] < f["size"])
    assert finished and current["boundary"] > 0 and any(f["boundary"] == 0 for f in st["files"]), st
    with open(os.path.join(vm, ".vmfs-crypt-region"), "rb") as f:
        assert json.loads(f.readline())["file"] == current["name"]
    for name in sorted(os.listdir(pvm)):
        got, where = read_plaintext(vm, name, keys)
        with open(os.path.join(pvm, name), "rb") as f:
            assert got == f.read(), f"{name}: unreadable by FORMAT.md in the middle of the deep rekey"
        assert (where == "reencrypt") == (name in deks), (name, where)
    scratch = str(tmp_path / "raw")
    os.makedirs(scratch)
    with mounted(env) as mnt:  # the mount resumes the deep rekey first (issue 10), then serves the folder
        check_through_mount(env, os.path.join(mnt, "vm1"), pvm, expected, scratch)
    new = check_at_rest(vm, pvm, keys)
    for name, old_dek in deks.items():
        assert new[name] != old_dek
        with open(os.path.join(vm, name), "rb") as f:
            stored = f.read()
        with open(os.path.join(pvm, name), "rb") as f:
            assert_old_dek_decrypts_nothing(old_dek, stored, f.read(), name)


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_internal_snapshots_taken_reverted_and_deleted_through_the_mount_survive_a_deep_rekey(venv_env, tmp_path):
    """After the encrypt, QEMU keeps using the internal snapshots through the mount: it takes one (s3), writes,
    reverts to s1 and deletes s2; a deep rekey of the folder keeps every snapshot as QEMU left it."""
    env = venv_env
    env.env["VMFS_CRYPT_REGION_SIZE"] = str(REGION)
    vm = os.path.join(env.ds, "vm1")
    expected = build_vm(env, vm)
    env.run("encrypt", vm)
    scratch = str(tmp_path)

    def read_snapshot(path: str, snap: str | None) -> bytes:
        raw = os.path.join(scratch, "snap.raw")
        env.tool("qemu-img", "convert", *(["-l", f"snapshot.name={snap}"] if snap else []), "-O", "raw", path, raw)
        with open(raw, "rb") as f:
            return f.read()

    later = bytearray(expected["snaps.qcow2"])
    _apply(later, "write -P 0xe1 3M 1M")
    with mounted(env) as mnt:
        img = os.path.join(mnt, "vm1", "snaps.qcow2")
        env.tool("qemu-img", "snapshot", "-c", "s3", img)
        env.tool("qemu-io", "-f", "qcow2", "-c", "write -P 0xe1 3M 1M", img)
        assert read_snapshot(img, None) == bytes(later)
        env.tool("qemu-img", "snapshot", "-a", "s1", img)
        env.tool("qemu-img", "snapshot", "-d", "s2", img)
        env.tool("qemu-img", "check", "-q", img)
        assert read_snapshot(img, None) == expected["snaps.qcow2@s1"], "the revert to s1 did not read back"
    with open(os.path.join(vm, "snaps.qcow2"), "rb") as f:
        stored = f.read()
    assert not stored.startswith(b"QFI\xfb") and bytes([0xe1]) * 64 not in stored, "QEMU's new data is plaintext at rest"
    env.run("rekey", "--deep", vm)
    with mounted(env) as mnt:
        img = os.path.join(mnt, "vm1", "snaps.qcow2")
        env.tool("qemu-img", "check", "-q", img)
        listed = env.tool("qemu-img", "snapshot", "-l", img).stdout.decode()
        assert " s1 " in listed and " s3 " in listed and " s2 " not in listed, listed
        assert read_snapshot(img, "s1") == expected["snaps.qcow2@s1"]
        assert read_snapshot(img, "s3") == expected["snaps.qcow2"]
        assert read_snapshot(img, None) == expected["snaps.qcow2@s1"]
