"""mfusepy operations over `VmfsCore`: argument translation and the one place where errors become errno."""

import ctypes
import errno
import functools
import logging
import os
import threading

import mfusepy

from ..errors import (AgentError, InUseError, KeyUnwrapError, PermissionDeniedError, ProviderError,
                      VmfsCryptError)
from ..fs.core import Caller, VmfsCore

log = logging.getLogger("vmfs_crypt.fs")
_THREAD = threading.local()
# Errors of the backing filesystem worth a log line (the rest, ENOENT and friends, are normal answers).
_LOGGED_ERRNOS = {errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _pin_thread_state() -> None:
    """Keep this libfuse worker thread's Python thread state alive between callbacks.

    ctypes wraps every callback from a foreign thread in PyGILState_Ensure/Release, which
    creates and destroys a thread state each time, and numpy re-initialises its per-thread
    state on each fresh one (about 15 us per request here). One unmatched Ensure per worker
    thread keeps the state; libfuse keeps a handful of workers, so this holds a handful of
    thread states (docs/PERFORMANCE.md).
    """
    if not getattr(_THREAD, "pinned", False):
        ctypes.pythonapi.PyGILState_Ensure()
        _THREAD.pinned = True


def to_errno(exc: BaseException, op: str, path) -> int:
    """The errno of any error of an operation (the only mapping of the mount), logging what the user must see."""
    path = str(path).lstrip("/") or "/"
    if isinstance(exc, mfusepy.FuseOSError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        if exc.errno in _LOGGED_ERRNOS:
            log.warning("%s: %s: %s", path, op, exc.strerror or exc)
        return exc.errno
    if isinstance(exc, (KeyUnwrapError, ProviderError, AgentError, PermissionDeniedError)):
        log.error("%s: %s refused: %s", path, op, exc)  # no key: the disk is locked
        return errno.EACCES
    if isinstance(exc, InUseError):
        log.error("%s: %s: %s", path, op, exc)
        return errno.EBUSY
    if isinstance(exc, VmfsCryptError):
        log.error("%s: %s failed: %s", path, op, exc)
        return errno.EIO
    # A bug of ours: one line, never a traceback in the mount log; the details at debug level.
    log.error("%s: %s failed: internal error %s: %s", path, op, type(exc).__name__, exc)
    log.debug("traceback of the internal error", exc_info=exc)
    return errno.EIO


def fuse_op(fn):
    """Every FUSE operation goes through here: thread state, then errors to errno."""
    op = fn.__name__

    @functools.wraps(fn)
    def wrapper(self, path, *args):
        _pin_thread_state()
        try:
            return fn(self, path, *args)
        except Exception as exc:  # noqa: BLE001 - mapped, not swallowed
            raise mfusepy.FuseOSError(to_errno(exc, op, path)) from None
    return wrapper


def _caller() -> Caller:
    uid, gid, pid = mfusepy.fuse_get_context()
    return Caller(uid, gid, pid)


RENAME_NOREPLACE = 1
FUSE_CAP_AUTO_INVAL_DATA = 1 << 12  # fuse_common.h (libfuse 3)


class VmfsFuse(mfusepy.FUSE):
    """mfusepy's FUSE with what its libfuse 3 side lacks (mfusepy 3.1.1, pinned).

    - rename: mfusepy drops the flags, so RENAME_EXCHANGE became a plain rename that
      destroyed the target (seen with fsstress); the flags now reach the core.
    - lseek: mfusepy has no wrapper for it; SEEK_DATA/SEEK_HOLE reach the core.
    - truncate: the file handle of an ftruncate reaches the core.
    """

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)

    def truncate_fuse_3(self, path, length: int, fip) -> int:
        # mfusepy drops the file handle here; libfuse 3 has no ftruncate, so an ftruncate of an
        # open file arrived as a path truncate (a second open: an emptied file kept its key).
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors),
                                        length, fh)

    def lseek(self, path, offset: int, whence: int, fip) -> int:
        fh = fip.contents.fh if fip else None
        return self.operations.lseek(None if path is None else path.decode(self.encoding, self.errors),
                                     offset, whence, fh)


class FuseOperations(mfusepy.Operations):
    """The mount's operations table. Paths arrive as str, relative to the mount point."""

    use_ns = True

    def __init__(self, core: VmfsCore, on_init=None, max_read: int | None = None) -> None:
        self.core = core
        self.on_init = on_init
        self.max_read = max_read

    def init_with_config(self, conn, config):
        # Not fuse_op: mfusepy re-raises whatever init raises (with a traceback), and there is
        # no errno to answer. The one line says what failed; the mount then serves anyway.
        _pin_thread_state()
        try:
            if conn is not None and mfusepy.fuse_version_major == 3:
                # Attributes are not cached (serve.py, issue 12); with auto_inval_data the kernel then
                # asked for them before every read: 4 KiB O_DIRECT random reads fell from about 25-37K
                # to 3-6K IOPS here. Page-cache coherence stays: it is dropped at each open and when a
                # getattr sees another size.
                conn.want &= ~FUSE_CAP_AUTO_INVAL_DATA
                if self.max_read:
                    # libfuse 3.14 never copies -o max_read into the connection and then refuses the
                    # INIT ("init() and fuse_session_new() requested different maximum read size").
                    conn.max_read = self.max_read
            if self.on_init:
                self.on_init()
        except Exception as exc:  # noqa: BLE001 - logged, not swallowed silently
            log.error("init: %s: %s", type(exc).__name__, exc)

    @fuse_op
    def getattr(self, path, fh=None):
        return self.core.getattr(path, fh)

    @fuse_op
    def readdir(self, path, fh):
        return [(name, {"st_ino": ino, "st_mode": mode}, 0) for name, ino, mode in self.core.readdir(path)]

    @fuse_op
    def readlink(self, path):
        return self.core.readlink(path)

    @fuse_op
    def statfs(self, path):
        return self.core.statfs(path)

    @fuse_op
    def chmod(self, path, mode):
        self.core.chmod(path, mode)

    @fuse_op
    def chown(self, path, uid, gid):
        self.core.chown(path, uid, gid)

    @fuse_op
    def utimens(self, path, times=None):
        # libfuse 3 passes UTIME_NOW/UTIME_OMIT through (2 resolved them); mfusepy hands them
        # over as those numbers of nanoseconds, which the core resolves (issue 12, utimensat).
        self.core.utimens(path, times)

    @fuse_op
    def access(self, path, amode):
        self.core.access(path, amode)

    @fuse_op
    def mkdir(self, path, mode):
        self.core.mkdir(path, mode, _caller())

    @fuse_op
    def rmdir(self, path):
        self.core.rmdir(path)

    @fuse_op
    def symlink(self, target, source):  # mfusepy: a symlink at `target` pointing to `source`
        self.core.symlink(source, target, _caller())

    @fuse_op
    def mknod(self, path, mode, dev):
        self.core.mknod(path, mode, dev, _caller())

    @fuse_op
    def unlink(self, path):
        self.core.unlink(path)

    @fuse_op
    def rename(self, old, new, flags=0):
        self.core.rename(old, new, flags)

    @fuse_op
    def lseek(self, path, offset, whence, fh):
        return self.core.lseek(fh, offset, whence)

    @fuse_op
    def link(self, target, source):  # mfusepy: a new name `target` for the existing `source`
        self.core.link(source, target)

    @fuse_op
    def open(self, path, flags):
        return self.core.open(path, flags)

    @fuse_op
    def create(self, path, mode, fi=None):  # mfusepy passes the open flags as `fi`
        flags = fi if isinstance(fi, int) else os.O_RDWR
        return self.core.create(path, mode, flags, caller=_caller())

    @fuse_op
    def release(self, path, fh):
        self.core.release(fh)

    @fuse_op
    def flush(self, path, fh):
        self.core.flush(fh)

    @fuse_op
    def fsync(self, path, datasync, fh):
        self.core.fsync(fh, bool(datasync))

    @fuse_op
    def read(self, path, size, offset, fh):
        return self.core.read(fh, size, offset)

    @fuse_op
    def write(self, path, data, offset, fh):
        return self.core.write(fh, data, offset)

    @fuse_op
    def truncate(self, path, length, fh=None):
        self.core.truncate(path, length, fh)

    @fuse_op
    def fallocate(self, path, mode, offset, size, fh):
        self.core.fallocate(fh, mode, offset, size)
        return 0
