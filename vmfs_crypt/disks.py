"""Offline disk operations: create, encrypt, decrypt, inspect and cat files of a datastore, crash-safe by journal."""

import json
import os
import secrets
from dataclasses import dataclass
from typing import Callable, Iterator

from .agent import AgentClient
from .atomicio import ATOMIC_TMP_PREFIX, fsync_dir, write_atomic
from .descriptor import (extents, flat_descriptor, format_encryption_lines, insert_encryption_lines,
                         is_descriptor, read_key_record, strip_encryption_lines)
from .errors import DataError, FormatError, UsageError
from .folder import (FOLDER_KEYS_NAME, HIDDEN_PREFIX, JOURNAL_NAME, TMP_PREFIX, FolderKeys, VmFolder, is_hidden_name,
                     is_plaintext_name, read_head)
from .holes import decrypt_sectors, nonzero_runs
from .keysafe import KeyRecord
from .sectors import SECTOR_SIZE
from .strict import check_members, exact_int, json_object
from .xts import SectorCipher

CHUNK_SIZE = 4 << 20  # bytes per read/encrypt/write step of encrypt and decrypt
Progress = Callable[[int], None]


# -- journal: the commit point of multi-file changes -------------------------------------
def _journal_path(folder: VmFolder) -> str:
    return os.path.join(folder.backing_dir, JOURNAL_NAME)


def commit(folder: VmFolder, renames: list[tuple[str, str]], keys: FolderKeys | None) -> None:
    """Atomically switch a folder to new files and a new key file (None: no key file, a plain folder).

    All new files are complete and fsynced before this is called. Writing the journal is the
    commit point; recover() rolls a committed journal forward after a crash, and removes
    uncommitted temporary files otherwise: an interruption leaves the old state or the new one.
    """
    doc = {"version": 1, "renames": renames, "keys": keys.to_bytes().decode("utf-8") if keys else None}
    write_atomic(_journal_path(folder), json.dumps(doc).encode("utf-8"), 0o600)
    _apply_journal(folder, doc)


def _apply_journal(folder: VmFolder, doc: dict) -> None:
    if doc["keys"] is not None:
        write_atomic(folder.keys_path, doc["keys"].encode("utf-8"), 0o600)
    for tmp, final in doc["renames"]:
        src = os.path.join(folder.backing_dir, tmp)
        if os.path.exists(src):
            os.replace(src, os.path.join(folder.backing_dir, final))
    if doc["keys"] is None and os.path.exists(folder.keys_path):
        os.unlink(folder.keys_path)
    fsync_dir(folder.backing_dir)
    os.unlink(_journal_path(folder))
    fsync_dir(folder.backing_dir)


def _plain_name(name) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and "\0" not in name and name not in (".", "..")


def _read_journal(path: str) -> dict:
    """The journal, validated before anything is touched: a crafted one must not move files elsewhere."""
    with open(path, "rb") as f:
        doc = json_object(f.read(), path)
    check_members(doc, {"version", "renames", "keys"}, path)
    if not exact_int(doc["version"], 1):
        raise FormatError(f"{path}: journal version {doc['version']!r} is not supported; upgrade vmfs-crypt")
    renames = doc["renames"]
    if not isinstance(renames, list) or not all(
            isinstance(r, list) and len(r) == 2 and all(_plain_name(n) for n in r) and r[0].startswith(TMP_PREFIX)
            for r in renames):
        raise FormatError(f"{path}: malformed renames in the journal of an interrupted operation; "
                          "inspect the folder by hand before continuing")
    if doc["keys"] is not None:
        if not isinstance(doc["keys"], str):
            raise FormatError(f"{path}: malformed keys in the journal")
        FolderKeys.from_bytes(doc["keys"].encode("utf-8"), f"{path} (new folder key file)")
    return doc


def recover(folder: VmFolder) -> str | None:
    """Finish or undo an interrupted encrypt/decrypt in this folder; say what was done."""
    path = _journal_path(folder)
    if os.path.exists(path):
        _apply_journal(folder, _read_journal(path))
        return f"{folder.backing_dir}: finished an interrupted operation"
    stray = [n for n in os.listdir(folder.backing_dir)
             if n.startswith((TMP_PREFIX, ATOMIC_TMP_PREFIX, "." + HIDDEN_PREFIX))]
    for name in stray:
        os.unlink(os.path.join(folder.backing_dir, name))
    return f"{folder.backing_dir}: removed {len(stray)} incomplete temporary files" if stray else None


# -- copying with encryption -------------------------------------------------------------
def _chunks(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    off = 0
    while off < size:
        data = os.pread(fd, min(CHUNK_SIZE, size - off), off)
        if not data:
            raise DataError(f"file shrank while being read at byte {off}")
        yield off, data
        off += len(data)


def transform_file(src_path: str, dst_path: str, decrypt_with: SectorCipher | None,
                   encrypt_with: SectorCipher | None, progress: Progress) -> None:
    """Copy src to a new dst, decrypting and/or encrypting each sector, keeping holes; fsync dst."""
    src = os.open(src_path, os.O_RDONLY | os.O_CLOEXEC)
    dst = os.open(dst_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        st = os.fstat(src)
        for off, data in _chunks(src, st.st_size):
            first = off // SECTOR_SIZE
            if decrypt_with is not None:
                data = decrypt_sectors(decrypt_with, first, data)
            for a, b in nonzero_runs(data):
                out = data[a:b] if encrypt_with is None else encrypt_with.encrypt(first + a // SECTOR_SIZE, data[a:b])
                os.pwrite(dst, out, off + a)
            progress(len(data))
        os.ftruncate(dst, st.st_size)
        os.fchmod(dst, st.st_mode & 0o7777)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


# -- what a folder holds -------------------------------------------------------------------
@dataclass
class FileInfo:
    name: str
    role: str  # "descriptor", "encrypted", "plaintext", "missing-key"
    size: int
    key_in: str | None = None  # descriptor name or the folder key file
    provider: str | None = None
    key_id: str | None = None


def _descriptor_extent_names(folder: VmFolder) -> dict[str, str]:
    """Flat extent name -> descriptor name, for descriptors in this folder."""
    out = {}
    for name in sorted(os.listdir(folder.backing_dir)):
        path = os.path.join(folder.backing_dir, name)
        if name.lower().endswith(".vmdk") and os.path.isfile(path) and is_descriptor(read_head(path)):
            with open(path, "rb") as f:
                for ext in extents(f.read(1 << 20)):
                    out[ext.file_name] = name
    return out


def folder_files(folder: VmFolder) -> list[FileInfo]:
    """Every visible regular file of a folder and how it is stored."""
    encrypted = folder.encrypted
    keys = folder.load_keys() if encrypted else None
    infos = []
    for name in sorted(os.listdir(folder.backing_dir)):
        path = os.path.join(folder.backing_dir, name)
        if is_hidden_name(name) or not os.path.isfile(path) or os.path.islink(path):
            continue
        size = os.path.getsize(path)
        if name.lower().endswith(".vmdk") and is_descriptor(read_head(path)):
            infos.append(FileInfo(name, "descriptor", size))
        elif not encrypted or is_plaintext_name(name):
            infos.append(FileInfo(name, "plaintext", size))
        else:
            found = folder.descriptor_record_for(name)
            if found:
                rec, where = found[1], found[0]
            else:
                rec, where = keys.files.get(name), FOLDER_KEYS_NAME
            if rec is None:
                infos.append(FileInfo(name, "missing-key", size))
            else:
                infos.append(FileInfo(name, "encrypted", size, where, rec.keysafe.kek.provider_id,
                                      rec.keysafe.kek.key_id))
    return infos


def info(path: str) -> dict:
    """What crypto-util would say about a folder or a file."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        folder, only = VmFolder(path), None
    elif os.path.isfile(path):
        folder, only = VmFolder(os.path.dirname(path)), os.path.basename(path)
    else:
        raise UsageError(f"{path}: no such file or folder")
    result = {"path": path, "folder": folder.backing_dir, "encrypted": folder.encrypted,
              "cipher": "aes-xts-plain64 (XTS-AES-256)", "sector_size": SECTOR_SIZE}
    if folder.encrypted:
        keys = folder.load_keys()
        result["folder_kek"] = {"provider": keys.kek.provider_id, "key_id": keys.kek.key_id}
    files = folder_files(folder)
    if only is not None:
        wanted = {only}
        if only.lower().endswith(".vmdk") and is_descriptor(read_head(path)):
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
            wanted |= {e.file_name for e in extents(raw)}
            record = read_key_record(raw, path)
            result["descriptor_key"] = None if record is None else {
                "provider": record.keysafe.kek.provider_id, "key_id": record.keysafe.kek.key_id}
        files = [f for f in files if f.name in wanted]
    result["files"] = [vars(f) for f in files]
    return result


# -- high-level operations -----------------------------------------------------------------
def _target_folder(path: str) -> VmFolder:
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return VmFolder(path)
    if os.path.isfile(path):
        return VmFolder(os.path.dirname(path))
    raise UsageError(f"{path}: no such disk or VM folder")


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        size = int(float(num) * units[unit])
    except ValueError:
        raise UsageError(f"size {text!r} is not a size such as 10G, 512M or 1073741824") from None
    if size <= 0 or size % SECTOR_SIZE:
        raise UsageError(f"size {text!r} must be a positive multiple of {SECTOR_SIZE} bytes")
    return size


def _folder_kek(folder: VmFolder, agent: AgentClient, provider: str | None):
    if folder.encrypted:
        keys = folder.load_keys()
        if provider and provider != keys.kek.provider_id:
            raise UsageError(f"{folder.backing_dir} is encrypted under provider {keys.kek.provider_id}; "
                             f"all its files use that provider's key (shallow rekey moves a folder)")
        return keys
    return FolderKeys(agent.new_kek(provider, os.path.basename(folder.backing_dir)))


def create_disk(vmdk_path: str, size: int, agent: AgentClient, provider: str | None = None) -> dict:
    """A new thin encrypted disk: descriptor (with its key lines) plus a sparse flat extent."""
    vmdk_path = os.path.abspath(vmdk_path)
    if not vmdk_path.endswith(".vmdk"):
        raise UsageError(f"{vmdk_path}: a disk descriptor's name ends in .vmdk")
    folder = VmFolder(os.path.dirname(vmdk_path))
    if not os.path.isdir(folder.backing_dir):
        raise UsageError(f"{folder.backing_dir}: no such folder; create the VM folder first")
    recover(folder)
    extent_name = os.path.basename(vmdk_path)[:-len(".vmdk")] + "-flat.vmdk"
    for p in (vmdk_path, os.path.join(folder.backing_dir, extent_name)):
        if os.path.exists(p):
            raise UsageError(f"{p} already exists; choose another name")
    keys = _folder_kek(folder, agent, provider)
    if not folder.encrypted:
        plain = [f.name for f in folder_files(folder) if f.role == "plaintext" and not is_plaintext_name(f.name)]
        if plain:
            raise UsageError(f"{folder.backing_dir} holds unencrypted files ({', '.join(plain[:3])}); "
                             f"run 'vmfs-crypt encrypt {folder.backing_dir}' first")
    record, dek = agent.new_file_key(keys.kek)
    del dek
    tmp_extent = TMP_PREFIX + extent_name
    tmp_desc = TMP_PREFIX + os.path.basename(vmdk_path)
    fd = os.open(os.path.join(folder.backing_dir, tmp_extent), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)  # thin: all holes, which read as zeros
        os.fsync(fd)
    finally:
        os.close(fd)
    desc = insert_encryption_lines(flat_descriptor(extent_name, size // SECTOR_SIZE, secrets.token_hex(4)),
                                   format_encryption_lines(record))
    write_atomic(os.path.join(folder.backing_dir, tmp_desc), desc, 0o600)
    commit(folder, [(tmp_extent, extent_name), (tmp_desc, os.path.basename(vmdk_path))], keys)
    return {"descriptor": vmdk_path, "extent": extent_name, "size": size,
            "provider": record.keysafe.kek.provider_id, "key_id": record.keysafe.kek.key_id}


def _descriptor_rewrite(path: str, record: KeyRecord | None) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    view = strip_encryption_lines(raw)
    return insert_encryption_lines(view, format_encryption_lines(record)) if record else view


def _stage_descriptors(folder: VmFolder, records: dict[str, KeyRecord | None], renames: list) -> None:
    """Write each descriptor's new version (new key lines, or none) as a temporary file to commit."""
    for name, record in records.items():
        tmp = TMP_PREFIX + name
        write_atomic(os.path.join(folder.backing_dir, tmp),
                     _descriptor_rewrite(os.path.join(folder.backing_dir, name), record), 0o600)
        renames.append((tmp, name))


def _extent_count(path: str) -> int:
    with open(path, "rb") as f:
        return len(extents(f.read(1 << 20)))


def encrypt_folder(path: str, agent: AgentClient, provider: str | None, progress_factory) -> dict:
    """Encrypt every plaintext file of a VM folder that should be encrypted (a folder is encrypted as a whole)."""
    folder = _target_folder(path)
    recover(folder)
    keys = _folder_kek(folder, agent, provider)
    infos = folder_files(folder)
    if folder.encrypted:
        todo = [f for f in infos if f.role == "missing-key"]
    else:
        todo = [f for f in infos if f.role == "plaintext" and not is_plaintext_name(f.name)]
    if not todo:
        if folder.encrypted:
            return {"folder": folder.backing_dir, "encrypted": [], "note": "already encrypted"}
        # A folder with nothing to encrypt yet (only logs/descriptors) becomes encrypted for new files.
        commit(folder, [], keys)
        return {"folder": folder.backing_dir, "encrypted": []}
    extent_owner = _descriptor_extent_names(folder)
    renames, new_keys = [], FolderKeys(keys.kek, dict(keys.files))
    desc_records: dict[str, KeyRecord] = {}
    with progress_factory(sum(f.size for f in todo), "encrypting") as bar:
        for f in todo:
            record, dek = agent.new_file_key(keys.kek)
            tmp = TMP_PREFIX + f.name
            transform_file(os.path.join(folder.backing_dir, f.name), os.path.join(folder.backing_dir, tmp),
                           None, SectorCipher(dek), bar.update)
            del dek
            renames.append((tmp, f.name))
            owner = extent_owner.get(f.name)
            single = owner and _extent_count(os.path.join(folder.backing_dir, owner)) == 1
            if single and owner not in desc_records:
                desc_records[owner] = record  # a single-extent disk keeps its key in its descriptor
            else:
                new_keys.files[f.name] = record
    _stage_descriptors(folder, desc_records, renames)
    commit(folder, renames, new_keys)
    return {"folder": folder.backing_dir, "encrypted": [f.name for f in todo]}


def decrypt_folder(path: str, agent: AgentClient, progress_factory) -> dict:
    """Decrypt every encrypted file of a VM folder and make it a plain folder again."""
    folder = _target_folder(path)
    recover(folder)
    if not folder.encrypted:
        raise UsageError(f"{folder.backing_dir} is not encrypted")
    infos = folder_files(folder)
    missing = [f.name for f in infos if f.role == "missing-key"]
    if missing:
        raise DataError(f"{folder.backing_dir}: no key for {', '.join(missing)}; nothing was changed")
    todo = [f for f in infos if f.role == "encrypted"]
    renames = []
    with progress_factory(sum(f.size for f in todo), "decrypting") as bar:
        for f in todo:
            record = folder.key_record_for(f.name)
            cipher = SectorCipher(agent.unwrap(record, os.path.join(folder.backing_dir, f.name)))
            tmp = TMP_PREFIX + f.name
            transform_file(os.path.join(folder.backing_dir, f.name), os.path.join(folder.backing_dir, tmp),
                           cipher, None, bar.update)
            renames.append((tmp, f.name))
    keyed = {}
    for f in infos:
        if f.role == "descriptor":
            with open(os.path.join(folder.backing_dir, f.name), "rb") as fh:
                if b"encryption." in fh.read():
                    keyed[f.name] = None
    _stage_descriptors(folder, keyed, renames)
    commit(folder, renames, None)
    return {"folder": folder.backing_dir, "decrypted": [f.name for f in todo]}


def cat_file(path: str, agent: AgentClient, write: Callable[[bytes], None]) -> None:
    """Write the plaintext of one file of a datastore (encrypted or not) to `write`."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")
    folder = VmFolder(os.path.dirname(path))
    name = os.path.basename(path)
    with open(path, "rb") as f:
        if not folder.encrypted or not folder.should_encrypt(name):
            raw = f.read()
            write(strip_encryption_lines(raw) if is_descriptor(raw) else raw)
            return
        record = folder.key_record_for(name)
        if record is None:
            raise DataError(f"{path}: no key for this file in its descriptor or {FOLDER_KEYS_NAME}")
        cipher = SectorCipher(agent.unwrap(record, path))
        for off, data in _chunks(f.fileno(), os.fstat(f.fileno()).st_size):
            write(decrypt_sectors(cipher, off // SECTOR_SIZE, data))


def rekey_folder(path: str, agent: AgentClient, provider: str | None, deep: bool, progress_factory) -> dict:
    """Shallow rekey (a new KEK wraps the same DEKs) or deep rekey (new DEKs, data re-encrypted) of a VM folder."""
    folder = _target_folder(path)
    recover(folder)
    if not folder.encrypted:
        raise UsageError(f"{folder.backing_dir} is not encrypted; use 'vmfs-crypt encrypt'")
    old_keys = folder.load_keys()
    infos = folder_files(folder)
    missing = [f.name for f in infos if f.role == "missing-key"]
    if missing:
        raise DataError(f"{folder.backing_dir}: no key for {', '.join(missing)}; nothing was changed")
    new_kek = agent.new_kek(provider or old_keys.kek.provider_id, os.path.basename(folder.backing_dir))
    new_keys = FolderKeys(new_kek)
    renames: list[tuple[str, str]] = []
    desc_records: dict[str, KeyRecord] = {}
    todo = [f for f in infos if f.role == "encrypted"]
    with progress_factory(sum(f.size for f in todo) if deep else len(todo), "deep rekey" if deep else "rekey") as bar:
        for f in todo:
            what = os.path.join(folder.backing_dir, f.name)
            found = folder.descriptor_record_for(f.name)
            record = found[1] if found else old_keys.files[f.name]
            if deep:
                new_record, dek = agent.new_file_key(new_kek)
                tmp = TMP_PREFIX + f.name
                transform_file(what, os.path.join(folder.backing_dir, tmp), SectorCipher(agent.unwrap(record, what)),
                               SectorCipher(dek), bar.update)
                del dek
                renames.append((tmp, f.name))
            else:
                new_record = agent.rewrap(record, new_kek, what)
                bar.update(1)
            if found:
                desc_records[found[0]] = new_record
            else:
                new_keys.files[f.name] = new_record
    _stage_descriptors(folder, desc_records, renames)
    commit(folder, renames, new_keys)
    return {"folder": folder.backing_dir, "files": [f.name for f in todo], "old_kek": vars(old_keys.kek),
            "new_kek": vars(new_kek), "deep": deep}
