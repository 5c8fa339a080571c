"""Storage safety of the mount (issue 7, cases 1, 4, 5, 8, 9, 10, 12): real mounts, real tmpfs, real QEMU tools.

Each test states the rule it checks. Every mount-level test here failed on the code before
the fix (run them with VMFS_TEST_REPO=/work/baseline: the CLI and the mount then run the old
package); the two in-process ones (the FUSE table, the threaded cipher) check the new code only.
"""

import errno
import mmap
import os
import stat
import subprocess

import pytest

from support import VmfsEnv, mounted, tree_hashes
from support.safety import (MIB, Ballast, at_rest_plaintext, free_bytes, is_root, log_problems, mount_log_text,
                            tmpfs)

pytestmark = [pytest.mark.cli, pytest.mark.fuse]
needs_root = pytest.mark.skipif(not is_root(), reason="mounting a tmpfs needs root")
SECTOR = 512


def _pattern(tag: int, length: int) -> bytes:
    """Bytes that differ per write and per 4 KiB page, so that a lost or misplaced piece shows."""
    page = bytearray()
    out = bytearray()
    for p in range(-(-length // 4096)):
        page = (bytes([(tag * 37 + p) % 251 + 1]) * 4092) + p.to_bytes(4, "little")
        out += page
    return bytes(out[:length])


def _aligned(length: int) -> mmap.mmap:
    return mmap.mmap(-1, length)  # page-aligned, as O_DIRECT needs


# ==== case 1: disk full ======================================================================
@pytest.fixture
def full_env(tmp_path):
    """A datastore on a 64 MiB tmpfs (config outside it), ballast beside it; vm1 encrypted with a 64 MiB thin disk d.vmdk."""
    tm = str(tmp_path / "tmpfs")
    with tmpfs(tm, 64 * MIB):
        env = VmfsEnv(str(tmp_path), datastore=os.path.join(tm, "ds"))
        try:
            env.run("provider", "add", "native", "local")
            os.makedirs(os.path.join(env.datastore, "plain"))
            os.makedirs(os.path.join(env.datastore, "vm1"))
            env.run("create", os.path.join(env.datastore, "vm1", "d.vmdk"), "--size", "64M")
            env.ballast = Ballast(os.path.join(tm, "ballast"))
            yield env
        finally:
            env.cleanup()


FULL_CASES = [(chunk, direct, target) for target in ("new", "flat") for chunk in (4096, 65536, MIB)
              for direct in (False, True)]
PLAIN_CASES = [(MIB, False, "plain"), (65536, True, "plain"), (MIB, False, "log"), (65536, True, "log")]


def _fill_to_full(fd: int, chunk: int, tag: int, start: int) -> tuple[int, list[int]]:
    """Write `chunk`-byte pieces from `start` until the filesystem is full; (bytes acknowledged, short counts)."""
    off, shorts = start, []
    buf = _aligned(chunk)
    for i in range(10_000):
        buf[:] = _pattern(tag + i, chunk)
        try:
            n = os.pwrite(fd, buf, off)
        except OSError as exc:
            # libfuse 3 asks for asynchronous direct I/O (QEMU's aio=native needs it), and the
            # kernel then answers a short O_DIRECT write with EIO for the whole request
            # (fs/fuse/file.c fuse_get_res_by_io): refused, nothing of it acknowledged.
            assert exc.errno in (errno.ENOSPC, errno.EIO), (exc, chunk, start, off)
            return off - start, shorts
        if n < chunk:
            shorts.append(n)
            off += n
            # the rest of that piece: nothing more fits, so it must fail (not be acknowledged)
            with pytest.raises(OSError) as again:
                os.pwrite(fd, memoryview(buf)[n:], off)
            assert again.value.errno == errno.ENOSPC
            return off - start, shorts
        off += n
    raise AssertionError("the filesystem never filled up")


def _expected(chunk: int, tag: int, acked: int) -> bytes:
    return b"".join(_pattern(tag + i, chunk) for i in range(-(-acked // chunk)))[:acked]


@needs_root
def test_disk_full_acknowledges_only_what_is_stored(full_env):
    """A write crossing the full point returns what was stored (or ENOSPC), fsync is clean, and all of it is there.

    Buffered and O_DIRECT, 4 KiB to 1 MiB pieces; files created through the mount, holes of a
    `vmfs-crypt create` flat extent (sparse: writing into them needs space), a plain folder's
    file and a plaintext-kind file of an encrypted folder. The old code acknowledged whole
    1 MiB and 64 KiB writes of which 8-12 KiB were never stored.
    """
    env = full_env
    ds = env.datastore
    cases = FULL_CASES + PLAIN_CASES
    # each "flat" case writes its own 8 MiB of the holes of d-flat.vmdk
    names, starts = {}, {}
    for i, (_, _, target) in enumerate(cases):
        names[i] = {"new": f"vm1/n{i}.bin", "flat": "vm1/d-flat.vmdk", "plain": f"plain/p{i}.bin",
                    "log": f"vm1/x{i}.log"}[target]
        starts[i] = 8 * MIB * sum(1 for c in cases[:i] if c[2] == "flat") if target == "flat" else 0
    results = {}
    with mounted(env) as mnt:
        for i, (_, _, target) in enumerate(cases):
            if target != "flat":
                open(os.path.join(mnt, names[i]), "wb").close()  # created (and keyed) while there is room
        env.ballast.fill()
        for i, (chunk, direct, target) in enumerate(cases):
            # room for a few pieces, with the full point inside a piece (odd number of pages)
            env.ballast.free(3 * chunk + 2 * MIB)
            env.ballast.take(max(0, free_bytes(ds) - 3 * chunk - 5 * 4096 - (i % 3) * 4096))
            fd = os.open(os.path.join(mnt, names[i]), os.O_RDWR | (os.O_DIRECT if direct else 0))
            try:
                acked, shorts = _fill_to_full(fd, chunk, 10 * i, starts[i])
                os.fsync(fd)  # nothing acknowledged is pending: fsync must succeed
            finally:
                os.close(fd)
            results[i] = acked
            assert acked > 0, (i, chunk, direct, target)
            with open(os.path.join(mnt, names[i]), "rb") as f:
                f.seek(starts[i])
                got = f.read(acked)
            assert got == _expected(chunk, 10 * i, acked), f"case {cases[i]}: read back differs before remount"
            if target != "flat":
                assert os.path.getsize(os.path.join(mnt, names[i])) == acked, cases[i]
        assert not log_problems(env)
    env.ballast.free(64 * MIB)
    for i, (chunk, direct, target) in enumerate(cases):
        folder, name = os.path.split(os.path.join(ds, names[i]))
        plain = at_rest_plaintext(env, folder, name, starts[i], results[i])
        assert plain == _expected(chunk, 10 * i, results[i]), \
            f"case {cases[i]}: acknowledged bytes are not stored (independent reader)"
    with mounted(env) as mnt:
        for i, (chunk, direct, target) in enumerate(cases):
            with open(os.path.join(mnt, names[i]), "rb") as f:
                f.seek(starts[i])
                assert f.read(results[i]) == _expected(chunk, 10 * i, results[i]), f"case {cases[i]} after remount"


@needs_root
def test_disk_full_descriptor_write_back_fails_close_and_fsync(full_env):
    """A descriptor rewritten through the mount is stored at fsync/close; if that fails (ENOSPC), they fail.

    The old bytes (with their key lines) stay at rest, no temporary file is left taking space,
    and once there is room the same change is stored.
    """
    env = full_env
    vm = os.path.join(env.datastore, "vm1")
    backing = os.path.join(vm, "d.vmdk")
    with open(backing, "rb") as f:
        before = f.read()
    with mounted(env) as mnt:
        env.ballast.fill()
        path = os.path.join(mnt, "vm1", "d.vmdk")
        fd = os.open(path, os.O_RDWR)
        view = os.pread(fd, 4096, 0)
        pos = view.index(b'"lsilogic"')
        assert os.pwrite(fd, b'"buslogic"', pos) == 10
        with pytest.raises(OSError) as err:
            os.fsync(fd)
        assert err.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as err:
            os.close(fd)
        assert err.value.errno == errno.ENOSPC
        with open(backing, "rb") as f:
            assert f.read() == before, "a failed write-back changed the descriptor at rest"
        assert not [n for n in os.listdir(vm) if n.startswith(".vmfs-crypt-atomic")], "a temporary file was left"
        env.ballast.free(4 * MIB)
        fd = os.open(path, os.O_RDWR)
        assert os.pwrite(fd, b'"buslogic"', pos) == 10
        os.fsync(fd)
        os.close(fd)
        with open(backing, "rb") as f:
            after = f.read()
        assert after == before.replace(b'"lsilogic"', b'"buslogic"')
        assert not log_problems(env)


@needs_root
def test_disk_full_growth_fails_without_a_change(full_env):
    """Growing by fallocate, truncate or a write past the end that runs out of space fails and changes nothing.

    In particular a truncate to 512*k + 5 bytes must encrypt the new 5-byte last sector
    (FORMAT.md 3.4); when that write fails, the old size and tail come back, instead of a
    size change whose last bytes decrypt to garbage.
    """
    env = full_env
    data = _pattern(7, 1000)
    with mounted(env) as mnt:
        path = os.path.join(mnt, "vm1", "g.bin")
        with open(path, "wb") as f:
            f.write(data)
        env.ballast.fill()
        fd = os.open(path, os.O_RDWR)
        try:
            for attempt in ("fallocate", "truncate", "write"):
                with pytest.raises(OSError) as err:
                    if attempt == "fallocate":
                        os.posix_fallocate(fd, 0, 8 * MIB)
                    elif attempt == "truncate":
                        os.ftruncate(fd, 100 * 1024 + 5)
                    else:
                        os.pwrite(fd, b"x", 3 * MIB + 3)
                assert err.value.errno == errno.ENOSPC, attempt
                assert os.fstat(fd).st_size == 1000, attempt
                assert os.pread(fd, 2000, 0) == data, attempt
        finally:
            os.close(fd)
        # write-back of shared mmap pages into holes: the error reaches msync
        fd = os.open(os.path.join(mnt, "vm1", "d-flat.vmdk"), os.O_RDWR)
        try:
            with mmap.mmap(fd, MIB) as m:
                m[:] = b"z" * MIB
                with pytest.raises(OSError) as err:
                    m.flush()
                assert err.value.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert not log_problems(env)
    assert at_rest_plaintext(env, os.path.join(env.datastore, "vm1"), "g.bin") == data


# ==== case 4: hard links =====================================================================
@pytest.fixture
def two_folders(venv_env):
    """vm1 and vm2 encrypted (each with a thin disk d.vmdk), and a plain folder."""
    env = venv_env
    for vm in ("vm1", "vm2"):
        os.makedirs(os.path.join(env.datastore, vm))
        env.run("create", os.path.join(env.datastore, vm, "d.vmdk"), "--size", "1M")
    os.makedirs(os.path.join(env.datastore, "plain"))
    return env


def _folder_keys(env: VmfsEnv, vm: str) -> dict:
    import json
    with open(os.path.join(env.datastore, vm, ".vmfs-crypt.json"), "rb") as f:
        return json.load(f)["files"]


def test_hard_links_follow_the_rename_rule(two_folders):
    """link(2) never gives a file's bytes another kind; an allowed link shares one inode and one key.

    The old code refused the rename x.nvram -> x.log (EXDEV) but allowed the link: writes
    through x.log were then stored in clear inside the encrypted x.nvram.
    """
    env = two_folders
    secret = b"NVRAM-SECRET" * 400
    with mounted(env) as mnt:
        vm1, vm2, plain = (os.path.join(mnt, d) for d in ("vm1", "vm2", "plain"))
        with open(os.path.join(vm1, "x.nvram"), "wb") as f:
            f.write(secret)
        with open(os.path.join(vm1, "a.log"), "wb") as f:
            f.write(b"log\n")
        with open(os.path.join(plain, "p.bin"), "wb") as f:
            f.write(b"plain data")
        with open(os.path.join(plain, "q.log"), "wb") as f:
            f.write(b"plain log\n")
        refused = [
            ("vm1/x.nvram", "vm1/x.log"),        # encrypted -> plaintext name
            ("vm1/x.nvram", "vm1/x.VMX"),        # (suffixes compare case-insensitively)
            ("vm1/x.nvram", "plain/x.nvram"),    # encrypted -> plain folder
            ("vm1/d-flat.vmdk", "plain/d-flat.vmdk"),
            ("plain/p.bin", "vm1/p.bin"),        # plain file -> encrypted name
            ("vm1/a.log", "vm1/a.nvram"),        # plaintext kind -> encrypted name
            ("vm1/d.vmdk", "vm1/d2.vmdk"),       # descriptors: one name only
            ("vm1/d.vmdk", "vm2/e.vmdk"),
            ("vm1/d.vmdk", "vm1/d.txt"),
            ("vm1/d.vmdk", "plain/d.vmdk"),      # (its key lines would make the plain folder damaged)
        ]
        before = tree_hashes(env.datastore)
        for src, dst in refused:
            with pytest.raises(OSError) as err:
                os.link(os.path.join(mnt, src), os.path.join(mnt, dst))
            assert err.value.errno == errno.EXDEV, (src, dst)
            assert not os.path.lexists(os.path.join(mnt, dst)), (src, dst)
        assert tree_hashes(env.datastore) == before, "a refused link changed the datastore"
        # allowed: within and between encrypted folders, and plaintext kinds among themselves
        allowed = [("vm1/x.nvram", "vm1/y.nvram"), ("vm1/x.nvram", "vm2/x.nvram"),
                   ("vm1/d-flat.vmdk", "vm1/copy.bin"), ("plain/q.log", "vm1/q.log")]
        for src, dst in allowed:
            os.link(os.path.join(mnt, src), os.path.join(mnt, dst))
            assert os.stat(os.path.join(mnt, dst)).st_nlink >= 2
            # one inode at rest (the mount numbers its nodes itself: no use_ino)
            assert os.stat(os.path.join(env.datastore, src)).st_ino == os.stat(os.path.join(env.datastore, dst)).st_ino
        # one inode, one key: writes through one name are read through the other, O_DIRECT and buffered
        a = os.open(os.path.join(vm1, "y.nvram"), os.O_RDWR | os.O_DIRECT)
        b = os.open(os.path.join(vm2, "x.nvram"), os.O_RDWR)
        try:
            buf = _aligned(4096)
            buf[:] = b"\x42" * 4096
            assert os.pwrite(a, buf, 4096) == 4096
            assert os.pwrite(b, b"\x43" * 100, 50) == 100
            expect = bytearray(secret)
            expect[4096:8192] = b"\x42" * 4096
            expect[50:150] = b"\x43" * 100
            assert os.pread(b, 10000, 0) == bytes(expect)
        finally:
            os.close(a)
            os.close(b)
        with open(os.path.join(vm1, "x.nvram"), "rb") as f:
            assert f.read() == bytes(expect)
    keys1, keys2 = _folder_keys(env, "vm1"), _folder_keys(env, "vm2")
    assert keys1["x.nvram"] == keys1["y.nvram"] == keys2["x.nvram"], "one file, one key record"
    assert "copy.bin" in keys1, "a link of a descriptor-keyed extent gets a key entry of its own name"
    for vm, name in (("vm1", "x.nvram"), ("vm1", "y.nvram"), ("vm2", "x.nvram")):
        assert at_rest_plaintext(env, os.path.join(env.datastore, vm), name) == bytes(expect), (vm, name)
    with open(os.path.join(env.datastore, "vm1", "x.nvram"), "rb") as f:
        assert b"NVRAM-SECRET" not in f.read()
    with mounted(env) as mnt:
        for name in ("vm1/x.nvram", "vm1/y.nvram", "vm2/x.nvram"):
            with open(os.path.join(mnt, name), "rb") as f:
                assert f.read() == bytes(expect), name
        with open(os.path.join(mnt, "vm1", "q.log"), "rb") as f:
            assert f.read() == b"plain log\n"
        assert not log_problems(env)


# ==== case 5: symlinks =======================================================================
SECRET = b"TOP-SECRET-SYMLINK-PAYLOAD!" * 40


def test_symlinks_never_lead_out_of_the_datastore_or_across_the_encryption_boundary(venv_env, tmp_path):
    """Symlinks made at rest pointing outside, into a plain folder or at a plaintext name are not followed.

    Writes and reads through them fail (EIO, with a log line) and nothing lands anywhere in
    clear; a backing directory swapped for a symlink is not followed either; such symlinks
    cannot be made through the mount (EPERM) while admissible ones work; offline `cat`
    refuses a symlink. The old code followed all of them.
    """
    env = venv_env
    ds = env.datastore
    outside = str(tmp_path / "outside")
    os.makedirs(outside)
    for vm in ("vm1", "vm2"):
        os.makedirs(os.path.join(ds, vm))
        env.run("create", os.path.join(ds, vm, "d.vmdk"), "--size", "1M")
    os.makedirs(os.path.join(ds, "plain"))
    os.makedirs(os.path.join(ds, "vm1", "plainsub"))  # a directory without a key file, made at rest
    vm1 = os.path.join(ds, "vm1")
    with open(os.path.join(vm1, "x.log"), "wb") as f:
        f.write(b"log\n")
    at_rest = {  # name in vm1 -> target: none of them may be followed
        "out.nvram": os.path.join(outside, "out.nvram"),
        "rel-out.nvram": "../../../outside/rel.nvram",
        "up.nvram": "../plain/up.nvram",
        "clear.nvram": "x.log",
        "dir": "plainsub",
        "extent-flat.vmdk": "/etc/passwd",
    }
    for name, target in at_rest.items():
        os.symlink(target, os.path.join(vm1, name))
    os.symlink(outside, os.path.join(ds, "plain", "abs"))
    os.symlink("../../outside", os.path.join(ds, "plain", "esc"))
    with mounted(env) as mnt:
        m1 = os.path.join(mnt, "vm1")
        targets = [os.path.join(m1, n) for n in at_rest if n != "dir"] + [
            os.path.join(m1, "dir", "y.nvram"), os.path.join(mnt, "plain", "abs", "p.nvram"),
            os.path.join(mnt, "plain", "esc", "q.nvram")]
        for path in targets:
            with pytest.raises(OSError) as err:
                with open(path, "ab") as f:
                    f.write(SECRET)
            assert err.value.errno == errno.EIO, path
            with pytest.raises(OSError):
                with open(path, "rb") as f:
                    f.read()
        # a directory swapped for a symlink at rest while the mount has it cached
        m2 = os.path.join(mnt, "vm2")
        assert os.path.isdir(m2) and os.listdir(m2)
        os.rename(os.path.join(ds, "vm2"), os.path.join(ds, "vm2.moved"))
        os.makedirs(os.path.join(outside, "vm2"))
        os.symlink(os.path.join(outside, "vm2"), os.path.join(ds, "vm2"))
        with pytest.raises(OSError):
            with open(os.path.join(m2, "z.nvram"), "wb") as f:
                f.write(SECRET)
        with pytest.raises(OSError):
            os.listdir(os.path.join(m2, "."))
        # made through the mount: inadmissible ones are refused, admissible ones work
        os.mkdir(os.path.join(m1, "encsub"))
        with open(os.path.join(m1, "x.nvram"), "wb") as f:
            f.write(b"")
        refused = [("/etc/passwd", "vm1/a.nvram"), ("../plain/b.nvram", "vm1/b.nvram"), ("x.log", "vm1/c.nvram"),
                   ("x.nvram", "vm1/c.log"), ("plainsub", "vm1/s"), ("encsub/../../plain", "vm1/t"),
                   (outside, "plain/l"), ("../../outside", "plain/m"), ("sub/../../../x", "plain/n")]
        for target, name in refused:
            with pytest.raises(OSError) as err:
                os.symlink(target, os.path.join(mnt, name))
            assert err.value.errno == errno.EPERM, (target, name)
        for target, name in [("x.nvram", "vm1/ok.nvram"), ("x.log", "vm1/ok.log"), ("encsub", "vm1/sub2"),
                             ("../vm1/x.nvram", "plain/ok.nvram")]:
            os.symlink(target, os.path.join(mnt, name))
        with open(os.path.join(m1, "ok.nvram"), "wb") as f:
            f.write(SECRET)
        with open(os.path.join(m1, "sub2", "w.nvram"), "wb") as f:
            f.write(SECRET)
        with open(os.path.join(mnt, "plain", "ok.nvram"), "rb") as f:
            assert f.read() == SECRET  # through the mount, into the encrypted folder: decrypted
        assert "not followed" in mount_log_text(env)
        assert not log_problems(env)
    assert os.listdir(os.path.join(outside, "vm2")) == [] and sorted(os.listdir(outside)) == ["vm2"], \
        "something was written outside the datastore"
    assert sorted(os.listdir(os.path.join(ds, "plain"))) == ["abs", "esc", "ok.nvram"]
    assert os.listdir(os.path.join(vm1, "plainsub")) == []
    with open(os.path.join(vm1, "x.log"), "rb") as f:
        assert f.read() == b"log\n"
    for dirpath, _, files in os.walk(ds):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                with open(p, "rb") as f:
                    assert b"TOP-SECRET" not in f.read(), p
    assert at_rest_plaintext(env, vm1, "x.nvram") == SECRET
    # offline: cat never follows a symlink (one line, non-zero exit, nothing printed)
    for name in ("extent-flat.vmdk", "out.nvram", "ok.nvram"):
        proc = env.run("cat", os.path.join(vm1, name), check=False)
        err = proc.stderr.decode()
        assert proc.returncode != 0 and not proc.stdout, name
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


# ==== case 8: replacing a disk in the mount ==================================================
QPATTERN = bytes([0x5A, 0xC3, 0x96, 0x3C]) * 16


def _raw_source(env: VmfsEnv, path: str) -> None:
    """A 16 MiB raw image: the pattern at a few offsets (unaligned too), holes between."""
    env.tool("qemu-img", "create", "-q", "-f", "raw", path, "16M")
    with open(path, "r+b") as f:
        for off in (0, 4096 + 17, MIB, (9 << 20) + 511, (16 << 20) - 4096):
            f.seek(off)
            f.write(QPATTERN * 32)


def _record_ids(env: VmfsEnv, vm: str) -> dict[str, str]:
    """File name -> data record id of every key of the folder (descriptor lines and folder key file)."""
    import base64
    import json
    import re
    folder = os.path.join(env.datastore, vm)
    out = {}
    for name, entry in _folder_keys(env, vm).items():
        out[name] = json.loads(base64.b64decode(entry["data"]))["id"]
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".vmdk") and os.path.getsize(path) < MIB:
            raw = open(path, "rb").read()
            m = re.search(rb'encryption\.data = "([^"]+)"', raw)
            ext = re.search(rb'"([^"]+)"(?: \d+)?\s*$', raw.split(b"# Extent description")[-1].split(b"\n\n")[0].strip())
            if m and raw.startswith(b"# Disk DescriptorFile") and ext:
                out[f"{ext.group(1).decode()} (in {name})"] = json.loads(base64.b64decode(m.group(1)))["id"]
    return out


def _assert_no_plaintext_at_rest(folder: str) -> None:
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            assert QPATTERN not in data, f"the pattern is in {name} at rest"
            if not name.endswith((".log", ".json")) and not data.startswith(b"# Disk DescriptorFile"):
                assert not data.startswith(b"KDMV"), f"{name} is a plaintext sparse VMDK at rest"


@pytest.mark.qemu
def test_replacing_a_disk_in_the_mount_works_and_encrypts_the_new_image(venv_env, tmp_path):
    """qemu-img create / convert over an existing encrypted disk work as on any filesystem (case 8).

    The new image is encrypted at rest, the replaced file's key is dropped (a fresh DEK), an
    extent left behind keeps its key, the mount log has no traceback, and the disk opens
    after a remount. The old code failed with "Could not close the new file: Invalid
    argument" and a FormatError traceback from the descriptor flush.
    """
    env = venv_env
    vm = os.path.join(env.datastore, "vm1")
    os.makedirs(vm)
    env.run("create", os.path.join(vm, "disk.vmdk"), "--size", "16M")
    src = str(tmp_path / "src.raw")
    _raw_source(env, src)
    with mounted(env) as mnt:
        disk = os.path.join(mnt, "vm1", "disk.vmdk")
        env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x77 0 64k", disk)
        old_flat_id = _record_ids(env, "vm1")["disk-flat.vmdk (in disk.vmdk)"]
        steps = [
            ("create", []),  # monolithicSparse (QEMU's default) over a flat disk
            ("create", ["-o", "subformat=monolithicFlat"]),  # flat over sparse: the old flat extent is reused
            ("create", ["-o", "subformat=streamOptimized"]),
            ("convert", []),  # sparse over stream
            ("convert", ["-o", "subformat=monolithicFlat"]),
            ("convert", ["-o", "subformat=streamOptimized"]),
            ("convert", ["-o", "subformat=monolithicFlat"]),  # flat over stream, over the old flat extent
        ]
        flat_ids = [old_flat_id]
        for i, (op, opts) in enumerate(steps):
            if op == "create":
                env.tool("qemu-img", "create", "-q", "-f", "vmdk", *opts, disk, "100M")
                env.tool("qemu-img", "check", disk)
                if "streamOptimized" not in " ".join(opts):
                    env.tool("qemu-io", "-f", "vmdk", "-c", f"write -P 0x{0x30 + i:02x} 1000 70000",
                             "-c", f"read -P 0x{0x30 + i:02x} 1000 70000", disk)
                info = env.tool("qemu-img", "info", disk).stdout.decode()
                assert "virtual size: 100 MiB" in info, info
            else:
                env.tool("qemu-img", "convert", "-O", "vmdk", *opts, src, disk)
                env.tool("qemu-img", "check", disk)
                env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, disk)
            ids = _record_ids(env, "vm1")
            if "monolithicFlat" in " ".join(opts):
                flat_id = ids.get("disk-flat.vmdk") or ids.get("disk-flat.vmdk (in disk.vmdk)")
                assert flat_id and flat_id not in flat_ids, f"step {i}: the replaced extent's key was kept"
                flat_ids.append(flat_id)
            elif i == 0:
                # the flat extent left behind keeps its key (moved to the folder key file) and its data
                assert ids.get("disk-flat.vmdk") == old_flat_id
                with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
                    assert f.read(65536) == b"\x77" * 65536
            _assert_no_plaintext_at_rest(vm)
        # cp of a sparse image over the (flat) descriptor: O_TRUNC and the writes on one open file,
        # a second reader holding the descriptor open meanwhile
        sparse = str(tmp_path / "s.vmdk")
        env.tool("qemu-img", "convert", "-O", "vmdk", src, sparse)
        reader = os.open(disk, os.O_RDONLY)
        try:
            subprocess.run(["cp", sparse, disk], check=True)
            assert os.pread(reader, 4, 0) == b"KDMV"
        finally:
            os.close(reader)
        env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, disk)
        _assert_no_plaintext_at_rest(vm)
        assert "disk.vmdk" in _record_ids(env, "vm1")
        env.tool("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", src, disk)
        assert not log_problems(env)
        failures = [line for line in mount_log_text(env).splitlines() if "vm1/disk" in line and "failed" in line]
        assert not failures, failures
    _assert_no_plaintext_at_rest(vm)
    assert at_rest_plaintext(env, vm, "disk-flat.vmdk")[:16 * MIB] == open(src, "rb").read()
    with mounted(env) as mnt:
        env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, os.path.join(mnt, "vm1", "disk.vmdk"))
        assert not log_problems(env)


def test_keys_survive_descriptor_removal_and_extent_replacement(two_folders):
    """Where a key lives stays true when descriptors and extents are removed or replaced by name (case 8).

    rm of a descriptor keeps its extent readable (its key moves to the folder key file); a
    file renamed over a descriptor-keyed extent (rsync, `mv tmp disk-flat.vmdk`) or created
    after it was removed reads back as written, not under the old descriptor's key; `sed -i`
    of a descriptor (a new file renamed over it) keeps its extent readable; a descriptor
    that holds a key is not moved to another folder (EXDEV: its lines would key another file).
    """
    env = two_folders
    data1, data2, data3 = (_pattern(t, 300_000) for t in (1, 2, 3))
    with mounted(env) as mnt:
        vm1, vm2 = os.path.join(mnt, "vm1"), os.path.join(mnt, "vm2")
        for vm, data in ((vm1, data1), (vm2, data2)):
            with open(os.path.join(vm, "d-flat.vmdk"), "r+b") as f:
                f.write(data)
        os.unlink(os.path.join(vm1, "d.vmdk"))
        with open(os.path.join(vm1, "d-flat.vmdk"), "rb") as f:
            assert f.read(len(data1)) == data1
        with open(os.path.join(vm2, "tmp.bin"), "wb") as f:
            f.write(data3)
        with pytest.raises(OSError) as err:
            os.rename(os.path.join(vm2, "d.vmdk"), os.path.join(vm1, "d.vmdk"))
        assert err.value.errno == errno.EXDEV
        subprocess.run(["sed", "-i", "s/lsilogic/buslogic/", os.path.join(vm2, "d.vmdk")], check=True)
        with open(os.path.join(vm2, "d-flat.vmdk"), "rb") as f:
            assert f.read(len(data2)) == data2
        os.rename(os.path.join(vm2, "tmp.bin"), os.path.join(vm2, "d-flat.vmdk"))
        with open(os.path.join(vm2, "d-flat.vmdk"), "rb") as f:
            assert f.read() == data3
        os.unlink(os.path.join(vm2, "d-flat.vmdk"))
        with open(os.path.join(vm2, "d-flat.vmdk"), "wb") as f:
            f.write(data1)
        assert not log_problems(env)
    assert at_rest_plaintext(env, os.path.join(env.datastore, "vm1"), "d-flat.vmdk")[:len(data1)] == data1
    assert at_rest_plaintext(env, os.path.join(env.datastore, "vm2"), "d-flat.vmdk") == data1
    with mounted(env) as mnt:
        with open(os.path.join(mnt, "vm1", "d-flat.vmdk"), "rb") as f:
            assert f.read(len(data1)) == data1
        with open(os.path.join(mnt, "vm2", "d-flat.vmdk"), "rb") as f:
            assert f.read() == data1
        with open(os.path.join(mnt, "vm2", "d.vmdk"), "rb") as f:
            assert b"buslogic" in f.read()


# ==== case 9: resizing a flat extent =========================================================
@pytest.mark.qemu
def test_resizing_a_flat_extent_keeps_its_descriptor_true(venv_env):
    """qemu-img resize (shrink, grow, falloc) of a descriptor-keyed flat extent: the descriptor follows.

    The extent line's sector count is rewritten at rest and in an open descriptor view, a
    size that is not whole sectors is refused (EINVAL and a log line), and the disk opens
    after a remount. The old code accepted the shrink and then refused the disk with EIO
    ("it was truncated; restore it from a backup"), even to grow it back.
    """
    env = venv_env
    vm = os.path.join(env.datastore, "vm1")
    os.makedirs(vm)
    env.run("create", os.path.join(vm, "disk.vmdk"), "--size", "64M")
    with mounted(env) as mnt:
        disk, flat = os.path.join(mnt, "vm1", "disk.vmdk"), os.path.join(mnt, "vm1", "disk-flat.vmdk")
        env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x61 1M 64k", "-c", "write -P 0x62 60M 64k", disk)

        def virtual_size() -> str:
            import json
            return json.loads(env.tool("qemu-img", "info", "--output=json", disk).stdout)["virtual-size"]

        env.tool("qemu-img", "resize", "-q", "--shrink", "-f", "raw", flat, "32M")
        assert virtual_size() == 32 * MIB
        env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x61 1M 64k", disk)
        env.tool("qemu-img", "resize", "-q", "-f", "raw", flat, "80M")
        assert virtual_size() == 80 * MIB
        env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x61 1M 64k", "-c", "read -P 0 60M 64k", disk)
        env.tool("qemu-img", "resize", "-q", "-f", "raw", "--preallocation=falloc", flat, "96M")
        assert virtual_size() == 96 * MIB
        for bad in (1_000_000, 96 * MIB + 5):
            with pytest.raises(OSError) as err:
                os.truncate(flat, bad)
            assert err.value.errno == errno.EINVAL
            assert os.path.getsize(flat) == 96 * MIB
        # with the descriptor open and being rewritten (as QEMU does): the open view follows too
        fd = os.open(disk, os.O_RDWR)
        try:
            view = os.pread(fd, 4096, 0)
            os.truncate(flat, 48 * MIB)
            cid = view.index(b"CID=")
            os.pwrite(fd, b"CID=12345678", cid)
        finally:
            os.close(fd)
        assert virtual_size() == 48 * MIB
        env.tool("qemu-img", "check", disk)
        assert "truncate to 1000000 refused" in mount_log_text(env)
        assert not log_problems(env)
    with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
        raw = f.read()
    assert b"RW 98304 VMFS" in raw and b"CID=12345678" in raw and raw.count(b"encryption.keySafe") == 1
    with mounted(env) as mnt:
        disk = os.path.join(mnt, "vm1", "disk.vmdk")
        env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x61 1M 64k", "-c", "read -P 0 40M 64k", disk)
        env.tool("qemu-img", "check", disk)


# ==== case 10: errors under metadata faults ==================================================
def _snapshot(root: str) -> dict[str, tuple]:
    """Every entry under root: its type and (regular files) content hash; FIFOs are never opened."""
    import hashlib
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[os.path.relpath(p, root)] = ("file", hashlib.sha256(f.read()).hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                out[os.path.relpath(p, root)] = ("link", os.readlink(p))
            else:
                out[os.path.relpath(p, root)] = (stat.S_IFMT(st.st_mode),)
    return out


def _damage(folder: str, fault: str, good_keys: bytes) -> None:
    keys = os.path.join(folder, ".vmfs-crypt.json")
    if fault == "descriptor":
        with open(os.path.join(folder, "d.vmdk"), "rb") as f:
            raw = f.read()
        with open(os.path.join(folder, "d.vmdk"), "wb") as f:
            f.write(raw.replace(b'encryption.keySafe = "vmware:', b'encryption.keySafe = "vmwore:'))
        return
    os.unlink(keys)
    if fault == "truncated":
        with open(keys, "wb") as f:
            f.write(good_keys[:len(good_keys) // 2])
    elif fault == "wrong-format":
        with open(keys, "wb") as f:
            f.write(good_keys.replace(b'"vmfs-crypt-folder"', b'"something-else"'))
    elif fault == "directory":
        os.mkdir(keys)
    elif fault == "fifo":
        os.mkfifo(keys)
    elif fault == "symlink":
        os.symlink("../vm0/.vmfs-crypt.json", keys)
    elif fault == "deep":
        with open(keys, "wb") as f:
            f.write(b"[" * 200_000 + b"]" * 200_000)


FAULTS = ["truncated", "wrong-format", "directory", "fifo", "symlink", "deep", "descriptor"]


def _operations(d: str):
    """(name, namespace?, callable) of every FUSE operation on the files of the folder `d` (in the mount)."""
    def write(path):
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, b"w" * 700, 100)
        finally:
            os.close(fd)

    def read(path):
        with open(path, "rb") as f:
            f.read()

    def fallocate(path):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, 1 << 16)
        finally:
            os.close(fd)

    j = lambda n: os.path.join(d, n)  # noqa: E731
    return [
        ("getattr", False, lambda: os.stat(j("x.nvram"))),
        ("readdir", False, lambda: os.listdir(d)),
        ("open+read", False, lambda: read(j("x.nvram"))),
        ("read extent", False, lambda: read(j("d-flat.vmdk"))),
        ("read descriptor", False, lambda: read(j("d.vmdk"))),
        ("write", False, lambda: write(j("x.nvram"))),
        ("write extent", False, lambda: write(j("d-flat.vmdk"))),
        ("write descriptor", False, lambda: write(j("d.vmdk"))),
        ("truncate", False, lambda: os.truncate(j("x.nvram"), 100)),
        ("truncate extent", False, lambda: os.truncate(j("d-flat.vmdk"), 0)),
        ("fallocate", False, lambda: fallocate(j("x.nvram"))),
        ("chmod", False, lambda: os.chmod(j("x.nvram"), 0o640)),
        ("utimens", False, lambda: os.utime(j("x.nvram"), ns=(10**9, 10**9))),
        ("create", True, lambda: open(j("new.nvram"), "wb").close()),
        ("create .vmdk", True, lambda: open(j("new.vmdk"), "wb").close()),
        ("mkdir", True, lambda: os.mkdir(j("sub2"))),
        ("rmdir", True, lambda: os.rmdir(j("empty"))),
        ("symlink", True, lambda: os.symlink("x.nvram", j("s.nvram"))),
        ("link", True, lambda: os.link(j("x.nvram"), j("z.nvram"))),
        ("rename", True, lambda: os.rename(j("x.nvram"), j("y.nvram"))),
        ("rename extent", True, lambda: os.rename(j("d-flat.vmdk"), j("e-flat.vmdk"))),
        ("rename descriptor", True, lambda: os.rename(j("d.vmdk"), j("e.vmdk"))),
        ("unlink descriptor", True, lambda: os.unlink(j("e.vmdk" if os.path.lexists(j("e.vmdk")) else "d.vmdk"))),
        ("unlink", True, lambda: os.unlink(j("u.nvram"))),
        ("unlink log", True, lambda: os.unlink(j("x.log"))),
    ]


def test_metadata_faults_give_errno_answers_and_change_nothing(venv_env):
    """Every operation under every fault of the key metadata gets an errno answer, never an internal error.

    Faults: the folder key file truncated, of another format, a directory, a FIFO, a
    symlink, deeply nested JSON; a descriptor with a malformed encryption line. The mount
    log shows no traceback and no "internal error", and a refused namespace operation
    leaves the backing tree as it was. (Mode 000 is no fault for root: not tested.) The old
    code deleted the file and then failed an unlink, left a subfolder without its key entry
    after a mkdir, and answered EINVAL with a traceback.
    """
    env = venv_env
    ds = env.datastore
    vm0 = os.path.join(ds, "vm0")
    os.makedirs(vm0)
    env.run("create", os.path.join(vm0, "d.vmdk"), "--size", "1M")
    with mounted(env) as mnt:
        with open(os.path.join(mnt, "vm0", "x.nvram"), "wb") as f:
            f.write(b"n" * 3000)
        with open(os.path.join(mnt, "vm0", "u.nvram"), "wb") as f:
            f.write(b"u" * 3000)
        with open(os.path.join(mnt, "vm0", "x.log"), "wb") as f:
            f.write(b"log\n")
        os.mkdir(os.path.join(mnt, "vm0", "empty"))
    with open(os.path.join(vm0, ".vmfs-crypt.json"), "rb") as f:
        good_keys = f.read()
    for fault in FAULTS:
        folder = os.path.join(ds, f"f-{fault}")
        subprocess.run(["cp", "-a", vm0, folder], check=True)
        _damage(folder, fault, good_keys)
    answers: dict[tuple[str, str], str] = {}
    with mounted(env) as mnt:
        for fault in FAULTS:
            for name, namespace, op in _operations(os.path.join(mnt, f"f-{fault}")):
                before = _snapshot(ds)
                try:
                    op()
                    answers[fault, name] = "ok"
                except OSError as exc:
                    answers[fault, name] = errno.errorcode.get(exc.errno, str(exc.errno))
                    if namespace:
                        assert _snapshot(ds) == before, f"{fault}: a refused {name} changed the datastore"
        problems = log_problems(env)
    assert not problems, "\n".join(problems)
    for fault in FAULTS:
        # nothing encrypted of a folder whose keys are unreadable is served, or changed
        if fault != "descriptor":
            for name in ("open+read", "read extent", "write", "write extent", "create", "mkdir", "link", "rename",
                         "unlink", "unlink descriptor"):
                assert answers[fault, name] != "ok", (fault, name, answers[fault, name])
        else:
            for name in ("read extent", "write extent", "truncate extent", "unlink descriptor"):
                assert answers[fault, name] != "ok", (fault, name, answers[fault, name])
    assert all(a in ("ok", "EIO", "EACCES", "EXDEV", "ENOENT", "EINVAL", "EPERM") for a in answers.values()), answers


def test_every_fuse_operation_maps_errors_in_one_place(caplog):
    """Each operation of the FUSE table goes through fuse_op (init, which has no errno, logs one line)."""
    import mfusepy

    from vmfs_crypt.fuse import adapter
    table = adapter.FuseOperations
    ops = [n for n, v in vars(table).items() if callable(v) and not n.startswith("_")]
    assert {"getattr", "open", "create", "write", "truncate", "fallocate", "link", "symlink", "rename"} <= set(ops)
    for name in ops:
        # lseek reaches us through adapter.VmfsFuse (mfusepy 3.1.1 has no wrapper for it)
        assert name in vars(mfusepy.Operations) or name == "lseek", f"{name} is not an mfusepy operation"
        if name != "init_with_config":
            assert getattr(vars(table)[name], "__wrapped__", None) is not None, f"{name} bypasses fuse_op"

    def boom():
        raise RuntimeError("the ready pipe is gone")
    with caplog.at_level("ERROR", logger="vmfs_crypt.fs"):
        table(core=None, on_init=boom).init_with_config(None, None)  # must not raise: mfusepy would print a traceback
    assert [r.getMessage() for r in caplog.records] == ["init: RuntimeError: the ready pipe is gone"]
    # an unexpected exception of an operation: one line, EIO, no traceback
    err = adapter.to_errno(KeyError("x"), "write", "/vm1/a")
    assert err == errno.EIO


# ==== case 12: concurrent writers, checked at rest ===========================================
def _record(sector: int, writer: int, seq: int) -> bytes:
    """A 512-byte sector that says which write of which writer put it at which sector."""
    head = b"REC1" + sector.to_bytes(8, "little") + writer.to_bytes(2, "little") + seq.to_bytes(6, "little")
    return (head * 26)[:SECTOR]


class _Writers:
    """Writer threads with exact models of what they wrote, a shared error list and a progress count."""

    def __init__(self, env: VmfsEnv) -> None:
        import threading
        self.env = env
        self.errors: list[str] = []
        self.ops = 0
        self.lock = threading.Lock()
        self.threads: list = []

    def start(self, fn, *args) -> None:
        import threading

        def run():
            try:
                fn(*args)
            except Exception as exc:  # reported by check()
                self.errors.append(f"{fn.__name__}{args[:1]}: {type(exc).__name__}: {exc}")
        t = threading.Thread(target=run)
        t.start()
        self.threads.append(t)

    def done_op(self) -> None:
        with self.lock:
            self.ops += 1

    def reopen(self, path: str, flags: int) -> int:
        """Open, waiting out an agent outage (EACCES: the key of a file nobody holds open cannot be fetched)."""
        import time
        deadline = time.monotonic() + 30
        while True:
            try:
                return os.open(path, flags)
            except PermissionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def join(self) -> None:
        for t in self.threads:
            t.join()
        assert not self.errors, self.errors


def _agent_pid(env: VmfsEnv) -> int | None:
    import re
    proc = env.run("agent", "status", check=False)
    m = re.search(r"agent (\d+) on", proc.stdout.decode() + proc.stderr.decode())
    return int(m.group(1)) if m else None


def test_concurrent_writers_with_agent_restarts_leave_the_right_ciphertext_at_rest(venv_env):
    """Several writers (buffered and O_DIRECT, overlapping and disjoint, unaligned edges, a growing tail,
    two names of one file) while the agent is killed and restarted; then every byte is checked at rest
    with the independent reader of FORMAT.md, not through the page cache (case 12).
    """
    import random
    import signal
    env = venv_env
    vm = os.path.join(env.datastore, "vm1")
    os.makedirs(vm)
    env.run("create", os.path.join(vm, "d.vmdk"), "--size", "4M")
    env.run("create", os.path.join(vm, "r.vmdk"), "--size", "1M")
    w = _Writers(env)
    replaced: list[bytes] = []
    region = 100_003  # unaligned: neighbouring writers share the sectors at their borders
    edges_model = [bytearray(region) for _ in range(4)]
    halves_model = [bytearray(64 * SECTOR), bytearray(64 * SECTOR)]  # two writers, one half of each sector
    edges_written = [0] * 4  # highest end each writer reached
    tail_model = bytearray()
    inner_model = bytearray(65536)
    flat_model = [bytearray(2 * MIB), bytearray(2 * MIB)]
    rec_log: list[list[tuple[int, int, int]]] = [[], [], []]  # writer -> [(seq, first sector, count)]
    rec_sectors = 4096  # a 2 MiB file of records

    with mounted(env) as mnt:
        m = os.path.join(mnt, "vm1")
        for name in ("edges.bin", "records.bin", "tail.bin"):
            open(os.path.join(m, name), "wb").close()
        with open(os.path.join(m, "halves.bin"), "wb") as f:
            f.write(bytes(64 * SECTOR))
        os.link(os.path.join(m, "halves.bin"), os.path.join(m, "halves-link.bin"))
        os.link(os.path.join(m, "edges.bin"), os.path.join(m, "edges-link.bin"))
        os.link(os.path.join(m, "records.bin"), os.path.join(m, "records-link.bin"))

        def edges_writer(i: int) -> None:
            rng = random.Random(100 + i)
            name = "edges.bin" if i % 2 else "edges-link.bin"
            flags = os.O_RDWR | (os.O_DIRECT if i >= 2 else 0)
            fd = w.reopen(os.path.join(m, name), flags)
            base = i * region
            for n in range(120):
                if n % 25 == 24:
                    os.close(fd)
                    fd = w.reopen(os.path.join(m, name), flags)
                off = rng.randrange(0, region - 1)
                length = min(rng.choice([1, 15, 17, 511, 513, 4096, rng.randrange(1, 30000)]), region - off)
                data = rng.randbytes(length)
                assert os.pwrite(fd, data, base + off) == length
                edges_model[i][off:off + length] = data
                edges_written[i] = max(edges_written[i], off + length)
                w.done_op()
            os.close(fd)

        def halves_writer(i: int) -> None:
            # Each sector is read, merged and rewritten by both writers, through two names of
            # one file: only one lock per backing inode keeps both halves.
            rng = random.Random(500 + i)
            fd = w.reopen(os.path.join(m, ("halves.bin", "halves-link.bin")[i]), os.O_RDWR | os.O_DIRECT)
            half = SECTOR // 2
            for n in range(400):
                s0 = rng.randrange(0, 64 - 4)
                for s in range(s0, s0 + 4):
                    data = rng.randbytes(half)
                    assert os.pwrite(fd, data, s * SECTOR + i * half) == half
                    halves_model[i][s * SECTOR + i * half:s * SECTOR + (i + 1) * half] = data
                w.done_op()
            os.close(fd)

        def replacer() -> None:
            # write a new extent beside the old one, fsync, rename it over, close: the common "atomic
            # replace". The old code moved the key entry but left r.vmdk's key lines, which win: the
            # data read back right while the file was open, and as garbage after a remount.
            rng = random.Random(600)
            for n in range(4):
                data = rng.randbytes(MIB)
                fd = w.reopen(os.path.join(m, "r-flat.vmdk.tmp"), os.O_RDWR | os.O_CREAT)
                assert os.pwrite(fd, data, 0) == MIB
                os.fsync(fd)
                os.rename(os.path.join(m, "r-flat.vmdk.tmp"), os.path.join(m, "r-flat.vmdk"))
                with open(os.path.join(m, "r-flat.vmdk"), "rb") as f:
                    assert f.read() == data
                os.close(fd)
                replaced.append(data)
                w.done_op()

        def records_writer(i: int) -> None:
            rng = random.Random(200 + i)
            direct = i != 1
            name = "records.bin" if i != 2 else "records-link.bin"
            flags = os.O_RDWR | (os.O_DIRECT if direct else 0)
            fd = w.reopen(os.path.join(m, name), flags)
            buf = _aligned(MIB)
            for seq in range(1, 60):
                count = rng.choice([8, 64, 256, 2048])
                first = rng.randrange(0, rec_sectors - count + 1)
                if direct:
                    first -= first % 8  # O_DIRECT at page-aligned offsets
                payload = b"".join(_record(first + k, i, seq) for k in range(count))
                buf[:len(payload)] = payload
                assert os.pwrite(fd, memoryview(buf)[:len(payload)], first * SECTOR) == len(payload)
                rec_log[i].append((seq, first, count))
                w.done_op()
            os.close(fd)

        def tail_appender() -> None:
            rng = random.Random(300)
            fd = w.reopen(os.path.join(m, "tail.bin"), os.O_RDWR)
            for n in range(200):
                data = rng.randbytes(rng.randrange(1, 3000))
                assert os.pwrite(fd, data, 65536 + len(tail_model)) == len(data)
                tail_model.extend(data)
                if n % 50 == 49:
                    os.ftruncate(fd, 65536 + len(tail_model) - 7)  # a short tail now and then
                    del tail_model[-7:]
                w.done_op()
            os.close(fd)

        def tail_inner() -> None:
            rng = random.Random(301)
            fd = w.reopen(os.path.join(m, "tail.bin"), os.O_RDWR | os.O_DIRECT)
            for n in range(100):
                off = rng.randrange(0, 65536 - 1)
                data = rng.randbytes(min(rng.randrange(1, 9000), 65536 - off))
                assert os.pwrite(fd, data, off) == len(data)
                inner_model[off:off + len(data)] = data
                w.done_op()
            os.close(fd)

        def flat_writer(i: int) -> None:
            rng = random.Random(400 + i)
            fd = w.reopen(os.path.join(m, "d-flat.vmdk"), os.O_RDWR | os.O_DIRECT)
            buf = _aligned(MIB)
            for n in range(30):
                off = rng.randrange(0, 2 * MIB // 4096) * 4096
                length = min(rng.choice([4096, 65536, MIB]), 2 * MIB - off)
                data = rng.randbytes(length)
                buf[:length] = data
                assert os.pwrite(fd, memoryview(buf)[:length], i * 2 * MIB + off) == length
                flat_model[i][off:off + length] = data
                w.done_op()
            os.close(fd)

        for i in range(4):
            w.start(edges_writer, i)
        for i in range(3):
            w.start(records_writer, i)
        for i in range(2):
            w.start(halves_writer, i)
        w.start(replacer)
        w.start(tail_appender)
        w.start(tail_inner)
        for i in range(2):
            w.start(flat_writer, i)
        # two agent restarts while they write: killed (SIGKILL) at set points of progress
        import time
        killed = []
        for at in (150, 500):
            deadline = time.monotonic() + 60
            while w.ops < at and any(t.is_alive() for t in w.threads) and time.monotonic() < deadline:
                time.sleep(0.02)
            pid = _agent_pid(env)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                env.run("agent", "start")
        w.join()
        assert len(killed) == 2 and w.ops >= 500, (killed, w.ops)
        assert not log_problems(env)

    def plain(name: str) -> bytes:
        return at_rest_plaintext(env, vm, name)

    # disjoint regions, exact
    edges = plain("edges.bin")
    size = max(i * region + edges_written[i] for i in range(4) if edges_written[i])
    assert len(edges) == size
    for i in range(4):
        got = edges[i * region:(i + 1) * region]
        assert got == bytes(edges_model[i][:len(got)]), f"edges writer {i}: wrong bytes at rest"
    assert plain("r-flat.vmdk") == replaced[-1], "the replaced extent is not under the key that opens it"
    halves = plain("halves.bin")
    for i in range(2):
        for s in range(64):
            lo, hi = s * SECTOR + i * SECTOR // 2, s * SECTOR + (i + 1) * SECTOR // 2
            assert halves[lo:hi] == halves_model[i][lo:hi], f"halves.bin sector {s}: writer {i}'s half was lost"
    tail = plain("tail.bin")
    assert tail[:65536] == bytes(inner_model) and tail[65536:] == bytes(tail_model)
    flat = plain("d-flat.vmdk")
    assert flat[:2 * MIB] == bytes(flat_model[0]) and flat[2 * MIB:4 * MIB] == bytes(flat_model[1])
    # overlapping records: each sector is a whole record of a write that covered it, the last one of its writer
    records = plain("records.bin")
    last = {}
    for i, log in enumerate(rec_log):
        for seq, first, count in log:
            for s in range(first, first + count):
                last[s, i] = seq
    for s in range(len(records) // SECTOR):
        sector = records[s * SECTOR:(s + 1) * SECTOR]
        if not any(sector):
            assert not any((s, i) in last for i in range(3)), f"sector {s}: written, reads as a hole"
            continue
        head = sector[:20]
        assert head[:4] == b"REC1", f"sector {s}: not a record: garbage at rest"
        at, writer, seq = (int.from_bytes(head[4:12], "little"), int.from_bytes(head[12:14], "little"),
                           int.from_bytes(head[14:20], "little"))
        assert sector == _record(at, writer, seq) and at == s, f"sector {s}: a torn or misplaced record"
        assert last.get((s, writer)) == seq, f"sector {s}: record of write {seq} of writer {writer}, not its last"
    with mounted(env) as mnt:  # and the mount reads the same after a remount
        with open(os.path.join(mnt, "vm1", "edges-link.bin"), "rb") as f:
            assert f.read() == edges


def test_sector_cipher_shared_by_threads_gives_the_single_threaded_bytes():
    """The pooled scratch arrays and cipher contexts of crypto/xts.py under concurrency (case 12).

    Eight threads encrypt and decrypt with four shared ciphers, in sizes from one sector to
    2 MiB (several 256 KiB chunks of one scratch set) and odd tails; every result must equal
    the one computed alone beforehand.
    """
    import random
    import threading

    from vmfs_crypt.crypto.xts import SectorCipher, new_dek
    ciphers = [SectorCipher(new_dek()) for _ in range(4)]
    rng = random.Random(7)
    jobs = []
    for _ in range(120):
        size = rng.choice([SECTOR, 4096, 65536, 300 * SECTOR + 17, MIB, 2 * MIB, 5 * SECTOR + 5])
        jobs.append((rng.randrange(4), rng.randrange(0, 2**40), rng.randbytes(size)))
    expected = [(bytes(ciphers[c].encrypt(s, d)), d) for c, s, d in jobs]
    errors = []

    def worker(k: int) -> None:
        order = list(range(len(jobs)))
        random.Random(k).shuffle(order)
        for j in order:
            c, s, d = jobs[j]
            ct = ciphers[c].encrypt(s, d)
            if bytes(ct) != expected[j][0] or bytes(ciphers[c].decrypt(s, ct)) != d:
                errors.append((k, j))
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
