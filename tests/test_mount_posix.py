"""POSIX behaviour through the mount, checked against the same operations on a plain file (a small fsx)."""

import errno
import mmap
import os
import random
import subprocess
import threading

import pytest

from support import mounted, tree_hashes

pytestmark = [pytest.mark.cli, pytest.mark.fuse, pytest.mark.qemu]

SECTOR = 512


@pytest.fixture
def enc_env(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
    return venv_env


def punch(fd: int, off: int, length: int) -> None:
    subprocess.run(["fallocate", "-p", "-o", str(off), "-l", str(length), f"/proc/self/fd/{fd}"],
                   check=True, pass_fds=(fd,))


def test_random_ops_match_a_plain_file(enc_env, tmp_path):
    """Unaligned writes, tiny and odd sizes, truncate both ways, punch-hole, reads: byte-identical to ext4/tmpfs."""
    rng = random.Random(20261124)
    with mounted(enc_env) as mnt:
        enc_path = os.path.join(mnt, "vm1", "fsx.bin")
        ref_path = str(tmp_path / "ref.bin")
        enc = os.open(enc_path, os.O_RDWR | os.O_CREAT, 0o600)
        ref = os.open(ref_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for step in range(600):
                size = os.fstat(ref).st_size
                op = rng.choice(["write", "write", "write", "truncate", "punch", "read"])
                # offsets cluster around sector edges and small sizes to hit partial sectors < 16 bytes
                off = rng.choice([rng.randrange(0, 300_000), rng.randrange(0, 40) * SECTOR + rng.choice([-3, 0, 1, 15, 16, 17, 511])])
                off = max(0, off)
                if op == "write":
                    data = rng.randbytes(rng.choice([1, 7, 15, 16, 17, 511, 512, 513, 4096, rng.randrange(1, 70_000)]))
                    assert os.pwrite(enc, data, off) == len(data)
                    os.pwrite(ref, data, off)
                elif op == "truncate":
                    new = rng.choice([0, off, size + rng.randrange(0, 5000), max(0, size - rng.randrange(0, 5000)),
                                      rng.randrange(0, 40) * SECTOR + rng.choice([1, 5, 15, 16, 100])])
                    os.ftruncate(enc, new)
                    os.ftruncate(ref, new)
                elif op == "punch" and size:
                    length = rng.randrange(1, 20_000)
                    punch(enc, off, length)
                    punch(ref, off, length)
                assert os.fstat(enc).st_size == os.fstat(ref).st_size, f"size differs after step {step} ({op})"
                rd_off, rd_len = rng.randrange(0, size + 1000), rng.randrange(1, 80_000)
                assert os.pread(enc, rd_len, rd_off) == os.pread(ref, rd_len, rd_off), f"data differs after step {step} ({op})"
            os.fsync(enc)
        finally:
            os.close(enc)
            os.close(ref)
        with open(ref_path, "rb") as f:
            expected = f.read()
    with mounted(enc_env) as mnt:
        with open(os.path.join(mnt, "vm1", "fsx.bin"), "rb") as f:
            assert f.read() == expected
    with open(os.path.join(enc_env.datastore, "vm1", "fsx.bin"), "rb") as f:
        assert f.read() != expected


def test_sparse_files_stay_sparse(enc_env):
    with mounted(enc_env) as mnt:
        path = os.path.join(mnt, "vm1", "sparse.bin")
        with open(path, "wb") as f:
            f.seek(100 << 20)
            f.write(b"end")
        with open(path, "rb") as f:
            assert f.read(1 << 20) == bytes(1 << 20)
            f.seek(100 << 20)
            assert f.read() == b"end"
    st = os.stat(os.path.join(enc_env.datastore, "vm1", "sparse.bin"))
    assert st.st_size == (100 << 20) + 3
    assert st.st_blocks * 512 < (1 << 20), "unwritten ranges were allocated in the backing file"


def test_punch_hole_frees_backing_blocks(enc_env):
    with mounted(enc_env) as mnt:
        path = os.path.join(mnt, "vm1", "discard.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(4 << 20))
        backing = os.path.join(enc_env.datastore, "vm1", "discard.bin")
        before = os.stat(backing).st_blocks
        fd = os.open(path, os.O_RDWR)
        try:
            punch(fd, 1000, (3 << 20))
            assert os.pread(fd, 3 << 20, 1000) == bytes(3 << 20)
        finally:
            os.close(fd)
        assert os.stat(backing).st_blocks < before - (2 << 20) // 512


def test_names_and_metadata(enc_env):
    with mounted(enc_env) as mnt:
        vm = os.path.join(mnt, "vm1")
        assert ".vmfs-crypt.json" not in os.listdir(vm)
        with pytest.raises(FileNotFoundError):
            os.stat(os.path.join(vm, ".vmfs-crypt.json"))
        with open(os.path.join(vm, "vm1.nvram"), "wb") as f:
            f.write(b"NVRAM" * 1000)
        with open(os.path.join(vm, "vmware.log"), "w") as f:
            f.write("log line\n")
        os.rename(os.path.join(vm, "vm1.nvram"), os.path.join(vm, "renamed.nvram"))
        os.chmod(os.path.join(vm, "renamed.nvram"), 0o640)
        os.utime(os.path.join(vm, "renamed.nvram"), ns=(1_000_000_000, 2_000_000_000))
        st = os.stat(os.path.join(vm, "renamed.nvram"))
        assert (st.st_mode & 0o777, st.st_mtime_ns, st.st_size) == (0o640, 2_000_000_000, 5000)
        os.mkdir(os.path.join(vm, "sub"))
        with open(os.path.join(vm, "sub", "x.vmem"), "wb") as f:
            f.write(b"MEMORY" * 100)
        with open(os.path.join(vm, "renamed.nvram"), "rb") as f:
            assert f.read() == b"NVRAM" * 1000
        # renaming an encrypted file to a plaintext-class name would change what its bytes mean
        with pytest.raises(OSError) as exc:
            os.rename(os.path.join(vm, "renamed.nvram"), os.path.join(vm, "renamed.log"))
        assert exc.value.errno == errno.EXDEV
        os.unlink(os.path.join(vm, "sub", "x.vmem"))
        os.rmdir(os.path.join(vm, "sub"))
    backing = os.path.join(enc_env.datastore, "vm1")
    with open(os.path.join(backing, "renamed.nvram"), "rb") as f:
        assert b"NVRAM" not in f.read()
    with open(os.path.join(backing, "vmware.log"), "rb") as f:
        assert f.read() == b"log line\n"  # logs stay plaintext, as in vSphere
    with open(os.path.join(backing, ".vmfs-crypt.json")) as f:
        keys = f.read()
    assert '"renamed.nvram"' in keys and '"vm1.nvram"' not in keys
    with mounted(enc_env) as mnt:
        with open(os.path.join(mnt, "vm1", "renamed.nvram"), "rb") as f:
            assert f.read() == b"NVRAM" * 1000


def test_concurrent_writers_and_readers_never_see_torn_sectors(enc_env):
    """Writers rewrite whole sectors with one repeated byte; readers must never see two values in a sector.

    O_DIRECT on both sides, as QEMU's cache=none: every request reaches the daemon, whose per-file
    reader/writer lock makes each request atomic. (Buffered I/O goes through the kernel's page
    cache, which copies pages without sector atomicity: a plain FUSE passthrough tears there too.)
    """
    sectors = 64
    with mounted(enc_env) as mnt:
        path = os.path.join(mnt, "vm1", "race.bin")
        with open(path, "wb") as f:
            f.write(bytes([1]) * SECTOR * sectors)
        errors: list[str] = []
        stop = threading.Event()

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            fd = os.open(path, os.O_RDWR | os.O_DIRECT)
            buf = mmap.mmap(-1, 8 * SECTOR)  # page-aligned, as O_DIRECT needs
            try:
                for _ in range(1500):
                    first = rng.randrange(0, sectors - 8)
                    count = rng.randrange(1, 8)
                    buf[:SECTOR * count] = bytes([rng.randrange(1, 256)]) * SECTOR * count
                    os.pwrite(fd, memoryview(buf)[:SECTOR * count], first * SECTOR)
            finally:
                os.close(fd)

        def reader() -> None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            buf = mmap.mmap(-1, SECTOR * sectors)
            try:
                while not stop.is_set():
                    os.preadv(fd, [buf], 0)
                    data = bytes(buf)
                    for i in range(sectors):
                        sector = data[i * SECTOR:(i + 1) * SECTOR]
                        if sector.count(sector[0]) != SECTOR:
                            errors.append(f"torn sector {i}")
                            return
            finally:
                os.close(fd)

        writers = [threading.Thread(target=writer, args=(s,)) for s in range(3)]
        readers = [threading.Thread(target=reader) for _ in range(2)]
        for t in writers + readers:
            t.start()
        for t in writers:
            t.join()
        stop.set()
        for t in readers:
            t.join()
        assert not errors, errors


def test_fio_verify_through_the_mount(enc_env):
    with mounted(enc_env) as mnt:
        target = os.path.join(mnt, "vm1", "fio.bin")
        for extra in (["--rw=randwrite", "--bs=4k", "--direct=1"],
                      ["--rw=randrw", "--bsrange=512-64k", "--bs_unaligned=1"],
                      ["--rw=write", "--bs=1M", "--direct=1"]):
            enc_env.tool("fio", "--name=verify", f"--filename={target}", "--size=16M", "--ioengine=psync",
                         "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
                         "--numjobs=1", *extra)
    with open(os.path.join(enc_env.datastore, "vm1", "fio.bin"), "rb") as f:
        data = f.read(1 << 20)
    assert data.count(0) < len(data) // 10  # ciphertext, not fio's plaintext headers
    assert b"verify" not in data


def test_descriptor_view_round_trip(enc_env):
    """Tools editing a descriptor through the mount keep the key lines at rest, in any shape of write."""
    backing = os.path.join(enc_env.datastore, "vm1", "disk.vmdk")
    before = tree_hashes(os.path.join(enc_env.datastore, "vm1"))
    with mounted(enc_env) as mnt:
        path = os.path.join(mnt, "vm1", "disk.vmdk")
        with open(path, "rb") as f:
            view = f.read()
        assert os.path.getsize(path) == len(view)
        edited = view.replace(b'ddb.adapterType = "lsilogic"', b'ddb.adapterType = "ide"') + bytes(300)
        with open(path, "r+b") as f:
            f.write(edited)
        with open(path, "rb") as f:
            assert f.read() == edited
    with open(backing, "rb") as f:
        raw = f.read()
    assert b'ddb.adapterType = "ide"' in raw and raw.count(b"encryption.keySafe") == 1
    assert tree_hashes(os.path.join(enc_env.datastore, "vm1"))["disk-flat.vmdk"] == before["disk-flat.vmdk"]
    with mounted(enc_env) as mnt:
        enc_env.tool("qemu-img", "info", os.path.join(mnt, "vm1", "disk.vmdk"))


def test_rename_over_an_open_file_switches_keys(enc_env):
    """After `mv a b`, new opens of b read a's data with a's key; handles open on the old b keep theirs."""
    with mounted(enc_env) as mnt:
        vm = os.path.join(mnt, "vm1")
        for name, byte in (("a.nvram", b"A"), ("b.nvram", b"B")):
            with open(os.path.join(vm, name), "wb") as f:
                f.write(byte * 3000)
        old_b = open(os.path.join(vm, "b.nvram"), "rb")
        try:
            os.rename(os.path.join(vm, "a.nvram"), os.path.join(vm, "b.nvram"))
            with open(os.path.join(vm, "b.nvram"), "rb") as f:
                assert f.read() == b"A" * 3000
            assert old_b.read() == b"B" * 3000
        finally:
            old_b.close()
        assert sorted(os.listdir(vm)) == ["b.nvram", "disk-flat.vmdk", "disk.vmdk"]
    with mounted(enc_env) as mnt:
        with open(os.path.join(mnt, "vm1", "b.nvram"), "rb") as f:
            assert f.read() == b"A" * 3000


def test_descriptor_unlinked_while_open_stays_deleted(enc_env):
    with mounted(enc_env) as mnt:
        path = os.path.join(mnt, "vm1", "disk.vmdk")
        f = open(path, "r+b")
        try:
            f.write(b"# Disk DescriptorFile\n")
            os.unlink(path)
        finally:
            f.close()
        assert not os.path.exists(path)
    assert not os.path.exists(os.path.join(enc_env.datastore, "vm1", "disk.vmdk"))


def test_descriptor_keeps_vmdk_name(enc_env):
    with mounted(enc_env) as mnt:
        vm = os.path.join(mnt, "vm1")
        with pytest.raises(OSError) as exc:
            os.rename(os.path.join(vm, "disk.vmdk"), os.path.join(vm, "disk.bak"))
        assert exc.value.errno == errno.EXDEV
        os.rename(os.path.join(vm, "disk.vmdk"), os.path.join(vm, "renamed.vmdk"))
        enc_env.tool("qemu-img", "info", os.path.join(vm, "renamed.vmdk"))
