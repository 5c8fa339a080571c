"""Atomic small-file writes: temp file, fsync, rename, fsync of the directory."""

import os

ATOMIC_TMP_PREFIX = ".vmfs-crypt-atomic."


def fsync_dir(dir_path: str) -> None:
    fd = os.open(dir_path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content."""
    dir_path = os.path.dirname(os.path.abspath(path))
    # Named like every vmfs-crypt temporary file (.vmfs-crypt*): hidden in the mount, and removed
    # by recovery if a crash leaves it behind.
    tmp = os.path.join(dir_path, f"{ATOMIC_TMP_PREFIX}{os.path.basename(path)}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(dir_path)
