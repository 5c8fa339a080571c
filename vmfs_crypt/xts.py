"""Sector cipher: XTS-AES-256 over 512-byte sectors, tweak = sector number (aes-xts-plain64)."""

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .sectors import SECTOR_SIZE, XTS_BLOCK_SIZE

DEK_SIZE = 64  # XTS-AES-256: two 256-bit AES keys (IEEE 1619-2007, 5.1)
MAX_SECTOR_NO = 2**64 - 1  # plain64: the tweak is the 64-bit sector number, zero-extended to 128 bits
_BLOCKS_PER_SECTOR = SECTOR_SIZE // XTS_BLOCK_SIZE
_LE_U64 = np.dtype("<u8")
# Shift counts for alpha^j, j = 1..31 (alpha^0 is the encrypted tweak itself).
_SHIFTS = np.arange(1, _BLOCKS_PER_SECTOR, dtype=np.uint64)
_RSHIFTS = np.uint64(64) - _SHIFTS


def _clmul_0x87(h: np.ndarray) -> np.ndarray:
    """Carry-less product h * (x^7 + x^2 + x + 1): the reduction of x^128 in GF(2^128)."""
    return h ^ (h << np.uint64(1)) ^ (h << np.uint64(2)) ^ (h << np.uint64(7))


def _tweak_masks(t0: np.ndarray) -> np.ndarray:
    """Masks T_j = T_0 * alpha^j for j = 0..31 of each sector (IEEE 1619 5.3.1), shape (n, 32, 2).

    T_0 is a 128-bit little-endian integer held as (lo, hi) uint64. Multiplying by
    alpha^j (j < 32) is a left shift by j whose j overflowing bits h fold back in as
    h * 0x87; h has at most 31 bits, so one fold suffices.
    """
    n = t0.shape[0]
    lo = t0[:, 0:1]
    hi = t0[:, 1:2]
    masks = np.empty((n, _BLOCKS_PER_SECTOR, 2), dtype=np.uint64)
    masks[:, 0, :] = t0
    overflow = hi >> _RSHIFTS
    masks[:, 1:, 0] = (lo << _SHIFTS) ^ _clmul_0x87(overflow)
    masks[:, 1:, 1] = (hi << _SHIFTS) | (lo >> _RSHIFTS)
    return masks


def sector_tweak(sector_no: int) -> bytes:
    """The XTS tweak of a sector: its number as 16 little-endian bytes (aes-xts-plain64)."""
    if not 0 <= sector_no <= MAX_SECTOR_NO:
        raise ValueError(f"sector number {sector_no} is outside 0..2^64-1")
    return sector_no.to_bytes(16, "little")


class SectorCipher:
    """Encrypts and decrypts runs of sectors of one file under its DEK.

    Whole sectors go through one AES-ECB call per run with the XTS masks computed in
    bulk (numpy); the result is byte-identical to one XTS data unit per sector, which the
    known-answer tests check against cryptography's XTS, NIST CAVP and botan. A final
    partial sector (a file whose size is not a multiple of 512) is its own data unit:
    XTS with ciphertext stealing when it is at least 16 bytes, otherwise XORed with the
    first bytes of the XTS encryption of 16 zero bytes under that sector's tweak
    (docs/FORMAT.md, "Partial last sector").
    """

    __slots__ = ("_k1", "_k2", "_dek")

    def __init__(self, dek: bytes) -> None:
        if len(dek) != DEK_SIZE:
            raise ValueError("a DEK is 64 bytes (XTS-AES-256)")
        if dek[:32] == dek[32:]:
            # IEEE 1619-2018 requires distinct halves; cryptography refuses them too.
            raise ValueError("the two halves of an XTS key must differ")
        self._dek = bytes(dek)
        self._k1 = algorithms.AES(self._dek[:32])
        self._k2 = algorithms.AES(self._dek[32:])

    def __repr__(self) -> str:
        return "SectorCipher(<key hidden>)"

    # -- whole sectors ---------------------------------------------------------------
    def _masks(self, first_sector_no: int, n: int) -> np.ndarray:
        if first_sector_no < 0 or first_sector_no + n - 1 > MAX_SECTOR_NO:
            raise ValueError("sector numbers must lie in 0..2^64-1")
        tweaks = np.zeros((n, 2), dtype=_LE_U64)
        tweaks[:, 0] = np.arange(n, dtype=np.uint64) + np.uint64(first_sector_no)
        enc = Cipher(self._k2, modes.ECB()).encryptor()
        t0 = np.frombuffer(enc.update(tweaks.tobytes()), dtype=_LE_U64).reshape(n, 2)
        return _tweak_masks(t0)

    def _whole(self, first_sector_no: int, data, encrypt: bool) -> bytes:
        n = len(data) // SECTOR_SIZE
        masks = self._masks(first_sector_no, n)
        blocks = np.frombuffer(data, dtype=_LE_U64, count=n * SECTOR_SIZE // 8).reshape(masks.shape)
        blocks = blocks ^ masks
        cipher = Cipher(self._k1, modes.ECB())
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out = np.empty(n * SECTOR_SIZE + XTS_BLOCK_SIZE, dtype=np.uint8)
        ctx.update_into(blocks.data.cast("B"), out)
        result = out[: n * SECTOR_SIZE].view(_LE_U64).reshape(masks.shape)
        result ^= masks
        return result.tobytes()

    # -- a partial last sector -----------------------------------------------------
    def _partial(self, sector_no: int, data: bytes, encrypt: bool) -> bytes:
        tweak = sector_tweak(sector_no)
        if len(data) >= XTS_BLOCK_SIZE:
            cipher = Cipher(algorithms.AES(self._dek), modes.XTS(tweak))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            return ctx.update(data) + ctx.finalize()
        enc = Cipher(algorithms.AES(self._dek), modes.XTS(tweak)).encryptor()
        pad = enc.update(bytes(XTS_BLOCK_SIZE))
        return bytes(a ^ b for a, b in zip(data, pad))

    def _run(self, first_sector_no: int, data, encrypt: bool) -> bytes:
        whole_len = len(data) - len(data) % SECTOR_SIZE
        parts = []
        if whole_len:
            parts.append(self._whole(first_sector_no, memoryview(data)[:whole_len], encrypt))
        if whole_len != len(data):
            tail_sector = first_sector_no + whole_len // SECTOR_SIZE
            parts.append(self._partial(tail_sector, bytes(memoryview(data)[whole_len:]), encrypt))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def encrypt(self, first_sector_no: int, plaintext) -> bytes:
        """Encrypt consecutive sectors starting at `first_sector_no`; only the last may be partial."""
        if not len(plaintext):
            return b""
        return self._run(first_sector_no, plaintext, True)

    def decrypt(self, first_sector_no: int, ciphertext) -> bytes:
        """Decrypt consecutive sectors starting at `first_sector_no`; only the last may be partial."""
        if not len(ciphertext):
            return b""
        return self._run(first_sector_no, ciphertext, False)
