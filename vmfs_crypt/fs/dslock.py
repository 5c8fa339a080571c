"""One mount per datastore: a POSIX record lock on a file at the datastore root (works on NFS, unlike a pid file alone).

The mount process holds an exclusive lock on DATASTORE/.vmfs-crypt-mount.lock for its whole
life and writes its pid, host and mount point into the file; a second mount of the datastore
(by any path to it, from any NFS client) is refused with the holder's name (issue 7, case 2),
and offline operations learn from it that a folder is served by a mount this host may not
see (ops/inuse.py). POSIX locks belong to the process and go away when *any* descriptor of
the file closes in it: the mount process never opens the file again.
"""

import fcntl
import json
import os
import socket

from ..errors import InUseError
from ..format.folder import HIDDEN_PREFIX
from ..sysutil import posix_lock_conflict, proc_cmdline
from .mounts import vmfs_mounts

LOCK_NAME = HIDDEN_PREFIX + "-mount.lock"


def _read_info(fd: int) -> dict:
    """What the mount wrote into the lock file; {} for anything else (the datastore is not trusted)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (ValueError, UnicodeError, RecursionError, OSError):
        return {}
    return info if isinstance(info, dict) else {}


def _holder(fd: int, path: str) -> str:
    info = _read_info(fd)
    try:
        conflict = posix_lock_conflict(fd, exclusive=True)
    except OSError:
        conflict = None
    pid = info.get("pid")
    if conflict and conflict[1] > 0 and conflict[1] != pid and info.get("host") in (None, socket.gethostname()):
        return f"by pid {conflict[1]} ({proc_cmdline(conflict[1])})"  # the file says another: trust the kernel
    if not info:
        return f"by another process (see {path})"
    host = info.get("host")
    on = f" on host {host}" if isinstance(host, str) and host != socket.gethostname() else ""
    return f"by pid {pid}{on} at {info.get('mountpoint')}"


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


def _overlapping_mount(datastore: str) -> str | None:
    """A mount of a datastore that holds this one, or that this one holds (nested datastores share folders)."""
    ds = here = os.path.realpath(datastore)
    while os.path.dirname(here) != here:
        here = os.path.dirname(here)
        holder = mounted_by(here) if os.path.lexists(os.path.join(here, LOCK_NAME)) else None
        if holder:
            return f"{here}, which holds it, is mounted {holder}"
    for m in vmfs_mounts():
        if m.datastore.startswith(ds.rstrip("/") + "/"):
            return f"{m.datastore}, inside it, is mounted at {m.mountpoint}"
    return None


class DatastoreLock:
    def __init__(self, datastore: str) -> None:
        self.path = os.path.join(datastore, LOCK_NAME)
        self.fd = -1

    def acquire(self, mountpoint: str) -> None:
        # World-readable: other users' commands must be able to see that the datastore is mounted.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd, self.path)
            os.close(fd)
            raise InUseError(f"{os.path.dirname(self.path)} is already mounted {holder}; a datastore is served "
                             "by one mount at a time: unmount it first") from None
        overlap = _overlapping_mount(os.path.dirname(self.path))
        if overlap:
            os.close(fd)
            raise InUseError(f"{os.path.dirname(self.path)} cannot be mounted: {overlap}; two mounts would serve the "
                             "same folders: unmount it first")
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o644)  # whatever the umask made of it
        os.ftruncate(fd, 0)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "mountpoint": os.path.realpath(mountpoint)}
        os.pwrite(fd, json.dumps(info).encode(), 0)
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
