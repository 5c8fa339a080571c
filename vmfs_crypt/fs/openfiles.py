"""The open-file table: file handles, and the state shared by every handle of one backing file.

Modelled on gocryptfs's internal/openfiletable: an encrypted file's shared state (its cipher
and its lock) is keyed by the backing inode, so two hard links or a renamed file share one
lock and one cipher. A descriptor's state is keyed by its path instead, because writing it
back replaces its inode (atomic rename); renames and unlinks re-point or retire it here.
"""

import errno
import threading
from dataclasses import dataclass, field

from ..crypto.xts import SectorCipher
from ..format.keysafe import KeyRecord, KeyRef
from .locks import RWLock


@dataclass
class EncryptedFile:
    """Shared state of one backing data file while it is open: encrypted, or plain (`cipher` None).

    A plain file has one too, for its lock: an online encrypt (issue 10, ops/online.py) gives
    it a cipher under that lock, which no plain read or write then still runs around.
    """

    inode: tuple[int, int]  # (st_dev, st_ino) of the backing file
    cipher: object  # SectorCipher (or FORMAT.md 7.8's split key while re-encrypted online); None: plain
    record: KeyRecord | None  # the key record its cipher came from (the DEK cache counts users by it)
    # Readers-writer lock: RWLock, or the compiled core's FileState (which also carries the
    # cipher, the revocation flag and the name for native log records): fs/datapath.py.
    lock: object = field(default_factory=RWLock)
    opens: int = 0
    online: object = None  # the online operation rewriting this file (ops/online.py): size changes refused
    kek_hint: KeyRef | None = None  # the KEK after an online operation, which leaves `record` None

    @property
    def kek(self) -> KeyRef | None:
        return self.record.keysafe.kek if self.record is not None else self.kek_hint

    def rekey(self, cipher: SectorCipher, record: KeyRecord) -> None:
        """Serve the file under a new DEK from now on: only for an empty file, with its lock held for writing.

        (An emptied file's old key is dropped, issue 7 case 8.) The compiled data path's
        file state, which is `lock`, is given the new cipher by the caller (DataPath.set_cipher).
        """
        self.cipher = cipher
        self.record = record


@dataclass
class DescriptorFile:
    """A descriptor of an encrypted folder, edited in memory without its encryption lines."""

    rel: str  # path in the mount, re-pointed on rename
    view: bytearray
    key_lines: list[bytes]
    mode: int
    dirty: bool = False
    deleted: bool = False  # unlinked or replaced while open: never written back
    opens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # The key lines as last read from or written to the file at rest: if `key_lines` still
    # equals them at write-back, the lines at rest win (a shallow rekey may have replaced
    # them); if the mount changed `key_lines` itself (an emptied descriptor), the mount's win.
    key_lines_seen: list[bytes] | None = None

    def __post_init__(self) -> None:
        if self.key_lines_seen is None:
            self.key_lines_seen = list(self.key_lines)


class OpenFileTable:
    """Handles by number, shared encrypted state by inode, descriptor state by path. Thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._handles: dict[int, object] = {}
        self._free: list[int] = []
        self._next_fh = 1
        self.encrypted: dict[tuple[int, int], EncryptedFile] = {}
        self.descriptors: dict[str, DescriptorFile] = {}

    # -- handles -------------------------------------------------------------------------
    def add(self, handle) -> int:
        with self.lock:
            if self._free:
                fh = self._free.pop()
            else:
                fh = self._next_fh
                self._next_fh += 1
            self._handles[fh] = handle
            return fh

    def get(self, fh: int):
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, "no such open file") from None

    def replace(self, fh: int, handle) -> None:
        with self.lock:
            self._handles[fh] = handle

    def pop(self, fh: int):
        with self.lock:
            handle = self._handles.pop(fh, None)
            if handle is None:
                raise OSError(errno.EBADF, "no such open file")
            self._free.append(fh)
            return handle

    def handles(self) -> list:
        with self.lock:
            return list(self._handles.values())

    def items(self) -> list[tuple[int, object]]:
        """(file handle number, handle) of every open handle."""
        with self.lock:
            return list(self._handles.items())

    # -- names ---------------------------------------------------------------------------
    def renamed(self, old_rel: str, new_rel: str) -> None:
        """After rename(old, new): what was at `new` is replaced, and `old`'s state and handles follow it."""
        with self.lock:
            replaced = self.descriptors.pop(new_rel, None)
            if replaced is not None:
                replaced.deleted = True
            moved = self.descriptors.pop(old_rel, None)
            if moved is not None:
                moved.rel = new_rel
                self.descriptors[new_rel] = moved
            prefix = old_rel + "/"
            for handle in self._handles.values():
                if handle.rel == old_rel:
                    handle.rel = new_rel
                elif handle.rel.startswith(prefix):  # a directory was renamed
                    handle.rel = new_rel + handle.rel[len(old_rel):]
            for rel in [r for r in self.descriptors if r.startswith(prefix)]:
                desc = self.descriptors.pop(rel)
                desc.rel = new_rel + rel[len(old_rel):]
                self.descriptors[desc.rel] = desc

    def unlinked(self, rel: str) -> None:
        with self.lock:
            desc = self.descriptors.pop(rel, None)
            if desc is not None:
                desc.deleted = True
