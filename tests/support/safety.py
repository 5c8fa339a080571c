"""Fixtures of the storage-safety tests (issue 7): small tmpfs datastores, ballast, the independent reader, log checks."""

import contextlib
import errno
import os
import subprocess

from .env import VmfsEnv

MIB = 1 << 20


def is_root() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def tmpfs(path: str, size_bytes: int):
    """A real tmpfs of `size_bytes` at `path` (needs root), unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0755", "tmpfs", path], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", path], check=False, capture_output=True)


def free_bytes(path: str) -> int:
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize


class Ballast:
    """Files in a directory of the datastore's tmpfs (outside the datastore) that take its free space."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self._files: list[str] = []

    def _new(self) -> str:
        path = os.path.join(self.dir, f"b{len(self._files):05d}")
        self._files.append(path)
        return path

    def fill(self) -> None:
        """Take every free byte (1 MiB files, then 4 KiB writes until ENOSPC)."""
        block = b"\xbb" * MIB
        while True:
            with open(self._new(), "wb", buffering=0) as f:
                try:
                    for off in range(0, MIB, 4096):
                        if f.write(block[:4096]) < 4096:
                            return
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    return

    def free(self, n_bytes: int) -> None:
        """Give back at least `n_bytes` (whole ballast files, newest first)."""
        while n_bytes > 0 and self._files:
            path = self._files.pop()
            n_bytes -= os.path.getsize(path)
            os.unlink(path)

    def take(self, n_bytes: int) -> None:
        """Take `n_bytes` more (rounded up to pages by tmpfs)."""
        with open(self._new(), "wb") as f:
            f.write(b"\xbb" * n_bytes)


def native_key_files(env: VmfsEnv) -> dict[str, bytes]:
    """Provider id -> native key file bytes, as the independent reader of FORMAT.md takes them."""
    with open(os.path.join(os.path.dirname(env.config), "native-local.key"), "rb") as f:
        return {"local": f.read()}


def at_rest_plaintext(env: VmfsEnv, folder: str, name: str, start: int = 0, length: int | None = None) -> bytes:
    """Plaintext bytes [start, start+length) of a backing file, decrypted by the reader written from docs/FORMAT.md alone.

    Only the sectors of the range are decrypted (the reader's own functions, one XTS data unit
    per sector; holes and the partial last sector as section 3 says).
    """
    import test_format_independent as ind  # tests/ is on sys.path (pytest rootdir)
    path = os.path.join(folder, name)
    size = os.path.getsize(path)
    end = size if length is None else min(size, start + length)
    if end <= start:
        return b""
    first, last = start // ind.SECTOR, (end - 1) // ind.SECTOR
    with open(path, "rb") as f:
        f.seek(first * ind.SECTOR)
        backing = f.read(min(size, (last + 1) * ind.SECTOR) - first * ind.SECTOR)
    if not ind.is_encrypted(folder, name):
        plain = backing
    else:
        keysafe, data, _ = ind.find_key(folder, name)
        provider, key_id, wrapped = ind.parse_locator(keysafe)
        dek = ind.unwrap(ind.native_kek(native_key_files(env)[provider], key_id), wrapped, ind.parse_data(data))
        out = bytearray()
        for i in range(0, len(backing), ind.SECTOR):
            unit = backing[i:i + ind.SECTOR]
            hole = not any(unit) and len(unit) >= 16  # section 3.4
            out += bytes(len(unit)) if hole else ind.xts_unit(dek, first + i // ind.SECTOR, unit, encrypt=False)
        plain = bytes(out)
    skip = start - first * ind.SECTOR
    return plain[skip:skip + end - start]


def mount_log_text(env: VmfsEnv) -> str:
    """The whole text of every mount log of the environment."""
    out = []
    for dirpath, _, files in os.walk(env.runtime):
        for name in sorted(files):
            if name.startswith("mount") and name.endswith(".log"):
                with open(os.path.join(dirpath, name), errors="replace") as f:
                    out.append(f.read())
    return "\n".join(out)


def log_problems(env: VmfsEnv) -> list[str]:
    """Lines of the mount logs that must never appear: tracebacks and internal errors."""
    return [line for line in mount_log_text(env).splitlines()
            if "Traceback" in line or "internal error" in line or "Uncaught exception" in line]
