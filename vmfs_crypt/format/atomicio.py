"""Small metadata files: atomic replacement (temp file, fsync, rename, fsync of the directory) and safe reads."""

import errno
import os
import stat

ATOMIC_TMP_PREFIX = ".vmfs-crypt-atomic."
_O_READ_SAFE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def pwrite_all(fd: int, data, offset: int) -> tuple[int, OSError | None]:
    """Write all of `data` at `offset`, looping over short writes; (bytes stored, the error that stopped it)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
        except OSError as exc:
            return done, exc
        if n <= 0:
            return done, OSError(errno.EIO, "the backing file took no bytes")
        done += n
    return done, None


def pwrite_exact(fd: int, data, offset: int) -> None:
    """Store all of `data` at `offset` or raise the error that stopped it."""
    err = pwrite_all(fd, data, offset)[1]
    if err is not None:
        raise err


class NotRegularFile(OSError):
    """The path is a symlink, FIFO, device, socket or directory where a regular file was expected."""


def fsync_dir(dir_path: str) -> None:
    fd = os.open(dir_path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_regular(path: str) -> int:
    """An O_RDONLY descriptor of a regular file; never follows a symlink and never blocks on a FIFO.

    Metadata files are attack surface (issue 7: a FIFO key file blocked the agent, a
    symlinked extent was followed to /etc/passwd). Raises FileNotFoundError, NotRegularFile
    or another OSError.
    """
    try:
        fd = os.open(path, _O_READ_SAFE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW: the last component is a symlink
            raise NotRegularFile(exc.errno, "is a symbolic link, not a regular file", path) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotRegularFile(errno.EINVAL, "is not a regular file", path)
    return fd


def read_fd(fd: int, max_size: int, offset: int = 0) -> bytes:
    """Up to `max_size` bytes from `offset` (fewer at end of file)."""
    chunks, left = [], max_size
    while left > 0:
        chunk = os.pread(fd, min(left, 1 << 20), offset)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_regular(path: str, max_size: int) -> bytes:
    """The bytes of a regular file (at most `max_size`), read as `open_regular` opens it."""
    fd = open_regular(path)
    try:
        return read_fd(fd, max_size)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content; the file gets exactly `mode`.

    `owner` (uid, gid): give the new file the owner of the file it replaces (a descriptor
    rewritten by the mount keeps its owner, e.g. libvirt's qemu user).
    """
    dir_path = os.path.dirname(os.path.abspath(path))
    # Named like every vmfs-crypt temporary file (.vmfs-crypt*): hidden in the mount, and removed
    # by recovery if a crash leaves it behind.
    tmp = os.path.join(dir_path, f"{ATOMIC_TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        # Exactly `mode`, whatever the umask: a descriptor QEMU rewrites through the mount keeps
        # its 0660 (its group's QEMU must open it again; issue 11's vm-operator test).
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if owner is not None:
            os.fchown(fd, *owner)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.rename(tmp, path)
    fsync_dir(dir_path)
