"""POSIX ownership, special files and hard links through an allow_other mount, by real other users (issue 12)."""

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading

import pytest

from support import VmfsEnv, mounted
from support.users import unix_user

pytestmark = [pytest.mark.cli, pytest.mark.fuse]

FOLDERS = ["vm1", "plain"]  # vm1: encrypted (vmfs-crypt create); plain: no folder key file
# Run as another user: the system Python, plain os calls (the venv under /root is not theirs).
USER_PY = "/usr/bin/python3"


@pytest.fixture(scope="module")
def mount():
    """One allow_other mount of a datastore with an encrypted and a plain folder, reachable by every user."""
    if os.geteuid() != 0:
        pytest.skip("needs root (other users, device nodes)")
    base = tempfile.mkdtemp(prefix="vcr-posix-", dir="/tmp")
    os.chmod(base, 0o755)  # other users must reach the mount point
    env = VmfsEnv(base)
    try:
        env.run("provider", "add", "native", "local")
        for folder in FOLDERS:
            os.makedirs(os.path.join(env.datastore, folder))
        env.run("create", os.path.join(env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
        with mounted(env, os.path.join(base, "mnt"), "--allow-other") as mnt:
            yield env, mnt
    finally:
        env.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def where(mount, request):
    """(mount folder, backing folder) of a fresh world-writable directory inside vm1 or plain."""
    env, mnt = mount
    folder = request.param
    name = f"t-{request.node.name.split('[')[0][-20:]}-{os.urandom(3).hex()}"
    path = os.path.join(mnt, folder, name)
    os.mkdir(path)
    os.chmod(path, 0o777)
    yield path, os.path.join(env.datastore, folder, name)
    shutil.rmtree(path, ignore_errors=True)


def as_user(user, code: str, *groups: int) -> subprocess.CompletedProcess:
    """Run Python `code` as `user` (umask 0; supplementary `groups`, else none), its stdout returned."""
    argv = ["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            "--", USER_PY, "-c", "import os, errno, stat, socket\nos.umask(0)\n" + code]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return proc


def owner(path: str) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid


@pytest.mark.parametrize("where", FOLDERS, indirect=True)
def test_entries_made_by_another_user_are_theirs(where):
    """File, folder, symlink, FIFO and socket node made by a real other user: its uid and gid, its exact mode."""
    path, backing = where
    with unix_user("posix") as user:
        as_user(user, f"""
d = {path!r}
os.close(os.open(os.path.join(d, 'f.bin'), os.O_CREAT | os.O_WRONLY, 0o640))
os.mkdir(os.path.join(d, 'sub'), 0o750)
os.symlink('f.bin', os.path.join(d, 'lnk.bin'))
os.mkfifo(os.path.join(d, 'fifo'), 0o620)
os.mknod(os.path.join(d, 'sock'), stat.S_IFSOCK | 0o600)
""")
        for name, mode in [("f.bin", 0o640), ("sub", 0o750), ("lnk.bin", None), ("fifo", 0o620), ("sock", 0o600)]:
            for where_ in (path, backing):  # as the mount shows it, and at rest
                p = os.path.join(where_, name)
                assert owner(p) == (user.uid, user.gid), (p, owner(p))
                if mode is not None:
                    assert stat.S_IMODE(os.lstat(p).st_mode) == mode, (p, oct(os.lstat(p).st_mode))
        assert stat.S_ISFIFO(os.lstat(os.path.join(path, "fifo")).st_mode)
        assert stat.S_ISSOCK(os.lstat(os.path.join(path, "sock")).st_mode)


@pytest.mark.parametrize("where", FOLDERS, indirect=True)
def test_setgid_directory_gives_its_group(where):
    """In a setgid directory of another group, new entries get that group, and new folders stay setgid."""
    path, backing = where
    with unix_user("posix") as user, unix_user("grp") as other:
        shared = os.path.join(path, "shared")
        os.mkdir(shared)
        os.chown(shared, 0, other.gid)
        os.chmod(shared, 0o2777)
        as_user(user, f"""
d = {shared!r}
os.close(os.open(os.path.join(d, 'f.bin'), os.O_CREAT | os.O_WRONLY, 0o644))
os.mkdir(os.path.join(d, 'sub'), 0o755)
os.mkfifo(os.path.join(d, 'fifo'), 0o644)
""")
        for name in ("f.bin", "sub", "fifo"):
            assert owner(os.path.join(shared, name)) == (user.uid, other.gid), name
            assert owner(os.path.join(backing, "shared", name)) == (user.uid, other.gid), name
        assert os.lstat(os.path.join(shared, "sub")).st_mode & stat.S_ISGID
        assert not os.lstat(os.path.join(shared, "f.bin")).st_mode & stat.S_ISGID


@pytest.mark.parametrize("where", FOLDERS, indirect=True)
def test_chown_by_unprivileged_owner(where):
    """The owner may give its file to one of its own groups; not to another user, nor to a group it is not in."""
    path, backing = where
    with unix_user("posix") as user, unix_user("grp") as other:
        out = as_user(user, f"""
p = os.path.join({path!r}, 'f.bin')
os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o644))
os.chown(p, -1, {other.gid})
for uid, gid in (({other.uid}, -1), (-1, {user.gid + 100000})):
    try:
        os.chown(p, uid, gid)
        print('allowed', uid, gid)
    except OSError as exc:
        print(errno.errorcode[exc.errno])
""", other.gid)
        assert out.stdout.split() == ["EPERM", "EPERM"], out.stdout
        assert owner(os.path.join(path, "f.bin")) == (user.uid, other.gid)
        assert owner(os.path.join(backing, "f.bin")) == (user.uid, other.gid)


def folder_keys(backing_dir: str) -> dict:
    """The key entries of the encrypted folder whose subfolder `backing_dir` is (or which it is)."""
    with open(os.path.join(backing_dir, ".vmfs-crypt.json")) as f:
        return json.load(f)["files"]


@pytest.mark.parametrize("where", FOLDERS, indirect=True)
def test_fifo_socket_and_device_nodes(where):
    """FIFO, socket and char device nodes: made, shown with their type and rdev, removed; no key entry for them."""
    path, backing = where
    rdev = os.makedev(1, 3)
    os.mkfifo(os.path.join(path, "fifo"), 0o600)
    os.mknod(os.path.join(path, "null"), stat.S_IFCHR | 0o600, rdev)
    os.mknod(os.path.join(path, "sock"), stat.S_IFSOCK | 0o600)
    for where_ in (path, backing):
        assert stat.S_ISFIFO(os.lstat(os.path.join(where_, "fifo")).st_mode)
        st = os.lstat(os.path.join(where_, "null"))
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == rdev, (where_, oct(st.st_mode), st.st_rdev)
        assert stat.S_ISSOCK(os.lstat(os.path.join(where_, "sock")).st_mode)
    assert sorted(n for n in os.listdir(path)) == ["fifo", "null", "sock"]
    if os.path.basename(os.path.dirname(backing)) == "vm1":
        assert not set(folder_keys(backing)) & {"fifo", "null", "sock"}  # nothing to encrypt: no key
    for name in ("fifo", "null", "sock"):
        os.unlink(os.path.join(path, name))
        assert not os.path.lexists(os.path.join(backing, name))
    assert os.listdir(path) == []


@pytest.mark.parametrize("where", FOLDERS, indirect=True)
def test_fifo_passes_data(where):
    """A writer and a reader meet at a FIFO in the mount; the bytes pass through."""
    path, _ = where
    fifo = os.path.join(path, "pipe")
    os.mkfifo(fifo, 0o600)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    reader.start()
    payload = os.urandom(100_000)  # more than a pipe buffer: the reader must drain it
    with open(fifo, "wb") as w:
        w.write(payload)
    reader.join(timeout=30)
    assert not reader.is_alive() and got == [payload]


@pytest.mark.parametrize("where", FOLDERS, indirect=True)
def test_hard_links_share_inode_and_count(where):
    """Two names of one file: one st_ino and st_nlink 2, as the backing file; right after rename and unlink."""
    path, backing = where
    data = os.urandom(5000)
    a, b, c = (os.path.join(path, n) for n in ("a.bin", "b.bin", "c.bin"))
    with open(a, "wb") as f:
        f.write(data)
    assert os.lstat(a).st_nlink == 1  # the kernel now holds a's attributes
    os.link(a, b)
    assert os.lstat(a).st_nlink == 2  # not a's cached count
    assert stat.S_IMODE(os.lstat(b).st_mode) == stat.S_IMODE(os.lstat(a).st_mode)
    os.chmod(b, 0o604)  # seen through the other name at once
    assert stat.S_IMODE(os.lstat(a).st_mode) == 0o604

    def check(names, nlink):
        backing_st = os.lstat(os.path.join(backing, os.path.basename(names[0])))
        for name in names:
            st = os.lstat(name)
            assert (st.st_ino, st.st_nlink) == (backing_st.st_ino, nlink), (name, st.st_ino, st.st_nlink)
            assert os.lstat(os.path.join(backing, os.path.basename(name))).st_nlink == nlink
            with open(name, "rb") as f:
                assert f.read() == data
    check([a, b], 2)
    os.rename(b, c)
    check([a, c], 2)
    os.unlink(a)
    check([c], 1)


def test_rename_over_an_empty_encrypted_folder(mount):
    """A folder renamed over an empty subfolder of an encrypted folder replaces it (its key file is ours)."""
    env, mnt = mount
    src, dst = os.path.join(mnt, "vm1", "ren-src"), os.path.join(mnt, "vm1", "ren-dst")
    os.mkdir(src)
    os.mkdir(dst)
    with open(os.path.join(src, "x.bin"), "wb") as f:
        f.write(b"kept")
    os.rename(src, dst)
    with open(os.path.join(dst, "x.bin"), "rb") as f:
        assert f.read() == b"kept"
    assert not os.path.exists(src)
    with open(os.path.join(dst, "y.bin"), "wb"):
        pass
    os.mkdir(src)
    with pytest.raises(OSError) as exc:
        os.rename(src, dst)  # not empty in the mount either
    assert exc.value.errno in (errno.ENOTEMPTY, errno.EEXIST)
    assert os.path.exists(os.path.join(env.datastore, "vm1", "ren-src", ".vmfs-crypt.json"))
    shutil.rmtree(dst)
    os.rmdir(src)
