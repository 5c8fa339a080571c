"""Sparse files: an all-zero sector in a backing file is a hole and reads as plaintext zeros (docs/FORMAT.md 3.4)."""

from ..crypto.sectors import SECTOR_SIZE, XTS_BLOCK_SIZE
from ..crypto.xts import SectorCipher

MIN_HOLE_TAIL = XTS_BLOCK_SIZE  # shorter partial last sectors are never holes
_ZERO_BLOCK = bytes(XTS_BLOCK_SIZE)
# From this size a look at each sector's first 8 bytes (numpy, one cache line per sector) beats
# the substring search for 16 zero bytes: 1 MiB of ciphertext 5.5 against 182 us here; below it
# numpy's per-call cost dominates (docs/PERFORMANCE.md, offline re-encryption).
_SCAN_BY_SECTOR_MIN = 64 * 1024


def has_zero_sector(data) -> bool:
    """`zero_sector_mask(data).any()`, without a pass over every byte of real ciphertext or data."""
    if len(data) < _SCAN_BY_SECTOR_MIN:
        if not isinstance(data, (bytes, bytearray)):
            data = bytes(data)  # `in` on a memoryview looks for an element, not a substring
        return _ZERO_BLOCK in data and bool(zero_sector_mask(data).any())
    import numpy as np

    n_full = len(data) // SECTOR_SIZE
    words = np.frombuffer(data, dtype=np.uint64, count=n_full * (SECTOR_SIZE // 8)).reshape(n_full, SECTOR_SIZE // 8)
    maybe = np.flatnonzero(words[:, 0] == 0)  # an all-zero sector starts with a zero word
    if maybe.size and not words[maybe].any(axis=1).all():
        return True
    tail = bytes(memoryview(data)[n_full * SECTOR_SIZE:])
    return len(tail) >= MIN_HOLE_TAIL and tail == bytes(len(tail))


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
    if not has_zero_sector(ciphertext):
        return plaintext  # fast path: real ciphertext has no all-zero sector
    holes = zero_sector_mask(ciphertext)
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
