"""Sparse files: an all-zero sector in a backing file is a hole and reads as plaintext zeros (docs/FORMAT.md 3.4)."""

from ..crypto.sectors import SECTOR_SIZE, XTS_BLOCK_SIZE
from ..crypto.xts import SectorCipher

MIN_HOLE_TAIL = XTS_BLOCK_SIZE  # shorter partial last sectors are never holes
_ZERO_BLOCK = bytes(XTS_BLOCK_SIZE)


def zero_sector_mask(data) -> "numpy.ndarray":  # noqa: F821
    """For each sector of `data`: is it all zero and so a hole (in ciphertext) or storable as one (in plaintext)?

    A partial last sector shorter than 16 bytes is never a hole: its ciphertext is an XOR
    pad (FORMAT.md 3.3), which is all zero for one plaintext in 2^(8r), so it is always
    stored encrypted.
    """
    import numpy as np  # only on slow paths: holes and offline copies (keeps numpy out of start-up)

    n_full = len(data) // SECTOR_SIZE
    arr = np.frombuffer(data, dtype=np.uint8)
    mask = np.zeros(-(-len(data) // SECTOR_SIZE), dtype=bool)
    if n_full:
        mask[:n_full] = ~arr[: n_full * SECTOR_SIZE].reshape(n_full, SECTOR_SIZE).any(axis=1)
    tail = len(data) % SECTOR_SIZE
    if tail >= MIN_HOLE_TAIL:
        mask[-1] = not arr[n_full * SECTOR_SIZE:].any()
    return mask


def decrypt_sectors(cipher: SectorCipher, first_sector_no: int, ciphertext) -> bytes:
    """Decrypt a run of backing sectors, giving zeros for holes."""
    plaintext = cipher.decrypt(first_sector_no, ciphertext)
    if _ZERO_BLOCK not in ciphertext:
        # Fast path (a C substring search): every hole holds 16 zero bytes in a row, and
        # real ciphertext does so with probability about len/2^128.
        return plaintext
    holes = zero_sector_mask(ciphertext)
    if not holes.any():
        return plaintext
    buf = bytearray(plaintext)
    for idx in holes.nonzero()[0]:
        start = int(idx) * SECTOR_SIZE
        end = min(start + SECTOR_SIZE, len(buf))
        buf[start:end] = bytes(end - start)
    return bytes(buf)


def nonzero_runs(plain) -> list[tuple[int, int]]:
    """(start, end) byte ranges of consecutive sectors holding a non-zero byte; the rest can stay holes."""
    import numpy as np

    zero = zero_sector_mask(plain)
    edges = np.flatnonzero(np.diff(np.concatenate(([1], zero, [1])).astype(np.int8)))
    return [(int(a) * SECTOR_SIZE, min(int(b) * SECTOR_SIZE, len(plain))) for a, b in zip(edges[::2], edges[1::2])]
