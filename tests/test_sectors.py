"""Offset arithmetic between plaintext bytes and 512-byte sectors (vmfs_crypt/sectors.py)."""

import random

import pytest

from vmfs_crypt.crypto.sectors import (
    SECTOR_SIZE,
    XTS_BLOCK_SIZE,
    plain_off_to_sector,
    sector_count,
    sector_len,
    sector_span,
    sector_to_plain_off,
)


def test_constants():
    assert SECTOR_SIZE == 512
    assert XTS_BLOCK_SIZE == 16
    assert SECTOR_SIZE % XTS_BLOCK_SIZE == 0


@pytest.mark.parametrize("off, sector", [(0, 0), (1, 0), (511, 0), (512, 1), (513, 1), (1023, 1),
                                         (1024, 2), (2**32 * 512, 2**32), (2**64 * 512 - 1, 2**64 - 1)])
def test_plain_off_to_sector(off, sector):
    assert plain_off_to_sector(off) == sector


def test_plain_off_to_sector_refuses_negative():
    with pytest.raises(ValueError):
        plain_off_to_sector(-1)


@pytest.mark.parametrize("sector, off", [(0, 0), (1, 512), (2, 1024), (2**32, 2**41), (2**64 - 1, (2**64 - 1) * 512)])
def test_sector_to_plain_off(sector, off):
    assert sector_to_plain_off(sector) == off
    assert plain_off_to_sector(off) == sector


@pytest.mark.parametrize("off, length, span", [
    (0, 1, (0, 1)),
    (0, 511, (0, 1)),
    (0, 512, (0, 1)),  # exactly one sector
    (0, 513, (0, 2)),
    (511, 1, (0, 1)),  # last byte of sector 0
    (511, 2, (0, 2)),  # across the boundary
    (512, 1, (1, 1)),  # first byte of sector 1
    (512, 512, (1, 1)),
    (100, 1024, (0, 3)),  # partial, whole, partial
    (1000, 24, (1, 1)),  # ends exactly at 1024
    (1000, 25, (1, 2)),
    (4096, 65536, (8, 128)),
])
def test_sector_span(off, length, span):
    assert sector_span(off, length) == span


@pytest.mark.parametrize("length", [0, -1, -512])
def test_sector_span_of_nothing(length):
    assert sector_span(1000, length) == (1, 0)
    assert sector_span(0, length) == (0, 0)


def test_sector_span_refuses_negative_offset():
    with pytest.raises(ValueError):
        sector_span(-1, 10)


def test_sector_span_covers_exactly_the_bytes():
    rnd = random.Random(1)
    for _ in range(2000):
        off = rnd.randrange(0, 10 * SECTOR_SIZE)
        length = rnd.randrange(1, 4 * SECTOR_SIZE)
        first, n = sector_span(off, length)
        assert sector_to_plain_off(first) <= off < sector_to_plain_off(first + 1)
        end = off + length  # exclusive
        assert sector_to_plain_off(first + n - 1) < end <= sector_to_plain_off(first + n)


@pytest.mark.parametrize("size, count", [(0, 0), (1, 1), (16, 1), (511, 1), (512, 1), (513, 2),
                                         (1024, 2), (1025, 3), (2**30, 2**21), (2**30 + 1, 2**21 + 1)])
def test_sector_count(size, count):
    assert sector_count(size) == count


@pytest.mark.parametrize("sector, size, length", [
    (0, 0, 0),  # empty file
    (0, 1, 1),
    (0, 511, 511),
    (0, 512, 512),
    (1, 512, 0),  # at end of file
    (0, 1000, 512),
    (1, 1000, 488),  # partial last sector
    (2, 1000, 0),  # past end of file
    (1, 1024, 512),
    (2, 1024, 0),
    (5, 1000, 0),  # far past end of file
    (2**21 - 1, 2**30, 512),
    (2**21, 2**30, 0),
    (2**21, 2**30 + 17, 17),
])
def test_sector_len(sector, size, length):
    assert sector_len(sector, size) == length


def test_sector_len_sums_to_file_size():
    rnd = random.Random(2)
    for size in [0, 1, 511, 512, 513, 4096, 4097] + [rnd.randrange(100_000) for _ in range(50)]:
        lens = [sector_len(s, size) for s in range(sector_count(size) + 2)]
        assert sum(lens) == size
        assert all(n == SECTOR_SIZE for n in lens[:max(0, sector_count(size) - 1)])
        assert lens[sector_count(size):] == [0, 0]
        if size:
            assert 0 < lens[sector_count(size) - 1] <= SECTOR_SIZE
