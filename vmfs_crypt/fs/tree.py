"""Paths beneath the datastore root, resolved without following symlinks (issue 7, case 5).

Every operation of the mount resolves the *parent directory* of its path with openat2(2)
and RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS (an O_NOFOLLOW walk where the kernel lacks it),
then acts on the last component through that directory's descriptor without following it
(O_NOFOLLOW, AT_SYMLINK_NOFOLLOW). A symlink anywhere in the backing path, or a path that
leaves the root, gives ELOOP/EXDEV instead of reaching outside the datastore; what a
symlink *shown* in the mount points to is the kernel's business (fs/namespace.py says which
symlinks may exist in an encrypted folder).
"""

import contextlib
import ctypes
import ctypes.util
import errno
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_OPENAT2 = 437  # the same number on every architecture (asm-generic)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_have_openat2 = True


def _openat2(dirfd: int, rel: str, flags: int) -> int:
    how = _OpenHow(flags, 0, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(SYS_OPENAT2, dirfd, os.fsencode(rel), ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def _walk(dirfd: int, parts: list[str]) -> int:
    """The fallback of openat2: one O_NOFOLLOW open per component."""
    fd = os.open(".", _DIR_FLAGS, dir_fd=dirfd)
    try:
        for part in parts:
            nxt = os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass
class Entry:
    """One path of the mount: its parent directory's descriptor and its last component."""

    dirfd: int
    name: str  # "" for the root itself
    rel: str  # relative to the root, without a leading slash ("" for the root)
    shown: str  # the backing path, for messages

    @property
    def at(self) -> str:
        """The name to pass with dir_fd=self.dirfd ("." for the root)."""
        return self.name or "."

    @property
    def parent_real(self) -> str:
        """A path of the parent directory for format-layer code that works on paths, valid while the entry is open.

        Through the directory's descriptor, not the datastore path: a path that is short in the
        mount may be longer than PATH_MAX at rest (pjdfstest */03.t gave ENAMETOOLONG; issue 12),
        and no component is looked up again.
        """
        return f"/proc/self/fd/{self.dirfd}"

    @property
    def real(self) -> str:
        return f"{self.parent_real}/{self.name}" if self.name else self.parent_real

    @property
    def shown_parent(self) -> str:
        return os.path.dirname(self.shown) if self.name else self.shown


class Tree:
    """The datastore root, opened once; every path is resolved beneath it."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self.root_fd = os.open(self.root, _DIR_FLAGS)

    def close(self) -> None:
        os.close(self.root_fd)

    @staticmethod
    def split(path: str) -> list[str]:
        parts = [p for p in path.split("/") if p and p != "."]
        if ".." in parts:
            raise OSError(errno.EXDEV, "path leaves the datastore", path)
        return parts

    def real(self, path: str) -> str:
        return os.path.join(self.root, *self.split(path))

    def open_dir(self, parts: list[str]) -> int:
        """An O_PATH descriptor of the directory at `parts` beneath the root, no symlink followed."""
        global _have_openat2
        if not parts:
            return os.open(".", _DIR_FLAGS, dir_fd=self.root_fd)
        if _have_openat2:
            try:
                return _openat2(self.root_fd, "/".join(parts), _DIR_FLAGS)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                _have_openat2 = False
        return _walk(self.root_fd, parts)

    @contextlib.contextmanager
    def entry(self, path: str):
        parts = self.split(path)
        fd = self.open_dir(parts[:-1])
        try:
            yield Entry(fd, parts[-1] if parts else "", "/".join(parts), os.path.join(self.root, *parts))
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def entries(self, a: str, b: str):
        with self.entry(a) as ea, self.entry(b) as eb:
            yield ea, eb
