"""A readers-writer lock with a hot zone: a read never sees a sector half rewritten by a concurrent write."""

import threading

from ..crypto.sectors import SECTOR_SIZE

# set_hot's `hi` for a zone that runs to the end of the file, and past it (a file's last region).
HOT_TO_END = (1 << 64) - 1


class RWLock:
    """Many readers or one writer (the Python data path; the compiled core has its own pthread lock).

    The hot zone (issue 10) is the same as native/datapath.c's: while an online operation
    rewrites bytes [lo, hi) without holding the lock, the data path's `*_span` calls wait as
    long as their request touches one of its sectors; the plain calls ignore it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._hot: tuple[int, int] | None = None

    def _hot_touches(self, offset: int, size: int) -> bool:
        if self._hot is None:
            return False
        lo, hi = self._hot
        last = offset + size - 1 if size else offset
        return offset // SECTOR_SIZE <= (hi - 1) // SECTOR_SIZE and last // SECTOR_SIZE >= lo // SECTOR_SIZE

    def acquire_read(self) -> None:
        # A waiting writer goes first, as in native/datapath.c: an online re-encryption takes
        # the lock for each region and must not starve under a guest's reads (issue 10).
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def acquire_read_span(self, offset: int, size: int) -> None:
        with self._cond:
            while self._writer or self._writers_waiting or self._hot_touches(offset, size):
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def _take_write(self) -> None:
        self._writers_waiting += 1
        try:
            while self._writer or self._readers:
                self._cond.wait()
        finally:
            self._writers_waiting -= 1

    def acquire_write(self) -> None:
        with self._cond:
            self._take_write()
            self._writer = True

    def acquire_write_span(self, offset: int, size: int) -> None:
        with self._cond:
            while True:
                # Waiting for the hot zone is not waiting as a writer: readers elsewhere go on.
                while self._hot_touches(offset, size):
                    self._cond.wait()
                self._take_write()
                if not self._hot_touches(offset, size):
                    break
                if not self._writers_waiting:  # the operation set a zone here meanwhile
                    self._cond.notify_all()
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()

    def set_hot(self, lo: int, hi: int) -> None:
        with self._cond:
            if not self._writer:
                raise RuntimeError("set_hot() needs the write lock held")
            if hi <= lo or lo % SECTOR_SIZE:
                raise ValueError("set_hot(lo, hi) needs lo < hi and lo at a sector boundary")
            self._hot = (lo, hi)

    def clear_hot(self) -> None:
        with self._cond:
            if not self._writer:
                raise RuntimeError("clear_hot() needs the write lock held")
            self._hot = None  # the waiters wake at release_write
