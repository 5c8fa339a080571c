"""Sector cipher: XTS-AES-256 over 512-byte sectors, tweak = sector number (aes-xts-plain64).

`SectorCipher` is the compiled core's (native/xts_batch.c: the tweaks of a request batched,
the GIL released) when it is built, else the Python reference `PySectorCipher`
(crypto/pyxts.py, numpy-batched); both give the same bytes (tests/test_native.py,
tests/test_xts.py with VMFS_CRYPT_NATIVE=0). The reference loads only when asked for, so a
process on the compiled path does not import numpy (about 0.2 s of every command's start).
"""

import secrets

from .native import native as _native

DEK_SIZE = 64  # XTS-AES-256: two 256-bit AES keys (IEEE 1619-2007, 5.1)
MAX_SECTOR_NO = 2**64 - 1  # plain64: the tweak is the 64-bit sector number, zero-extended to 128 bits


def sector_tweak(sector_no: int) -> bytes:
    """The XTS tweak of a sector: its number as 16 little-endian bytes (aes-xts-plain64)."""
    if not 0 <= sector_no <= MAX_SECTOR_NO:
        raise ValueError(f"sector number {sector_no} is outside 0..2^64-1")
    return sector_no.to_bytes(16, "little")


def new_dek() -> bytes:
    """A fresh random DEK (from `secrets`) whose two halves differ, as XTS requires (FORMAT.md 3.1)."""
    while True:
        dek = secrets.token_bytes(DEK_SIZE)
        if dek[:32] != dek[32:]:
            return dek


class PySplitCipher:
    """The key of a file mid-way through an in-place re-encryption (docs/FORMAT.md 7.8), in Python.

    Sectors below `boundary_sector` are under `below`, the others under `above`; None stands
    for plaintext (bytes unchanged). The reference of the compiled core's `split_cipher`
    (native/xts_batch.c vc_xts_split_new), which tests compare it with.
    """

    def __init__(self, below, above, boundary_sector: int) -> None:
        if not 0 <= boundary_sector <= MAX_SECTOR_NO:
            raise ValueError(f"sector number {boundary_sector} is outside 0..2^64-1")
        self.below, self.above, self.boundary_sector = below, above, boundary_sector

    def _run(self, enc: bool, first_sector_no: int, data) -> bytes:
        data = memoryview(data).cast("B")
        units = -(-len(data) // 512)
        n_below = min(max(self.boundary_sector - first_sector_no, 0), units)
        lo_len = len(data) if n_below == units else n_below * 512
        out = []
        for cipher, first, part in ((self.below, first_sector_no, data[:lo_len]),
                                    (self.above, first_sector_no + n_below, data[lo_len:])):
            if len(part):
                out.append(bytes(part) if cipher is None else
                           (cipher.encrypt if enc else cipher.decrypt)(first, part))
        return b"".join(out)

    def encrypt(self, first_sector_no: int, plaintext) -> bytes:
        return self._run(True, first_sector_no, plaintext)

    def decrypt(self, first_sector_no: int, ciphertext) -> bytes:
        return self._run(False, first_sector_no, ciphertext)

    def __reduce__(self):
        raise TypeError("a SectorCipher holds key material and cannot be pickled or copied")


def split_cipher(below, above, boundary_sector: int):
    """Sectors below `boundary_sector` under `below`, the rest under `above` (None: plaintext); FORMAT.md 7.8."""
    if _native is not None and SectorCipher is _native.SectorCipher:
        return _native.split_cipher(below, above, boundary_sector)
    return PySplitCipher(below, above, boundary_sector)


def __getattr__(name: str):
    """PySectorCipher and the reference's internals, loaded on first use."""
    if name.startswith("__"):  # the import system probes __path__ & co.: not a reason to load numpy
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import pyxts
    try:
        return getattr(pyxts, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if _native is not None:
    SectorCipher = _native.SectorCipher
else:
    from .pyxts import PySectorCipher as SectorCipher  # noqa: E402,F401
