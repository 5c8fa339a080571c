"""Which code serves reads and writes: the compiled core (native/datapath.c) when present, else Python.

With the compiled core, every decided plain or encrypted handle is registered with it at
open (fd, and the file's native `FileState`: cipher, readers-writer lock, revocation flag,
name for log records) and unregistered at release; libfuse then calls the native read and
write entries for it without entering the interpreter (fuse/native.py installs them).
Python keeps serving descriptors and a new empty `.vmdk` until its first write decides its
kind, and every other operation; Python's truncate and fallocate take the same `FileState`
lock as the native read and write. Without the core, `fs/sectorio.py` serves everything
under a Python lock: the two give the same bytes (tests/test_native.py).
"""

import logging

from ..crypto.native import native, reason
from ..crypto.xts import SectorCipher
from .locks import RWLock

log = logging.getLogger("vmfs_crypt.fs")


class DataPath:
    """The Python data path: nothing to register."""

    name = "python"
    description = f"python ({reason})" if native is None else "python"

    def file_lock(self, cipher: SectorCipher | None, name: str):
        return RWLock()

    def attach(self, fh: int, fd: int, lock) -> None:
        """Serve handle `fh` natively from now on (no-op here)."""

    def detach(self, fh: int) -> None:
        """Stop serving `fh` natively (no-op here)."""

    def set_revoked(self, lock, revoked: bool) -> None:
        """The native path refuses I/O under a revoked KEK by itself; Python checks `VmfsCore.revoked`."""

    def rename(self, lock, name: str) -> None:
        """Keep the name in native log records current."""

    def set_cipher(self, lock, cipher: SectorCipher) -> None:
        """A file got a new DEK (emptied: issue 7, case 8); the caller holds `lock` for writing."""

    def stats(self) -> dict:
        return {}


class NativeDataPath(DataPath):
    name = "native"
    description = f"native ({reason})"

    def __init__(self) -> None:
        native.set_log(lambda message: log.error("%s", message))
        self._attached: set[int] = set()

    def file_lock(self, cipher: SectorCipher | None, name: str):
        return native.FileState(cipher, name)

    def attach(self, fh: int, fd: int, lock) -> None:
        native.register(fh, fd, lock)
        self._attached.add(fh)

    def detach(self, fh: int) -> None:
        if fh in self._attached:
            self._attached.discard(fh)
            native.unregister(fh)

    def set_revoked(self, lock, revoked: bool) -> None:
        lock.revoked = revoked

    def rename(self, lock, name: str) -> None:
        lock.name = name

    def set_cipher(self, lock, cipher: SectorCipher) -> None:
        lock.set_cipher(cipher)

    def stats(self) -> dict:
        return dict(native.stats())


def choose() -> DataPath:
    """The compiled core when it loaded (VMFS_CRYPT_NATIVE=0 turns it off), else Python."""
    if native is not None and SectorCipher is native.SectorCipher:
        return NativeDataPath()
    return DataPath()
