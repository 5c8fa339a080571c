"""format/holes.py's quick "any hole here?" check against FORMAT.md 3.4 read literally.

`has_zero_sector` decides the fast paths of the offline re-encryption and of the Python data
path (issue 13): a wrong False would store a hole's sector encrypted (or decrypt a hole into
noise), a wrong True only costs time. It looks at one word per sector from 64 KiB on, so the
cases here are sectors that start with zeros and end otherwise, and the partial last sector.
"""

import os
import random

from vmfs_crypt.format.holes import _SCAN_BY_SECTOR_MIN, has_zero_sector, zero_sector_mask

SECTOR = 512


def _any_hole(data: bytes) -> bool:
    """FORMAT.md 3.4: an all-zero sector is a hole, except a partial last sector under 16 bytes."""
    n_full = len(data) // SECTOR
    if any(not any(data[i * SECTOR:(i + 1) * SECTOR]) for i in range(n_full)):
        return True
    tail = data[n_full * SECTOR:]
    return len(tail) >= 16 and not any(tail)


def _buffers(rnd: random.Random):
    big = _SCAN_BY_SECTOR_MIN // SECTOR
    for _ in range(400):
        nsec = rnd.choice([0, 1, 2, 7, big - 1, big, big + 3, 2 * big])
        tail = rnd.choice([0, 1, 15, 16, 17, 300, 511])
        b = bytearray(os.urandom(nsec * SECTOR + tail))
        for k in range(nsec):
            r = rnd.random()
            if r < 0.005:
                b[k * SECTOR:(k + 1) * SECTOR] = bytes(SECTOR)
            elif r < 0.05:  # zero at the start (the word the quick look reads) but not all zero
                n = rnd.choice([8, 16, 64, 511])
                b[k * SECTOR:k * SECTOR + n] = bytes(n)
        if tail and rnd.random() < 0.3:
            b[nsec * SECTOR:] = bytes(tail)
        yield b


def test_has_zero_sector_is_format_3_4_for_every_buffer_type():
    rnd = random.Random(20261204)
    seen = {True: 0, False: 0}
    for b in _buffers(rnd):
        want = _any_hole(bytes(b))
        seen[want] += 1
        for data in (bytes(b), b, memoryview(b)):
            assert has_zero_sector(data) is want, (len(b), type(data).__name__)
            assert bool(zero_sector_mask(data).any()) is want
    assert seen[True] > 20 and seen[False] > 20  # both answers were exercised


def test_a_sector_zero_but_for_its_last_byte_is_not_a_hole():
    b = bytearray(os.urandom(4 * _SCAN_BY_SECTOR_MIN))
    for k in range(0, len(b), SECTOR):
        b[k:k + SECTOR - 1] = bytes(SECTOR - 1)
        b[k + SECTOR - 1] = 1
    assert not has_zero_sector(b)
    b[-1] = 0  # now the last sector is all zero
    assert has_zero_sector(b)
    assert has_zero_sector(bytes(b)[:-SECTOR] + bytes(16))  # an all-zero 16-byte last sector
    assert not has_zero_sector(bytes(b)[:-SECTOR] + bytes(15))  # under 16 bytes: never a hole
