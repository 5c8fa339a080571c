"""One offline operation per folder at a time: a POSIX record lock on FOLDER/.vmfs-crypt-op.lock.

Offline operations (encrypt, decrypt, rekey, create) stage temporary files in the folder and
recovery deletes temporary files that no journal names. Without this lock a second operation,
or the recovery of a mount starting meanwhile, deleted the first one's staged files and the
first one's commit then named files that were gone (issue 7, case 2). fcntl record locks work
on NFS too. The file exists only while the lock is held: it is unlinked before it is released,
and a process that locked a file that was unlinked meanwhile tries again.
"""

import errno
import fcntl
import json
import os
import socket

from ..errors import InUseError
from ..sysutil import posix_lock_conflict, proc_cmdline
from .folder import HIDDEN_PREFIX

OP_LOCK_NAME = HIDDEN_PREFIX + "-op.lock"
_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


def _holder_text(fd: int, path: str) -> str:
    """Who holds the lock: what they wrote into the file, checked against what the kernel says."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, UnicodeError, RecursionError, OSError):
        info = {}
    if not isinstance(info, dict):
        info = {}
    try:
        conflict = posix_lock_conflict(fd, exclusive=True)
    except OSError:
        conflict = None
    pid = conflict[1] if conflict and conflict[1] > 0 else info.get("pid")
    what = info.get("what") if info.get("pid") == pid else None
    if what is None and isinstance(pid, int) and info.get("host") in (None, socket.gethostname()):
        what = proc_cmdline(pid)
    host = info.get("host")
    where = f" on host {host}" if isinstance(host, str) and host != socket.gethostname() else ""
    return f"pid {pid}{where} ({what or '?'})" if pid else f"another process (see {path})"


class FolderOpLock:
    """`with FolderOpLock(dir, "vmfs-crypt encrypt ...")`: exclusive, never waits (InUseError names the holder)."""

    def __init__(self, folder_dir: str, what: str) -> None:
        self.path = os.path.join(folder_dir, OP_LOCK_NAME)
        self.what = what
        self.fd = -1

    def acquire(self) -> None:
        for _ in range(100):  # another process may unlink the file between our open and our lock
            fd = os.open(self.path, _OPEN_FLAGS, 0o600)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EAGAIN):
                    os.close(fd)
                    raise
                holder = _holder_text(fd, self.path)
                os.close(fd)
                raise InUseError(f"{os.path.dirname(self.path)} is being changed by another vmfs-crypt operation, "
                                 f"{holder}; wait for it to finish (nothing was changed)") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what[:200]}
            os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
            self.fd = fd
            return
        raise InUseError(f"{self.path}: cannot take the folder's operation lock (it keeps being replaced)")

    def release(self) -> None:
        if self.fd >= 0:
            try:
                os.unlink(self.path)  # while still holding it: nobody can lock this inode and keep it
            except FileNotFoundError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FolderOpLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
