"""Copying a file sector by sector, decrypting and/or encrypting, keeping holes; what encrypt/decrypt/rekey run."""

import os
from typing import Callable, Iterator

from ..crypto.sectors import SECTOR_SIZE
from ..crypto.xts import SectorCipher
from ..errors import DataError
from ..format.atomicio import open_regular, pwrite_all
from ..format.holes import decrypt_sectors, nonzero_runs

CHUNK_SIZE = 4 << 20  # bytes per read/encrypt/write step
Progress = Callable[[int], None]


def chunks(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off < size:
        data = os.pread(fd, min(CHUNK_SIZE, size - off), off)
        if not data:
            raise DataError(f"file shrank while being read at byte {off}")
        yield off, data
        off += len(data)


def transform_file(src_path: str, dst_path: str, decrypt_with: SectorCipher | None,
                   encrypt_with: SectorCipher | None, progress: Progress) -> None:
    """Copy src to a new dst, decrypting and/or encrypting each sector, keeping holes; fsync dst."""
    src = open_regular(src_path)
    try:
        dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except BaseException:
        os.close(src)
        raise
    try:
        st = os.fstat(src)
        for off, data in chunks(src, st.st_size):
            first = off // SECTOR_SIZE
            if decrypt_with is not None:
                data = decrypt_sectors(decrypt_with, first, data)
            for a, b in nonzero_runs(data):
                out = data[a:b] if encrypt_with is None else encrypt_with.encrypt(first + a // SECTOR_SIZE, data[a:b])
                done, err = pwrite_all(dst, out, off + a)
                if err is not None:
                    raise err
            progress(len(data))
        os.ftruncate(dst, st.st_size)
        os.fchmod(dst, st.st_mode & 0o7777)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
