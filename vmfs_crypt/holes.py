"""Sparse files: an all-zero sector in a backing file is a hole and reads as plaintext zeros (docs/FORMAT.md)."""

import numpy as np

from .sectors import SECTOR_SIZE
from .xts import SectorCipher


def zero_sector_mask(data) -> np.ndarray:
    """For each (possibly partial last) sector of `data`: is every byte zero?"""
    n_full = len(data) // SECTOR_SIZE
    arr = np.frombuffer(data, dtype=np.uint8)
    mask = np.zeros(-(-len(data) // SECTOR_SIZE), dtype=bool)
    if n_full:
        mask[:n_full] = ~arr[: n_full * SECTOR_SIZE].reshape(n_full, SECTOR_SIZE).any(axis=1)
    if len(data) % SECTOR_SIZE:
        mask[-1] = not arr[n_full * SECTOR_SIZE:].any()
    return mask


def decrypt_sectors(cipher: SectorCipher, first_sector_no: int, ciphertext) -> bytes:
    """Decrypt a run of backing sectors, giving zeros for holes."""
    plaintext = cipher.decrypt(first_sector_no, ciphertext)
    holes = zero_sector_mask(ciphertext)
    if not holes.any():
        return plaintext
    buf = bytearray(plaintext)
    for idx in np.flatnonzero(holes):
        start = int(idx) * SECTOR_SIZE
        end = min(start + SECTOR_SIZE, len(buf))
        buf[start:end] = bytes(end - start)
    return bytes(buf)


def nonzero_runs(plain) -> list[tuple[int, int]]:
    """(start, end) byte ranges of consecutive sectors holding a non-zero byte; the rest can stay holes."""
    zero = zero_sector_mask(plain)
    edges = np.flatnonzero(np.diff(np.concatenate(([1], zero, [1])).astype(np.int8)))
    return [(int(a) * SECTOR_SIZE, min(int(b) * SECTOR_SIZE, len(plain))) for a, b in zip(edges[::2], edges[1::2])]
