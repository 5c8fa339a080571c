"""Known-answer and cross-implementation tests of the XTS-AES-256 sector cipher.

Oracles: NIST CAVP XTSGenAES256 (cryptography-vectors), cryptography's own XTS (one
data unit per sector, i.e. what dm-crypt aes-xts-plain64 does) and Debian's `botan`
CLI, an independent implementation. No timing assertions here (see scripts/bench.py).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
from importlib import resources

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vmfs_crypt.crypto import xts
from vmfs_crypt.crypto.sectors import SECTOR_SIZE
from vmfs_crypt.crypto.xts import DEK_SIZE, MAX_SECTOR_NO, SectorCipher, sector_tweak

NIST_FILE = "ciphers/AES/XTS/tweak-dataunitseqno/XTSGenAES256.rsp"


# -- reference implementation: one cryptography XTS data unit per sector -------------
def ref_xts(key: bytes, unit_no: int, data: bytes, encrypt: bool) -> bytes:
    cipher = Cipher(algorithms.AES(key), modes.XTS(unit_no.to_bytes(16, "little")))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


def ref_sectors(dek: bytes, first: int, data: bytes, encrypt: bool) -> bytes:
    """Sector by sector; a partial last sector < 16 bytes is XORed with XTS(0^16)."""
    out = []
    for i in range(0, len(data), SECTOR_SIZE):
        chunk = data[i:i + SECTOR_SIZE]
        sector = first + i // SECTOR_SIZE
        if len(chunk) >= 16:
            out.append(ref_xts(dek, sector, chunk, encrypt))
        else:
            pad = ref_xts(dek, sector, bytes(16), True)
            out.append(bytes(a ^ b for a, b in zip(chunk, pad)))
    return b"".join(out)


def units(dek: bytes, first: int, data: bytes, bpu: int, encrypt: bool) -> bytes:
    return bytes(xts._xts_units(xts._Ecb(dek[:32]), xts._Ecb(dek[32:]), first, data, bpu, encrypt))


def random_dek(rnd: random.Random) -> bytes:
    return rnd.randbytes(DEK_SIZE)


# -- (a) NIST CAVP ---------------------------------------------------------------
def load_nist() -> list[dict]:
    try:
        import cryptography_vectors
    except ImportError:  # pragma: no cover - `make deps` installs it (extra "test")
        return []
    text = (resources.files(cryptography_vectors) / NIST_FILE).read_text()
    entries, direction, cur = [], None, {}
    for line in text.splitlines() + [""]:
        line = line.strip()
        if line in ("[ENCRYPT]", "[DECRYPT]"):
            direction = line[1:-1].lower()
        elif "=" in line:
            k, v = (x.strip() for x in line.split("=", 1))
            cur[k] = v
        elif not line and cur:
            cur["direction"] = direction
            entries.append(cur)
            cur = {}
    return entries


NIST = load_nist()
needs_nist = pytest.mark.skipif(not NIST, reason="cryptography-vectors not installed")
NIST_WHOLE = [e for e in NIST if int(e["DataUnitLen"]) % 128 == 0]


@needs_nist
def test_nist_file_has_the_expected_whole_byte_entries():
    lens = sorted({int(e["DataUnitLen"]) for e in NIST_WHOLE})
    assert lens == [256, 384]
    assert len(NIST_WHOLE) == 600  # 200 of 256 bits, 400 of 384 bits
    assert {e["direction"] for e in NIST_WHOLE} == {"encrypt", "decrypt"}


@pytest.mark.parametrize("e", NIST_WHOLE, ids=lambda e: f"{e['direction']}-{e['COUNT']}-{e['DataUnitLen']}")
def test_nist_vector(e):
    key = bytes.fromhex(e["Key"])
    seq = int(e["DataUnitSeqNumber"])
    pt, ct = bytes.fromhex(e["PT"]), bytes.fromhex(e["CT"])
    bpu = int(e["DataUnitLen"]) // 128
    assert len(pt) == bpu * 16
    encrypt = e["direction"] == "encrypt"
    src, want = (pt, ct) if encrypt else (ct, pt)
    # cryptography's XTS (the oracle the rest of the tests lean on) ...
    assert ref_xts(key, seq, src, encrypt) == want
    # ... and our bulk path with a data unit of `bpu` blocks, in both directions.
    assert units(key, seq, src, bpu, encrypt) == want
    assert units(key, seq, want, bpu, not encrypt) == src


@needs_nist
def test_nist_vectors_run_through_the_bulk_path_many_units_at_once():
    """Every NIST key, its unit placed at several positions inside a longer run."""
    rnd = random.Random(7)
    for e in NIST_WHOLE[::25]:
        key = bytes.fromhex(e["Key"])
        seq = int(e["DataUnitSeqNumber"])
        bpu = int(e["DataUnitLen"]) // 128
        pt, ct = bytes.fromhex(e["PT"]), bytes.fromhex(e["CT"])  # in both sections
        for before in (0, 1, 5, 300):  # 300 units of 3 blocks cross a 64 KiB chunk
            if seq < before:
                continue
            filler = [rnd.randbytes(bpu * 16) for _ in range(before)]
            run = b"".join(filler) + pt
            out = units(key, seq - before, run, bpu, True)
            assert out[-len(ct):] == ct
            assert units(key, seq - before, out, bpu, False) == run


# -- the bulk path against cryptography's XTS, unit by unit ----------------------------
@pytest.mark.parametrize("bpu", [1, 2, 3, 7, 8, 16, 31, 32])
def test_bulk_units_match_one_xts_per_unit(bpu):
    rnd = random.Random(bpu)
    for n_units in (1, 2, 9, 4096 // bpu + 3):  # the last one spans two chunks
        dek = random_dek(rnd)
        first = rnd.choice([0, 1, 2**32 - 2, 2**63, MAX_SECTOR_NO - n_units + 1])
        data = rnd.randbytes(n_units * bpu * 16)
        want = b"".join(ref_xts(dek, first + k, data[k * bpu * 16:(k + 1) * bpu * 16], True)
                        for k in range(n_units))
        assert units(dek, first, data, bpu, True) == want
        assert units(dek, first, want, bpu, False) == data


def test_bulk_units_refuse_bad_arguments():
    k = xts._Ecb(bytes(range(32)))
    with pytest.raises(ValueError):
        xts._xts_units(k, k, 0, bytes(33 * 16), 33, True)  # unit too long for one fold
    with pytest.raises(ValueError):
        xts._xts_units(k, k, 0, bytes(100), 2, True)  # not whole units
    with pytest.raises(ValueError):
        xts._xts_units(k, k, MAX_SECTOR_NO, bytes(64), 2, True)  # unit numbers past 2^64-1
    with pytest.raises(ValueError):
        xts._xts_units(k, k, -1, bytes(32), 2, True)


# -- SectorCipher against the per-sector reference --------------------------------
SIZES = [512, 1024, 4096, 65536, 65536 + 512, 1 << 20, 200 * 512 + 16, 3 * 512 + 17,
         512 + 1, 511, 16, 15, 1, 4096 + 300]


@pytest.mark.parametrize("size", SIZES)
def test_sector_cipher_matches_reference(size):
    rnd = random.Random(size)
    dek = random_dek(rnd)
    sc = SectorCipher(dek)
    n_sectors = -(-size // SECTOR_SIZE)
    for first in (0, 1, 2**32 - 3, MAX_SECTOR_NO - n_sectors + 1):
        data = rnd.randbytes(size)
        ct = sc.encrypt(first, data)
        assert len(ct) == size
        assert bytes(ct) == ref_sectors(dek, first, data, True)
        assert bytes(sc.decrypt(first, ct)) == data
        assert bytes(sc.decrypt(first, data)) == ref_sectors(dek, first, data, False)


def test_sector_cipher_accepts_bytes_like_inputs_and_returns_a_bytearray():
    rnd = random.Random(3)
    dek = random_dek(rnd)
    sc = SectorCipher(dek)
    data = rnd.randbytes(8 * 512 + 40)
    want = ref_sectors(dek, 9, data, True)
    raw = bytearray(b"x" + data)
    unaligned = memoryview(raw)[1:]  # not 8-byte aligned
    for arg in (data, bytearray(data), memoryview(data), unaligned, np.frombuffer(data, np.uint8)):
        out = sc.encrypt(9, arg)
        assert isinstance(out, bytearray)
        assert out == want
    assert sc.encrypt(9, b"") == b"" and sc.decrypt(9, b"") == b""


def test_sector_cipher_output_works_with_pwrite(tmp_path):
    dek = random_dek(random.Random(4))
    sc = SectorCipher(dek)
    data = os.urandom(4096)
    ct = sc.encrypt(0, data)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert os.pwrite(fd, ct, 0) == 4096
        assert os.pwrite(fd, ct[512:1024], 4096) == 512
        assert os.pread(fd, 4096, 0) == ct
    finally:
        os.close(fd)


def test_sector_cipher_is_thread_safe():
    rnd = random.Random(5)
    dek = random_dek(rnd)
    sc = SectorCipher(dek)
    jobs = [(rnd.randrange(2**40), rnd.randbytes(rnd.choice([512, 4096, 65536, 70000]))) for _ in range(40)]
    want = [ref_sectors(dek, first, data, True) for first, data in jobs]
    errors = []

    def worker(order):
        for i in order:
            first, data = jobs[i]
            for _ in range(3):
                if sc.encrypt(first, data) != want[i] or sc.decrypt(first, want[i]) != data:
                    errors.append(i)

    threads = [threading.Thread(target=worker, args=(random.Random(t).sample(range(len(jobs)), len(jobs)),))
               for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_sector_range_is_enforced():
    sc = SectorCipher(random_dek(random.Random(6)))
    with pytest.raises(ValueError):
        sc.encrypt(-1, bytes(512))
    with pytest.raises(ValueError):
        sc.encrypt(MAX_SECTOR_NO, bytes(1024))  # second sector would be 2^64
    with pytest.raises(ValueError):
        sc.encrypt(MAX_SECTOR_NO, bytes(513))  # partial second sector too
    sc.encrypt(MAX_SECTOR_NO, bytes(512))
    sc.encrypt(MAX_SECTOR_NO, bytes(100))
    assert sector_tweak(0) == bytes(16)
    assert sector_tweak(2**32) == bytes([0, 0, 0, 0, 1]) + bytes(11)
    assert sector_tweak(MAX_SECTOR_NO) == b"\xff" * 8 + bytes(8)
    with pytest.raises(ValueError):
        sector_tweak(2**64)
    with pytest.raises(ValueError):
        sector_tweak(-1)


# -- (b) botan, an independent implementation --------------------------------------
BOTAN = shutil.which("botan")
needs_botan = pytest.mark.skipif(BOTAN is None, reason="botan CLI not installed (make deps installs it)")


def botan_xts(dek: bytes, sector_no: int, data: bytes, encrypt: bool) -> bytes:
    args = [BOTAN, "encryption", "--mode=aes-256-xts", f"--key={dek.hex()}",
            f"--iv={sector_tweak(sector_no).hex()}"]
    if not encrypt:
        args.append("--decrypt")
    r = subprocess.run(args, input=data, capture_output=True, timeout=60, check=True)
    return r.stdout


BOTAN_SECTORS = [0, 1, 2, 255, 256, 2**32 - 1, 2**32, 2**63, MAX_SECTOR_NO]


@needs_botan
@pytest.mark.parametrize("sector_no", BOTAN_SECTORS)
def test_whole_sector_matches_botan(sector_no):
    rnd = random.Random(sector_no)
    dek = random_dek(rnd)
    sc = SectorCipher(dek)
    pt = rnd.randbytes(512)
    ct = sc.encrypt(sector_no, pt)
    assert bytes(ct) == botan_xts(dek, sector_no, pt, True)
    assert botan_xts(dek, sector_no, bytes(ct), False) == pt
    other = rnd.randbytes(512)  # decrypt direction against botan's encryption
    assert bytes(sc.decrypt(sector_no, botan_xts(dek, sector_no, other, True))) == other


@needs_botan
@pytest.mark.parametrize("first", [2**32 - 3, MAX_SECTOR_NO - 7, 0])
def test_multi_sector_run_matches_botan_sector_by_sector(first):
    rnd = random.Random(first)
    dek = random_dek(rnd)
    pt = rnd.randbytes(8 * 512)
    ct = SectorCipher(dek).encrypt(first, pt)
    for i in range(8):
        assert bytes(ct[i * 512:(i + 1) * 512]) == botan_xts(dek, first + i, pt[i * 512:(i + 1) * 512], True), i
    # One 4096-byte XTS data unit is something else: the sector split matters.
    assert bytes(ct) != botan_xts(dek, first, pt, True)


@needs_botan
@pytest.mark.parametrize("tail", [16, 17, 100, 256, 500, 511])
def test_partial_last_sector_matches_botan_ciphertext_stealing(tail):
    rnd = random.Random(tail)
    dek = random_dek(rnd)
    sc = SectorCipher(dek)
    first = 2**32 - 2
    pt = rnd.randbytes(3 * 512 + tail)
    ct = sc.encrypt(first, pt)
    last = first + 3
    assert bytes(ct[3 * 512:]) == botan_xts(dek, last, pt[3 * 512:], True)
    assert bytes(ct[:512]) == botan_xts(dek, first, pt[:512], True)
    assert bytes(sc.decrypt(first, ct)) == pt


@needs_botan
@pytest.mark.parametrize("tail", [1, 7, 15])
def test_tiny_last_sector_is_xored_with_botan_keystream(tail):
    """< 16 bytes cannot be one XTS unit: XOR with XTS(16 zero bytes) of that sector."""
    rnd = random.Random(100 + tail)
    dek = random_dek(rnd)
    pt = rnd.randbytes(512 + tail)
    ct = SectorCipher(dek).encrypt(2**32 - 1, pt)
    pad = botan_xts(dek, 2**32, bytes(16), True)
    assert bytes(ct[512:]) == bytes(a ^ b for a, b in zip(pt[512:], pad))


# -- (c) properties of the construction --------------------------------------------
def test_equal_sectors_at_different_numbers_differ():
    sc = SectorCipher(random_dek(random.Random(8)))
    pt = bytes(512) * 4
    ct = sc.encrypt(10, pt)
    blocks = {bytes(ct[i:i + 512]) for i in range(0, len(ct), 512)}
    assert len(blocks) == 4
    assert sc.encrypt(11, bytes(512)) == ct[512:1024]
    assert sc.encrypt(2**32 + 10, bytes(512)) != ct[:512]
    # within a sector, equal 16-byte blocks differ too
    cblocks = {bytes(ct[i:i + 16]) for i in range(0, 512, 16)}
    assert len(cblocks) == 32


def test_dek_with_equal_halves_is_refused():
    half = os.urandom(32)
    with pytest.raises(ValueError):
        SectorCipher(half + half)
    with pytest.raises(ValueError):
        SectorCipher(bytes(64))


@pytest.mark.parametrize("length", [0, 16, 32, 63, 65, 128])
def test_wrong_dek_length_is_refused(length):
    with pytest.raises(ValueError):
        SectorCipher(os.urandom(length))


def test_repr_never_shows_key_bytes():
    dek = bytes(range(1, 65))
    sc, py = SectorCipher(dek), xts.PySectorCipher(dek)
    for text in (repr(sc), str(sc), repr(py), str(py), repr(py._k1), repr(py._k2)):
        assert dek.hex() not in text
        assert dek[:32].hex() not in text and dek[32:].hex() not in text
        assert dek.hex()[:16] not in text
        assert repr(dek[:8])[2:-1] not in text
        assert "hidden" in text
    assert not hasattr(sc, "__dict__") and not hasattr(py, "__dict__")  # nothing else to dump by accident
