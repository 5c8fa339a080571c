"""Offset arithmetic between plaintext byte offsets and 512-byte sectors."""

SECTOR_SIZE = 512
XTS_BLOCK_SIZE = 16


def plain_off_to_sector(plain_off: int) -> int:
    """Index of the sector that holds plaintext byte `plain_off`."""
    if plain_off < 0:
        raise ValueError("offset must not be negative")
    return plain_off // SECTOR_SIZE


def sector_to_plain_off(sector_no: int) -> int:
    """Byte offset at which sector `sector_no` starts (same in plaintext and backing file)."""
    return sector_no * SECTOR_SIZE


def sector_span(plain_off: int, length: int) -> tuple[int, int]:
    """First sector and number of sectors touched by `length` bytes at `plain_off` (length > 0)."""
    if length <= 0:
        return plain_off_to_sector(plain_off), 0
    first = plain_off_to_sector(plain_off)
    last = plain_off_to_sector(plain_off + length - 1)
    return first, last - first + 1


def sector_count(file_size: int) -> int:
    """Sectors a file of `file_size` bytes occupies, the last one possibly partial."""
    return -(-file_size // SECTOR_SIZE)


def sector_len(sector_no: int, file_size: int) -> int:
    """Bytes of sector `sector_no` that lie inside a file of `file_size` bytes (0 past EOF)."""
    start = sector_to_plain_off(sector_no)
    return max(0, min(SECTOR_SIZE, file_size - start))
