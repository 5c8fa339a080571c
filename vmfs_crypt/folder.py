"""Encrypted VM folders: the folder key file, which files are encrypted, and where each file's wrapped DEK lives."""

import json
import os
from dataclasses import dataclass, field

from .atomicio import write_atomic
from .descriptor import Extent, extents, is_descriptor, read_key_record
from .errors import FormatError
from .keysafe import FORMAT_VERSION, KNOWN_FEATURES, KeyRecord, KeyRef
from .strict import check_members, check_version_features, json_object

FOLDER_KEYS_NAME = ".vmfs-crypt.json"
FOLDER_FORMAT = "vmfs-crypt-folder"
# vSphere's split: logs, VM configuration and descriptors stay readable; everything else
# in an encrypted VM folder (extents, sparse disks, nvram, vswp, vmem, vmsn, core dumps,
# anything unknown) is encrypted, so an unknown file type fails safe.
PLAINTEXT_SUFFIXES = (".log", ".vmx", ".vmxf", ".vmsd", ".vmtx", ".hlog", ".lck")
DESCRIPTOR_PROBE_SIZE = len(b"# Disk DescriptorFile")


def is_plaintext_name(name: str) -> bool:
    """Files that an encrypted folder keeps in plaintext by name (not descriptors: those go by content)."""
    return name.lower().endswith(PLAINTEXT_SUFFIXES) or name.lower().startswith("vmware") and name.lower().endswith(".log")


HIDDEN_PREFIX = ".vmfs-crypt"
JOURNAL_NAME = ".vmfs-crypt-journal.json"
TMP_PREFIX = ".vmfs-crypt-tmp."


def is_hidden_name(name: str) -> bool:
    """Our own metadata and temporary files (all named .vmfs-crypt*), which the mount does not show."""
    return name.startswith(HIDDEN_PREFIX) or name.startswith("." + HIDDEN_PREFIX)


def read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(DESCRIPTOR_PROBE_SIZE)
    except (FileNotFoundError, IsADirectoryError):
        return b""


@dataclass
class FolderKeys:
    """The contents of a VM folder's key file: its default KEK and the key records of files without a descriptor."""

    kek: KeyRef
    files: dict[str, KeyRecord] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        doc = {
            "format": FOLDER_FORMAT,
            "version": FORMAT_VERSION,
            "features": [],
            "kek": {"provider": self.kek.provider_id, "keyId": self.kek.key_id},
            "files": {name: rec.as_json() for name, rec in sorted(self.files.items())},
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, what: str) -> "FolderKeys":
        doc = json_object(raw, what)
        if doc.get("format") != FOLDER_FORMAT:
            raise FormatError(f"{what}: not a vmfs-crypt folder key file")
        check_version_features(doc, FORMAT_VERSION, KNOWN_FEATURES, what)
        check_members(doc, {"format", "version", "features", "kek", "files"}, what)
        kek = doc["kek"]
        if (not isinstance(kek, dict) or set(kek) != {"provider", "keyId"}
                or not all(isinstance(v, str) and v for v in kek.values())):
            raise FormatError(f"{what}: kek must be {{\"provider\": ..., \"keyId\": ...}}")
        files = doc["files"]
        if not isinstance(files, dict):
            raise FormatError(f"{what}: files must be an object")
        records = {}
        for name, rec in files.items():
            if not name or "/" in name or name in (".", ".."):
                raise FormatError(f"{what}: bad file name {name!r}")
            records[name] = KeyRecord.from_json(rec, f"{what} entry {name!r}")
        return cls(KeyRef(kek["provider"], kek["keyId"]), records)


class VmFolder:
    """One directory of the backing datastore, seen through its (optional) folder key file."""

    def __init__(self, backing_dir: str) -> None:
        self.backing_dir = backing_dir
        self.keys_path = os.path.join(backing_dir, FOLDER_KEYS_NAME)

    @property
    def encrypted(self) -> bool:
        """The rule: a folder is encrypted exactly when it holds a folder key file."""
        return os.path.isfile(self.keys_path)

    def load_keys(self) -> FolderKeys:
        try:
            with open(self.keys_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise FormatError(f"{self.keys_path}: missing; this folder is not encrypted") from None
        return FolderKeys.from_bytes(raw, self.keys_path)

    def save_keys(self, keys: FolderKeys) -> None:
        write_atomic(self.keys_path, keys.to_bytes(), 0o600)

    def is_descriptor_file(self, name: str) -> bool:
        return is_descriptor(read_head(os.path.join(self.backing_dir, name)))

    def descriptor_record_for(self, name: str) -> tuple[str, KeyRecord, Extent] | None:
        """(descriptor name, key record, extent line) of the encrypted descriptor whose single extent is `name`."""
        for entry in sorted(os.listdir(self.backing_dir)):
            if not entry.lower().endswith(".vmdk") or entry == name:
                continue
            path = os.path.join(self.backing_dir, entry)
            if not os.path.isfile(path) or not is_descriptor(read_head(path)):
                continue
            with open(path, "rb") as f:
                raw = f.read(1 << 20)
            if b"encryption." not in raw:
                continue
            listed = extents(raw)
            if any(ext.file_name == name for ext in listed):
                record = read_key_record(raw, path)
                if record is not None:
                    if len(listed) != 1:
                        # One DEK with the same tweaks for several files would repeat keystreams.
                        raise FormatError(f"{path}: has encryption lines but {len(listed)} extents; only "
                                          "single-extent descriptors carry a key (FORMAT.md 6.2)")
                    return entry, record, listed[0]
        return None

    def key_record_for(self, name: str) -> KeyRecord | None:
        """Where a file's wrapped DEK lives: its disk's descriptor first, else the folder key file."""
        found = self.descriptor_record_for(name)
        if found:
            return found[1]
        return self.load_keys().files.get(name)

    def should_encrypt(self, name: str) -> bool:
        """Whether an existing file of this encrypted folder is stored encrypted."""
        if is_hidden_name(name) or is_plaintext_name(name):
            return False
        if name.lower().endswith(".vmdk") and self.is_descriptor_file(name):
            return False
        return True
