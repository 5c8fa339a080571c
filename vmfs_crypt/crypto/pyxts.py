"""The Python reference sector cipher (PySectorCipher): XTS-AES-256 over 512-byte sectors, batched with numpy.

The bulk path (`_xts_units`, `_bulk`) encrypts many XTS data units in one go: the tweaks
of all units go through one AES call under the tweak key, the masks T_j = T_0 * alpha^j
are computed with numpy, and the masked blocks go through one AES-ECB pass under the data
key (see `_Ecb` for why that pass is an XTS context with a zero tweak). Large calls are
cut into chunks of at most 256 KiB worked in reusable scratch arrays, and every result
is written straight into the caller's output buffer. The result is byte-identical to one
XTS data unit per sector (checked against NIST CAVP vectors, cryptography's XTS and
botan in tests/test_xts.py); docs/PERFORMANCE.md has the measurements.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .sectors import SECTOR_SIZE, XTS_BLOCK_SIZE
from .xts import DEK_SIZE, MAX_SECTOR_NO, sector_tweak

_BLOCKS_PER_SECTOR = SECTOR_SIZE // XTS_BLOCK_SIZE
_MAX_BLOCKS_PER_UNIT = 32  # one fold of the overflow suffices for alpha^j, j < 32 (_Scratch.masks_for)
_CHUNK_BLOCKS = 16384  # 256 KiB of data per round (measured best: 64 and 128 KiB were slower on 1 MiB calls)
_U64 = np.dtype("<u8")
# 0-d arrays: numpy's cheapest scalar operands
_ONE, _TWO, _SEVEN = (np.array(k, dtype=_U64) for k in (1, 2, 7))
_add, _xor, _shl, _shr, _copyto = np.add, np.bitwise_xor, np.left_shift, np.right_shift, np.copyto
_SCRATCH_POOL_MAX = 4  # idle scratch sets kept per unit size (each is about 1.5 MiB)
_VIEW_CACHE_MAX = 64  # chunk sizes whose array views a scratch set keeps


class _Ecb:
    """AES-ECB under one key, with contexts reused across calls.

    Fast path: XTS whose encrypted tweak is zero is plain ECB (every mask is
    0 * alpha^j = 0), and OpenSSL's XTS code runs much faster than its ECB code (it
    is vectorised; 13.6 vs 7.9 GB/s on 64 KiB here, see docs/PERFORMANCE.md). So the contexts are XTS contexts
    under key || aux, where aux is a random throwaway AES key and the tweak is
    AES_aux^-1(0). A self-check at construction falls back to real ECB contexts if
    that ever stops giving ECB output. ECB (and this XTS) keeps no state between
    `update` calls on whole blocks, so a context can serve any number of calls.
    Contexts are pooled in lists (pop/append are atomic), which keeps them safe with
    concurrent callers: each call owns the context it popped.
    """

    __slots__ = ("_alg", "_mode", "_pools")

    def __init__(self, key: bytes) -> None:
        self._pools: tuple[list, list] = ([], [])  # decryptors, encryptors
        aux = os.urandom(32)
        while aux == key:  # pragma: no cover - 2^-256
            aux = os.urandom(32)
        zero_tweak = Cipher(algorithms.AES(aux), modes.ECB()).decryptor().update(bytes(16))
        self._alg, self._mode = algorithms.AES(key + aux), modes.XTS(zero_tweak)
        probe = os.urandom(64)
        ecb = Cipher(algorithms.AES(key), modes.ECB())
        expect = ecb.encryptor().update(probe)
        fast = Cipher(self._alg, self._mode)
        if fast.encryptor().update(probe) != expect or fast.decryptor().update(expect) != probe:
            self._alg, self._mode = algorithms.AES(key), modes.ECB()  # pragma: no cover

    def __repr__(self) -> str:
        return "_Ecb(<key hidden>)"

    def acquire(self, encrypt: bool):
        try:
            return self._pools[encrypt].pop()
        except IndexError:
            cipher = Cipher(self._alg, self._mode)
            return cipher.encryptor() if encrypt else cipher.decryptor()

    def release(self, ctx, encrypt: bool) -> None:
        self._pools[encrypt].append(ctx)


class _Scratch:
    """Preallocated work arrays for one chunk of up to `cap` units of `bpu` blocks.

    Planes are laid out (lane, unit, block) with lane 0 = low and lane 1 = high 64 bits
    of a 128-bit value, so that every numpy operation below runs over contiguous,
    non-broadcast operands (numpy's fast loops); only the last one writes the masks
    interleaved as the data is: (unit, block, lane).
    """

    __slots__ = ("bpu", "cap", "_views", "_full", "_base")

    def __init__(self, bpu: int) -> None:
        self.bpu = bpu
        self.cap = max(1, _CHUNK_BLOCKS // bpu)
        self._views: dict[int, tuple] = {}
        self._base = np.zeros((), dtype=_U64)
        cap = self.cap
        tw = np.zeros((cap, 2), dtype=_U64)  # tweak inputs: (unit number, 0)
        t0 = np.empty(cap * 2 + 2, dtype=_U64)  # encrypted tweaks (+16 bytes for update_into)
        t2 = np.empty((2, cap), dtype=_U64)  # T_0 as rows lo, hi
        ext = np.empty((2, cap, bpu), dtype=_U64)  # t2 repeated along the blocks
        shl = np.empty((2, cap, bpu), dtype=_U64)
        shl[...] = np.arange(bpu, dtype=_U64)  # j
        shr = np.uint64(64) - shl[0]  # 64 - j (numpy defines x >> 64 == 0)
        rot = np.empty((2, cap, bpu), dtype=_U64)
        carry = np.empty((2, cap, bpu), dtype=_U64)
        f, g = ext[0], ext[1]  # fold temporaries reuse ext, dead by then (smaller cache footprint)
        masks = np.empty((cap, bpu, 2), dtype=_U64)
        self._full = (tw, t0, t2, ext, shl, shr, rot, carry, f, g, masks)

    def _views_for(self, n: int) -> tuple:
        v = self._views.get(n)
        if v is None:
            tw, t0, t2, ext, shl, shr, rot, carry, f, g, masks = self._full
            v = (tw[:n, 0], memoryview(tw[:n]).cast("B"), memoryview(t0).cast("B"),
                 t0[: 2 * n].reshape(n, 2).T, t2[:, :n], t2[:, :n, None], ext[:, :n],
                 ext[0, :n], ext[1, :n], shl[:, :n], shr[:n], rot[:, :n], carry[:, :n],
                 carry[0, :n], carry[1, :n], f[:n], g[:n], masks[:n],
                 masks[:n].transpose(2, 0, 1), _ARANGE[:n])
            if len(self._views) < _VIEW_CACHE_MAX:
                self._views[n] = v
        return v

    def masks_for(self, ecb2, first_unit_no: int, n: int) -> np.ndarray:
        """Masks T_j = E_K2(unit) * alpha^j (IEEE 1619 5.3.1) of `n` units, shape (n, bpu, 2).

        A 128-bit value is (lo, hi) uint64, little-endian. Multiplying by alpha^j (j < 32)
        is a 128-bit rotation left by j followed by folding the j bits h that wrapped
        around into x^128 = x^7 + x^2 + x + 1: lo ^= h<<1 ^ h<<2 ^ h<<7 (the h<<0 term is
        already there from the rotation). h has at most 31 bits, so one fold suffices.
        """
        (tw_lo, tw_bytes, t0_bytes, t0_t, t2, t2_col, ext, ext_lo, ext_hi, shl, shr, rot,
         carry, h, c_hi, f, g, masks, masks_planes, arange) = self._views_for(n)
        base = self._base
        base[()] = first_unit_no
        _add(arange, base, tw_lo)
        ecb2.update_into(tw_bytes, t0_bytes)
        _copyto(t2, t0_t)
        _copyto(ext, t2_col)
        _shl(ext, shl, rot)  # (lo << j, hi << j)
        _shr(ext_hi, shr, h)  # h = hi >> 64-j, the bits that wrap around
        _shr(ext_lo, shr, c_hi)  # lo >> 64-j, carried into the high half
        # ext is dead from here on: f and g live in it
        _shl(h, _ONE, f)
        _shl(h, _TWO, g)
        _xor(f, g, f)
        _shl(h, _SEVEN, g)
        _xor(f, g, f)
        _xor(h, f, h)  # h * (x^7 + x^2 + x + 1)
        _xor(rot, carry, masks_planes)  # disjoint bits except the fold: XOR
        return masks


_ARANGE = np.arange(_CHUNK_BLOCKS, dtype=_U64)
_SCRATCH: dict[int, list[_Scratch]] = {}


def _xts_units_into(k1: _Ecb, k2: _Ecb, first_unit_no: int, data, blocks_per_unit: int,
                    encrypt: bool, out: bytearray, out_off: int = 0) -> None:
    """XTS-encrypt/decrypt whole data units of `blocks_per_unit` 16-byte blocks into `out`.

    Unit k of `data` uses tweak `first_unit_no + k` (128-bit little-endian). `out` must
    have at least 15 spare bytes after `out_off + len(data)` (AES-ECB update_into needs
    them; they are not written). `out_off` must be a multiple of 8.
    """
    bpu = blocks_per_unit
    unit = bpu * XTS_BLOCK_SIZE
    size = len(data)
    n_units = size // unit
    if not 1 <= bpu <= _MAX_BLOCKS_PER_UNIT:
        raise ValueError(f"data units of 1..{_MAX_BLOCKS_PER_UNIT} blocks are supported")
    if n_units * unit != size:
        raise ValueError("data must be whole data units")
    if first_unit_no < 0 or first_unit_no + n_units - 1 > MAX_SECTOR_NO:
        raise ValueError("data unit numbers must lie in 0..2^64-1")
    if len(out) < out_off + size + XTS_BLOCK_SIZE - 1 or out_off % 8:
        raise ValueError("output buffer too small or misaligned")
    if n_units:
        _bulk(k1, k2, first_unit_no, data, n_units, bpu, encrypt, out, out_off)


def _bulk(k1: _Ecb, k2: _Ecb, first_unit_no: int, data, n_units: int, bpu: int, encrypt: bool,
          out: bytearray, out_off: int) -> None:
    """The work of `_xts_units_into`, arguments already checked (n_units >= 1)."""
    words = bpu * 2
    total = n_units * words
    src = np.frombuffer(data, dtype=_U64, count=total)
    dst = np.frombuffer(out, dtype=_U64, count=total, offset=out_off)
    try:
        s = _SCRATCH[bpu].pop()
    except (KeyError, IndexError):
        s = _Scratch(bpu)
    ecb1 = k1.acquire(encrypt)
    ecb2 = k2.acquire(True)
    with memoryview(out) as out_mv:
        cap = s.cap
        if n_units <= cap:  # one chunk, the common case
            masks = s.masks_for(ecb2, first_unit_no, n_units)
            src = src.reshape(masks.shape)
            dst = dst.reshape(masks.shape)
            _xor(src, masks, dst)
            # In place: AES-ECB on whole blocks keeps no state and allows in == out.
            ecb1.update_into(out_mv[out_off: out_off + 8 * total], out_mv[out_off:])
            _xor(dst, masks, dst)
        else:
            for u in range(0, n_units, cap):
                n = n_units - u if n_units - u < cap else cap
                masks = s.masks_for(ecb2, first_unit_no + u, n)
                a, b = u * words, (u + n) * words
                o = dst[a:b].reshape(masks.shape)
                _xor(src[a:b].reshape(masks.shape), masks, o)
                ecb1.update_into(out_mv[out_off + 8 * a: out_off + 8 * b], out_mv[out_off + 8 * a:])
                _xor(o, masks, o)
    # Only reached without an exception: a context that saw an error may hold a partial
    # block, so it is dropped rather than pooled.
    k1.release(ecb1, encrypt)
    k2.release(ecb2, True)
    pool = _SCRATCH.setdefault(bpu, [])
    if len(pool) < _SCRATCH_POOL_MAX:
        pool.append(s)


def _xts_units(k1: _Ecb, k2: _Ecb, first_unit_no: int, data, blocks_per_unit: int,
               encrypt: bool) -> bytearray:
    """Like `_xts_units_into`, returning a new bytearray of len(data)."""
    out = bytearray(len(data) + XTS_BLOCK_SIZE)
    _xts_units_into(k1, k2, first_unit_no, data, blocks_per_unit, encrypt, out)
    del out[len(data):]
    return out


class PySectorCipher:
    """Encrypts and decrypts runs of sectors of one file under its DEK.

    Whole sectors go through `_bulk` (bulk AES-ECB with the XTS masks computed by
    numpy); the result is byte-identical to one XTS data unit per sector, which the
    known-answer tests check against cryptography's XTS, NIST CAVP and botan. A final
    partial sector (a file whose size is not a multiple of 512) is its own data unit:
    XTS with ciphertext stealing when it is at least 16 bytes, otherwise XORed with the
    first bytes of the XTS encryption of 16 zero bytes under that sector's tweak
    (docs/FORMAT.md, "Partial last sector").

    `encrypt` and `decrypt` accept any bytes-like object and return a new **bytearray**
    of the same length (len, slicing, == with bytes and os.pwrite work; it is mutable and
    unhashable, so wrap it in bytes() where an immutable object is needed, e.g. a FUSE
    read result for mfusepy). Safe to use from several threads at once.
    """

    __slots__ = ("_k1", "_k2", "_xts")

    def __init__(self, dek: bytes) -> None:
        if len(dek) != DEK_SIZE:
            raise ValueError("a DEK is 64 bytes (XTS-AES-256)")
        dek = bytes(dek)
        if dek[:32] == dek[32:]:
            # IEEE 1619-2018 requires distinct halves; cryptography refuses them too.
            raise ValueError("the two halves of an XTS key must differ")
        self._k1 = _Ecb(dek[:32])
        self._k2 = _Ecb(dek[32:])
        self._xts = algorithms.AES(dek)

    def __repr__(self) -> str:
        return "PySectorCipher(<key hidden>)"

    # -- a partial last sector -----------------------------------------------------
    def _partial(self, sector_no: int, data: bytes, encrypt: bool) -> bytes:
        tweak = sector_tweak(sector_no)
        if len(data) >= XTS_BLOCK_SIZE:
            cipher = Cipher(self._xts, modes.XTS(tweak))
            ctx = cipher.encryptor() if encrypt else cipher.decryptor()
            return ctx.update(data) + ctx.finalize()
        enc = Cipher(self._xts, modes.XTS(tweak)).encryptor()
        pad = enc.update(bytes(XTS_BLOCK_SIZE))
        return bytes(a ^ b for a, b in zip(data, pad))

    def _run(self, first_sector_no: int, data, encrypt: bool) -> bytearray:
        if type(data) is not bytes and type(data) is not bytearray:
            data = memoryview(data).cast("B")
        total = len(data)
        n_whole, tail_len = divmod(total, SECTOR_SIZE)
        if first_sector_no < 0 or first_sector_no + n_whole - (not tail_len) > MAX_SECTOR_NO:
            raise ValueError("sector numbers must lie in 0..2^64-1")
        out = bytearray(total + XTS_BLOCK_SIZE)
        if n_whole:
            _bulk(self._k1, self._k2, first_sector_no, data, n_whole, _BLOCKS_PER_SECTOR, encrypt, out, 0)
        if tail_len:
            whole_len = total - tail_len
            tail = bytes(data[whole_len:])
            out[whole_len:total] = self._partial(first_sector_no + n_whole, tail, encrypt)
        del out[total:]
        return out

    def encrypt(self, first_sector_no: int, plaintext) -> bytearray:
        """Encrypt consecutive sectors starting at `first_sector_no`; only the last may be partial."""
        if not len(plaintext):
            return bytearray()
        return self._run(first_sector_no, plaintext, True)

    def decrypt(self, first_sector_no: int, ciphertext) -> bytearray:
        """Decrypt consecutive sectors starting at `first_sector_no`; only the last may be partial."""
        if not len(ciphertext):
            return bytearray()
        return self._run(first_sector_no, ciphertext, False)

