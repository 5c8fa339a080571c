"""Open-file handles, one type per kind (plain, encrypted, descriptor) with the same methods, so no kind ladders.

Each method raises OSError (with an errno) or a VmfsCryptError; the FUSE adapter maps both
to errno in one place.
"""

import errno
import logging
import os
from typing import Callable

from ..errors import KeyRevokedError
from ..format.descriptor import DESCRIPTOR_MAGIC, DESCRIPTOR_MAX_SIZE
from ..format.kinds import FileKind
from ..format.keysafe import KeyRef
from ..sysutil import libc_fallocate
from . import sectorio
from .openfiles import DescriptorFile, EncryptedFile

log = logging.getLogger("vmfs_crypt.fs")


def _where(op: str, offset: int) -> str:
    return f"{op} at byte {offset} (sector {offset // 512})"


class Handle:
    kind: FileKind

    def __init__(self, rel: str, fd: int = -1) -> None:
        self.rel = rel  # the path in the mount (re-pointed by renames), for messages
        self.fd = fd

    def read(self, size: int, offset: int) -> bytes:
        raise NotImplementedError

    def write(self, data, offset: int) -> int:
        raise NotImplementedError

    def truncate(self, length: int) -> None:
        raise NotImplementedError

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    def flush(self) -> None:
        """Nothing is buffered in the daemon except descriptor views."""

    def fsync(self, datasync: bool) -> None:
        if self.fd >= 0:
            (os.fdatasync if datasync else os.fsync)(self.fd)

    def seek_data(self, offset: int, whence: int) -> int:
        """lseek(SEEK_DATA or SEEK_HOLE) of the backing file: sectors at rest that are holes read as zeros."""
        return os.lseek(self.fd, offset, whence)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _refuse_online(file: EncryptedFile, op: str) -> None:
    if file.online is not None:
        raise OSError(errno.EBUSY, f"{op} refused while an online {file.online} rewrites this file (issue 10)")


class PlainHandle(Handle):
    """A plain data file. Its shared `file` carries the lock; while an online encrypt or decrypt
    rewrites it (ops/online.py) it carries a cipher too, and I/O goes through sectorio."""

    kind = FileKind.PLAIN

    def __init__(self, rel: str, fd: int, file: EncryptedFile) -> None:
        super().__init__(rel, fd)
        self.file = file

    def read(self, size: int, offset: int) -> bytes:
        lock = self.file.lock
        lock.acquire_read_span(offset, size)
        try:
            cipher = self.file.cipher
            if cipher is None:
                return os.pread(self.fd, size, offset)
            return sectorio.read(self.fd, cipher, size, offset, f"{self.rel}: {_where('read', offset)}")
        finally:
            lock.release_read()

    def write(self, data, offset: int) -> int:
        lock = self.file.lock
        lock.acquire_read_span(offset, len(data))
        try:
            if self.file.cipher is None:
                stored, err = sectorio.pwrite_all(self.fd, data, offset)
                if err is not None and stored == 0:
                    raise err
                return stored
        finally:
            lock.release_read()
        lock.acquire_write_span(offset, len(data))  # a cipher, once given, stays until the handle is replaced
        try:
            return sectorio.write(self.fd, self.file.cipher, data, offset, f"{self.rel}: {_where('write', offset)}")
        finally:
            lock.release_write()

    def truncate(self, length: int) -> None:
        _refuse_online(self.file, "truncate")
        os.ftruncate(self.fd, length)

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        _refuse_online(self.file, "fallocate")
        libc_fallocate(self.fd, mode, offset, length)


class EncryptedHandle(Handle):
    kind = FileKind.ENCRYPTED

    def __init__(self, rel: str, fd: int, file: EncryptedFile, is_revoked: Callable[[KeyRef], bool]) -> None:
        super().__init__(rel, fd)
        self.file = file
        self._is_revoked = is_revoked
        self.pending = False  # a new empty .vmdk whose first write decides descriptor or encrypted

    def _check(self, op: str) -> None:
        if self.file.kek is not None and self._is_revoked(self.file.kek):
            raise KeyRevokedError(f"{self.file.kek} was revoked (on_revoke = \"lock\"): {op} refused")

    def read(self, size: int, offset: int) -> bytes:
        self._check("read")
        lock = self.file.lock
        lock.acquire_read_span(offset, size)
        try:
            return sectorio.read(self.fd, self.file.cipher, size, offset, f"{self.rel}: {_where('read', offset)}")
        finally:
            lock.release_read()

    def write(self, data, offset: int) -> int:
        self._check("write")
        lock = self.file.lock
        lock.acquire_write_span(offset, len(data))
        try:
            return sectorio.write(self.fd, self.file.cipher, data, offset, f"{self.rel}: {_where('write', offset)}")
        finally:
            lock.release_write()

    def truncate(self, length: int) -> None:
        self._check("truncate")
        _refuse_online(self.file, "truncate")
        self.file.lock.acquire_write()
        try:
            sectorio.truncate(self.fd, self.file.cipher, length, f"{self.rel}: truncate to {length}")
        finally:
            self.file.lock.release_write()

    def fallocate(self, mode: int, offset: int, length: int) -> None:
        self._check("fallocate")
        _refuse_online(self.file, "fallocate")
        self.file.lock.acquire_write()
        try:
            sectorio.fallocate_encrypted(self.fd, self.file.cipher, mode, offset, length,
                                         f"{self.rel}: fallocate mode {mode:#x} at byte {offset}")
        finally:
            self.file.lock.release_write()


class DescriptorHandle(Handle):
    """A descriptor view in memory; `write_back` stores it with its key lines (atomically) on flush."""

    kind = FileKind.DESCRIPTOR

    def __init__(self, rel: str, desc: DescriptorFile, write_back: Callable[[DescriptorFile], None]) -> None:
        super().__init__(rel)
        self.desc = desc
        self._write_back = write_back

    def read(self, size: int, offset: int) -> bytes:
        with self.desc.lock:
            return bytes(self.desc.view[offset:offset + size])

    def write(self, data, offset: int) -> int:
        """Edit the view in memory; stored (with the key lines) at flush/fsync.

        Refused: a write that makes the view stop starting with the descriptor line
        (EINVAL: it would be stored in clear and then read as ciphertext; an emptied
        descriptor becomes an encrypted file instead, core.write), and a view larger than a
        descriptor is read back (EFBIG: the rest would be lost at the next open).
        """
        desc = self.desc
        end = offset + len(data)
        with desc.lock:
            if end + sum(map(len, desc.key_lines)) > DESCRIPTOR_MAX_SIZE:
                raise OSError(errno.EFBIG, f"a descriptor holds at most {DESCRIPTOR_MAX_SIZE} bytes")
            magic_len = len(DESCRIPTOR_MAGIC)
            if offset < magic_len:
                head = bytearray(desc.view[:magic_len])
                if offset > len(head):
                    head.extend(bytes(offset - len(head)))
                k = min(len(data), magic_len - offset)
                head[offset:offset + k] = bytes(data[:k])
                if not DESCRIPTOR_MAGIC.startswith(bytes(head)):
                    log.error("%s: write at byte %d refused: it would overwrite the descriptor's first line (a "
                              "descriptor is stored in clear); truncate the file first to replace it", self.rel, offset)
                    raise OSError(errno.EINVAL, "this would overwrite the descriptor's first line: truncate it first")
            if offset > len(desc.view):
                desc.view.extend(bytes(offset - len(desc.view)))
            desc.view[offset:end] = data
            desc.dirty = True
        return len(data)

    def truncate(self, length: int) -> None:
        """Cut or extend the view (length 0 is core's business: the descriptor then starts afresh)."""
        desc = self.desc
        with desc.lock:
            if desc.key_lines and 0 < length and b"\n" not in desc.view[:length]:
                # its key lines go after the first line, which would be gone
                log.error("%s: truncate to %d refused: it cuts the descriptor's first line", self.rel, length)
                raise OSError(errno.EINVAL, "a descriptor with keys keeps its first line")
            if length > DESCRIPTOR_MAX_SIZE:
                raise OSError(errno.EFBIG, f"a descriptor holds at most {DESCRIPTOR_MAX_SIZE} bytes")
            if length < len(desc.view):
                del desc.view[length:]
            else:
                desc.view.extend(bytes(length - len(desc.view)))
            desc.dirty = True

    def flush(self) -> None:
        self._write_back(self.desc)

    def fsync(self, datasync: bool) -> None:
        self._write_back(self.desc)

    def seek_data(self, offset: int, whence: int) -> int:
        size = len(self.desc.view)
        if offset < 0 or offset >= size:
            raise OSError(errno.ENXIO, os.strerror(errno.ENXIO))
        return offset if whence == os.SEEK_DATA else size
