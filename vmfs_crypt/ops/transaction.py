"""One folder transaction: recover on enter, stage new files beside the old ones, commit by journal on success."""

import os

from ..format.atomicio import write_atomic
from ..format.descriptor import format_encryption_lines, insert_encryption_lines, read_descriptor
from ..format.folder import TMP_PREFIX, FolderKeys, VmFolder
from ..format.journal import commit, recover
from ..format.keysafe import KeyRecord
from ..errors import FormatError


class FolderTransaction:
    """`with FolderTransaction(folder) as tx:` ... `tx.commit(keys)`; leaving without commit drops the staged files."""

    def __init__(self, folder: VmFolder) -> None:
        self.folder = folder
        self.renames: list[tuple[str, str]] = []
        self.committed = False

    def __enter__(self) -> "FolderTransaction":
        recover(self.folder)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            for tmp, _ in self.renames:
                try:
                    os.unlink(os.path.join(self.folder.backing_dir, tmp))
                except FileNotFoundError:
                    pass

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
        commit(self.folder, self.renames, keys)
        self.committed = True
