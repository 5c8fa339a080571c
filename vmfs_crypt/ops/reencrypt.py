"""In-place re-encryption of a folder's files, region by region, resumable after a crash (FORMAT.md 7.8, issue 10).

Each region [b, b+R) is copied to the sidecar and fsynced, rewritten in place and fsynced,
and only then is the boundary advanced by an atomic rewrite of the folder key file: extra
space is one region, not a copy of the file. The key metadata switches to the new keys at
the end, in one journal commit (ops/transaction.py). An abort (`vmfs-crypt abort`) runs the
same steps backwards, from each boundary down to 0, and commits the old keys.
"""

import errno
import os
import signal
import stat
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from ..agent.protocol import KeyAccess
from ..crypto.sectors import SECTOR_SIZE
from ..crypto.xts import SectorCipher
from ..errors import DataError, FormatError, UsageError
from ..format.atomicio import pwrite_all
from ..format.folder import FolderKeys
from ..format.holes import decrypt_sectors, has_zero_sector, nonzero_runs, zero_sector_mask
from ..format.keysafe import KeyRecord, KeyRef
from ..format.reencrypt import (DEFAULT_REGION_SIZE, MAX_REGION_SIZE, ReencryptFile, ReencryptState, read_region,
                                remove_region, write_region)
from ..fs.sectorio import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from .inuse import Access
from .transaction import FolderTransaction

REGION_ENV = "VMFS_CRYPT_REGION_SIZE"  # bytes per region; small values let tests make many regions
# Bytes transformed and stored per step of a region: the cipher of a 4 MiB chunk ran at half the
# speed of 1 MiB ones (its buffers spill out of the CPU caches; docs/PERFORMANCE.md, issue 13).
WRITE_CHUNK = 1 << 20
# What an offline operation lets malloc keep at the top of its heaps (sysutil.keep_heap_top):
# each 64 MiB region's buffers were faulted in afresh; with this, offline `rekey --deep` of 1 GiB
# on tmpfs went from 415-458 to 568-583 MB/s, its RSS from 182 to 194 MB (docs/PERFORMANCE.md).
OFFLINE_HEAP_TOP_PAD = 4 * DEFAULT_REGION_SIZE
ProgressFactory = Callable[[int, str], object]

# Test-only fault injection (issue 10's kill tests; no effect when unset), read once per process:
# the engine SIGSTOPs itself so that a test can SIGKILL it at an exact point instead of racing
# a poller. Regions are counted from 1 in the order this process rewrites them.
STOP_AFTER_ENV = "VMFS_CRYPT_TEST_STOP_AFTER_REGIONS"  # stop once the Nth region's boundary is committed
STOP_IN_ENV = "VMFS_CRYPT_TEST_STOP_IN_REGION"  # stop in the Nth region: sidecar written, half of it rewritten
# "N:FIFO": at the same point of the Nth online region, the engine thread alone waits until the
# test has opened FIFO for writing and closed it; the mount serves meanwhile (the hot zone tests).
HOLD_IN_ENV = "VMFS_CRYPT_TEST_HOLD_IN_REGION"


def _stop_point(name: str) -> int | None:
    raw = os.environ.get(name, "")
    return int(raw) if raw.isdigit() and int(raw) > 0 else None


_STOP_AFTER = _stop_point(STOP_AFTER_ENV)
_STOP_IN = _stop_point(STOP_IN_ENV)
_HOLD_IN = os.environ.get(HOLD_IN_ENV, "").partition(":")
_regions_started = 0


def _stop_here() -> None:
    os.kill(os.getpid(), signal.SIGSTOP)


def region_size(default: int = DEFAULT_REGION_SIZE) -> int:
    """Bytes per region of a new operation: VMFS_CRYPT_REGION_SIZE when set, else `default`."""
    raw = os.environ.get(REGION_ENV)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value <= 0 or value % SECTOR_SIZE or value > MAX_REGION_SIZE:
        raise UsageError(f"{REGION_ENV}={raw!r}: a region is a positive multiple of {SECTOR_SIZE} bytes, "
                         f"at most {MAX_REGION_SIZE}")
    return value


def start(tx: FolderTransaction, op: str, kek: KeyRef | None, base: FolderKeys, entries: list[ReencryptFile],
          strip: list[str], region: int | None = None) -> FolderKeys | None:
    """Record the operation: the key file gets the state (and every `from` record), keyed descriptors lose their lines.

    `region`: bytes per region (default: `region_size()`).

    One journal commit, so that afterwards each file of the operation is keyed only by the
    state, which readers that do not know it refuse (FORMAT.md 7.8).
    """
    if not entries:  # nothing to rewrite: only the key metadata changes
        for name in strip:
            tx.stage_descriptor(name, None)
        tx.commit(None if op == "decrypt" else FolderKeys(kek, {}))
        return None
    files = dict(base.files)
    for f in entries:
        if f.frm is not None:
            files[f.name] = f.frm
    keys = FolderKeys(base.kek, files, ReencryptState(op, region or region_size(), kek, entries))
    for name in strip:
        tx.stage_descriptor(name, None)
    tx.commit(keys)
    return keys


def resume(tx: FolderTransaction, keys: KeyAccess, progress: ProgressFactory) -> ReencryptState | None:
    """Finish an interrupted in-place operation of the folder (None: there was none)."""
    folder = tx.folder
    if not folder.encrypted:
        return None
    current = folder.load_keys(allow_reencrypt=True)
    if current.reencrypt is None:
        return None
    if current.reencrypt.aborting:
        raise UsageError(f"{folder.backing_dir}: the abort of an in-place {current.reencrypt.op} is in flight; "
                         f"finish it first with 'vmfs-crypt abort {folder.backing_dir}'")
    tx.check_in_use(Access.DATA)
    # Resuming reads data already under the new keys (an encrypt's too): the agent checks the
    # privilege of reading data, not of encrypting, which never hands out such a DEK (issue 11).
    purpose = "rekey" if current.reencrypt.op == "rekey" else "decrypt"
    before = getattr(keys, "purpose", None)
    if hasattr(keys, "purpose"):
        keys.purpose = purpose
    try:
        run(tx, keys, current, progress)
    finally:
        if hasattr(keys, "purpose"):
            keys.purpose = before
    return current.reencrypt


def _open_rw(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{path}: not a regular file")
    return fd


def _cipher(keys: KeyAccess, record: KeyRecord | None, what: str) -> SectorCipher | None:
    return SectorCipher(keys.unwrap(record, what)) if record is not None else None


def transform(old: bytes, first: int, frm: SectorCipher | None, to: SectorCipher | None) -> bytes:
    """The new backing bytes of sectors `first`... : decrypted under `frm`, encrypted under `to`; holes stay holes."""
    plain = decrypt_sectors(frm, first, old) if frm is not None else old
    if to is None:
        return plain
    if not has_zero_sector(plain):
        return to.encrypt(first, plain)  # no sector of zeros: nothing to keep as a hole
    out = bytearray(len(plain))
    for a, b in nonzero_runs(plain):
        out[a:b] = to.encrypt(first + a // SECTOR_SIZE, plain[a:b])
    return bytes(out)


def _runs(mask) -> list[tuple[int, int]]:
    """(first, end) sector indexes of the runs of True in `mask`."""
    import numpy as np

    edges = np.flatnonzero(np.diff(np.concatenate(([0], mask, [0])).astype(np.int8)))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def store(fd: int, offset: int, new: bytes, now: bytes, what: str, exact: bool = False) -> None:
    """Make the backing bytes at `offset` `new` (they are `now`), writing only sectors that must change.

    A sector that becomes all zero is punched out rather than written, so holes stay holes
    (FORMAT.md 3.4, 7.8): a thin disk does not fill up by being re-encrypted or recovered.
    A sector all zero before and after is never written; `exact` (a restore from the sidecar)
    also skips every sector that already holds its bytes.
    """
    import numpy as np

    if not exact and not has_zero_sector(new) and not has_zero_sector(now):
        # Fast path (a fully written disk): no sector of either is a hole, so all of it is written.
        differ = zero = None
    else:
        pad = -len(new) % SECTOR_SIZE
        zero = zero_sector_mask(new)
        if exact:
            a = np.frombuffer(new + bytes(pad) if pad else new, dtype=np.uint8).reshape(-1, SECTOR_SIZE)
            b = np.frombuffer(now + bytes(pad) if pad else now, dtype=np.uint8).reshape(-1, SECTOR_SIZE)
            differ = (a != b).any(axis=1)
        else:
            differ = ~(zero & zero_sector_mask(now))
    if differ is None:
        done, err = pwrite_all(fd, new, offset)
        if err is not None:
            raise DataError(f"{what}: write failed at byte {offset + done}: {err.strerror}; the operation "
                            "stopped and resumes from its saved region when run again") from None
        return
    for first, end in _runs(differ & ~zero):
        lo, hi = first * SECTOR_SIZE, min(end * SECTOR_SIZE, len(new))
        done, err = pwrite_all(fd, new[lo:hi], offset + lo)
        if err is not None:
            raise DataError(f"{what}: write failed at byte {offset + lo + done}: {err.strerror}; the operation "
                            "stopped and resumes from its saved region when run again") from None
    for first, end in _runs(differ & zero):
        lo, hi = first * SECTOR_SIZE, min(end * SECTOR_SIZE, len(new))
        try:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset + lo, hi - lo)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise DataError(f"{what}: cannot clear bytes {offset + lo}-{offset + hi}: {exc.strerror}") from None
            done, err = pwrite_all(fd, new[lo:hi], offset + lo)  # no holes here: zeros read the same
            if err is not None:
                raise DataError(f"{what}: write failed at byte {offset + lo + done}: {err.strerror}") from None


def _write_in_place(fd: int, offset: int, old: bytes, first: int, frm, to, what: str, done=lambda n: None) -> None:
    """Rewrite `old` at `offset` chunk by chunk; `done(n)` after each (progress moves within a region)."""
    for start_ in range(0, len(old), WRITE_CHUNK):
        part = old[start_:start_ + WRITE_CHUNK]
        store(fd, offset + start_, transform(part, first + start_ // SECTOR_SIZE, frm, to), part, what)
        done(len(part))


# The cipher of a region runs on worker threads while its sidecar is written and hashed
# (the native cipher, hashlib and os.write release the GIL): offline `rekey --deep` of 512 MiB
# on tmpfs spent about as long in the sidecar as in the cipher (issue 13, docs/PERFORMANCE.md).
# Only the computing goes ahead: no byte of the region is stored before its sidecar is durable.
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1)),
                                       thread_name_prefix="vmfs-crypt-cipher")
        return _pool


def _transform_ahead(old: bytes, first: int, frm, to) -> list[Future]:
    """The new bytes of each WRITE_CHUNK of `old` (sectors from `first`), computed by the workers."""
    def one(start_: int) -> bytes:
        return transform(old[start_:start_ + WRITE_CHUNK], first + start_ // SECTOR_SIZE, frm, to)

    pool = _workers()
    return [pool.submit(one, start_) for start_ in range(0, len(old), WRITE_CHUNK)]


def _store_ahead(fd: int, offset: int, old: bytes, pending: list[Future], what: str, done) -> None:
    """Store the chunks `_transform_ahead` computed, in order; the rest are cancelled on a failure."""
    try:
        for i, fut in enumerate(pending):
            start_ = i * WRITE_CHUNK
            part = old[start_:start_ + WRITE_CHUNK]
            store(fd, offset + start_, fut.result(), part, what)
            done(len(part))
    finally:
        for fut in pending:
            fut.cancel()


def _read_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, offset + got)
        if not chunk:
            raise DataError(f"{what}: shorter than recorded ({offset + got} bytes) during an in-place re-encryption")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _check_keyed_by_state(folder, state: ReencryptState) -> None:
    for f in state.files:
        if folder.descriptor_record_for(f.name) is not None:
            raise FormatError(f"{os.path.join(folder.backing_dir, f.name)}: keyed by a descriptor during an in-place "
                              f"{state.op}; refusing to guess which key its sectors are under")


def sized(fd: int, f: ReencryptFile, state: ReencryptState, what: str) -> None:
    """Check the file against its recorded size and follow its growth (FORMAT.md 7.8)."""
    at_rest = os.fstat(fd).st_size
    if at_rest < f.size:
        raise DataError(f"{what}: is {at_rest} bytes, but its in-place {state.op} began at "
                        f"{f.size}; it was changed meanwhile: restore it from a backup")
    # Grown by a guest while a mount carried the operation online: past the recorded size the
    # bytes are under the old key, or under the new one once the file was finished.
    if f.done:
        f.boundary = at_rest
    f.size = at_rest


def restore_saved(fd: int, d: str, state: ReencryptState, f: ReencryptFile, what: str) -> None:
    """Interrupted inside a region of `f`: put the region's old bytes back from a valid sidecar (then redo it whole)."""
    if state.current() is not f:
        return
    saved = read_region(d, state)
    if saved is not None:
        off, old = saved
        store(fd, off, old, _read_exact(fd, len(old), off, what), what, exact=True)
        os.fsync(fd)


def rewrite_region(fd: int, d: str, state: ReencryptState, f: ReencryptFile, frm, to, what: str,
                   done=lambda n: None, lost=None) -> tuple[int, int]:
    """Steps 1 and 2 of FORMAT.md 7.8 for the next region of `f` (keys as the region goes: swapped when aborting).

    Returns the region's (offset, length); the caller moves the boundary (step 3). On a failed
    rewrite the old bytes are put back; `lost(offset, length, exc)` when even that fails.
    """
    global _regions_started
    off, n = state.region_of(f)
    if state.aborting:
        frm, to = to, frm  # back from the new key to the old one
    old = _read_exact(fd, n, off, what)
    test_point = _regions_started + 1 == _STOP_IN or HOLD_IN_ENV in os.environ
    # computed while the sidecar is written; stored only after it is durable
    pending = None if test_point or n <= WRITE_CHUNK else _transform_ahead(old, off // SECTOR_SIZE, frm, to)
    try:
        write_region(d, f.name, off, old)
    except BaseException:
        for fut in pending or ():
            fut.cancel()
        raise
    _regions_started += 1
    half = 0
    if test_point:  # test-only: a crash, or a wait, in step 2
        half = n // 2 // SECTOR_SIZE * SECTOR_SIZE
        _write_in_place(fd, off, old[:half], off // SECTOR_SIZE, frm, to, what, done)
        os.fsync(fd)
        if _regions_started == _STOP_IN:
            _stop_here()
        hold_in_region()
    # progress per chunk (WRITE_CHUNK): a 64 MiB region was one step (a 48 MiB file showed only 100 %)
    try:
        if pending is not None:
            _store_ahead(fd, off, old, pending, what, done)
        else:
            _write_in_place(fd, off + half, old[half:], (off + half) // SECTOR_SIZE, frm, to, what, done)
        os.fsync(fd)
    except BaseException:
        # Put the region's old bytes back before anyone reads it by the state again (the sidecar has them too).
        try:
            store(fd, off, old, _read_exact(fd, n, off, what), what, exact=True)
            os.fsync(fd)
        except (DataError, OSError) as exc:
            if lost is not None:
                lost(off, n, exc)  # the valid sidecar restores it at the next run
        raise
    return off, n


def advance(f: ReencryptFile, state: ReencryptState, off: int, n: int) -> None:
    """Step 3's new boundary after the region [off, off + n) (forward: its end; aborting: its start)."""
    f.boundary = off if state.aborting else off + n


def run(tx: FolderTransaction, keys: KeyAccess, current: FolderKeys | None, progress: ProgressFactory,
        fresh: dict[str, bytes] | None = None) -> None:
    """Carry the recorded operation (or its abort) to its end, from where it stopped, and commit.

    `fresh`: file name -> the new DEK just made for it (so a first run needs no unwrap of it).
    """
    if current is None:
        return  # start() had nothing to rewrite and committed already
    folder = tx.folder
    state = current.reencrypt
    d = folder.backing_dir
    _check_keyed_by_state(folder, state)
    if state.aborting:
        order, left = list(reversed(state.files)), sum(f.boundary for f in state.files)
        label = "aborting"
    else:
        order, left = state.files, sum(f.size - f.boundary for f in state.files)
        label = {"encrypt": "encrypting", "decrypt": "decrypting", "rekey": "deep rekey"}[state.op]
    with progress(left, label) as bar:
        for f in order:
            if (f.boundary == 0) if state.aborting else f.done:
                continue
            what = os.path.join(d, f.name)
            frm = _cipher(keys, f.frm, what)
            to = SectorCipher(fresh.pop(f.name)) if fresh and f.name in fresh else _cipher(keys, f.to, what)
            fd = _open_rw(what)
            try:
                sized(fd, f, state, what)
                restore_saved(fd, d, state, f, what)
                while (f.boundary > 0) if state.aborting else not f.done:
                    off, n = rewrite_region(fd, d, state, f, frm, to, what, bar.update)
                    advance(f, state, off, n)
                    folder.save_keys(current)  # the boundary moves: the region is under its new key now
                    if _regions_started == _STOP_AFTER:  # test-only: a crash between regions
                        _stop_here()
            finally:
                os.close(fd)
    remove_region(d)
    if state.aborting:
        commit_abort(tx, current)
    else:
        _commit(tx, current)


def begin_abort(folder, current: FolderKeys) -> None:
    """Turn the operation in flight into its abort (FORMAT.md 7.8): no region of it is in flight afterwards.

    The region in flight is restored from its sidecar first and the sidecar removed, so that
    no sidecar of the forward run can be taken for one of the abort's.
    """
    state = current.reencrypt
    if state.aborting:
        return
    d = folder.backing_dir
    f = state.current()
    if f is not None and read_region(d, state) is not None:
        what = os.path.join(d, f.name)
        fd = _open_rw(what)
        try:
            restore_saved(fd, d, state, f, what)
        finally:
            os.close(fd)
    remove_region(d)
    state.aborting = True
    folder.save_keys(current)


def abort(tx: FolderTransaction, keys: KeyAccess, progress: ProgressFactory) -> ReencryptState:
    """Return a folder with an in-place operation in flight to its old keys, in place (`vmfs-crypt abort`, offline)."""
    folder = tx.folder
    current = folder.load_keys(allow_reencrypt=True) if folder.encrypted else None
    if current is None or current.reencrypt is None:
        raise UsageError(f"{folder.backing_dir}: no in-place encrypt, decrypt or deep rekey is in flight there; "
                         "nothing to abort")
    tx.check_in_use(Access.DATA)
    _check_keyed_by_state(folder, current.reencrypt)
    before = getattr(keys, "purpose", None)
    if hasattr(keys, "purpose"):  # the data under both keys is read: as resume()
        keys.purpose = "rekey" if current.reencrypt.op == "rekey" else "decrypt"
    try:
        begin_abort(folder, current)
        run(tx, keys, current, progress)
    finally:
        if hasattr(keys, "purpose"):
            keys.purpose = before
    return current.reencrypt


def commit_abort(tx: FolderTransaction, current: FolderKeys, check: bool = True) -> None:
    """Every file is back under `from`: the key metadata without the state (FORMAT.md 7.8, "The commit of an abort").

    The old records stay in `files` (where the operation's start put them), except that a
    deep rekey's file whose `descriptor` is named gets its old encryption lines back there.
    An aborted encrypt of a folder that holds no other key (it was plain) makes it plain again.
    """
    state = current.reencrypt
    if check:
        tx.check_in_use(Access.DATA)  # our own writes changed the files: look again from here
    files = dict(current.files)
    if state.op == "encrypt" and not files and not any(d.has_encryption_lines for d in tx.folder.descriptors()):
        tx.commit(None)  # an encrypt starts on a plain folder (lifecycle.encrypt_folder) and no key is left
        return
    for f in state.files:
        if f.frm is not None and f.descriptor is not None:
            tx.stage_descriptor(f.descriptor, f.frm)
            files.pop(f.name, None)
    tx.commit(FolderKeys(current.kek, files))


def _commit(tx: FolderTransaction, current: FolderKeys, check: bool = True) -> None:
    """Switch the key metadata to the new keys in one journal commit (decrypt: the folder becomes plain)."""
    state = current.reencrypt
    if check:
        tx.check_in_use(Access.DATA)  # our own writes changed the files: look again from here
    if state.op == "decrypt":
        tx.commit(None)
        return
    files = {n: r for n, r in current.files.items() if state.entry(n) is None}
    for f in state.files:
        if f.descriptor is not None:
            tx.stage_descriptor(f.descriptor, f.to)
        else:
            files[f.name] = f.to
    tx.commit(FolderKeys(state.kek, files))


# -- for the online path (ops/online.py), which runs the same steps inside the mount --------------

open_rw = _open_rw
read_exact = _read_exact
write_in_place = _write_in_place
stop_here = _stop_here


def hold_in_region() -> None:
    """Test-only: in the region HOLD_IN_ENV names, wait for its FIFO's writer to come and go."""
    number, _, fifo = _HOLD_IN
    if fifo and number.isdigit() and _regions_started == int(number):
        with open(fifo, "rb") as f:
            f.read()


def after_region() -> None:
    """A region's boundary is committed: stop here if the test-only stop point says so."""
    if _regions_started == _STOP_AFTER:
        _stop_here()


def commit_online(tx: FolderTransaction, current: FolderKeys) -> None:
    """The commit of an operation the mount carried out: its own handles are the users, nothing to check."""
    _commit(tx, current, check=False)
