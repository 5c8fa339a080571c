"""The journal of a folder (docs/FORMAT.md 7.6): the commit point of multi-file changes, and recovery.

New files are built as `.vmfs-crypt-tmp.NAME`, fsynced, and committed by writing the journal;
applying it (idempotently) renames them into place and writes or removes the folder key file.
A journal may only do what vmfs-crypt writes (issue 7, case 7): it is checked, before
anything is touched, to leave every file that has a key now with a key afterwards (or to
replace it with a decrypted copy), so a crafted or damaged journal can neither move files
out of the folder nor destroy keys.
"""

import errno
import json
import os

from ..errors import FormatError, InUseError
from .atomicio import ATOMIC_TMP_PREFIX, NotRegularFile, fsync_dir, read_regular, write_atomic
from .descriptor import read_descriptor
from .folder import HIDDEN_PREFIX, JOURNAL_NAME, TMP_PREFIX, FolderKeys, VmFolder
from .oplock import FolderOpLock
from .strict import check_members, exact_int, json_object

JOURNAL_VERSION = 1
JOURNAL_MAX_SIZE = 128 << 20  # it holds a whole new folder key file


def journal_path(folder: VmFolder) -> str:
    return os.path.join(folder.backing_dir, JOURNAL_NAME)


def commit(folder: VmFolder, renames: list[tuple[str, str]], keys: FolderKeys | None) -> None:
    """Atomically switch a folder to new files and a new key file (None: no key file, a plain folder).

    All new files are complete and fsynced before this is called. Writing the journal is the
    commit point; `recover` rolls a committed journal forward after a crash, and removes
    uncommitted temporary files otherwise: an interruption leaves the old state or the new one.
    """
    doc = {"version": JOURNAL_VERSION, "renames": [list(r) for r in renames],
           "keys": keys.to_bytes().decode("utf-8") if keys else None}
    check_journal(folder, doc, journal_path(folder))
    write_atomic(journal_path(folder), json.dumps(doc).encode("utf-8"), 0o600)
    _apply(folder, doc)


def _apply(folder: VmFolder, doc: dict) -> None:
    if doc["keys"] is not None:
        write_atomic(folder.keys_path, doc["keys"].encode("utf-8"), 0o600)
    for tmp, final in doc["renames"]:
        src = os.path.join(folder.backing_dir, tmp)
        if os.path.lexists(src):
            os.replace(src, os.path.join(folder.backing_dir, final))
    if doc["keys"] is None and os.path.lexists(folder.keys_path):
        os.unlink(folder.keys_path)
    fsync_dir(folder.backing_dir)
    os.unlink(journal_path(folder))
    fsync_dir(folder.backing_dir)


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def read_journal(folder: VmFolder) -> dict:
    """The journal, validated before anything is touched."""
    path = journal_path(folder)
    try:
        raw = read_regular(path, JOURNAL_MAX_SIZE)
    except NotRegularFile:
        raise FormatError(f"{path}: the journal is not a regular file; inspect the folder by hand") from None
    doc = json_object(raw, path)
    check_members(doc, {"version", "renames", "keys"}, path)
    if not exact_int(doc["version"], JOURNAL_VERSION):
        raise FormatError(f"{path}: journal version {doc['version']!r} is not supported; upgrade vmfs-crypt")
    check_journal(folder, doc, path)
    return doc


def check_journal(folder: VmFolder, doc: dict, path: str) -> None:
    """Refuse a journal that vmfs-crypt would not write (FORMAT.md 7.6)."""
    renames = doc["renames"]
    if not isinstance(renames, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(_plain_name(n) for n in r) and r[0].startswith(TMP_PREFIX)
            and not r[1].startswith(HIDDEN_PREFIX) for r in renames):
        raise FormatError(f"{path}: malformed renames in the journal of an interrupted operation; "
                          "inspect the folder by hand before continuing")
    finals = {final: tmp for tmp, final in renames}
    if len(finals) != len(renames):
        raise FormatError(f"{path}: the journal renames two files to one name")
    new_keys = None
    if doc["keys"] is not None:
        if not isinstance(doc["keys"], str):
            raise FormatError(f"{path}: malformed keys in the journal")
        new_keys = FolderKeys.from_bytes(doc["keys"].encode("utf-8"), f"{path} (new folder key file)")
    # Every file that has a key now must have one afterwards, or be replaced by the journal
    # (with its decrypted copy, when the folder becomes plain).
    old = _keyed_files(folder, {}, with_key_file=True)
    after = _keyed_files(folder, finals, with_key_file=False) if new_keys is not None else set()
    if new_keys is not None:
        after |= set(new_keys.files)
    for name in sorted(old):
        if not os.path.lexists(os.path.join(folder.backing_dir, name)) and name not in finals:
            continue
        if name not in after and not (new_keys is None and name in finals):
            raise FormatError(f"{path}: applying this journal would leave {name} without its key; "
                              "it was not written by vmfs-crypt: inspect the folder by hand (nothing was changed)")


def _keyed_files(folder: VmFolder, finals: dict[str, str], with_key_file: bool) -> set[str]:
    """Names that have a key in descriptors (as they will be after `finals`), and in the current key file if asked."""
    names: set[str] = set()
    if with_key_file:
        try:
            names |= set(folder.load_keys().files)
        except FormatError:
            pass  # no usable key file now: nothing of it can be lost
    try:
        entries = sorted(os.listdir(folder.backing_dir))
    except OSError:
        return names
    for entry in entries:
        if not entry.lower().endswith(".vmdk") or entry.startswith(HIDDEN_PREFIX):
            continue
        source = finals.get(entry, entry)
        desc = read_descriptor(os.path.join(folder.backing_dir, source))
        if desc is not None and desc.has_encryption_lines:
            names |= {e.file_name for e in desc.extents}
    for final, tmp in finals.items():
        if final.lower().endswith(".vmdk") and final not in entries:
            desc = read_descriptor(os.path.join(folder.backing_dir, tmp))
            if desc is not None and desc.has_encryption_lines:
                names |= {e.file_name for e in desc.extents}
    return names


def _strays(folder: VmFolder) -> list[str]:
    return [n for n in os.listdir(folder.backing_dir)
            if n.startswith((TMP_PREFIX, ATOMIC_TMP_PREFIX, "." + HIDDEN_PREFIX))]


def recover(folder: VmFolder, lock_held: bool = False) -> str | None:
    """Finish or undo an interrupted operation in this folder; say what was done.

    Temporary files are only leftovers when no operation is running: unless the caller holds
    the folder's operation lock (format/oplock.py), it is taken here whenever there is
    something to do, and a folder that another operation is changing is left alone.
    """
    if not lock_held:
        if not os.path.lexists(journal_path(folder)) and not _strays(folder):
            return None
        try:
            lock = FolderOpLock(folder.backing_dir, "recovery of an interrupted operation")
            lock.acquire()
        except InUseError as exc:
            return f"{folder.backing_dir}: not recovered now: {exc}"
        except OSError as exc:
            if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            lock = None  # a read-only folder: no operation can be writing in it either
        try:
            return _recover(folder)
        finally:
            if lock is not None:
                lock.release()
    return _recover(folder)


def _recover(folder: VmFolder) -> str | None:
    if os.path.lexists(journal_path(folder)):
        _apply(folder, read_journal(folder))
        return f"{folder.backing_dir}: finished an interrupted operation"
    stray = _strays(folder)
    for name in stray:
        os.unlink(os.path.join(folder.backing_dir, name))
    return f"{folder.backing_dir}: removed {len(stray)} incomplete temporary files" if stray else None
