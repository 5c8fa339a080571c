"""Sector I/O of one encrypted backing file: read, write (read-modify-write of edges), truncate, fallocate, tails.

Pure functions on a backing file descriptor and the file's `SectorCipher`; the caller holds
the file's lock (readers share it; writes and size changes take it alone). This is the
Python reference of the data path: a compiled data path must give the same bytes at rest
and the same answers (returned counts, errors, sizes) for the same calls, and tests compare
the two. The byte rules are docs/FORMAT.md 3.2-3.4: one XTS data unit per 512-byte sector,
tweak = sector number; the partial last sector is a data unit of its own length (ciphertext
stealing from 16 bytes, an XOR pad below 16); an all-zero backing sector (and an all-zero
partial last sector of 16 bytes or more) is a hole and reads as zeros; a partial last sector
under 16 bytes is always stored encrypted.

The rules on failure (issue 7, case 1: "what the mount acknowledges is stored"):

- `write` returns the number of the caller's bytes that lie in completely stored sectors,
  counted from `offset` (so a short count, never more than was stored), or raises the
  backing file's error (ENOSPC, EDQUOT, EFBIG, EIO...) when that number is 0. A sector that
  the backing file took only partly is dropped when it lay past the old end of file (the
  file is cut back to the last complete sector), so no torn sector is ever readable.
- When a write stores nothing, or a truncate or fallocate fails, the file is left as it was:
  its old size and the old encoding of its partial last sector (which a size change
  re-encrypts, FORMAT.md 3.3) are put back before the error is raised.
- Only the data units that the operation needs are rewritten, and only in place: a
  sector's ciphertext changes only when its plaintext, its length as last sector, or (for a
  hole) its storage changes.

Nothing here buffers: every acknowledged byte has been handed to the backing file by
pwrite(2) before the function returns, so the backing file's fsync reports every later
write-back error of it.
"""

import errno
import logging
import os

from ..crypto.sectors import SECTOR_SIZE, sector_len, sector_span, sector_to_plain_off
from ..crypto.xts import SectorCipher
from ..errors import DataError
from ..format.atomicio import pwrite_all, pwrite_exact
from ..format.holes import MIN_HOLE_TAIL, decrypt_sectors
from ..sysutil import libc_fallocate

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Every other mode (COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE...) moves or shares bytes
# between offsets: ciphertext moved to another sector decrypts to garbage under that
# sector's tweak. Refused (EOPNOTSUPP), whatever the kernel lets through.
FALLOC_MODES_SUPPORTED = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE

log = logging.getLogger("vmfs_crypt.fs")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) on a backing file (os.posix_fallocate has no mode)."""
    libc_fallocate(fd, mode, offset, length)


def read_sectors(fd: int, cipher: SectorCipher, first: int, count: int, file_size: int, what: str) -> bytes:
    """Plaintext of sectors first..first+count-1 (the last clipped at `file_size`); holes read as zeros.

    Raises DataError when the backing file holds fewer bytes than `file_size` says.
    """
    start = sector_to_plain_off(first)
    length = min(count * SECTOR_SIZE, file_size - start)
    if length <= 0:
        return b""
    ciphertext = os.pread(fd, length, start)
    if len(ciphertext) != length:
        raise DataError(f"{what}: short read at sector {first} (the backing file shrank or is damaged)")
    return decrypt_sectors(cipher, first, ciphertext)


def read(fd: int, cipher: SectorCipher, size: int, offset: int, what: str) -> bytes:
    """The plaintext of [offset, min(offset + size, end of file)); b"" at or past the end."""
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


class _TailUndo:
    """The backing bytes of the one sector a size change re-encrypts, kept to put them back on failure."""

    def __init__(self, fd: int, old_size: int) -> None:
        self.fd = fd
        self.old_size = old_size
        self.sector: int | None = None
        self.ciphertext = b""

    def save(self, sector: int) -> None:
        self.sector = sector
        start = sector_to_plain_off(sector)
        self.ciphertext = os.pread(self.fd, max(0, min(SECTOR_SIZE, self.old_size - start)), start)

    def restore(self) -> None:
        """Old size, then the old bytes of the re-encrypted sector (in place: its page is allocated)."""
        if os.fstat(self.fd).st_size != self.old_size:
            os.ftruncate(self.fd, self.old_size)
        if self.sector is not None and self.ciphertext:
            pwrite_exact(self.fd, self.ciphertext, sector_to_plain_off(self.sector))


def reencode_tail(fd: int, cipher: SectorCipher, old_size: int, new_size: int, what: str,
                  undo: _TailUndo | None = None) -> None:
    """The partial last sector is its own XTS data unit: re-encrypt it when the file's size moves.

    Growing: the old tail sector (if partial) gets its new length (a whole sector, or the new
    end if that lies in the same sector). Shrinking: the sector that becomes the new tail (if
    partial) gets its new, shorter length. The caller then writes or truncates the backing
    file to the new size. A tail whose new plaintext is all zero (and 16 bytes or more) is
    stored as a hole; one that is a hole already is not rewritten. `undo` records the old
    bytes first.
    """
    if new_size >= old_size:
        target, boundary = old_size // SECTOR_SIZE, old_size
    else:
        target, boundary = new_size // SECTOR_SIZE, new_size
    if boundary % SECTOR_SIZE == 0:
        return
    new_len = sector_len(target, new_size)
    start = sector_to_plain_off(target)
    old_cipher = os.pread(fd, max(0, min(SECTOR_SIZE, old_size - start)), start)
    old_plain = read_sectors(fd, cipher, target, 1, old_size, what)
    new_plain = (old_plain + bytes(SECTOR_SIZE))[:new_len]
    if undo is not None:
        undo.save(target)
    if not any(new_plain) and new_len >= MIN_HOLE_TAIL:
        # An all-zero sector is stored as zeros: a hole, which reads back as zeros.
        if any(old_cipher):
            pwrite_exact(fd, bytes(len(old_cipher)), start)
        return
    pwrite_exact(fd, cipher.encrypt(target, new_plain), start)


def seal_new_short_tail(fd: int, cipher: SectorCipher, old_size: int, new_size: int) -> None:
    """After growing by truncate/fallocate: a new last sector under 16 bytes is not a hole, so encrypt its zeros."""
    tail_len = new_size % SECTOR_SIZE
    tail_start = new_size - tail_len
    if 0 < tail_len < MIN_HOLE_TAIL and tail_start >= old_size:
        pwrite_exact(fd, cipher.encrypt(tail_start // SECTOR_SIZE, bytes(tail_len)), tail_start)


def _undo(undo: _TailUndo, what: str) -> None:
    try:
        undo.restore()
    except OSError as exc:  # the error being raised is the one to report; this one is logged
        log.error("%s: could not put the file back to %d bytes after a failed size change (%s)",
                  what, undo.old_size, exc.strerror or exc)


def write(fd: int, cipher: SectorCipher, data, offset: int, what: str) -> int:
    """Encrypt `data` at `offset`; the number of bytes stored (see the module's rules on failure).

    The sectors the range touches are written in one pwrite run; the parts of its first and
    last sector outside the range are read back first (read-modify-write) when they hold
    data. A write past the end of file first re-encrypts the old partial last sector as a
    whole sector; the gap in between stays a hole.
    """
    if not data:
        return 0
    old_size = os.fstat(fd).st_size
    end = offset + len(data)
    new_size = max(old_size, end)
    first, count = sector_span(offset, len(data))
    last = first + count - 1
    undo = _TailUndo(fd, old_size)
    if old_size % SECTOR_SIZE and old_size // SECTOR_SIZE < first:
        reencode_tail(fd, cipher, old_size, new_size, what, undo)
    size_before = os.fstat(fd).st_size  # the tail step may have grown it to a whole sector
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
    return _short_write(fd, err, what, undo, size_before, offset, end, region_start, stored)


def _short_write(fd: int, err: OSError, what: str, undo: _TailUndo, size_before: int,
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
        elif os.fstat(fd).st_size > complete_end:
            os.ftruncate(fd, complete_end)  # the torn sector was new: drop it
    acked = min(end, complete_end) - offset
    if acked <= 0:
        _undo(undo, what)
        raise err
    return acked


def truncate(fd: int, cipher: SectorCipher, length: int, what: str) -> None:
    """Set the plaintext size to `length`, all or nothing.

    Growing: the old partial last sector is re-encrypted for its new length, the file is
    extended (the new range is a hole: zeros), and a new last sector under 16 bytes is
    encrypted. Shrinking: the sector that becomes the partial last one is re-encrypted for its
    shorter length, then the file is cut. On failure the old size and tail come back.
    """
    old_size = os.fstat(fd).st_size
    if length == old_size:
        return
    undo = _TailUndo(fd, old_size)
    try:
        reencode_tail(fd, cipher, old_size, length, what, undo)
        os.ftruncate(fd, length)
        seal_new_short_tail(fd, cipher, old_size, length)
    except OSError:
        _undo(undo, what)
        raise


def write_zeros(fd: int, cipher: SectorCipher, offset: int, length: int, what: str) -> None:
    """Zero [offset, offset+length) of the plaintext, or raise (ENOSPC when only part was stored)."""
    if length > 0 and write(fd, cipher, bytes(length), offset, what) != length:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fallocate_encrypted(fd: int, cipher: SectorCipher, mode: int, offset: int, size: int, what: str) -> None:
    """fallocate(2) of the plaintext range [offset, offset+size).

    Mode 0 / KEEP_SIZE: allocate backing space (all-zero backing blocks are holes, so the
    plaintext does not change); without KEEP_SIZE a range past the end grows the file as
    `truncate` does, all or nothing. PUNCH_HOLE / ZERO_RANGE: the whole sectors of the range
    become holes in the backing file and the partial sectors at its edges are rewritten with
    encrypted zeros (ZERO_RANGE past the end without KEEP_SIZE first grows the file); an error
    there may leave part of the range zeroed, as on other filesystems. Other modes: EOPNOTSUPP.
    """
    if mode & ~FALLOC_MODES_SUPPORTED:
        raise OSError(errno.EOPNOTSUPP, f"fallocate mode {mode:#x} would move ciphertext between sectors")
    old_size = os.fstat(fd).st_size
    end = offset + size
    if not mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
        if mode & FALLOC_FL_KEEP_SIZE or end <= old_size:
            fallocate(fd, mode, offset, size)
            return
        undo = _TailUndo(fd, old_size)
        try:
            reencode_tail(fd, cipher, old_size, end, what, undo)
            fallocate(fd, mode, offset, size)
            seal_new_short_tail(fd, cipher, old_size, end)
        except OSError:
            _undo(undo, what)
            raise
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
