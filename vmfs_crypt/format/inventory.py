"""What a folder and a datastore hold: every file with its kind and where its key lives; the datastore walk.

Used by the offline operations, `info`, and the mount (recovery and the KEK prefetch). The
walk never follows a symlink (os.walk's default), so nothing outside the datastore is read.
"""

import logging
import os
import stat
from dataclasses import dataclass

from ..errors import VmfsCryptError
from .descriptor import read_descriptor
from .folder import FOLDER_KEYS_NAME, FolderState, VmFolder, is_hidden_name
from .journal import recover
from .keysafe import KeyRef
from .kinds import FileKind, classify

log = logging.getLogger("vmfs_crypt.format")


@dataclass(frozen=True)
class FileInfo:
    """One visible regular file of a folder and how it is stored."""

    name: str
    kind: FileKind
    size: int
    key_in: str | None = None  # the descriptor holding its key, or the folder key file
    kek: KeyRef | None = None  # the KEK its DEK is wrapped under
    missing_key: bool = False  # an encrypted-kind file without a key (an error, except when empty)

    @property
    def role(self) -> str:
        """`info`'s word for it: descriptor, encrypted, plaintext or missing-key."""
        return "missing-key" if self.missing_key else self.kind.value

    def as_json(self) -> dict:
        return {"name": self.name, "role": self.role, "size": self.size, "key_in": self.key_in,
                "kek": self.kek.to_json() if self.kek else None}


def folder_files(folder: VmFolder) -> list[FileInfo]:
    """Every visible regular file of a folder (symlinks, FIFOs and the like are skipped, never followed)."""
    state = folder.state()
    keys = folder.load_keys() if state is FolderState.ENCRYPTED else None
    infos = []
    for name in sorted(os.listdir(folder.backing_dir)):
        if is_hidden_name(name):
            continue
        st = os.lstat(os.path.join(folder.backing_dir, name))
        if not stat.S_ISREG(st.st_mode):
            continue
        kind = classify(folder, name, st, state)
        if kind is FileKind.PLAIN and name.lower().endswith(".vmdk") and read_descriptor(
                os.path.join(folder.backing_dir, name)) is not None:
            kind = FileKind.DESCRIPTOR  # a descriptor of a plain folder (it stays plaintext when encrypted)
        if kind is not FileKind.ENCRYPTED:
            infos.append(FileInfo(name, kind, st.st_size))
            continue
        found = folder.descriptor_record_for(name)
        if found:
            rec, where = found[1], found[0]
        else:
            rec, where = (keys.files.get(name) if keys else None), FOLDER_KEYS_NAME
        if rec is None:
            infos.append(FileInfo(name, kind, st.st_size, missing_key=True))
        else:
            infos.append(FileInfo(name, kind, st.st_size, where, rec.keysafe.kek))
    return infos


def walk_folders(datastore: str):
    """Every directory of the datastore, the root first (symlinked directories are not entered)."""
    for dirpath, dirnames, _ in os.walk(datastore):
        dirnames.sort()
        yield VmFolder(dirpath)


def recover_datastore(datastore: str) -> list[str]:
    """Finish interrupted operations in every folder; a folder that cannot be recovered is reported, not fatal."""
    notes = []
    for folder in walk_folders(datastore):
        try:
            note = recover(folder)
        except (VmfsCryptError, OSError) as exc:
            note = f"{folder.backing_dir}: left as it is (damaged; its files are refused until repaired): {exc}"
            log.error("%s", note)
        if note:
            notes.append(note)
    return notes


def datastore_key_refs(datastore: str) -> list[dict]:
    """Each distinct KEK that the datastore's encrypted files are wrapped under, with those files."""
    refs: dict[KeyRef, list[str]] = {}
    for folder in walk_folders(datastore):
        try:
            if folder.state() is not FolderState.ENCRYPTED:
                continue
            files = folder_files(folder)
        except (VmfsCryptError, OSError) as exc:
            log.error("%s: cannot list its keys: %s", folder.backing_dir, exc)
            continue
        for f in files:
            if f.kek is not None:
                refs.setdefault(f.kek, []).append(os.path.relpath(os.path.join(folder.backing_dir, f.name), datastore))
    return [dict(ref.to_json(), disks=names) for ref, names in refs.items()]
