"""One folder transaction: lock the folder, recover, stage new files beside the old ones, commit by journal on success.

The folder's operation lock (format/oplock.py) keeps other offline operations and a
starting mount's recovery away from the staged files; `check_in_use` refuses a folder
whose files are open (ops/inuse.py), and the commit looks again first (issue 7, case 2).
"""

import os

from ..format.atomicio import write_atomic
from ..format.descriptor import format_encryption_lines, insert_encryption_lines, read_descriptor
from ..format.folder import TMP_PREFIX, FolderKeys, VmFolder
from ..format.journal import commit, recover
from ..format.keysafe import KeyRecord
from ..format.oplock import FolderOpLock
from ..errors import FormatError
from .inuse import Access, FolderGuard


class FolderTransaction:
    """`with FolderTransaction(folder, "encrypt") as tx:` ... `tx.commit(keys)`; leaving without commit drops the staged files."""

    def __init__(self, folder: VmFolder, op: str) -> None:
        self.folder = folder
        self.op = op
        self.renames: list[tuple[str, str]] = []
        self.committed = False
        self._lock = FolderOpLock(folder.backing_dir, f"vmfs-crypt {op} {folder.backing_dir}")
        self._guard: FolderGuard | None = None

    def __enter__(self) -> "FolderTransaction":
        self._lock.acquire()
        try:
            recover(self.folder, lock_held=True)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self.committed:
                for tmp, _ in self.renames:
                    try:
                        os.unlink(os.path.join(self.folder.backing_dir, tmp))
                    except FileNotFoundError:
                        pass
        finally:
            self._lock.release()

    def check_in_use(self, access: Access) -> None:
        """Refuse (InUseError) if a file this operation replaces is open; checked again at the commit."""
        self._guard = FolderGuard(self.folder.backing_dir, self.op, access)
        self._guard.check()

    def path(self, name: str) -> str:
        return os.path.join(self.folder.backing_dir, name)

    def stage(self, name: str) -> str:
        """The temporary path for the new version of `name` (the caller writes and fsyncs it)."""
        tmp = TMP_PREFIX + name
        self.renames.append((tmp, name))
        return self.path(tmp)

    def stage_descriptor(self, name: str, record: KeyRecord | None) -> None:
        """A new version of descriptor `name` with `record`'s encryption lines (None: without any)."""
        desc = read_descriptor(self.path(name))
        if desc is None:
            raise FormatError(f"{self.path(name)}: not a text VMDK descriptor any more")
        view = desc.view
        write_atomic(self.stage(name), insert_encryption_lines(view, format_encryption_lines(record))
                     if record else view, 0o600)

    def commit(self, keys: FolderKeys | None) -> None:
        if self._guard is not None:
            self._guard.check_again()
        commit(self.folder, self.renames, keys, on_committed=self._committed)
        # Applied: an in-place re-encryption commits twice in one transaction (its start and its end).
        self.renames = []
        self.committed = False

    def _committed(self) -> None:
        # The journal is written: the staged files are its own now. Should applying it fail,
        # they stay for recovery (deleting them would leave new keys over old contents).
        self.committed = True
