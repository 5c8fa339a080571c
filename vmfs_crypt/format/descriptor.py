"""VMDK text descriptors: recognise them, list their extents, and keep the encryption lines apart from the view QEMU sees."""

import os
import re
from dataclasses import dataclass
from functools import cached_property

from ..errors import FormatError
from .atomicio import open_regular, read_fd
from .keysafe import KeyRecord

DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
# A text descriptor is a few hundred bytes (QEMU pads it to 512-byte multiples); a .vmdk
# larger than this is a sparse or flat data file, never a descriptor we read whole.
DESCRIPTOR_MAX_SIZE = 1 << 20
KEYSAFE_KEY = "encryption.keySafe"
DATA_KEY = "encryption.data"
# A line of ours: optional blanks, "encryption.", the rest of the line and its newline.
_ENC_LINE_RE = re.compile(rb"^[ \t]*encryption\.[^\n]*(?:\n|$)", re.MULTILINE)
_ENC_KV_RE = re.compile(r'^[ \t]*(encryption\.[A-Za-z]+)[ \t]*=[ \t]*"([^"]*)"[ \t]*\r?$')
_EXTENT_RE = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)\s+"([^"]+)"(?:\s+(\d+))?', re.MULTILINE)
# The same lines in bytes, to change one extent's size without touching any other byte.
_EXTENT_BYTES_RE = re.compile(rb'^\s*(?:RW|RDONLY|NOACCESS)\s+(\d+)\s+[A-Z]+\s+"([^"]+)"', re.MULTILINE)


@dataclass(frozen=True)
class Extent:
    access: str
    sectors: int
    kind: str  # FLAT, VMFS, SPARSE, VMFSSPARSE, ZERO...
    file_name: str
    offset: int


@dataclass(frozen=True)
class Descriptor:
    """A text VMDK descriptor as stored (with its encryption lines, if any)."""

    path: str
    raw: bytes

    @cached_property
    def extents(self) -> list["Extent"]:
        return extents(self.raw)

    @property
    def has_encryption_lines(self) -> bool:
        return bool(encryption_lines(self.raw))

    def key_record(self) -> KeyRecord | None:
        """Its key record, or None; FormatError when its encryption lines are malformed."""
        return read_key_record(self.raw, self.path)

    @property
    def view(self) -> bytes:
        return strip_encryption_lines(self.raw)


def read_descriptor(path: str) -> Descriptor | None:
    """The text descriptor stored at `path`, or None when `path` is not a regular file that starts like one.

    The one reader of descriptors (mount, offline operations, inspection): a symlink, FIFO or
    directory is never a descriptor, and never followed.
    """
    try:
        fd = open_regular(path)
    except OSError:
        return None
    try:
        head = read_fd(fd, len(DESCRIPTOR_MAGIC))
        if not is_descriptor(head):
            return None  # a sparse or flat data file: read no further
        return Descriptor(path, head + read_fd(fd, DESCRIPTOR_MAX_SIZE - len(head), len(head)))
    finally:
        os.close(fd)


def is_descriptor(head: bytes) -> bool:
    """True when a file starts like a text VMDK descriptor (as opposed to a KDMV/COWD sparse file)."""
    return head.startswith(DESCRIPTOR_MAGIC)


def extents(text: bytes) -> list[Extent]:
    """The extent lines of a descriptor, in order."""
    body = text.rstrip(b"\x00").decode("utf-8", "replace")
    return [Extent(m[1], int(m[2]), m[3], m[4], int(m[5] or 0)) for m in _EXTENT_RE.finditer(body)]


def set_extent_sectors(text: bytes, file_name: str, sectors: int) -> bytes:
    """`text` with the size (in sectors) of every extent line naming `file_name` set to `sectors`; nothing else changes."""
    name = file_name.encode("utf-8")
    out, pos = [], 0
    for m in _EXTENT_BYTES_RE.finditer(text):
        if m.group(2) == name:
            out += [text[pos:m.start(1)], str(sectors).encode("ascii")]
            pos = m.end(1)
    out.append(text[pos:])
    return b"".join(out)


def strip_encryption_lines(raw: bytes) -> bytes:
    """The descriptor as tools see it through the mount: without our encryption.* lines."""
    return _ENC_LINE_RE.sub(b"", raw)


def encryption_lines(raw: bytes) -> list[bytes]:
    """The encryption.* lines of a backing descriptor, each with its newline."""
    return [m.group(0) if m.group(0).endswith(b"\n") else m.group(0) + b"\n" for m in _ENC_LINE_RE.finditer(raw)]


def insert_encryption_lines(view: bytes, lines: list[bytes]) -> bytes:
    """Put encryption lines back after the first line (the DescriptorFile header) of a view."""
    if not lines:
        return view
    newline = view.find(b"\n")
    if newline < 0:
        raise FormatError("a VMDK descriptor must start with a '# Disk DescriptorFile' line")
    return view[:newline + 1] + b"".join(lines) + view[newline + 1:]


def format_encryption_lines(record: KeyRecord) -> list[bytes]:
    return [f'{KEYSAFE_KEY} = "{record.keysafe.to_locator()}"\n'.encode("ascii"),
            f'{DATA_KEY} = "{record.data.encode()}"\n'.encode("ascii")]


def read_key_record(raw: bytes, what: str) -> KeyRecord | None:
    """The key record in a descriptor's encryption lines, or None when it has none."""
    values: dict[str, str] = {}
    for line in encryption_lines(raw):
        match = _ENC_KV_RE.match(line.rstrip(b"\n").decode("utf-8", "replace"))
        if not match:
            raise FormatError(f"{what}: malformed line {line.strip()[:60]!r}; restore the descriptor from a backup")
        key, value = match.groups()
        if key not in (KEYSAFE_KEY, DATA_KEY):
            raise FormatError(f"{what}: unknown descriptor key {key}; this vmfs-crypt does not know it")
        if key in values:
            raise FormatError(f"{what}: {key} appears twice")
        values[key] = value
    if not values:
        return None
    if set(values) != {KEYSAFE_KEY, DATA_KEY}:
        raise FormatError(f"{what}: has only one of {KEYSAFE_KEY} and {DATA_KEY}; restore the descriptor from a backup")
    return KeyRecord.parse(values[KEYSAFE_KEY], values[DATA_KEY], what)


def flat_descriptor(extent_name: str, sectors: int, cid: str) -> bytes:
    """A descriptor in ESXi's style for one preallocated-format (here: thin, sparse) flat extent."""
    cylinders = max(1, sectors // (255 * 63))
    return (
        "# Disk DescriptorFile\n"
        "version=1\n"
        "encoding=\"UTF-8\"\n"
        f"CID={cid}\n"
        "parentCID=ffffffff\n"
        "createType=\"vmfs\"\n"
        "\n"
        "# Extent description\n"
        f"RW {sectors} VMFS \"{extent_name}\"\n"
        "\n"
        "# The Disk Data Base\n"
        "#DDB\n"
        "\n"
        "ddb.adapterType = \"lsilogic\"\n"
        f"ddb.geometry.cylinders = \"{cylinders}\"\n"
        "ddb.geometry.heads = \"255\"\n"
        "ddb.geometry.sectors = \"63\"\n"
        "ddb.virtualHWVersion = \"14\"\n"
    ).encode("utf-8")
