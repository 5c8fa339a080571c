"""One mount per datastore: a POSIX record lock on a file at the datastore root (works on NFS, unlike a pid file alone).

The mount process holds an exclusive lock on DATASTORE/.vmfs-crypt-mount.lock for its whole
life and writes its pid and mount point into the file; a second mount, and every offline
operation on a folder of that datastore, sees the lock and refuses with the holder's name.
"""

import fcntl
import json
import os

from ..errors import InUseError
from ..format.folder import HIDDEN_PREFIX

LOCK_NAME = HIDDEN_PREFIX + "-mount.lock"


def _read_info(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, UnicodeError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder(fd: int, path: str) -> str:
    info = _read_info(fd)
    if not info:
        return f"by another process (see {path})"
    return f"by pid {info.get('pid')} at {info.get('mountpoint')}"


def lock_info(datastore: str) -> dict:
    """What the mount holding the lock wrote: {"pid": ..., "mountpoint": ...} (or {})."""
    try:
        fd = os.open(os.path.join(datastore, LOCK_NAME), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        return _read_info(fd)
    finally:
        os.close(fd)


class DatastoreLock:
    def __init__(self, datastore: str) -> None:
        self.path = os.path.join(datastore, LOCK_NAME)
        self.fd = -1

    def acquire(self, mountpoint: str) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd, self.path)
            os.close(fd)
            raise InUseError(f"{os.path.dirname(self.path)} is already mounted {holder}; a datastore is served "
                             "by one mount at a time: unmount it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "mountpoint": os.path.realpath(mountpoint)}).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def mounted_by(datastore: str) -> str | None:
    """Who holds the mount lock of this datastore (None when nobody does); leaves no lock behind."""
    path = os.path.join(datastore, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            # A shared lock conflicts with the mount's exclusive one; taking it (briefly) means nobody mounts.
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(fd, path)
        return None
    finally:
        os.close(fd)
