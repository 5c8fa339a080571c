"""Tests of the native data path, vmfs_crypt._native (native/*.c).

Oracles:
- the sector cipher: vmfs_crypt's own Python SectorCipher, cryptography's XTS one data unit
  per sector (what dm-crypt aes-xts-plain64 does) and NIST CAVP XTSGenAES256;
- the data path: `PyRef` below, a minimal copy of fs.py's `_read_plain` / `_write_plain` /
  `_reencode_tail` / `_seal_new_short_tail` / `_truncate_encrypted` / the punch branch of
  `_fallocate_encrypted` (vmfs_crypt/fs.py at dd90455; copied because the package is being
  restructured), a plain reference file (a bytearray), and an independent decryption of
  the backing file with plain `cryptography` calls;
- short writes: a 1 MiB tmpfs filled to the edge, and RLIMIT_FSIZE (byte-exact short writes)
  in a child process;
- FUSE wiring: a child process mounting a minimal mfusepy passthrough with the native
  entries spliced into mfusepy's fuse_operations, under libfuse 2.9 and libfuse 3.

`python tests/test_native.py fsize-child DIR` and `... mount-child ...` are the child processes.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import pickle
import random
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
from importlib import resources

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vmfs_crypt.crypto.native import native, reason

try:  # the package is being moved into subpackages
    from vmfs_crypt.crypto.xts import PySectorCipher
except ImportError:  # pragma: no cover - layout before the restructuring
    from vmfs_crypt.xts import SectorCipher as PySectorCipher

pytestmark = pytest.mark.skipif(native is None, reason=f"native data path off: {reason}")

SECTOR = 512
MIN_HOLE_TAIL = 16
MAX_SECTOR_NO = 2**64 - 1
NIST_FILE = "ciphers/AES/XTS/tweak-dataunitseqno/XTSGenAES256.rsp"
_FH = itertools.count(1_000_000)  # handle numbers no other test uses
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _sys_env() -> dict:
    """Environment for system tools: without the sanitizer preload of make test-native-asan."""
    return {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS", "UBSAN_OPTIONS")}


# -- independent oracle: cryptography's XTS, one data unit per sector ------------------
def ref_xts(dek: bytes, unit: int, data: bytes, encrypt: bool) -> bytes:
    c = Cipher(algorithms.AES(dek), modes.XTS(unit.to_bytes(16, "little")))
    ctx = c.encryptor() if encrypt else c.decryptor()
    return ctx.update(data) + ctx.finalize()


def ref_sectors(dek: bytes, first: int, data: bytes, encrypt: bool) -> bytes:
    out = []
    for i in range(0, len(data), SECTOR):
        chunk, n = data[i:i + SECTOR], first + i // SECTOR
        if len(chunk) >= 16:
            out.append(ref_xts(dek, n, chunk, encrypt))
        else:
            pad = ref_xts(dek, n, bytes(16), True)
            out.append(bytes(a ^ b for a, b in zip(chunk, pad)))
    return b"".join(out)


def indep_plaintext(dek: bytes, backing: bytes) -> bytes:
    """FORMAT.md 3 from the text: decrypt a whole backing file, holes read as zeros."""
    out = bytearray()
    for i in range(0, len(backing), SECTOR):
        s = backing[i:i + SECTOR]
        if len(s) >= MIN_HOLE_TAIL and not any(s):
            out += bytes(len(s))
        else:
            out += ref_sectors(dek, i // SECTOR, s, False)
    return bytes(out)


def read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


# -- the Python reference: fs.py's data path on one fd -----------------------------------
def _zero_sector_mask(data) -> list[bool]:
    n_full = len(data) // SECTOR
    mask = [not any(data[i * SECTOR:(i + 1) * SECTOR]) for i in range(n_full)]
    tail = len(data) % SECTOR
    if tail:
        mask.append(tail >= MIN_HOLE_TAIL and not any(data[n_full * SECTOR:]))
    return mask


def _decrypt_sectors(cipher, first: int, ciphertext: bytes) -> bytes:
    """vmfs_crypt/holes.py decrypt_sectors."""
    plaintext = cipher.decrypt(first, ciphertext)
    if bytes(16) not in ciphertext:
        return bytes(plaintext)
    buf = bytearray(plaintext)
    for idx, hole in enumerate(_zero_sector_mask(ciphertext)):
        if hole:
            start = idx * SECTOR
            end = min(start + SECTOR, len(buf))
            buf[start:end] = bytes(end - start)
    return bytes(buf)


def _sector_span(off: int, length: int) -> tuple[int, int]:
    first, last = off // SECTOR, (off + length - 1) // SECTOR
    return first, last - first + 1


def _sector_len(sector_no: int, file_size: int) -> int:
    return max(0, min(SECTOR, file_size - sector_no * SECTOR))


class PyRef:
    """fs.py (dd90455) `_read_sectors`, `_read_plain`, `_write_plain`, `_reencode_tail`,
    `_seal_new_short_tail`, `_truncate_encrypted` and the punch branch of
    `_fallocate_encrypted`, on one backing fd, without locks (callers hold them)."""

    def __init__(self, fd: int, cipher) -> None:
        self.fd, self.cipher = fd, cipher

    def _read_sectors(self, first: int, count: int, file_size: int) -> bytes:
        start = first * SECTOR
        length = min(count * SECTOR, file_size - start)
        if length <= 0:
            return b""
        ciphertext = os.pread(self.fd, length, start)
        if len(ciphertext) != length:
            raise OSError(errno.EIO, f"short read at sector {first}")
        return _decrypt_sectors(self.cipher, first, ciphertext)

    def read_plain(self, size: int, offset: int) -> bytes:
        file_size = os.fstat(self.fd).st_size
        end = min(offset + size, file_size)
        if end <= offset:
            return b""
        first, count = _sector_span(offset, end - offset)
        plaintext = self._read_sectors(first, count, file_size)
        skip = offset - first * SECTOR
        return bytes(memoryview(plaintext)[skip:skip + end - offset])

    def reencode_tail(self, old_size: int, new_size: int) -> None:
        if new_size >= old_size:
            target, boundary = old_size // SECTOR, old_size
        else:
            target, boundary = new_size // SECTOR, new_size
        if boundary % SECTOR == 0:
            return
        new_len = _sector_len(target, new_size)
        old_plain = self._read_sectors(target, 1, old_size)
        new_plain = (old_plain + bytes(SECTOR))[:new_len]
        if not any(new_plain) and new_len >= MIN_HOLE_TAIL:
            if old_plain:
                os.pwrite(self.fd, bytes(len(old_plain)), target * SECTOR)
            return
        os.pwrite(self.fd, self.cipher.encrypt(target, new_plain), target * SECTOR)

    def seal_new_short_tail(self, old_size: int, new_size: int) -> None:
        tail_len = new_size % SECTOR
        tail_start = new_size - tail_len
        if 0 < tail_len < MIN_HOLE_TAIL and tail_start >= old_size:
            os.pwrite(self.fd, self.cipher.encrypt(tail_start // SECTOR, bytes(tail_len)), tail_start)

    def write_plain(self, data: bytes, offset: int) -> int:
        if not data:
            return 0
        old_size = os.fstat(self.fd).st_size
        end = offset + len(data)
        new_size = max(old_size, end)
        first, count = _sector_span(offset, len(data))
        last = first + count - 1
        if old_size % SECTOR and old_size // SECTOR < first:
            self.reencode_tail(old_size, new_size)
        region_start = first * SECTOR
        region_end = min((last + 1) * SECTOR, new_size)
        if offset == region_start and end == region_end:
            plain = data
        else:
            buf = bytearray(region_end - region_start)
            need_head = offset != region_start and region_start < old_size
            need_tail = (end != region_end and last * SECTOR < old_size
                         and (last != first or not need_head))
            if need_head:
                head = self._read_sectors(first, 1, old_size)
                buf[:len(head)] = head
            if need_tail:
                tail = self._read_sectors(last, 1, old_size)
                pos = last * SECTOR - region_start
                buf[pos:pos + len(tail)] = tail
            buf[offset - region_start:end - region_start] = data
            plain = buf
        os.pwrite(self.fd, self.cipher.encrypt(first, plain), region_start)
        return len(data)

    def truncate(self, length: int) -> None:
        old_size = os.fstat(self.fd).st_size
        if length == old_size:
            return
        self.reencode_tail(old_size, length)
        os.ftruncate(self.fd, length)
        self.seal_new_short_tail(old_size, length)

    def punch_inner(self, offset: int, size: int) -> list[tuple[int, int]]:
        """The hole-punching half of a KEEP_SIZE discard; returns the edges to zero by writes."""
        clip_end = min(offset + size, os.fstat(self.fd).st_size)
        if clip_end <= offset:
            return []
        inner_start = -(-offset // SECTOR) * SECTOR
        inner_end = clip_end // SECTOR * SECTOR
        if inner_end > inner_start:
            _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, inner_start, inner_end - inner_start)
            edges = [(offset, inner_start), (inner_end, clip_end)]
        else:
            edges = [(offset, clip_end)]
        return [(lo, hi) for lo, hi in edges if hi > lo]


# -- helpers ---------------------------------------------------------------------------------
class Registered:
    """An encrypted or plain backing file registered with the native handle table."""

    def __init__(self, path, cipher, name: str, dek: bytes | None = None, flags=os.O_RDWR | os.O_CREAT) -> None:
        self.path, self.dek = str(path), dek
        self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o600)
        self.state = native.FileState(cipher, name)
        self.fh = next(_FH)
        native.register(self.fh, self.fd, self.state)

    def write(self, data, off: int) -> int:
        return native.handle_write(self.fh, data, off)

    def read(self, size: int, off: int) -> bytes:
        return native.handle_read(self.fh, size, off)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        try:
            native.unregister(self.fh)
        except KeyError:
            pass
        os.close(self.fd)


@pytest.fixture
def logs():
    got: list[str] = []
    native.set_log(got.append)
    yield got
    native.set_log(None)


def load_nist() -> list[dict]:
    try:
        import cryptography_vectors
    except ImportError:  # pragma: no cover
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


# ============================== the sector cipher ==========================================
def test_loader_reports_the_library():
    assert native.openssl_version().startswith("OpenSSL 3.")
    assert native.openssl_version() in reason
    assert native.FUSE_HEADERS[0] == 3
    expect = os.environ.get("VMFS_CRYPT_NATIVE_EXPECT")  # make test-native-asan: the ASan build
    if expect:
        assert os.path.realpath(native.__file__).startswith(os.path.realpath(expect)), native.__file__


def test_loader_can_be_switched_off():
    out = subprocess.run([sys.executable, "-c", "from vmfs_crypt.crypto import native as n; print(n.native, '|', n.reason)"],
                         env=dict(os.environ, VMFS_CRYPT_NATIVE="0"), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None | disabled by VMFS_CRYPT_NATIVE=0"


def test_cipher_matches_python_and_cryptography_random():
    rnd = random.Random(13)
    for i in range(400):
        dek = rnd.randbytes(64)
        nat, py = native.SectorCipher(dek), PySectorCipher(dek)
        kind = i % 4
        if kind == 0:
            length = rnd.randint(1, 200 * 1024)
        elif kind == 1:
            length = SECTOR * rnd.randint(0, 8) + rnd.randint(1, 15)  # tails under 16 bytes
        elif kind == 2:
            length = SECTOR * rnd.randint(0, 8) + rnd.randint(16, 511)  # tails with stealing
        else:
            length = SECTOR * rnd.randint(1, 400)  # whole sectors
        units = -(-length // SECTOR)
        first = rnd.choice([0, rnd.randrange(2**64 - units + 1), 2**64 - units, 2**32 - 1, 2**63 - 1])
        data = rnd.randbytes(length)
        ct = nat.encrypt(first, data)
        assert type(ct) is bytearray
        assert ct == py.encrypt(first, data)
        assert nat.decrypt(first, ct) == data
        assert nat.decrypt(first, data) == py.decrypt(first, data)
        if length <= 8 * SECTOR + 511:  # the slow independent oracle on the short ones
            assert ct == ref_sectors(dek, first, data, True)


def test_cipher_every_tail_length_both_directions():
    rnd = random.Random(14)
    dek = rnd.randbytes(64)
    nat, py = native.SectorCipher(dek), PySectorCipher(dek)
    for tail in range(SECTOR):
        for whole in (0, 1, 3):
            if whole == 0 and tail == 0:
                continue
            data = rnd.randbytes(whole * SECTOR + tail)
            first = rnd.randrange(2**40)
            assert nat.encrypt(first, data) == py.encrypt(first, data)
            assert nat.decrypt(first, data) == py.decrypt(first, data)
    data = rnd.randbytes(3 * SECTOR + 7)
    assert nat.encrypt(2**64 - 4, data) == ref_sectors(dek, 2**64 - 4, data, True)


NIST = load_nist()


@pytest.mark.skipif(not NIST, reason="cryptography-vectors not installed")
def test_cipher_nist_cavp_xtsgenaes256():
    checked = 0
    for e in NIST:
        if int(e["DataUnitLen"]) % 8:
            continue  # 140/250-bit units are not whole bytes
        key, seq = bytes.fromhex(e["Key"]), int(e["DataUnitSeqNumber"])
        pt, ct = bytes.fromhex(e["PT"]), bytes.fromhex(e["CT"])
        c = native.SectorCipher(key)
        if e["direction"] == "encrypt":
            assert c.encrypt(seq, pt) == ct, e["COUNT"]
        else:
            assert c.decrypt(seq, ct) == pt, e["COUNT"]
        checked += 1
    assert checked == 600


def test_cipher_rejects_bad_keys_and_ranges():
    with pytest.raises(ValueError, match="a DEK is 64 bytes"):
        native.SectorCipher(bytes(63))
    with pytest.raises(ValueError, match="a DEK is 64 bytes"):
        native.SectorCipher(bytes(65))
    with pytest.raises(ValueError, match="two halves"):
        native.SectorCipher(bytes(range(32)) * 2)
    with pytest.raises(TypeError):
        native.SectorCipher("k" * 64)
    c = native.SectorCipher(bytes(range(64)))
    for first, length in ((2**64, 1), (-1, 1), (2**64 - 1, SECTOR + 1), (2**64 - 2, 3 * SECTOR), (2**70, 512)):
        with pytest.raises(ValueError, match="sector numbers"):
            c.encrypt(first, bytes(length))
        with pytest.raises(ValueError, match="sector numbers"):
            c.decrypt(first, bytes(length))
    assert c.encrypt(2**64 - 1, bytes(SECTOR)) == PySectorCipher(bytes(range(64))).encrypt(2**64 - 1, bytes(SECTOR))
    assert c.encrypt(2**64 - 2, bytes(2 * SECTOR - 1))  # last sector partial, number 2^64-1
    assert c.encrypt(-5, b"") == bytearray() and c.decrypt(2**80, b"") == bytearray()  # as vmfs_crypt.xts
    with pytest.raises(TypeError):
        c.encrypt(1.0, b"x" * 16)
    with pytest.raises(TypeError):
        c.encrypt(0, "text")
    with pytest.raises(TypeError):
        c.encrypt(0)
    # bytes-like inputs
    import numpy as np
    data = bytes(range(256)) * 5
    assert c.encrypt(3, bytearray(data)) == c.encrypt(3, memoryview(data)) == c.encrypt(3, np.frombuffer(data, np.uint8))


def test_cipher_hides_and_refuses_to_copy_key():
    dek = bytes(range(64))
    c = native.SectorCipher(dek)
    assert repr(c) == "SectorCipher(<key hidden>)"
    assert dek.hex() not in repr(c) and not hasattr(c, "__dict__")
    for attempt in (lambda: pickle.dumps(c), lambda: __import__("copy").copy(c), lambda: __import__("copy").deepcopy(c)):
        with pytest.raises(TypeError):
            attempt()
    with pytest.raises(TypeError):
        type("Sub", (native.SectorCipher,), {})


def test_cipher_threads_hammering_one_key():
    rnd = random.Random(15)
    dek = rnd.randbytes(64)
    c = native.SectorCipher(dek)
    py = PySectorCipher(dek)
    jobs = []
    for _ in range(48):
        length = rnd.choice([SECTOR * 8, SECTOR * 128 + 100, rnd.randint(1, 70000), 9])
        first = rnd.randrange(2**63)
        data = rnd.randbytes(length)
        jobs.append((first, data, bytes(py.encrypt(first, data))))
    errors = []

    def worker(seed):
        r = random.Random(seed)
        for _ in range(150):
            first, data, ct = r.choice(jobs)
            if c.encrypt(first, data) != ct or c.decrypt(first, ct) != data:
                errors.append((seed, first, len(data)))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_cipher_releases_the_gil():
    c = native.SectorCipher(bytes(range(64)))
    data = bytes(64 << 20)
    ticks = [0]
    running = threading.Event()
    stop = threading.Event()

    def count():
        running.set()
        while not stop.is_set():
            ticks[0] += 1

    t = threading.Thread(target=count)
    t.start()
    running.wait()
    try:
        for _ in range(5):  # a loaded machine may not schedule the counter during one call
            before = ticks[0]
            c.encrypt(0, data)
            if ticks[0] > before:
                break
        # with the GIL held the counter could not move during the call
        assert ticks[0] > before
    finally:
        stop.set()
        t.join()


# ============================== file state, handles, FUSE entries ===========================
def test_filestate_api(tmp_path):
    c = native.SectorCipher(bytes(range(64)))
    s = native.FileState(c, "vm1/disk-flat.vmdk")
    assert s.cipher is c and s.name == "vm1/disk-flat.vmdk" and s.revoked is False
    assert "disk-flat" in repr(s) and "encrypted=True" in repr(s)
    s.name = "vm1/renamed-flat.vmdk"
    s.revoked = 1
    assert s.name == "vm1/renamed-flat.vmdk" and s.revoked is True
    assert native.FileState(None, "x").cipher is None
    s2 = native.FileState(None, "weird-\udcff-name")  # surrogateescape round trip
    assert s2.name == "weird-\udcff-name"
    with pytest.raises(TypeError):
        native.FileState(PySectorCipher(bytes(range(64))), "x")
    with pytest.raises(TypeError):
        native.FileState(None, b"bytes")
    with pytest.raises(ValueError):
        native.FileState(None, "nul\0name")
    with pytest.raises(RuntimeError):
        s.release_read()
    with pytest.raises(RuntimeError):
        s.release_write()
    s.acquire_read()
    s.acquire_read()
    s.release_read()
    s.release_read()
    s.acquire_write()
    s.release_write()
    with pytest.raises(TypeError):
        pickle.dumps(s)


def test_register_errors(tmp_path):
    f = Registered(tmp_path / "a", None, "a")
    try:
        with pytest.raises(ValueError, match="already registered"):
            native.register(f.fh, f.fd, f.state)
        with pytest.raises(OSError) as e:
            native.register(next(_FH), 987654, f.state)
        assert e.value.errno == errno.EBADF
        with pytest.raises(KeyError):
            native.unregister(next(_FH))
        with pytest.raises(ValueError):
            native.register(-1, f.fd, f.state)
        with pytest.raises(TypeError):
            native.register(next(_FH), f.fd, object())
        # our own fd may close at once: the table holds a duplicate
        fh = next(_FH)
        fd = os.open(f.path, os.O_RDWR)
        native.register(fh, fd, f.state)
        os.close(fd)
        assert native.handle_write(fh, b"still served", 0) == 12
        assert native.handle_read(fh, 100, 0) == b"still served"
        native.unregister(fh)
        with pytest.raises(OSError) as e:
            native.handle_read(fh, 10, 0)
        assert e.value.errno == errno.EBADF  # not registered, no fallback installed
    finally:
        f.close()


def test_revoked_refuses_io(tmp_path):
    dek = os.urandom(64)
    f = Registered(tmp_path / "r", native.SectorCipher(dek), "vm/r-flat.vmdk", dek)
    try:
        assert f.write(b"abc" * 300, 0) == 900
        f.state.revoked = True
        for op in (lambda: f.read(10, 0), lambda: f.write(b"x", 0), lambda: f.write(b"", 0)):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EACCES
        f.state.revoked = False
        assert f.read(9, 0) == b"abcabcabc"
    finally:
        f.close()


def test_set_cipher_serves_under_the_new_key_only_with_the_write_lock(tmp_path):
    """An emptied file gets a new DEK (issue 7, case 8): the file state switches cipher under its write lock."""
    old_dek, new_dek = os.urandom(64), os.urandom(64)
    old, new = native.SectorCipher(old_dek), native.SectorCipher(new_dek)
    f = Registered(tmp_path / "k", old, "vm/k.nvram", old_dek)
    plain = native.FileState(None, "plain")
    try:
        assert f.write(b"A" * 1000, 0) == 1000
        with pytest.raises(RuntimeError):
            f.state.set_cipher(new)  # without the write lock
        with pytest.raises(TypeError):
            f.state.set_cipher(None)
        with pytest.raises(RuntimeError):
            plain.set_cipher(new)  # a plain file too needs the write lock held
        plain.acquire_write()
        try:
            plain.set_cipher(new)  # an online encrypt gives a plain file a key (issue 10)
        finally:
            plain.release_write()
        assert plain.cipher is new
        f.state.acquire_write()
        try:
            os.ftruncate(f.fd, 0)
            f.state.set_cipher(new)
        finally:
            f.state.release_write()
        assert f.state.cipher is new
        assert f.write(b"B" * 1000, 0) == 1000
        with open(f.path, "rb") as raw:
            at_rest = raw.read()
        assert PySectorCipher(new_dek).decrypt(0, at_rest) == b"B" * 1000
        assert PySectorCipher(old_dek).decrypt(0, at_rest) != b"B" * 1000
        assert f.read(1000, 0) == b"B" * 1000
    finally:
        f.close()


def test_data_fault_short_read_is_eio_and_logged(logs):
    """A backing file shorter than its size says (here a sysfs file: st_size 4096, 23 bytes)."""
    path = "/sys/kernel/mm/transparent_hugepage/enabled"
    if not os.path.exists(path):
        pytest.skip("no sysfs file to fake a short backing read with")
    dek = bytes(range(64))
    f = Registered(path, native.SectorCipher(dek), "vm/broken-flat.vmdk", dek, flags=os.O_RDONLY)
    before = native.stats()["faults"]
    try:
        with pytest.raises(OSError) as e:
            f.read(512, 1024)
        assert e.value.errno == errno.EIO
    finally:
        f.close()
    assert native.stats()["faults"] == before + 1
    assert logs == ["vm/broken-flat.vmdk: read at byte 1024 (sector 2) failed: short read at sector 2"]
    assert dek.hex()[:16] not in logs[0]


def test_install_fallback_and_abi(tmp_path):
    """The FUSE entries: registered fh -> native; other fh -> the fallback; both ABIs."""
    calls = []
    # mfusepy's prototypes, with the file info as an opaque pointer (the fallback receives
    # the very pointer libfuse passed)
    READ = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64,
                            ctypes.c_void_p)
    WRITE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64,
                             ctypes.c_void_p)

    def fb_read(path, buf, size, off, fi):
        calls.append(("read", path, size, off))
        ctypes.memmove(buf, b"fallback", 8)
        return 8

    def fb_write(path, buf, size, off, fi):
        calls.append(("write", path, size, off, ctypes.string_at(buf, size)))
        return size

    keep = READ(fb_read), WRITE(fb_write)
    addr = [ctypes.cast(k, ctypes.c_void_p).value for k in keep]

    class FI3(ctypes.Structure):  # libfuse 3.14 include/fuse_common.h, up to fh
        _fields_ = [("flags", ctypes.c_int), ("bits", ctypes.c_uint), ("padding2", ctypes.c_uint),
                    ("fh", ctypes.c_uint64), ("lock_owner", ctypes.c_uint64), ("poll_events", ctypes.c_uint32)]

    class FI2(ctypes.Structure):  # libfuse 2.9 include/fuse/fuse_common.h, up to fh
        _fields_ = [("flags", ctypes.c_int), ("fh_old", ctypes.c_ulong), ("writepage", ctypes.c_int),
                    ("bits", ctypes.c_uint), ("fh", ctypes.c_uint64), ("lock_owner", ctypes.c_uint64),
                    ("poll_events", ctypes.c_uint32)]

    import mfusepy  # whichever libfuse it loaded: its fuse_file_info must put fh where we read it
    assert mfusepy.fuse_file_info.fh.offset == (FI3 if mfusepy.fuse_version_major == 3 else FI2).fh.offset

    f = Registered(tmp_path / "p", None, "p")
    try:
        for major, FI in ((3, FI3), (2, FI2)):
            nr, nw = native.install(addr[0], addr[1], fuse_major=major)
            entry_r = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64,
                                       ctypes.POINTER(FI))(nr)
            entry_w = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int64,
                                       ctypes.POINTER(FI))(nw)
            s0 = native.stats()
            fi = FI(fh=f.fh)
            assert entry_w(b"/p", b"native!", 7, 0, ctypes.byref(fi)) == 7
            buf = ctypes.create_string_buffer(16)
            assert entry_r(b"/p", buf, 16, 0, ctypes.byref(fi)) == 7 and buf.raw[:7] == b"native!"
            other = FI(fh=next(_FH))
            assert entry_r(b"/other", buf, 16, 3, ctypes.byref(other)) == 8 and buf.raw[:8] == b"fallback"
            assert entry_w(b"/other", b"xyz", 3, 5, ctypes.byref(other)) == 3
            assert native.handle_read(next(_FH), 16, 1) == b"fallback"  # the test entry takes the same way
            s1 = native.stats()
            assert (s1["reads"] - s0["reads"], s1["writes"] - s0["writes"]) == (1, 1)
            assert (s1["fallback_reads"] - s0["fallback_reads"], s1["fallback_writes"] - s0["fallback_writes"]) == (2, 1)
            assert calls[-3:] == [("read", b"/other", 16, 3), ("write", b"/other", 3, 5, b"xyz"), ("read", None, 16, 1)]
            with pytest.raises(ValueError):
                native.install(nr, addr[1], fuse_major=major)  # would recurse
        with pytest.raises(ValueError):
            native.install(0, 0, fuse_major=1)
    finally:
        native.install(0, 0)  # back to ABI 3 without fallbacks
        f.close()
    with pytest.raises(OSError) as e:
        native.handle_read(next(_FH), 1, 0)
    assert e.value.errno == errno.EBADF


# ============================== the data path model =========================================
def _pick_off(r: random.Random, size: int) -> int:
    c = r.random()
    if c < 0.25:
        return r.randrange(0, size + 1024)
    if c < 0.55:
        return max(0, r.randrange(0, size // SECTOR + 2) * SECTOR + r.randint(-17, 17))
    if c < 0.8:
        return max(0, size + r.randint(-600, 600))
    if c < 0.97:
        return r.randrange(0, 256 * 1024)
    return r.randrange(0, 3 << 20)  # sparse growth


def _pick_len(r: random.Random) -> int:
    c = r.random()
    if c < 0.3:
        return r.randint(1, 16)
    if c < 0.6:
        return r.randint(1, 1200)
    if c < 0.9:
        return r.choice([512, 1024, 4096, 8192]) + r.choice([0, 0, 0, -1, 1, -15, 15, -16, 16])
    if c < 0.985:
        return r.randint(1, 70000)
    # requests the native path splits over two threads (SPLIT_MIN = 256 KiB)
    return r.choice([r.randint(256 * 1024, 1_300_000), r.randint(1, 16) * 64 * 1024])


def _pick_data(r: random.Random, n: int) -> bytes:
    c = r.random()
    if c < 0.15:
        return bytes(n)  # zero plaintext: the zero-tail (hole) paths
    if c < 0.2:
        return bytes(n - 1) + b"\x01"
    return r.randbytes(n)


def _run_model(tmp_path, seed: int, n_ops: int) -> int:
    """Random ops on (native encrypted, native plain) vs (PyRef, bytearray); returns ops done."""
    r = random.Random(seed)
    dek = r.randbytes(64)
    enc = Registered(tmp_path / f"n{seed}.bin", native.SectorCipher(dek), f"model/n{seed}.bin", dek)
    pla = Registered(tmp_path / f"p{seed}.bin", None, f"model/p{seed}.bin")
    ref_fd = os.open(tmp_path / f"ref{seed}.bin", os.O_RDWR | os.O_CREAT, 0o600)
    ref = PyRef(ref_fd, PySectorCipher(dek))
    on_native = PyRef(enc.fd, PySectorCipher(dek))  # Python's truncate/fallocate on the native file
    model, plain_model = bytearray(), bytearray()
    ops = 0

    def check_backing(where):
        assert read_all(enc.fd) == read_all(ref_fd), f"backing ciphertext differs {where}"
        assert read_all(pla.fd) == bytes(plain_model), f"plain file differs {where}"

    try:
        for i in range(n_ops):
            size = len(model)
            c = r.random()
            where = f"seed {seed} op {i}"
            if c < 0.45:
                off, n = _pick_off(r, size), _pick_len(r)
                data = _pick_data(r, n)
                assert enc.write(data, off) == n, where
                assert ref.write_plain(data, off) == n
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off:off + n] = data
            elif c < 0.8:
                off, n = _pick_off(r, size), _pick_len(r)
                got = enc.read(n, off)
                assert got == ref.read_plain(n, off), where
                assert got == bytes(model[off:off + n]), where
            elif c < 0.9:
                length = r.choice([r.randrange(0, size + 2048), r.randrange(0, size // SECTOR + 2) * SECTOR
                                   + r.randint(1, 15), r.randrange(0, 64) * SECTOR, size + r.randint(1, 20)])
                enc.state.acquire_write()
                try:
                    on_native.truncate(length)
                finally:
                    enc.state.release_write()
                ref.truncate(length)
                del model[length:]
                model.extend(bytes(length - len(model)))
            else:  # discard (KEEP_SIZE): holes inside, encrypted zeros at the edges
                off, n = _pick_off(r, size), r.choice([_pick_len(r), r.randint(1, 20) * SECTOR])
                enc.state.acquire_write()
                try:
                    edges = on_native.punch_inner(off, n)
                finally:
                    enc.state.release_write()
                for lo, hi in edges:
                    assert enc.write(bytes(hi - lo), lo) == hi - lo
                for lo, hi in ref.punch_inner(off, n):
                    ref.write_plain(bytes(hi - lo), lo)
                end = min(off + n, len(model))
                if end > off:
                    model[off:end] = bytes(end - off)
            assert enc.size() == os.fstat(ref_fd).st_size == len(model), where
            ops += 1
            # the plain handle: passthrough
            off, n = _pick_off(r, len(plain_model)), _pick_len(r)
            if r.random() < 0.5:
                data = r.randbytes(n)
                assert pla.write(data, off) == n
                if off > len(plain_model):
                    plain_model.extend(bytes(off - len(plain_model)))
                plain_model[off:off + n] = data
            else:
                assert pla.read(n, off) == bytes(plain_model[off:off + n])
            ops += 1
            if i % 400 == 0:
                check_backing(where)
        check_backing(f"seed {seed} at the end")
        assert indep_plaintext(dek, read_all(enc.fd)) == bytes(model)
    finally:
        enc.close()
        pla.close()
        os.close(ref_fd)
    return ops


def test_datapath_model_vs_python_reference(tmp_path):
    ops = sum(_run_model(tmp_path, seed, 17_000) for seed in (1, 2, 3))
    assert ops >= 100_000


def test_datapath_hypothesis(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    offsets = st.one_of(st.integers(0, 5000), st.integers(0, 40).map(lambda k: k * SECTOR),
                        st.tuples(st.integers(0, 40), st.integers(-16, 16)).map(lambda t: max(0, t[0] * SECTOR + t[1])))
    op = st.one_of(
        st.tuples(st.just("w"), offsets, st.integers(1, 3000), st.sampled_from(["rand", "zero"])),
        st.tuples(st.just("r"), offsets, st.integers(0, 3000), st.just("")),
        st.tuples(st.just("t"), offsets, st.just(0), st.just("")),
    )
    dek = bytes(range(1, 65))
    counter = itertools.count()

    @settings(max_examples=120, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(op, max_size=25))
    def run(seq):
        k = next(counter)
        enc = Registered(tmp_path / f"h{k}", native.SectorCipher(dek), "h", dek)
        ref_fd = os.open(tmp_path / f"hr{k}", os.O_RDWR | os.O_CREAT, 0o600)
        ref, on_native, model = PyRef(ref_fd, PySectorCipher(dek)), PyRef(enc.fd, PySectorCipher(dek)), bytearray()
        try:
            for i, (kind, off, n, fill) in enumerate(seq):
                if kind == "w":
                    data = bytes(n) if fill == "zero" else bytes((off + j * 7 + i) % 251 + 1 for j in range(n))
                    assert enc.write(data, off) == n
                    ref.write_plain(data, off)
                    model.extend(bytes(max(0, off - len(model))))
                    model[off:off + n] = data
                elif kind == "r":
                    assert enc.read(n, off) == ref.read_plain(n, off) == bytes(model[off:off + n])
                else:
                    enc.state.acquire_write()
                    on_native.truncate(off)
                    enc.state.release_write()
                    ref.truncate(off)
                    del model[off:]
                    model.extend(bytes(off - len(model)))
                assert read_all(enc.fd) == read_all(ref_fd)
        finally:
            enc.close()
            os.close(ref_fd)

    run()


def test_hole_rules_on_crafted_backing(tmp_path):
    """All-zero backing sectors are holes, except a partial last sector under 16 bytes
    (its ciphertext is an XOR pad: all zero for one plaintext in 2^(8r); random ops never
    make one, so craft it)."""
    dek = os.urandom(64)
    pc = PySectorCipher(dek)
    for size in (3 * SECTOR + 1, 3 * SECTOR + 5, 3 * SECTOR + 15, 3 * SECTOR + 16, 3 * SECTOR + 300, 4 * SECTOR):
        for grow_by in (0, 700, 5000):
            f = Registered(tmp_path / f"z{size}-{grow_by}", native.SectorCipher(dek), "z", dek)
            ref_fd = os.open(tmp_path / f"zr{size}-{grow_by}", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                for fd in (f.fd, ref_fd):  # sector 0 real ciphertext, the rest zero bytes
                    os.pwrite(fd, pc.encrypt(0, b"A" * SECTOR), 0)
                    os.ftruncate(fd, size)
                got = f.read(size + 10, 0)
                assert got == PyRef(ref_fd, pc).read_plain(size + 10, 0) == indep_plaintext(dek, read_all(f.fd))
                tail = size % SECTOR
                if 0 < tail < MIN_HOLE_TAIL:
                    assert got[-tail:] != bytes(tail)  # decrypted, not a hole
                else:
                    assert got[SECTOR:] == bytes(size - SECTOR)
                if grow_by:  # a write past it re-encodes that tail from its decryption
                    assert f.write(b"B" * 10, size + grow_by) == 10
                    PyRef(ref_fd, pc).write_plain(b"B" * 10, size + grow_by)
                    assert read_all(f.fd) == read_all(ref_fd)
            finally:
                f.close()
                os.close(ref_fd)


def _writes_and_reads_vs_reference(tmp_path, seed: int, writes, reads) -> None:
    """The native data path against the Python reference for the given (offset, length) requests."""
    rnd = random.Random(seed)
    dek = rnd.randbytes(64)
    enc = Registered(tmp_path / f"big{seed}", native.SectorCipher(dek), "big", dek)
    ref_fd = os.open(tmp_path / f"bigref{seed}", os.O_RDWR | os.O_CREAT, 0o600)
    ref = PyRef(ref_fd, PySectorCipher(dek))
    try:
        for off, n in writes:
            data = rnd.randbytes(n)
            assert enc.write(data, off) == n
            ref.write_plain(data, off)
            assert read_all(enc.fd) == read_all(ref_fd), (off, n)
        for off, n in reads:
            assert enc.read(n, off) == ref.read_plain(n, off), (off, n)
    finally:
        enc.close()
        os.close(ref_fd)


def test_large_unaligned_requests_cross_chunks(tmp_path):
    """Requests bigger than the 256 KiB scratch rounds, unaligned at both ends."""
    _writes_and_reads_vs_reference(
        tmp_path, 21, ((0, 3 << 20), (100, (1 << 20) + 3), (777, 600_000), ((3 << 20) - 5, 9), (262_144 - 1, 262_146)),
        ((1, 3 << 20), (262_143, 524_290), (0, 10 << 20), (5, 0)))


def test_large_aligned_requests_split_over_two_threads(tmp_path):
    """Aligned requests of 256 KiB and more are served on two threads: same bytes as the reference."""
    before = native.stats()["split_requests"]
    _writes_and_reads_vs_reference(
        tmp_path, 22, ((0, 4 << 20), (512, 1 << 20), (1 << 20, 256 * 1024), (3 << 20, (1 << 20) + 700),
                       (2 << 20, 262_144 + 512), ((4 << 20) + 300 * 1024, 1 << 20)),
        ((0, 4 << 20), (512, 1 << 20), (1 << 20, 256 * 1024), (3 << 20, 2 << 20), (0, 8 << 20)))
    if os.cpu_count() and os.cpu_count() > 1:
        assert native.stats()["split_requests"] > before


# ============================== short writes =============================================
@pytest.fixture
def tmpfs_1m(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mnt)],
                         capture_output=True, text=True, env=_sys_env())
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, env=_sys_env())


def _fill(path, leave: int) -> None:
    """Fill the filesystem of `path` until about `leave` bytes are free."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            free = os.statvfs(os.path.dirname(path)).f_bavail * os.statvfs(os.path.dirname(path)).f_frsize
            if free <= leave:
                return
            try:
                os.write(fd, bytes(min(free - leave, 65536)))
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    return
                raise
    finally:
        os.close(fd)


def _check_acknowledged(f: Registered, model: bytearray, acked: list[tuple[int, int]]) -> None:
    backing = read_all(f.fd)
    assert len(backing) == len(model)
    plain_indep = indep_plaintext(f.dek, backing)
    for lo, hi in acked:
        assert f.read(hi - lo, lo) == bytes(model[lo:hi])
        assert plain_indep[lo:hi] == bytes(model[lo:hi])
    assert plain_indep == bytes(model)


def test_short_writes_on_full_tmpfs(tmpfs_1m):
    rnd = random.Random(31)
    dek = rnd.randbytes(64)
    for round_no, leave in enumerate((300_000, 130_000, 70_000)):
        for name in os.listdir(tmpfs_1m):
            os.unlink(tmpfs_1m / name)
        f = Registered(tmpfs_1m / "disk-flat.vmdk", native.SectorCipher(dek), "vm/disk-flat.vmdk", dek)
        try:
            model, acked = bytearray(), []
            first = rnd.randbytes(20_000 + round_no * 333)
            assert f.write(first, 0) == len(first)
            model += first
            acked.append((0, len(first)))
            _fill(str(tmpfs_1m / "filler"), leave)
            off = len(model) - rnd.randint(0, 700)  # overlapping the old tail, unaligned
            saw_short = saw_enospc = False
            for _ in range(40):
                n = rnd.choice([4096, 4096 + 1, 65536 - 3, 262_144, 1 << 20, rnd.randint(4096, 1 << 20)])
                data = rnd.randbytes(n)
                before = f.size()
                try:
                    got = f.write(data, off)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
                    saw_enospc = True
                    assert f.size() == before  # nothing acknowledged, nothing changed
                else:
                    assert 0 < got <= n
                    if got < n:
                        saw_short = True
                        assert (off + got) % SECTOR == 0  # only complete sectors are acknowledged
                        assert f.size() == max(before, off + got)
                    model.extend(bytes(max(0, off - len(model))))
                    model[off:off + got] = data[:got]
                    acked.append((off, off + got))
                _check_acknowledged(f, model, acked)
                if saw_enospc:
                    break
                off = off + rnd.randint(0, n) if rnd.random() < 0.7 else rnd.randrange(0, len(model) + 1)
            assert saw_enospc, "the filesystem never filled up"
            assert saw_short or round_no, "no write crossed the full point"
            # inside the file, overwrites of allocated sectors still work on a full filesystem
            assert f.write(b"\x42" * 1000, 100) == 1000
            model[100:1100] = b"\x42" * 1000
            _check_acknowledged(f, model, acked + [(100, 1100)])
        finally:
            f.close()


def test_failed_append_restores_old_tail_encoding(tmpfs_1m):
    """Growing past a partial last sector re-encodes it first; the write then fails: it comes back."""
    dek = os.urandom(64)
    for tail_len in (700, 520, 1023):  # r = 188, 8 (< 16), 511
        for name in os.listdir(tmpfs_1m):
            os.unlink(tmpfs_1m / name)
        f = Registered(tmpfs_1m / "t", native.SectorCipher(dek), "t", dek)
        try:
            data = os.urandom(tail_len)
            assert f.write(data, 0) == tail_len
            before = read_all(f.fd)
            _fill(str(tmpfs_1m / "filler"), 0)
            with pytest.raises(OSError) as e:
                f.write(b"new" * 100, 512 * 1024)
            assert e.value.errno == errno.ENOSPC
            assert read_all(f.fd) == before  # old size, old tail encoding
            assert f.read(5000, 0) == data
        finally:
            f.close()


def test_short_writes_byte_exact_with_rlimit_fsize(tmp_path):
    """RLIMIT_FSIZE cuts writes at any byte: torn sectors of every kind (in a child process)."""
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "fsize-child", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "fsize-child ok" in res.stdout


def _fsize_child(d: str) -> None:
    """Scenarios under RLIMIT_FSIZE = LIMIT (writes cross it at byte granularity)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logs: list[str] = []
    native.set_log(logs.append)
    dek = os.urandom(64)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def scenario(name, old_data, limit, off, data, expect_ret, expect_plain=None, expect_size=None, fault=False):
        f = Registered(os.path.join(d, name), native.SectorCipher(dek), name, dek)
        try:
            if old_data:
                assert f.write(old_data, 0) == len(old_data)
            before = read_all(f.fd)
            del logs[:]
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            try:
                try:
                    got = f.write(data, off)
                except OSError as e:
                    got = -e.errno
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            assert got == expect_ret, (name, got, expect_ret)
            after = read_all(f.fd)
            if expect_plain is None:  # nothing acknowledged: the backing file is as before
                assert after == before, name
            else:
                assert len(after) == expect_size, (name, len(after), expect_size)
                assert indep_plaintext(dek, after) == expect_plain, name
                assert f.read(len(after) + 10, 0) == expect_plain, name
            assert bool(logs) == fault, (name, logs)
            if fault:
                assert logs[0].startswith(f"{name}: write at byte {off} ") and "torn" in logs[0], logs
        finally:
            f.close()

    old64k = os.urandom(65536)
    new8k = os.urandom(8192)
    # (a) interior sector overwritten whole and torn: old ciphertext not kept -> hole, logged
    exp = bytearray(old64k)
    exp[8192:9728] = new8k[:1536]
    exp[9728:10240] = bytes(512)
    scenario("interior", old64k, 10_000, 8192, new8k, 1536, bytes(exp), 65536, fault=True)
    # (b) read-modify-write head sector torn: restored from the ciphertext read for it
    scenario("head", old64k, 8192 + 100, 8192 + 50, new8k[:1000], -errno.EFBIG)
    # (c) RMW tail sector torn after a complete first sector
    exp = bytearray(old64k)
    exp[8192:8704] = new8k[:512]
    scenario("tail", old64k, 8704 + 40, 8192, new8k[:700], 512, bytes(exp), 65536)
    # (d) the old partial last sector (r >= 16 and r < 16) overwritten whole and torn
    old_r300, old_r10 = os.urandom(8192 + 300), os.urandom(8192 + 10)
    scenario("oldtail300", old_r300, 8192 + 100, 8192, new8k[:1000], -errno.EFBIG)
    scenario("oldtail10", old_r10, 8192 + 5, 8192, new8k[:600], -errno.EFBIG)
    # (e) growth past EOF torn: the torn bytes are cut off, complete sectors acknowledged
    old4k = os.urandom(4096)
    scenario("grow", old4k, 6000, 4096, new8k[:4096], 1536, old4k + new8k[:1536], 4096 + 1536)
    # (f) the old partial tail re-encoded, then the write fails outright: old encoding back
    old700 = os.urandom(700)
    scenario("reenc-fail", old700, 2048, 4096, new8k[:4096], -errno.EFBIG)
    # (g) re-encoded, then one complete sector stored: the old tail stays a whole sector
    scenario("reenc-part", old700, 4096 + 1000, 4096, new8k[:4096], 512,
             old700 + bytes(4096 - 700) + new8k[:512], 4608)
    # (h) starting at the limit: nothing written at all
    scenario("at-limit", old4k, 4096, 4096, new8k, -errno.EFBIG)
    # (i) the plain passthrough: a short count is what pwrite stored
    p = Registered(os.path.join(d, "plain"), None, "plain")
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
        try:
            assert p.write(b"z" * 4000, 0) == 1000
            try:
                p.write(b"z", 1000)
                raise AssertionError("EFBIG expected")
            except OSError as e:
                assert e.errno == errno.EFBIG
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    finally:
        p.close()
    print("fsize-child ok")


# ============================== concurrency ===============================================
def test_concurrent_sectors_never_torn(tmp_path):
    dek = os.urandom(64)
    n_sectors = 64
    main = Registered(tmp_path / "c", native.SectorCipher(dek), "c", dek)
    # more opens of the same file share its state (as FUSE opens of one backing file do)
    extra = []
    for _ in range(3):
        fh = next(_FH)
        fd = os.open(main.path, os.O_RDWR)
        native.register(fh, fd, main.state)
        os.close(fd)
        extra.append(fh)
    fhs = [main.fh] + extra

    def tag(writer: int, sector: int, seq: int) -> bytes:
        return (writer.to_bytes(2, "little") + sector.to_bytes(2, "little") + seq.to_bytes(4, "little")) * 64

    assert main.write(b"".join(tag(0, s, 0) for s in range(n_sectors)), 0) == n_sectors * SECTOR
    errors: list[str] = []
    stop = time.monotonic() + 2.0
    private = {1: (48, 52), 2: (52, 56), 3: (56, 60)}  # sector ranges only that writer touches

    def check(buf: bytes, first: int) -> None:
        for k in range(len(buf) // SECTOR):
            s = buf[k * SECTOR:(k + 1) * SECTOR]
            if s != s[:8] * 64 or int.from_bytes(s[2:4], "little") != first + k:
                errors.append(f"torn or misplaced sector {first + k}")
                return

    def writer(w: int) -> None:
        r = random.Random(w)
        seq = 0
        while time.monotonic() < stop and not errors:
            seq += 1
            if r.random() < 0.3:
                lo, hi = private[w]
                first = r.randrange(lo, hi)
                count = r.randint(1, hi - first)
                data = b"".join(tag(w, s, seq) for s in range(first, first + count))
                native.handle_write(r.choice(fhs), data, first * SECTOR)
                if native.handle_read(r.choice(fhs), len(data), first * SECTOR) != data:
                    errors.append(f"writer {w} lost its private write")
            else:
                first = r.randrange(0, 48)
                count = r.randint(1, min(16, 48 - first))
                data = b"".join(tag(w, s, seq) for s in range(first, first + count))
                if native.handle_write(r.choice(fhs), data, first * SECTOR) != len(data):
                    errors.append(f"writer {w}: short write")

    def reader(seed: int) -> None:
        r = random.Random(100 + seed)
        while time.monotonic() < stop and not errors:
            first = r.randrange(0, n_sectors)
            count = r.randint(1, n_sectors - first)
            check(native.handle_read(r.choice(fhs), count * SECTOR, first * SECTOR), first)

    def python_lock_holder() -> None:
        """Python code holding the file's write lock (as truncate will): no native write gets in."""
        while time.monotonic() < stop and not errors:
            main.state.acquire_write()
            try:
                a = read_all(main.fd)
                time.sleep(0.003)
                if read_all(main.fd) != a:
                    errors.append("a native write ran while Python held the write lock")
            finally:
                main.state.release_write()
            time.sleep(0.002)

    threads = ([threading.Thread(target=writer, args=(w,)) for w in (1, 2, 3)]
               + [threading.Thread(target=reader, args=(k,)) for k in range(2)]
               + [threading.Thread(target=python_lock_holder)])
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors[:5]
        check(main.read(n_sectors * SECTOR, 0), 0)
        assert indep_plaintext(dek, read_all(main.fd)) == main.read(n_sectors * SECTOR, 0)
    finally:
        for fh in extra:
            native.unregister(fh)
        main.close()


def test_unregister_while_in_flight(tmp_path):
    """Handles come and go while other threads use them: no crash, only EBADF for gone ones."""
    dek = os.urandom(64)
    base = Registered(tmp_path / "u", native.SectorCipher(dek), "u", dek)
    base.write(os.urandom(64 * 1024), 0)
    stop = time.monotonic() + 1.0
    live = [next(_FH) for _ in range(8)]
    errors = []

    def churn():
        r = random.Random(1)
        while time.monotonic() < stop:
            fh = r.choice(live)
            try:
                native.unregister(fh)
            except KeyError:
                fd = os.open(base.path, os.O_RDWR)
                try:
                    native.register(fh, fd, base.state)
                except ValueError:
                    pass
                os.close(fd)

    def use(seed):
        r = random.Random(seed)
        while time.monotonic() < stop:
            try:
                if r.random() < 0.5:
                    native.handle_read(r.choice(live), 8192, r.randrange(0, 60000))
                else:
                    native.handle_write(r.choice(live), b"q" * 4096, r.randrange(0, 60000))
            except OSError as e:
                if e.errno != errno.EBADF:
                    errors.append(e)

    threads = [threading.Thread(target=churn)] + [threading.Thread(target=use, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for fh in live:
        try:
            native.unregister(fh)
        except KeyError:
            pass
    base.close()
    assert not errors


# ============================== through a FUSE mount =======================================
def _fuse_library(major: int) -> str | None:
    import ctypes.util
    return ctypes.util.find_library("fuse3" if major == 3 else "fuse")


@pytest.mark.parametrize("major", [2, 3])
def test_mount_serves_natively(tmp_path, major):
    """A minimal mfusepy passthrough with the native entries spliced in (the integration recipe)."""
    if not os.path.exists("/dev/fuse") or os.geteuid() != 0:
        pytest.skip("needs /dev/fuse and root")
    if not _fuse_library(major):
        pytest.skip(f"no libfuse {major}")
    backing, mnt = tmp_path / "backing", tmp_path / "mnt"
    backing.mkdir()
    mnt.mkdir()
    dek = os.urandom(64)
    env = dict(os.environ)
    env.pop("FUSE_LIBRARY_NAME", None)
    if major == 3:
        env["FUSE_LIBRARY_NAME"] = "fuse3"
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "mount-child", str(backing), str(mnt),
                              dek.hex()], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(mnt):
            if child.poll() is not None or time.monotonic() > deadline:
                out, err = child.communicate(timeout=5) if child.poll() is not None else ("", "timeout")
                pytest.fail(f"mount did not come up: {out}\n{err}")
            time.sleep(0.05)
        data = os.urandom(300_000)
        with open(mnt / "disk-flat.enc", "wb") as fobj:
            fobj.write(data)  # direct_io: every write reaches the daemon
        fd = os.open(mnt / "disk-flat.enc", os.O_RDWR)
        try:
            os.pwrite(fd, b"unaligned!", 1000)
            data = data[:1000] + b"unaligned!" + data[1010:]
            os.pwrite(fd, b"tail", len(data))
            data += b"tail"
            assert os.pread(fd, len(data) + 100, 0) == data
            assert os.pread(fd, 777, 511) == data[511:511 + 777]
        finally:
            os.close(fd)
        assert indep_plaintext(dek, (backing / "disk-flat.enc").read_bytes()) == data
        (mnt / "notes.txt").write_bytes(b"plain text")
        assert (backing / "notes.txt").read_bytes() == b"plain text" == (mnt / "notes.txt").read_bytes()
        (mnt / "other.slow").write_bytes(b"served by Python")
        assert (mnt / "other.slow").read_bytes() == b"served by Python"
        stats = json.loads((mnt / ".stats").read_bytes().rstrip(b"\0"))
        assert stats["reads"] >= 3 and stats["writes"] >= 4, stats  # the native path served
        assert stats["fallback_reads"] >= 2 and stats["fallback_writes"] >= 1, stats  # .slow and .stats
        assert stats["mfusepy_fuse_major"] == major
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True, env=_sys_env())
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, env=_sys_env())
    assert child.returncode == 0, child.stderr.read() if child.stderr else ""


def _mount_child(backing: str, mnt: str, dek_hex: str) -> None:
    import mfusepy

    from vmfs_crypt.fuse.native import install_into

    cipher = native.SectorCipher(bytes.fromhex(dek_hex))

    class Ops(mfusepy.Operations):
        use_ns = True

        def __init__(self):
            self.fds, self.next_fh, self.lock = {}, 10, threading.Lock()

        def _real(self, path):
            return os.path.join(backing, path.lstrip("/"))

        def getattr(self, path, fh=None):
            if path.startswith("/.stats"):
                return {"st_mode": stat.S_IFREG | 0o444, "st_size": 4096, "st_nlink": 1}
            try:
                st = os.lstat(self._real(path))
            except OSError as e:
                raise mfusepy.FuseOSError(e.errno) from None
            return {k: getattr(st, k) for k in ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid",
                                                "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}

        def readdir(self, path, fh):
            return [".", ".."] + os.listdir(self._real(path))

        def _handle(self, path, fd):
            with self.lock:
                fh = self.next_fh
                self.next_fh += 1
                self.fds[fh] = fd
            if path.endswith(".enc"):
                native.register(fh, fd, native.FileState(cipher, path.lstrip("/")))
            elif path.endswith(".txt"):
                native.register(fh, fd, native.FileState(None, path.lstrip("/")))
            return fh  # anything else (.slow, .stats) is served by the Python methods below

        def open(self, path, flags):
            if path.startswith("/.stats"):
                return self._handle(path, -1)
            return self._handle(path, os.open(self._real(path), (flags & ~(os.O_DIRECT | os.O_APPEND)) | os.O_RDWR))

        def create(self, path, mode, fi=None):
            return self._handle(path, os.open(self._real(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode))

        def truncate(self, path, length, fh=None):
            os.truncate(self._real(path), length)

        def read(self, path, size, offset, fh):  # the fallback
            if path.startswith("/.stats"):
                doc = dict(native.stats(), mfusepy_fuse_major=mfusepy.fuse_version_major)
                return json.dumps(doc).encode()[offset:offset + size]
            return os.pread(self.fds[fh], size, offset)

        def write(self, path, data, offset, fh):  # the fallback
            return os.pwrite(self.fds[fh], data, offset)

        def release(self, path, fh):
            try:
                native.unregister(fh)
            except KeyError:
                pass
            with self.lock:
                fd = self.fds.pop(fh)
            if fd >= 0:
                os.close(fd)

    real_main = mfusepy.fuse_main_real

    def main_with_native(argc, argv, ops_p, size, user_data):
        install_into(ops_p.contents, mfusepy.fuse_version_major)
        return real_main(argc, argv, ops_p, size, user_data)

    mfusepy.fuse_main_real = main_with_native
    mfusepy.FUSE(Ops(), mnt, foreground=True, nothreads=False, direct_io=True, fsname="vc-native-test")


if __name__ == "__main__":
    if sys.argv[1] == "fsize-child":
        _fsize_child(sys.argv[2])
    elif sys.argv[1] == "mount-child":
        _mount_child(*sys.argv[2:5])
    else:
        raise SystemExit(f"unknown child {sys.argv[1]}")


# -- the split key of a file re-encrypted online (docs/FORMAT.md 7.8, issue 10) ---------------

def test_split_cipher_matches_the_python_reference():
    """native.split_cipher == crypto.xts.PySplitCipher over random boundaries, runs and tails, plaintext parts included."""
    from vmfs_crypt.crypto.xts import PySplitCipher

    r = random.Random(10)
    for i in range(2_000):
        deks = [r.randbytes(64), r.randbytes(64)]
        parts = [None if r.random() < 0.3 else k for k in deks]
        boundary = r.choice([0, r.randrange(0, 64), r.randrange(0, 64), 2**64 - 1])
        nat = native.split_cipher(*(None if k is None else native.SectorCipher(k) for k in parts), boundary)
        ref = PySplitCipher(*(None if k is None else PySectorCipher(k) for k in parts), boundary)
        first, n = r.randrange(0, 64), r.choice([r.randrange(1, 40 * SECTOR), r.randrange(1, 8) * SECTOR])
        data = r.randbytes(n)
        ct = nat.encrypt(first, data)
        assert ct == ref.encrypt(first, data), f"case {i}"
        assert nat.decrypt(first, ct) == ref.decrypt(first, ct) == data, f"case {i}"
        # each sector is exactly what its own part makes of it
        if n % SECTOR == 0:
            for k in range(n // SECTOR):
                part = parts[0] if first + k < boundary else parts[1]
                want = data[k * SECTOR:(k + 1) * SECTOR]
                if part is not None:
                    want = PySectorCipher(part).encrypt(first + k, want)
                assert ct[k * SECTOR:(k + 1) * SECTOR] == want, f"case {i} sector {first + k}"
    with pytest.raises(TypeError):
        native.split_cipher(b"k" * 64, None, 0)
    with pytest.raises(TypeError):
        pickle.dumps(native.split_cipher(None, None, 0))


def test_datapath_under_a_split_key_vs_python_reference(tmp_path):
    """Reads and writes of a file mid-way through an online re-encryption (a split key, its boundary
    moved under the write lock as ops/online.py does): the native path and sectorio with
    PySplitCipher leave the same bytes at rest and read the same plaintext."""
    from vmfs_crypt.crypto.xts import PySplitCipher
    from vmfs_crypt.fs import sectorio

    for seed in range(4):
        r = random.Random(100 + seed)
        deks = [r.randbytes(64), r.randbytes(64)]
        # encrypt (plain -> key), decrypt (key -> plain), deep rekey (key -> key)
        below, above = [(deks[0], None), (None, deks[1]), (deks[0], deks[1]), (deks[0], deks[1])][seed]
        nat_parts = [None if k is None else native.SectorCipher(k) for k in (below, above)]
        ref_parts = [None if k is None else PySectorCipher(k) for k in (below, above)]
        state_cipher = native.split_cipher(*nat_parts, 0)
        f = Registered(tmp_path / f"s{seed}", None, f"split/{seed}")
        f.state.acquire_write()
        f.state.set_cipher(state_cipher)  # a plain FileState may get a key (an online encrypt)
        f.state.release_write()
        ref_fd = os.open(tmp_path / f"r{seed}", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        model = bytearray()
        boundary = 0
        try:
            for i in range(3_000):
                where = f"seed {seed} op {i}"
                if r.random() < 0.02:  # the engine's step: rewrite a region, then move the boundary over it
                    new = min(boundary + r.randint(1, 8), 200)
                    lo, hi = boundary * SECTOR, min(new * SECTOR, len(model))
                    old_plain = f.read(max(hi - lo, 0), lo) if hi > lo else b""
                    f.state.acquire_write()
                    f.state.set_cipher(native.split_cipher(*nat_parts, new))
                    f.state.release_write()
                    ref_old = PySplitCipher(*ref_parts, boundary)
                    ref_plain = sectorio.read(ref_fd, ref_old, max(hi - lo, 0), lo, where) if hi > lo else b""
                    assert old_plain == ref_plain == bytes(model[lo:hi]), where
                    boundary = new
                    if hi > lo:
                        assert f.write(old_plain, lo) == hi - lo
                        assert sectorio.write(ref_fd, PySplitCipher(*ref_parts, boundary), ref_plain, lo, where) == hi - lo
                ref_cipher = PySplitCipher(*ref_parts, boundary)
                off, n = _pick_off(r, len(model)), _pick_len(r)
                if r.random() < 0.5:
                    data = _pick_data(r, n)
                    assert f.write(data, off) == n, where
                    assert sectorio.write(ref_fd, ref_cipher, data, off, where) == n
                    if off > len(model):
                        model.extend(bytes(off - len(model)))
                    model[off:off + n] = data
                else:
                    got = f.read(n, off)
                    assert got == sectorio.read(ref_fd, ref_cipher, n, off, where) == bytes(model[off:off + n]), where
                if i % 300 == 0:
                    assert read_all(f.fd) == read_all(ref_fd), where
            assert read_all(f.fd) == read_all(ref_fd)
        finally:
            f.close()
            os.close(ref_fd)
