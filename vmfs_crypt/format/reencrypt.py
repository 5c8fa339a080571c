"""The state of an in-place re-encryption (docs/FORMAT.md 7.8): the folder key file's `reencrypt` member and the region sidecar."""

import errno
import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass, field

from ..crypto.sectors import SECTOR_SIZE
from ..errors import FormatError
from .atomicio import NotRegularFile, fsync_dir, open_regular, pwrite_exact, read_fd
from .keysafe import KeyRecord, KeyRef
from .strict import check_members, exact_int, json_object

REENCRYPT_FEATURE = "reencrypt"
REGION_NAME = ".vmfs-crypt-region"  # not a temporary-file prefix: recovery without keys must keep it
REGION_FORMAT = "vmfs-crypt-region"
OPS = ("encrypt", "decrypt", "rekey")
DEFAULT_REGION_SIZE = 64 << 20
MAX_REGION_SIZE = 1 << 30


@dataclass
class ReencryptFile:
    """One file of the operation: bytes below `boundary` are under `to`, the rest under `frm` (None: plaintext)."""

    name: str
    size: int
    boundary: int
    frm: KeyRecord | None
    to: KeyRecord | None
    descriptor: str | None  # the descriptor that gets `to`'s encryption lines at the commit (None: files[name])

    @property
    def done(self) -> bool:
        return self.boundary >= self.size

    def to_json(self) -> dict:
        return {"name": self.name, "size": self.size, "boundary": self.boundary,
                "from": self.frm.as_json() if self.frm else None, "to": self.to.as_json() if self.to else None,
                "descriptor": self.descriptor}


@dataclass
class ReencryptState:
    """The folder's operation in flight (FORMAT.md 7.8)."""

    op: str
    region_size: int
    kek: KeyRef | None  # the folder's KEK after the commit (None: the folder becomes plain)
    files: list[ReencryptFile] = field(default_factory=list)
    # Aborted: the writer moves every boundary back to 0, returning the files to `from` (FORMAT.md 7.8).
    aborting: bool = False

    def to_json(self) -> dict:
        out = {"op": self.op, "regionSize": self.region_size, "kek": self.kek.to_json() if self.kek else None,
               "files": [f.to_json() for f in self.files]}
        if self.aborting:
            out["aborting"] = True
        return out

    def current(self) -> ReencryptFile | None:
        """The file whose region may be in flight: the first one not finished, or, aborting, the last one begun."""
        if self.aborting:
            return next((f for f in reversed(self.files) if f.boundary > 0), None)
        return next((f for f in self.files if not f.done), None)

    def region_of(self, f: ReencryptFile) -> tuple[int, int]:
        """(offset, length) of the region the writer rewrites next in `f`: at its boundary, or, aborting, below it."""
        if self.aborting:
            low = (f.boundary - 1) // self.region_size * self.region_size if f.boundary else 0
            return low, f.boundary - low
        return f.boundary, min(self.region_size, f.size - f.boundary)

    def entry(self, name: str) -> ReencryptFile | None:
        return next((f for f in self.files if f.name == name), None)

    @classmethod
    def from_json(cls, obj, what: str, files: dict[str, KeyRecord]) -> "ReencryptState":
        """Parse and check the member against the key file's `files` (FormatError on anything FORMAT.md 7.8 rejects)."""
        what = f"{what}: reencrypt"
        if not isinstance(obj, dict):
            raise FormatError(f"{what}: must be an object")
        check_members(obj, {"op", "regionSize", "kek", "files"} | ({"aborting"} if "aborting" in obj else set()), what)
        if "aborting" in obj and obj["aborting"] is not True:
            raise FormatError(f"{what}: aborting must be true when present")
        op, region = obj["op"], obj["regionSize"]
        if op not in OPS:
            raise FormatError(f"{what}: unknown op {op!r}")
        if type(region) is not int or region <= 0 or region % SECTOR_SIZE or region > MAX_REGION_SIZE:
            raise FormatError(f"{what}: regionSize must be a positive multiple of {SECTOR_SIZE} up to {MAX_REGION_SIZE}")
        kek = None if obj["kek"] is None else KeyRef.from_json(obj["kek"], f"{what}: kek")
        if (kek is None) != (op == "decrypt"):
            raise FormatError(f"{what}: kek must be null exactly for decrypt")
        if not isinstance(obj["files"], list) or not obj["files"]:
            raise FormatError(f"{what}: files must be a non-empty array")
        out, seen, started = [], set(), False
        for i, f in enumerate(obj["files"]):
            fw = f"{what}: files[{i}]"
            if not isinstance(f, dict):
                raise FormatError(f"{fw}: must be an object")
            check_members(f, {"name", "size", "boundary", "from", "to", "descriptor"}, fw)
            name, size, boundary, desc = f["name"], f["size"], f["boundary"], f["descriptor"]
            if not _plain_name(name) or name in seen:
                raise FormatError(f"{fw}: bad or repeated name {name!r}")
            seen.add(name)
            if type(size) is not int or type(boundary) is not int or size < 0 or not 0 <= boundary <= size:
                raise FormatError(f"{fw}: size and boundary must be integers with 0 <= boundary <= size")
            if boundary != size and boundary % region:
                raise FormatError(f"{fw}: boundary {boundary} is neither the size nor a multiple of regionSize")
            if started and boundary:
                raise FormatError(f"{fw}: started before an earlier file was finished")
            if boundary < size:
                started = True
            frm = None if f["from"] is None else KeyRecord.from_json(f["from"], f"{fw}: from")
            to = None if f["to"] is None else KeyRecord.from_json(f["to"], f"{fw}: to")
            if (frm is None) != (op == "encrypt") or (to is None) != (op == "decrypt"):
                raise FormatError(f"{fw}: from must be null exactly for encrypt, to exactly for decrypt")
            if desc is not None and (not _plain_name(desc) or op == "decrypt"):
                raise FormatError(f"{fw}: bad descriptor {desc!r}")
            have = files.get(name)
            if (frm is None and have is not None) or (frm is not None and (have is None or have.as_json() != frm.as_json())):
                raise FormatError(f"{fw}: files[{name!r}] must be exactly its from record (absent when from is null)")
            out.append(ReencryptFile(name, size, boundary, frm, to, desc))
        return cls(op, region, kek, out, aborting="aborting" in obj)


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


# -- the region sidecar -------------------------------------------------------------------------

def region_path(folder_dir: str) -> str:
    return os.path.join(folder_dir, REGION_NAME)


def _region_header(name: str, offset: int, length: int, sha256_hex: str) -> bytes:
    return json.dumps({"format": REGION_FORMAT, "version": 1, "file": name, "offset": offset, "length": length,
                       "sha256": sha256_hex}, sort_keys=True).encode("utf-8") + b"\n"


def write_region(folder_dir: str, name: str, offset: int, old: bytes) -> None:
    """Save the old bytes of the region about to be rewritten, durably, before a byte of it changes.

    The previous sidecar is overwritten in place and cut to size, not truncated first: on tmpfs
    writing it into fresh pages cost about as much as hashing it (issue 13). The bytes go in
    while another thread hashes them, the header line last: its length does not depend on the
    hash. Until the fsync a mix of old and new bytes is valid by FORMAT.md 7.8 (offset, length
    and hash are checked) only if it holds exactly these bytes, so a crash never leaves a valid
    sidecar with wrong bytes.
    """
    digest: list[str] = []
    hasher = threading.Thread(target=lambda: digest.append(hashlib.sha256(old).hexdigest()),
                              name="vmfs-crypt-sidecar-hash")  # hashlib releases the GIL
    hasher.start()
    path = region_path(folder_dir)
    fresh = not os.path.lexists(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except BaseException:
        hasher.join()
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a hard link would be another file's bytes
            raise FormatError(f"{path}: not a regular file with one link; remove it by hand")
        head_len = len(_region_header(name, offset, len(old), "0" * 64))
        pwrite_exact(fd, old, head_len)
        hasher.join()
        if not digest:
            raise OSError(errno.EIO, "the region's SHA-256 failed", path)
        header = _region_header(name, offset, len(old), digest[0])
        if len(header) != head_len:
            raise AssertionError("region header length depends on its hash")
        pwrite_exact(fd, header, 0)
        os.ftruncate(fd, head_len + len(old))
        os.fsync(fd)
    finally:
        hasher.join()
        os.close(fd)
    if fresh:
        fsync_dir(folder_dir)


def read_region(folder_dir: str, state: ReencryptState) -> tuple[int, bytes] | None:
    """(offset, old bytes) of a valid sidecar for the region in flight of the state's current file; None when there is none.

    Anything else (torn, stale, for another file or offset) is ignored: the writer changes no
    byte of a region before its sidecar is complete and fsynced (FORMAT.md 7.8).
    """
    current = state.current()
    if current is None:
        return None
    offset, want = state.region_of(current)
    try:
        fd = open_regular(region_path(folder_dir))
    except FileNotFoundError:
        return None
    except NotRegularFile:
        raise FormatError(f"{region_path(folder_dir)}: not a regular file; remove it by hand") from None
    try:
        raw = read_fd(fd, want + 4096)
    finally:
        os.close(fd)
    nl = raw.find(b"\n")
    if nl < 0:
        return None
    try:
        head = json_object(raw[:nl], REGION_NAME)
        check_members(head, {"format", "version", "file", "offset", "length", "sha256"}, REGION_NAME)
    except FormatError:
        return None
    body = raw[nl + 1:]
    if (head["format"] != REGION_FORMAT or not exact_int(head["version"], 1) or head["file"] != current.name
            or not exact_int(head["offset"], offset) or not exact_int(head["length"], want)
            or len(body) != want or head["sha256"] != hashlib.sha256(body).hexdigest()):
        return None
    return offset, body


def remove_region(folder_dir: str) -> None:
    try:
        os.unlink(region_path(folder_dir))
    except FileNotFoundError:
        return
    fsync_dir(folder_dir)
