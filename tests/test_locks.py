"""The file lock's hot zone (issue 10), native (native/datapath.c) and Python (fs/locks.py): the same behaviour.

While an online operation rewrites a region without the lock, data-path I/O touching one of
the region's sectors waits and the rest of the file is served; a waiter for the zone does
not hold back other readers; clearing the zone lets the waiters go.
"""

import threading

import pytest

from vmfs_crypt.crypto.native import native
from vmfs_crypt.fs.locks import HOT_TO_END, RWLock


def _native_lock():
    if native is None:
        pytest.skip("native data path off")
    return native.FileState(None, "vm1/disk-flat.vmdk")


@pytest.fixture(params=["native", "python"])
def lock(request):
    return _native_lock() if request.param == "native" else RWLock()


def _waiter(lock, kind: str, offset: int, size: int):
    """A thread that takes the lock's span `kind` and lets go; the event is set once it had it."""
    got = threading.Event()

    def run():
        getattr(lock, f"acquire_{kind}_span")(offset, size)
        got.set()
        getattr(lock, f"release_{kind}")()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def _set_hot(lock, lo: int, hi: int) -> None:
    lock.acquire_write()
    lock.set_hot(lo, hi)
    lock.release_write()


def _clear_hot(lock) -> None:
    lock.acquire_write()
    lock.clear_hot()
    lock.release_write()


def test_the_hot_zone_needs_the_write_lock_and_a_sector_aligned_start(lock):
    with pytest.raises(RuntimeError):
        lock.set_hot(0, 512)
    with pytest.raises(RuntimeError):
        lock.clear_hot()
    lock.acquire_write()
    for lo, hi in ((512, 512), (1024, 512), (100, 4096)):
        with pytest.raises(ValueError):
            lock.set_hot(lo, hi)
    lock.release_write()


def test_io_outside_the_zone_goes_on_io_touching_a_sector_of_it_waits_until_it_is_cleared(lock):
    _set_hot(lock, 1024, 1536)  # sector 2; a zone's end may be mid-sector (a file's short tail)
    for offset, size in ((0, 1024), (1536, 1), (1536, 4096), (1 << 40, 512)):
        lock.acquire_read_span(offset, size)
        lock.release_read()
        lock.acquire_write_span(offset, size)
        lock.release_write()
    lock.acquire_read()  # the operation's own (and the control plane's) locks ignore the zone
    lock.release_read()
    waiters = [_waiter(lock, "read", 1535, 1), _waiter(lock, "write", 1023, 2), _waiter(lock, "read", 0, 4096)]
    for t, got in waiters:
        t.join(0.3)  # a bounded look: each must still wait
        assert t.is_alive() and not got.is_set()
    # A writer waiting for the zone is not a waiting writer: readers elsewhere are not held back by it
    lock.acquire_read_span(4096, 512)
    lock.release_read()
    _clear_hot(lock)
    for t, got in waiters:
        t.join(30)
        assert got.is_set() and not t.is_alive()


def test_a_last_region_zone_runs_past_the_end_of_the_file(lock):
    _set_hot(lock, 4096, HOT_TO_END)
    t, got = _waiter(lock, "write", 1 << 50, 4096)  # a write that would grow the file
    t.join(0.3)
    assert t.is_alive() and not got.is_set()
    lock.acquire_write_span(0, 4096)
    lock.release_write()
    _clear_hot(lock)
    t.join(30)
    assert got.is_set()
