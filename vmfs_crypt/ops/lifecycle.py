"""Offline disk operations: create, encrypt, decrypt, rekey and cat, each one folder transaction (crash-safe)."""

import os
import secrets
from dataclasses import dataclass, field
from typing import Callable

from ..agent.protocol import KeyAccess
from ..crypto.sectors import SECTOR_SIZE
from ..crypto.xts import SectorCipher
from ..errors import DataError, UsageError, VmfsCryptError
from ..format.atomicio import NotRegularFile, open_regular, write_atomic
from ..format.descriptor import flat_descriptor, format_encryption_lines, insert_encryption_lines, read_descriptor
from ..format.folder import FOLDER_KEYS_NAME, FolderKeys, FolderState, VmFolder, check_extent_length
from ..format.holes import decrypt_sectors
from ..format.inventory import FileInfo, folder_files
from ..format.keysafe import KeyRecord, KeyRef
from ..format.kinds import FileKind, classify, classify_name
from ..fs.mounts import backing_path
from ..format.reencrypt import ReencryptFile
from . import reencrypt
from .copy import chunks
from .inuse import Access
from .transaction import FolderTransaction

ProgressFactory = Callable[[int, str], object]  # (total, label) -> context manager with .update(n)


@dataclass
class CreateResult:
    descriptor: str
    extent: str
    size: int
    kek: KeyRef


@dataclass
class FolderResult:
    """What an encrypt, decrypt or rekey did to a folder."""

    folder: str
    files: list[str] = field(default_factory=list)
    note: str | None = None
    old_kek: KeyRef | None = None
    new_kek: KeyRef | None = None
    deep: bool = False
    op: str | None = None  # abort_folder: the operation that was aborted ("encrypt", "decrypt", "rekey")


def target_folder(path: str) -> VmFolder:
    """The folder an operation works on; a path inside a vmfs-crypt mount names its folder at rest."""
    path = os.path.abspath(backing_path(os.path.abspath(path)))
    if os.path.isdir(path) and not os.path.islink(path):
        return VmFolder(path)
    if os.path.isfile(path) and not os.path.islink(path):
        return VmFolder(os.path.dirname(path))
    raise UsageError(f"{path}: no such disk or VM folder (symbolic links are not followed)")


def _check_usable(folder: VmFolder) -> None:
    if folder.state() is FolderState.DAMAGED:
        raise DataError(folder.damage())


def _folder_keys(folder: VmFolder, keys: KeyAccess, provider: str | None) -> FolderKeys:
    if folder.encrypted:
        current = folder.load_keys()
        if provider and provider != current.kek.provider_id:
            raise UsageError(f"{folder.backing_dir} is encrypted under provider {current.kek.provider_id}; "
                             f"all its files use that provider's key (shallow rekey moves a folder)")
        return current
    return FolderKeys(keys.new_kek(provider, os.path.basename(folder.backing_dir)))


def check_keys(folder: VmFolder, infos: list[FileInfo]) -> None:
    """Refuse (DataError) when an encrypted file of the folder has no key anywhere."""
    missing = [f.name for f in infos if f.missing_key]
    if missing:
        raise DataError(f"{folder.backing_dir}: no key for {', '.join(missing)}; nothing was changed")


def create_disk(vmdk_path: str, size: int, keys: KeyAccess, provider: str | None = None) -> CreateResult:
    """A new thin encrypted disk: descriptor (with its key lines) plus a sparse flat extent."""
    vmdk_path = os.path.abspath(backing_path(os.path.abspath(vmdk_path)))
    if not vmdk_path.endswith(".vmdk"):
        raise UsageError(f"{vmdk_path}: a disk descriptor's name ends in .vmdk")
    folder = VmFolder(os.path.dirname(vmdk_path))
    if not os.path.isdir(folder.backing_dir):
        raise UsageError(f"{folder.backing_dir}: no such folder; create the VM folder first")
    with FolderTransaction(folder, "create") as tx:
        _check_usable(folder)
        extent_name = os.path.basename(vmdk_path)[:-len(".vmdk")] + "-flat.vmdk"
        for p in (vmdk_path, tx.path(extent_name)):
            if os.path.lexists(p):
                raise UsageError(f"{p} already exists; choose another name")
        if not folder.encrypted:
            plain = [f.name for f in folder_files(folder)
                     if f.kind is FileKind.PLAIN and _would_be_encrypted(f.name)]
            if plain:
                raise UsageError(f"{folder.backing_dir} holds unencrypted files ({', '.join(plain[:3])}); "
                                 f"run 'vmfs-crypt encrypt {folder.backing_dir}' first")
        folder_keys = _folder_keys(folder, keys, provider)
        record, dek = keys.new_file_key(folder_keys.kek, tx.path(extent_name))
        del dek
        fd = os.open(tx.stage(extent_name), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)  # thin: all holes, which read as zeros
            os.fsync(fd)
        finally:
            os.close(fd)
        desc = insert_encryption_lines(flat_descriptor(extent_name, size // SECTOR_SIZE, secrets.token_hex(4)),
                                       format_encryption_lines(record))
        write_atomic(tx.stage(os.path.basename(vmdk_path)), desc, 0o600)
        tx.commit(folder_keys)
    return CreateResult(vmdk_path, extent_name, size, record.keysafe.kek)


def _would_be_encrypted(name: str) -> bool:
    """Would a plain folder's file of this name be encrypted if the folder were encrypted?"""
    return classify_name(FolderState.ENCRYPTED, name) is FileKind.ENCRYPTED


def encrypt_folder(path: str, keys: KeyAccess, provider: str | None, progress: ProgressFactory) -> FolderResult:
    """Encrypt every plaintext file of a VM folder that should be encrypted (a folder is encrypted as a whole)."""
    folder = target_folder(path)
    with FolderTransaction(folder, "encrypt") as tx:
        _check_usable(folder)
        resumed = reencrypt.resume(tx, keys, progress)
        if resumed is not None and resumed.op == "encrypt":
            return FolderResult(folder.backing_dir, [f.name for f in resumed.files], note="resumed", new_kek=resumed.kek)
        # An encrypted folder's own KEK (and a --provider that contradicts it) before any work.
        folder_keys = _folder_keys(folder, keys, provider) if folder.encrypted else None
        todo = encrypt_todo(folder, folder_files(folder))
        if not todo:
            if folder.encrypted:
                return FolderResult(folder.backing_dir, note="already encrypted")
            # A folder with nothing to encrypt yet (only logs/descriptors) becomes encrypted for new files.
            folder_keys = _folder_keys(folder, keys, provider)  # a new KEK for the folder
            tx.commit(folder_keys)
            return FolderResult(folder.backing_dir, new_kek=folder_keys.kek)
        tx.check_in_use(Access.DATA)
        folder_keys = folder_keys or _folder_keys(folder, keys, provider)
        entries, fresh = encrypt_entries(tx, keys, folder_keys, todo, by_descriptor=True)
        current = reencrypt.start(tx, "encrypt", folder_keys.kek, folder_keys, entries, [])
        reencrypt.run(tx, keys, current, progress, fresh)
        del fresh
    return FolderResult(folder.backing_dir, [f.name for f in todo], new_kek=folder_keys.kek)


def encrypt_todo(folder: VmFolder, infos: list[FileInfo]) -> list[FileInfo]:
    """The files an encrypt of the folder rewrites."""
    if folder.encrypted:
        return [f for f in infos if f.missing_key]
    return [f for f in infos if f.kind is FileKind.PLAIN and _would_be_encrypted(f.name)]


def encrypt_entries(tx: FolderTransaction, keys: KeyAccess, folder_keys: FolderKeys, todo: list[FileInfo],
                    by_descriptor: bool) -> tuple[list[ReencryptFile], dict[str, bytes]]:
    """The file states of an encrypt (new DEKs) and those DEKs by name.

    `by_descriptor`: a single-extent disk gets its key in its descriptor at the commit (the
    online path keeps every key in the folder key file: open descriptor views are not rewritten).
    """
    owners = tx.folder.extent_owners() if by_descriptor else {}
    entries: list[ReencryptFile] = []
    used: set[str] = set()
    fresh: dict[str, bytes] = {}
    for f in todo:
        record, fresh[f.name] = keys.new_file_key(folder_keys.kek, tx.path(f.name))
        owner = owners.get(f.name)
        desc = read_descriptor(tx.path(owner)) if owner else None
        in_desc = desc is not None and len(desc.extents) == 1 and owner not in used
        if in_desc:
            used.add(owner)  # a single-extent disk keeps its key in its descriptor
        entries.append(ReencryptFile(f.name, f.size, 0, None, record, owner if in_desc else None))
    return entries, fresh


def decrypt_entries(folder: VmFolder, infos: list[FileInfo]) -> tuple[list[ReencryptFile], list[str]]:
    """The file states of a decrypt, and the descriptors whose key lines leave at its start."""
    entries: list[ReencryptFile] = []
    for f in infos:
        if f.kind is not FileKind.ENCRYPTED:
            continue
        record = folder.key_record_for(f.name)
        if record is not None:  # an empty file without a key (check_keys allows it) has nothing to decrypt
            entries.append(ReencryptFile(f.name, f.size, 0, record, None, None))
    strip = [os.path.basename(d.path) for d in folder.descriptors() if d.has_encryption_lines]
    return entries, strip


def deep_rekey_entries(tx: FolderTransaction, keys: KeyAccess, old_keys: FolderKeys, new_kek: KeyRef,
                       infos: list[FileInfo], by_descriptor: bool
                       ) -> tuple[list[ReencryptFile], list[str], dict[str, bytes]]:
    """The file states of a deep rekey (new DEKs under `new_kek`), the descriptors stripped at its start, the DEKs."""
    entries: list[ReencryptFile] = []
    strip: list[str] = []
    fresh: dict[str, bytes] = {}
    for f in infos:
        if f.kind is not FileKind.ENCRYPTED:
            continue
        found = tx.folder.descriptor_record_for(f.name)
        record = found[1] if found else old_keys.files[f.name]
        new_record, fresh[f.name] = keys.new_file_key(new_kek, tx.path(f.name))
        entries.append(ReencryptFile(f.name, f.size, 0, record, new_record,
                                     found[0] if found and by_descriptor else None))
        if found:
            strip.append(found[0])
    return entries, strip, fresh


def _cipher(folder: VmFolder, keys: KeyAccess, name: str) -> SectorCipher:
    record = folder.key_record_for(name)
    if record is None:
        raise DataError(f"{os.path.join(folder.backing_dir, name)}: no key in its descriptor or {FOLDER_KEYS_NAME}")
    return SectorCipher(keys.unwrap(record, os.path.join(folder.backing_dir, name)))


def decrypt_folder(path: str, keys: KeyAccess, progress: ProgressFactory) -> FolderResult:
    """Decrypt every encrypted file of a VM folder and make it a plain folder again."""
    folder = target_folder(path)
    with FolderTransaction(folder, "decrypt") as tx:
        _check_usable(folder)
        resumed = reencrypt.resume(tx, keys, progress)
        if resumed is not None and resumed.op == "decrypt":
            return FolderResult(folder.backing_dir, [f.name for f in resumed.files], note="resumed")
        if not folder.encrypted:
            raise UsageError(f"{folder.backing_dir} is not encrypted")
        infos = folder_files(folder)
        check_keys(folder, infos)
        tx.check_in_use(Access.DATA)
        todo = [f for f in infos if f.kind is FileKind.ENCRYPTED]
        entries, strip = decrypt_entries(folder, infos)
        current = reencrypt.start(tx, "decrypt", None, folder.load_keys(), entries, strip)
        reencrypt.run(tx, keys, current, progress)
    return FolderResult(folder.backing_dir, [f.name for f in todo])


def rekey_folder(path: str, keys: KeyAccess, provider: str | None, deep: bool, progress: ProgressFactory) -> FolderResult:
    """Shallow rekey (a new KEK wraps the same DEKs) or deep rekey (new DEKs, data re-encrypted) of a VM folder."""
    folder = target_folder(path)
    with FolderTransaction(folder, "deep rekey" if deep else "rekey") as tx:
        _check_usable(folder)
        resumed = reencrypt.resume(tx, keys, progress)
        if resumed is not None and resumed.op == "rekey" and deep:
            return FolderResult(folder.backing_dir, [f.name for f in resumed.files], note="resumed",
                                old_kek=resumed.files[0].frm.keysafe.kek, new_kek=resumed.kek, deep=True)
        if not folder.encrypted:
            raise UsageError(f"{folder.backing_dir} is not encrypted; use 'vmfs-crypt encrypt'")
        old_keys = folder.load_keys()
        infos = folder_files(folder)
        check_keys(folder, infos)
        tx.check_in_use(Access.DATA if deep else Access.KEYS)
        new_kek = keys.new_kek(provider or old_keys.kek.provider_id, os.path.basename(folder.backing_dir))
        todo = [f for f in infos if f.kind is FileKind.ENCRYPTED]
        if deep:
            entries, strip, fresh = deep_rekey_entries(tx, keys, old_keys, new_kek, infos, by_descriptor=True)
            current = reencrypt.start(tx, "rekey", new_kek, old_keys, entries, strip)
            reencrypt.run(tx, keys, current, progress, fresh)
            del fresh
        else:
            new_keys = FolderKeys(new_kek)
            desc_records: dict[str, KeyRecord] = {}
            with progress(len(todo), "rekey") as bar:
                for f in todo:
                    what = tx.path(f.name)
                    found = folder.descriptor_record_for(f.name)
                    record = found[1] if found else old_keys.files[f.name]
                    new_record = keys.rewrap(record, new_kek, what)
                    bar.update(1)
                    if found:
                        desc_records[found[0]] = new_record
                    else:
                        new_keys.files[f.name] = new_record
            for name, record in desc_records.items():
                tx.stage_descriptor(name, record)
            tx.commit(new_keys)
    return FolderResult(folder.backing_dir, [f.name for f in todo], old_kek=old_keys.kek, new_kek=new_kek, deep=deep)


def cat_file(path: str, keys: KeyAccess, write: Callable[[bytes], None]) -> None:
    """Write the plaintext of one file of a datastore (encrypted or not) to `write`."""
    path = os.path.abspath(path)
    folder = VmFolder(os.path.dirname(path))
    name = os.path.basename(path)
    try:
        fd = open_regular(path)
    except NotRegularFile:
        raise UsageError(f"{path}: not a regular file (symbolic links are not followed)") from None
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    try:
        state = folder.state()
        kind = classify(folder, name, os.fstat(fd), state)
        if kind is FileKind.ENCRYPTED and state is FolderState.DAMAGED:
            raise DataError(folder.damage())
        if kind is not FileKind.ENCRYPTED:
            desc = read_descriptor(path) if name.lower().endswith(".vmdk") else None
            if desc is not None:
                write(desc.view)
                return
            for _, data in chunks(fd, os.fstat(fd).st_size):
                write(data)
            return
        size = os.fstat(fd).st_size
        found = folder.descriptor_record_for(name)
        if found:
            check_extent_length(path, size, found[0], found[2])
        cipher = _cipher(folder, keys, name)
        for off, data in chunks(fd, size):
            write(decrypt_sectors(cipher, off // SECTOR_SIZE, data))
    finally:
        os.close(fd)


def abort_folder(path: str, keys: KeyAccess, progress: ProgressFactory) -> FolderResult:
    """Return a folder whose in-place encrypt, decrypt or deep rekey is in flight (or aborting) to its old keys."""
    folder = target_folder(path)
    with FolderTransaction(folder, "abort") as tx:
        state = reencrypt.abort(tx, keys, progress)
    return FolderResult(folder.backing_dir, [f.name for f in state.files], op=state.op)


def interrupted_folders(datastore: str) -> list[tuple[str, str, bool]]:
    """Every folder of the datastore whose key file records an in-place operation in flight: (path, op, aborting)."""
    found = []
    for top, dirs, _files in os.walk(datastore):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".vmfs-crypt"))
        if not os.path.lexists(os.path.join(top, FOLDER_KEYS_NAME)):
            continue
        try:
            state = VmFolder(top).load_keys(allow_reencrypt=True).reencrypt
        except (VmfsCryptError, OSError, ValueError):
            continue  # damaged, not in flight: the mount reports it for that folder
        if state is not None:
            found.append((top, state.op, state.aborting))
    return found

