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
import stat

from ..errors import FormatError, InUseError
from .atomicio import ATOMIC_TMP_PREFIX, NotRegularFile, fsync_dir, read_regular, write_atomic
from .descriptor import read_descriptor
from .folder import FOLDER_KEYS_MAX_SIZE, HIDDEN_PREFIX, JOURNAL_NAME, TMP_PREFIX, FolderKeys, VmFolder, is_hidden_name, is_plaintext_name
from .oplock import FolderOpLock
from .strict import check_members, exact_int, json_object

JOURNAL_VERSION = 1
JOURNAL_MAX_SIZE = 128 << 20  # it holds a whole new folder key file


def journal_path(folder: VmFolder) -> str:
    return os.path.join(folder.backing_dir, JOURNAL_NAME)


def commit(folder: VmFolder, renames: list[tuple[str, str]], keys: FolderKeys | None,
           on_committed=None) -> None:
    """Atomically switch a folder to new files and a new key file (None: no key file, a plain folder).

    All new files are complete and fsynced before this is called. Writing the journal is the
    commit point; `recover` rolls a committed journal forward after a crash, and removes
    uncommitted temporary files otherwise: an interruption leaves the old state or the new one.
    `on_committed` is called once the journal is written: from then on the staged files belong
    to the journal, and a failure while applying it must leave them for recovery.
    """
    doc = {"version": JOURNAL_VERSION, "renames": [list(r) for r in renames],
           "keys": keys.to_bytes().decode("utf-8") if keys else None}
    try:
        check_journal(folder, doc, journal_path(folder), committing=True)
    except FormatError as exc:
        raise FormatError(f"{exc}; refusing to commit, nothing was changed (did another program change the "
                          "folder meanwhile?)") from None
    write_atomic(journal_path(folder), json.dumps(doc).encode("utf-8"), 0o600)
    if on_committed is not None:
        on_committed()
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
    """The journal, validated before anything is touched (FormatError says why it is refused)."""
    path = journal_path(folder)
    try:
        raw = read_regular(path, JOURNAL_MAX_SIZE)
    except NotRegularFile:
        raise FormatError(f"{path}: the journal is not a regular file; {RECOVERY_HINT}") from None
    try:
        doc = json_object(raw, path)
        check_members(doc, {"version", "renames", "keys"}, path)
    except FormatError as exc:
        raise FormatError(f"{exc}; {RECOVERY_HINT}") from None
    if not exact_int(doc["version"], JOURNAL_VERSION):
        raise FormatError(f"{path}: journal version {doc['version']!r} is not supported (an operation of a newer "
                          "vmfs-crypt was interrupted); finish it with that version, nothing was changed")
    try:
        check_journal(folder, doc, path)
    except FormatError as exc:
        raise FormatError(f"{exc}; {RECOVERY_HINT}") from None
    return doc


def journal_problem(folder: VmFolder) -> str | None:
    """Why the folder's journal would be refused (None: there is none, or it is a valid interrupted operation)."""
    if not os.path.lexists(journal_path(folder)):
        return None
    try:
        read_journal(folder)
    except (FormatError, OSError) as exc:
        return str(exc)
    return None


def _reject(path: str, why: str) -> FormatError:
    return FormatError(f"{path}: {why}")


RECOVERY_HINT = ("vmfs-crypt does not write such a journal (it is damaged or crafted): nothing was changed, and the "
                 "folder's encrypted files are refused until it is inspected by hand and the journal removed")


def check_journal(folder: VmFolder, doc: dict, path: str, committing: bool = False) -> None:
    """Refuse a journal that vmfs-crypt would not write (FORMAT.md 7.6), before anything is touched.

    vmfs-crypt's journals rename `.vmfs-crypt-tmp.NAME` to NAME (a data file or a descriptor,
    never a plaintext kind or our own metadata), and keep every key: a file that has a key now
    keeps the same data record unless the journal replaces the file itself, and a folder
    becomes plain (keys null) only with every keyed file replaced by its decrypted copy.
    `committing`: the journal is about to be written, so every temporary file must exist.
    """
    renames = doc["renames"]
    if not isinstance(renames, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(_plain_name(n) for n in r) for r in renames):
        raise _reject(path, "malformed renames")
    finals: dict[str, str] = {}
    for tmp, final in renames:
        if tmp != TMP_PREFIX + final or is_hidden_name(final):
            raise _reject(path, f"it renames {tmp!r} to {final!r} (only {TMP_PREFIX}NAME to NAME is allowed, and "
                          "never to vmfs-crypt's own files)")
        if is_plaintext_name(final):
            raise _reject(path, f"it replaces {final}, a plaintext kind vmfs-crypt never rewrites")
        if final in finals:
            raise _reject(path, f"it renames two files to {final}")
        finals[final] = tmp
    keys = doc["keys"]
    if keys is not None and not isinstance(keys, str):
        raise _reject(path, "malformed keys")
    new_keys = FolderKeys.from_bytes(keys.encode("utf-8"), f"{path} (new folder key file)", allow_reencrypt=True) \
        if keys is not None else None
    d = folder.backing_dir
    pending = {}  # final -> True when its temporary file is still there (not renamed yet)
    for final, tmp in finals.items():
        for name in (tmp, final):
            try:
                st = os.lstat(os.path.join(d, name))
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                raise _reject(path, f"{name} is not a regular file")
        pending[final] = os.path.lexists(os.path.join(d, tmp))
        if committing and not pending[final]:
            raise FormatError(f"{os.path.join(d, tmp)}: a staged file vanished before the commit; nothing was "
                              "changed (was another program deleting files in the folder?)")
    current_raw = _current_key_file(folder, path)
    if new_keys is not None and not all(pending.values()) and current_raw is not None \
            and current_raw != keys.encode("utf-8"):
        # _apply writes the key file before it renames anything: renames done means keys written.
        missing = sorted(f for f, p in pending.items() if not p)
        raise _reject(path, f"its temporary files for {', '.join(missing)} are missing")
    replaced = set(finals)  # already renamed ones hold the new content as well
    # A journal that wrote its key file already (interrupted while renaming) is applied again as it is.
    rewritten = new_keys is not None and current_raw == keys.encode("utf-8")
    now, finished = _keys_now(folder, current_raw, path, rewritten)
    after = _keys_after(folder, finals, pending, new_keys)
    # An in-place re-encryption's commit (FORMAT.md 7.8): its files were rewritten in place,
    # so each takes its `to` record (none when decrypted), and nothing else of the rule changes.
    for name, data in sorted(finished.items()):
        if after.get(name) != data:
            raise _reject(path, f"applying it would not give {name}, re-encrypted in place, its new key record")
    for name, data in sorted(now.items()):
        if name in finished:
            continue
        if name not in finals and not _is_data_file(os.path.join(d, name), name):
            continue  # a key entry of a file that is gone, or of a kind that never uses one: nothing to keep
        if name in replaced:
            if name not in after and new_keys is not None:
                raise _reject(path, f"applying it would leave {name} without its key")
            continue
        if name not in after:
            raise _reject(path, f"applying it would leave {name} without its key")
        if after[name] != data:
            raise _reject(path, f"applying it would give {name} another key record (only its own file's "
                          "replacement may have a new one)")
    if new_keys is None:
        kept = sorted(n for n, _ in _descriptor_keys(folder, finals, pending).items())
        if kept:
            raise _reject(path, f"it makes the folder plain but descriptors would still hold keys (for "
                          f"{', '.join(kept)})")


def _is_data_file(path: str, name: str) -> bool:
    """An existing regular file that is stored encrypted in an encrypted folder (FORMAT.md 7.2)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return (stat.S_ISREG(st.st_mode) and not is_hidden_name(name) and not is_plaintext_name(name)
            and read_descriptor(path) is None)


def _current_key_file(folder: VmFolder, path: str) -> bytes | None:
    """The current folder key file's bytes (None when there is none); a journal cannot go over an unreadable one."""
    try:
        raw = read_regular(folder.keys_path, FOLDER_KEYS_MAX_SIZE)
    except FileNotFoundError:
        return None
    except NotRegularFile:
        raise _reject(path, f"{folder.keys_path} is not a regular file") from None
    return raw


def _keys_now(folder: VmFolder, current_raw: bytes | None, path: str,
              rewritten: bool = False) -> tuple[dict[str, str], dict[str, str | None]]:
    """Every file that has a key now -> its data record (encryption.data), from the key file and descriptors;
    and the files of a finished in-place re-encryption -> the record they take at its commit (None: plaintext)."""
    out: dict[str, str] = {}
    finished: dict[str, str | None] = {}
    if current_raw is not None:
        try:
            current = FolderKeys.from_bytes(current_raw, folder.keys_path, allow_reencrypt=True)
        except FormatError as exc:
            raise _reject(path, f"the folder key file it would replace cannot be read ({exc})") from None
        out.update({name: rec.data.encode() for name, rec in current.files.items()})
        state = current.reencrypt
        if state is not None and not rewritten:
            if state.aborting and all(f.boundary == 0 for f in state.files):
                # An abort's commit: every file is back under its `from` record (none: plaintext).
                finished = {f.name: f.frm.data.encode() if f.frm else None for f in state.files}
            elif state.aborting or not all(f.done for f in state.files):
                raise _reject(path, "it would replace the key file of an in-place re-encryption that is not "
                              "finished (its files are under two keys)")
            else:
                finished = {f.name: f.to.data.encode() if f.to else None for f in state.files}
    out.update(_descriptor_keys(folder, {}, {}))
    return out, finished


def _keys_after(folder: VmFolder, finals: dict[str, str], pending: dict[str, bool],
                new_keys: FolderKeys | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if new_keys is not None:
        out.update({name: rec.data.encode() for name, rec in new_keys.files.items()})
    out.update(_descriptor_keys(folder, finals, pending))
    return out


def _descriptor_keys(folder: VmFolder, finals: dict[str, str], pending: dict[str, bool]) -> dict[str, str]:
    """Extent name -> data record of every descriptor with encryption lines, as the folder is after the renames."""
    out: dict[str, str] = {}
    d = folder.backing_dir
    try:
        entries = set(os.listdir(d))
    except OSError:
        return out
    names = sorted(n for n in entries | set(finals) if n.lower().endswith(".vmdk") and not is_hidden_name(n))
    for name in names:
        source = finals[name] if pending.get(name) else name
        desc = read_descriptor(os.path.join(d, source))
        if desc is None or not desc.has_encryption_lines:
            continue
        record = desc.key_record()  # malformed lines: FormatError, the journal is refused
        for ext in desc.extents:
            out.setdefault(ext.file_name, record.data.encode())
    return out


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
        # The killed writer may have left its own half-written atomic file (of the key file it was
        # replacing when it died): with the journal applied it is a leftover like any other (7.6).
        for name in _strays(folder):
            os.unlink(os.path.join(folder.backing_dir, name))
        return f"{folder.backing_dir}: finished an interrupted operation"
    stray = _strays(folder)
    for name in stray:
        os.unlink(os.path.join(folder.backing_dir, name))
    return f"{folder.backing_dir}: removed {len(stray)} incomplete temporary files" if stray else None
