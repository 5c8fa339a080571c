"""What the FUSE adapter adds over mfusepy on libfuse 3: rename flags, UTIME_NOW/OMIT, lseek, options, inode numbers."""

import ctypes
import errno
import os
import subprocess
import time

import pytest

from support import mounted

pytestmark = [pytest.mark.cli, pytest.mark.fuse]
_libc = ctypes.CDLL(None, use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
AT_FDCWD = -100


def renameat2(a: str, b: str, flags: int) -> int:
    if _libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), flags) == 0:
        return 0
    return ctypes.get_errno()


@pytest.fixture
def enc_env(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    os.makedirs(os.path.join(venv_env.datastore, "plain"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "8M")
    return venv_env


@pytest.mark.parametrize("folder", ["vm1", "plain"])
def test_rename_exchange_is_refused_and_noreplace_is_honoured(enc_env, folder):
    with mounted(enc_env) as mnt:
        a, b = os.path.join(mnt, folder, "a.nvram"), os.path.join(mnt, folder, "b.nvram")
        for path, byte in ((a, b"A"), (b, b"B")):
            with open(path, "wb") as f:
                f.write(byte * 5000)
        assert renameat2(a, b, RENAME_EXCHANGE) == errno.EINVAL  # mfusepy turned this into a plain rename
        assert renameat2(a, b, RENAME_NOREPLACE) == errno.EEXIST
        for path, byte in ((a, b"A"), (b, b"B")):
            with open(path, "rb") as f:
                assert f.read() == byte * 5000, "nothing was replaced"
        c = os.path.join(mnt, folder, "c.nvram")
        assert renameat2(a, c, RENAME_NOREPLACE) == 0
        with open(c, "rb") as f:
            assert f.read() == b"A" * 5000


def test_touch_sets_now_and_omit_keeps(enc_env):
    with mounted(enc_env) as mnt:
        path = os.path.join(mnt, "vm1", "t.nvram")
        with open(path, "wb") as f:
            f.write(b"x")
        os.utime(path, ns=(1_000_000_000, 2_000_000_000))
        before = time.time_ns()
        subprocess.run(["touch", "-m", path], check=True)  # utimensat(atime UTIME_OMIT, mtime UTIME_NOW)
        st = os.stat(path)
        assert st.st_atime_ns == 1_000_000_000, "UTIME_OMIT kept atime"
        assert st.st_mtime_ns >= before - 1_000_000_000, "UTIME_NOW set mtime to now, not to 1970"


def test_seek_hole_and_data_follow_the_backing_file(enc_env):
    with mounted(enc_env) as mnt:
        path = os.path.join(mnt, "vm1", "disk-flat.vmdk")
        fd = os.open(path, os.O_RDWR)
        try:
            os.pwrite(fd, os.urandom(65536), 4 << 20)
            assert os.lseek(fd, 0, os.SEEK_DATA) == 4 << 20
            assert os.lseek(fd, 4 << 20, os.SEEK_HOLE) == (4 << 20) + 65536
            assert os.lseek(fd, 0, os.SEEK_HOLE) == 0
        finally:
            os.close(fd)


def test_hard_links_show_one_inode_and_the_mount_its_type(enc_env):
    with mounted(enc_env) as mnt:
        a, b = os.path.join(mnt, "plain", "a"), os.path.join(mnt, "plain", "b")
        with open(a, "wb") as f:
            f.write(b"data")
        os.link(a, b)
        sa, sb = os.stat(a), os.stat(b)
        assert sa.st_ino == sb.st_ino == os.stat(os.path.join(enc_env.datastore, "plain", "a")).st_ino
        assert sa.st_nlink == 2
        assert {n for n in os.listdir(os.path.join(mnt, "plain"))} == {"a", "b"}
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", mnt], capture_output=True, text=True).stdout
        assert out.split() == ["fuse.vmfs-crypt", os.path.realpath(enc_env.datastore)]  # issue 9


def test_max_read_option_mounts(enc_env):
    with mounted(enc_env, None, "-o", "max_read=65536") as mnt:
        with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
            assert f.read(200_000) == bytes(200_000)
