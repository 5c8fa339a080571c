"""The mount's side of an online re-encryption (issue 10): the folders under one, and the keys its files are served under.

ops/online.py carries the operation out inside the mount process. Here is what it changes in
the core: a folder under an operation is marked (`VmfsCore.online`), so that its names do not
change and its key file, which records the operation (FORMAT.md 7.8), is read; every file of
the operation is held in the open-file table for the whole run (its shared state, keyed by
inode, is what every handle of it uses, open before or during the operation), and served
under a split key: sectors below the boundary under the new key, the rest under the old one
(`crypto.xts.split_cipher`; None = plaintext). The key changes only under the file's write
lock, which no read or write of it, native or Python, runs around; while a region is
rewritten it is the lock's hot zone (fs/locks.py), which reads and writes touching it wait for.
"""

import errno
import fcntl
import os
import threading
from dataclasses import dataclass, field

from ..crypto.xts import split_cipher
from ..errors import InUseError
from .handles import EncryptedHandle, PlainHandle
from .openfiles import EncryptedFile


@dataclass
class OnlineFolder:
    """A folder under an online operation."""

    op: str  # for messages: "encrypt", "decrypt", "deep rekey"
    # Held by the operation while it commits (a journal is in the folder): readers of the
    # folder's state wait instead of seeing it damaged (VmfsCore.folder_of).
    gate: threading.Lock = field(default_factory=threading.Lock)


class HeldFile:
    """One file of an online operation: its shared state, and the two keys of its split."""

    def __init__(self, shared: EncryptedFile, frm, to, rel: str) -> None:
        self.shared = shared
        self.frm, self.to = frm, to  # SectorCipher or None (plaintext)
        self.rel = rel

    def set_boundary(self, core, boundary_sector: int | None) -> None:
        """Serve the file under the split at `boundary_sector` (None: all of it under the new key).

        The caller holds the file's write lock.
        """
        if boundary_sector is None:
            cipher = self.to if self.to is not None else split_cipher(None, None, 0)
        else:
            cipher = split_cipher(self.to, self.frm, boundary_sector)
        self.shared.cipher = cipher
        core.datapath.set_cipher(self.shared.lock, cipher)


def hold(core, inode: tuple[int, int], rel: str, frm, to, op: str) -> HeldFile:
    """Hold the shared state of the file at `inode` for an operation, served under the old key so far (boundary 0).

    Refused (InUseError) while a handle of it cannot follow: an empty `.vmdk` whose first
    write still decides its kind, or a plain file open write-only (its fd cannot read the
    edges of a sector it writes once the file is encrypted). The caller holds core's
    metadata lock.
    """
    shared = core.files.encrypted.get(inode)
    for _, handle in core.files.items():
        if getattr(handle, "file", None) is not shared or shared is None:
            continue
        if isinstance(handle, EncryptedHandle) and handle.pending:
            raise InUseError(f"{rel}: an empty disk is open through the mount and not written yet; close it and "
                             f"run the {op} again")
        if isinstance(handle, PlainHandle) and fcntl.fcntl(handle.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            raise InUseError(f"{rel}: open write-only through the mount; an online {op} needs it closed or open "
                             "for reading and writing")
    if shared is None:
        shared = core.files.encrypted[inode] = EncryptedFile(inode, None, None, core.datapath.file_lock(None, rel))
    shared.opens += 1
    held = HeldFile(shared, frm, to, rel)
    shared.lock.acquire_write()
    try:
        shared.online = op
        held.set_boundary(core, 0)
    finally:
        shared.lock.release_write()
    return held


def finish(core, held: HeldFile, kek, back: bool = False) -> None:
    """After the commit: the file is under its new key (or plain), and its handles are of its new kind.

    `back`: the operation was aborted, the file is under its old key again (`kek` is the
    folder's, unchanged). Else the DEK cache's count for the old key record ends here (the
    record no longer keys the file), so no old DEK outlives the operation. The caller holds
    core's metadata lock.
    """
    shared = held.shared
    final = held.frm if back else held.to
    shared.lock.acquire_write()
    try:
        if back:
            cipher = final if final is not None else split_cipher(None, None, 0)
            shared.cipher = cipher
            core.datapath.set_cipher(shared.lock, cipher)
        else:
            held.set_boundary(core, None)
            if shared.record is not None:
                core.deks.release(shared.record)
            shared.record = None
            shared.kek_hint = kek
        shared.online = None
    finally:
        shared.lock.release_write()
    for number, handle in core.files.items():
        if getattr(handle, "file", None) is not shared:
            continue
        if final is None and isinstance(handle, EncryptedHandle):
            core.files.replace(number, PlainHandle(handle.rel, handle.fd, shared))
        elif final is not None and isinstance(handle, PlainHandle):
            core.files.replace(number, EncryptedHandle(handle.rel, handle.fd, shared, core._is_revoked))
    core.drop_shared(shared)


def release(core, held: HeldFile) -> None:
    """An operation that stopped before its commit (it resumes at the next mount): let go of the file.

    Its handles keep the split key as it is, which is what is at rest.
    """
    core.drop_shared(held.shared)


def busy_error(rel: str, op: str) -> OSError:
    return OSError(errno.EBUSY, f"{rel}: an online {op} runs in this folder")
