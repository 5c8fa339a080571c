"""Which files of a datastore are encrypted: the one classification used by the mount and the offline operations.

The rules (docs/FORMAT.md 7.2): in an encrypted (or damaged) folder, every regular file is
encrypted except our hidden metadata, the plaintext kinds by name (logs, VM configuration)
and text VMDK descriptors (by content); a plain folder holds only plaintext.
"""

import enum
import os
import stat

from .descriptor import read_descriptor
from .folder import FolderState, VmFolder, is_hidden_name, is_plaintext_name


class FileKind(enum.Enum):
    PLAIN = "plaintext"  # stored as it reads
    ENCRYPTED = "encrypted"  # every sector under the file's DEK
    DESCRIPTOR = "descriptor"  # a text VMDK descriptor: plaintext plus our key lines, which the mount hides
    HIDDEN = "hidden"  # vmfs-crypt's own metadata and temporary files: never shown, never touched by users
    SPECIAL = "special"  # directories, symlinks, FIFOs, sockets, devices: hold no data to encrypt


def classify_name(state: FolderState, name: str) -> FileKind:
    """The kind a new regular file of this name gets (a new .vmdk is encrypted until its first write shows a descriptor)."""
    if is_hidden_name(name):
        return FileKind.HIDDEN
    if state is FolderState.PLAIN or is_plaintext_name(name):
        return FileKind.PLAIN
    return FileKind.ENCRYPTED


def classify(folder: VmFolder, name: str, st: os.stat_result | None = None,
             state: FolderState | None = None) -> FileKind:
    """The kind of the existing entry `name` of `folder` (`st`: its lstat, if the caller has it)."""
    state = folder.state() if state is None else state
    kind = classify_name(state, name)
    if kind is not FileKind.ENCRYPTED:
        return kind
    path = os.path.join(folder.backing_dir, name)
    if st is None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return kind
    if not stat.S_ISREG(st.st_mode):
        return FileKind.SPECIAL
    if name.lower().endswith(".vmdk") and read_descriptor(path) is not None:
        return FileKind.DESCRIPTOR
    return FileKind.ENCRYPTED
