"""Sector I/O of one encrypted backing file: read, write (read-modify-write of edges), truncate, fallocate, tails.

Pure functions on a backing file descriptor and the file's `SectorCipher`; the caller holds
the file's lock (readers share it, writers and size changes take it alone). This is the
Python reference of the data path: the compiled core (native/datapath.c) must give the
same bytes at rest, and tests compare the two. The byte rules are docs/FORMAT.md 3.2-3.4
(one XTS data unit per sector, the partial last sector, holes).

What a write acknowledges is stored (issue 7, case 1): if the backing file takes only part
of the ciphertext (ENOSPC, EDQUOT, EFBIG), `write` returns the number of the caller's bytes
that lie in completely stored sectors, or raises the error if there are none, and puts the
file back to its old size and tail encoding where the failed part had changed them.
"""

import errno
import logging
import os

from ..crypto.sectors import SECTOR_SIZE, sector_len, sector_span, sector_to_plain_off
from ..crypto.xts import SectorCipher
from ..errors import DataError
from ..format.holes import MIN_HOLE_TAIL, decrypt_sectors
from ..sysutil import libc_fallocate

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

log = logging.getLogger("vmfs_crypt.fs")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on a backing file (os.posix_fallocate has no mode)."""
    libc_fallocate(fd, mode, offset, length)


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


def _write_exact(fd: int, data, offset: int) -> None:
    """Store all of `data` or raise (for metadata-like rewrites of one sector)."""
    done, err = pwrite_all(fd, data, offset)
    if err is not None:
        raise err


def read_sectors(fd: int, cipher: SectorCipher, first: int, count: int, file_size: int, what: str) -> bytes:
    """Plaintext of sectors first..first+count-1 (the last clipped at EOF); holes read as zeros."""
    start = sector_to_plain_off(first)
    length = min(count * SECTOR_SIZE, file_size - start)
    if length <= 0:
        return b""
    ciphertext = os.pread(fd, length, start)
    if len(ciphertext) != length:
        raise DataError(f"{what}: short read at sector {first} (the backing file shrank or is damaged)")
    return decrypt_sectors(cipher, first, ciphertext)


def read(fd: int, cipher: SectorCipher, size: int, offset: int, what: str) -> bytes:
    file_size = os.fstat(fd).st_size
    end = min(offset + size, file_size)
    if end <= offset:
        return b""
    first, count = sector_span(offset, end - offset)
    plaintext = read_sectors(fd, cipher, first, count, file_size, what)
    skip = offset - sector_to_plain_off(first)
    if isinstance(plaintext, bytes) and skip == 0 and len(plaintext) == end - offset:
        return plaintext
    return bytes(memoryview(plaintext)[skip:skip + end - offset])  # one copy; mfusepy's memmove takes bytes


def reencode_tail(fd: int, cipher: SectorCipher, old_size: int, new_size: int, what: str) -> None:
    """The partial last sector is its own XTS data unit: re-encrypt it when the file's size moves.

    Growing: the old tail sector (if partial) gets its new length. Shrinking: the sector
    that becomes the new tail (if partial) gets its new, shorter length. The caller then
    writes or truncates the backing file to the new size.
    """
    if new_size >= old_size:
        target, boundary = old_size // SECTOR_SIZE, old_size
    else:
        target, boundary = new_size // SECTOR_SIZE, new_size
    if boundary % SECTOR_SIZE == 0:
        return
    new_len = sector_len(target, new_size)
    old_plain = read_sectors(fd, cipher, target, 1, old_size, what)
    new_plain = (old_plain + bytes(SECTOR_SIZE))[:new_len]
    if not any(new_plain) and new_len >= MIN_HOLE_TAIL:
        # An all-zero sector is stored as zeros: a hole, which reads back as zeros.
        if old_plain:
            _write_exact(fd, bytes(len(old_plain)), sector_to_plain_off(target))
        return
    _write_exact(fd, cipher.encrypt(target, new_plain), sector_to_plain_off(target))


def seal_new_short_tail(fd: int, cipher: SectorCipher, old_size: int, new_size: int) -> None:
    """After growing by truncate/fallocate: a new last sector under 16 bytes is not a hole, so encrypt its zeros."""
    tail_len = new_size % SECTOR_SIZE
    tail_start = new_size - tail_len
    if 0 < tail_len < MIN_HOLE_TAIL and tail_start >= old_size:
        _write_exact(fd, cipher.encrypt(tail_start // SECTOR_SIZE, bytes(tail_len)), tail_start)


def _undo_growth(fd: int, cipher: SectorCipher, grown_size: int, old_size: int, what: str) -> None:
    """Put a file that a failed write grew back to `old_size` with its old tail encoding."""
    if grown_size > old_size:
        reencode_tail(fd, cipher, grown_size, old_size, what)
        os.ftruncate(fd, old_size)


def write(fd: int, cipher: SectorCipher, data, offset: int, what: str) -> int:
    """Encrypt `data` at `offset`, reading back the untouched parts of partial edge sectors; bytes stored."""
    if not data:
        return 0
    old_size = os.fstat(fd).st_size
    end = offset + len(data)
    new_size = max(old_size, end)
    first, count = sector_span(offset, len(data))
    last = first + count - 1
    size_before = old_size  # the backing size just before the main write (the tail step may grow it)
    if old_size % SECTOR_SIZE and old_size // SECTOR_SIZE < first:
        reencode_tail(fd, cipher, old_size, new_size, what)
        size_before = os.fstat(fd).st_size
    region_start = sector_to_plain_off(first)
    region_end = min(sector_to_plain_off(last + 1), new_size)
    if offset == region_start and end == region_end:
        plain = data
    else:
        buf = bytearray(region_end - region_start)
        need_head = offset != region_start and region_start < old_size
        need_tail = (end != region_end and sector_to_plain_off(last) < old_size
                     and (last != first or not need_head))
        if need_head:
            head = read_sectors(fd, cipher, first, 1, old_size, what)
            buf[:len(head)] = head
        if need_tail:
            tail = read_sectors(fd, cipher, last, 1, old_size, what)
            pos = sector_to_plain_off(last) - region_start
            buf[pos:pos + len(tail)] = tail
        buf[offset - region_start:end - region_start] = data
        plain = buf
    ciphertext = cipher.encrypt(first, plain)
    stored, err = pwrite_all(fd, ciphertext, region_start)
    if err is None:
        return len(data)
    return _short_write(fd, cipher, err, what, old_size, size_before, offset, end, region_start, stored)


def _short_write(fd: int, cipher: SectorCipher, err: OSError, what: str, old_size: int, size_before: int,
                 offset: int, end: int, region_start: int, stored: int) -> int:
    """The backing file took only `stored` bytes of the region: acknowledge what is complete, undo the rest."""
    complete_end = region_start + stored // SECTOR_SIZE * SECTOR_SIZE
    torn_end = region_start + stored
    if torn_end != complete_end:
        if complete_end < size_before:
            # Local filesystems fail allocations at block (>= 512-byte) granularity, so this
            # needs an exotic backing filesystem; say exactly which sector it hit.
            log.error("%s: sector %d was partly overwritten when the backing file ran out of space (%s); "
                      "restore it from a backup", what, complete_end // SECTOR_SIZE, err.strerror)
        else:
            os.ftruncate(fd, complete_end)  # the torn sector was new: drop it
    acked = min(end, complete_end) - offset
    if acked <= 0:
        _undo_growth(fd, cipher, os.fstat(fd).st_size, old_size, what)
        raise err
    return acked


def truncate(fd: int, cipher: SectorCipher, length: int, what: str) -> None:
    old_size = os.fstat(fd).st_size
    if length == old_size:
        return
    reencode_tail(fd, cipher, old_size, length, what)
    try:
        os.ftruncate(fd, length)
    except OSError:
        _undo_growth(fd, cipher, os.fstat(fd).st_size, old_size, what)
        raise
    seal_new_short_tail(fd, cipher, old_size, length)


def write_zeros(fd: int, cipher: SectorCipher, offset: int, length: int, what: str) -> None:
    """Zero [offset, offset+length) of the plaintext, all or nothing (ENOSPC raises)."""
    if length > 0 and write(fd, cipher, bytes(length), offset, what) != length:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fallocate_encrypted(fd: int, cipher: SectorCipher, mode: int, offset: int, size: int, what: str) -> None:
    old_size = os.fstat(fd).st_size
    end = offset + size
    if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        grows = not mode & FALLOC_FL_KEEP_SIZE and end > old_size
        if grows:
            reencode_tail(fd, cipher, old_size, end, what)
        try:
            fallocate(fd, mode, offset, size)
        except OSError:
            if grows:
                _undo_growth(fd, cipher, os.fstat(fd).st_size, old_size, what)
            raise
        if grows:
            seal_new_short_tail(fd, cipher, old_size, end)
        return
    # Discard: whole sectors become holes in the backing file (holes read as zeros);
    # partial sectors at either edge are rewritten with encrypted zeros.
    if not mode & FALLOC_FL_KEEP_SIZE and end > old_size:
        truncate(fd, cipher, end, what)
        old_size = end
    clip_end = min(end, old_size)
    if clip_end <= offset:
        return
    inner_start = -(-offset // SECTOR_SIZE) * SECTOR_SIZE
    inner_end = clip_end // SECTOR_SIZE * SECTOR_SIZE
    if inner_end > inner_start:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, inner_start, inner_end - inner_start)
        edges = [(offset, inner_start), (inner_end, clip_end)]
    else:
        edges = [(offset, clip_end)]
    for lo, hi in edges:
        write_zeros(fd, cipher, lo, hi - lo, what)
