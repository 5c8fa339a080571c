"""Encrypted VM folders: the folder key file, which files are encrypted, and where each file's wrapped DEK lives."""

import enum
import json
import os
import stat
from dataclasses import dataclass, field

from .atomicio import NotRegularFile, read_regular, write_atomic
from .descriptor import Descriptor, Extent, read_descriptor
from ..errors import DataError, FormatError
from .keysafe import FORMAT_VERSION, KNOWN_FEATURES, KeyRecord, KeyRef
from .reencrypt import REENCRYPT_FEATURE, ReencryptState
from .strict import check_members, check_version_features, json_object

FOLDER_KEYS_NAME = ".vmfs-crypt.json"
FOLDER_FORMAT = "vmfs-crypt-folder"
# vSphere's split: logs, VM configuration and descriptors stay readable; everything else
# in an encrypted VM folder (extents, sparse disks, nvram, vswp, vmem, vmsn, core dumps,
# anything unknown) is encrypted, so an unknown file type fails safe.
PLAINTEXT_SUFFIXES = (".log", ".vmx", ".vmxf", ".vmsd", ".vmtx", ".hlog", ".lck")
FOLDER_KEYS_MAX_SIZE = 64 << 20  # a key entry is about 300 bytes: room for 200,000 files


def is_plaintext_name(name: str) -> bool:
    """Files that an encrypted folder keeps in plaintext by name (not descriptors: those go by content)."""
    return name.lower().endswith(PLAINTEXT_SUFFIXES) or name.lower().startswith("vmware") and name.lower().endswith(".log")


HIDDEN_PREFIX = ".vmfs-crypt"
JOURNAL_NAME = ".vmfs-crypt-journal.json"
TMP_PREFIX = ".vmfs-crypt-tmp."


def is_hidden_name(name: str) -> bool:
    """Our own metadata and temporary files (all named .vmfs-crypt*), which the mount does not show."""
    return name.startswith(HIDDEN_PREFIX) or name.startswith("." + HIDDEN_PREFIX)


@dataclass
class FolderKeys:
    """The contents of a VM folder's key file: its default KEK and the key records of files without a descriptor."""

    kek: KeyRef
    files: dict[str, KeyRecord] = field(default_factory=dict)
    # An in-place re-encryption in flight (FORMAT.md 7.8, issue 10): written with the feature
    # "reencrypt", which readers that do not implement it refuse.
    reencrypt: ReencryptState | None = None

    def to_bytes(self) -> bytes:
        doc = {
            "format": FOLDER_FORMAT,
            "version": FORMAT_VERSION,
            "features": [REENCRYPT_FEATURE] if self.reencrypt else [],
            "kek": self.kek.to_json(),
            "files": {name: rec.as_json() for name, rec in sorted(self.files.items())},
        }
        if self.reencrypt:
            doc["reencrypt"] = self.reencrypt.to_json()
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, raw: bytes, what: str, allow_reencrypt: bool = False) -> "FolderKeys":
        """Parse a folder key file; one with a re-encryption in flight only for the code that finishes it."""
        doc = json_object(raw, what)
        if doc.get("format") != FOLDER_FORMAT:
            raise FormatError(f"{what}: not a vmfs-crypt folder key file")
        check_version_features(doc, FORMAT_VERSION, KNOWN_FEATURES | {REENCRYPT_FEATURE}, what)
        features = doc["features"]
        if len(set(features)) != len(features):
            raise FormatError(f"{what}: features {features!r} lists a feature twice")
        in_flight = REENCRYPT_FEATURE in features
        check_members(doc, {"format", "version", "features", "kek", "files"} | ({"reencrypt"} if in_flight else set()),
                      what)
        kek = KeyRef.from_json(doc["kek"], f"{what}: kek")
        files = doc["files"]
        if not isinstance(files, dict):
            raise FormatError(f"{what}: files must be an object")
        records = {}
        for name, rec in files.items():
            if not name or "/" in name or name in (".", ".."):
                raise FormatError(f"{what}: bad file name {name!r}")
            records[name] = KeyRecord.from_json(rec, f"{what} entry {name!r}")
        state = ReencryptState.from_json(doc["reencrypt"], what, records) if in_flight else None
        if state is not None and not allow_reencrypt:
            folder = os.path.dirname(os.path.abspath(what))
            if state.aborting:
                raise FormatError(f"{what}: the abort of an in-place {state.op} of this folder was interrupted; its "
                                  f"files are refused until it is finished: run 'vmfs-crypt abort {folder}' (it goes "
                                  "on where it stopped)")
            raise FormatError(f"{what}: an in-place {state.op} of this folder was interrupted; its files are refused "
                              f"until it is finished: run 'vmfs-crypt {state.op}{' --deep' if state.op == 'rekey' else ''} "
                              f"{folder}' (it resumes where it stopped)")
        return cls(kek, records, state)


def check_extent_length(what: str, size: int, descriptor: str, ext: Extent) -> None:
    """A descriptor-keyed flat extent shorter than its descriptor says was truncated: refuse it (FORMAT.md 7.4)."""
    need = (ext.offset + ext.sectors) * 512
    if ext.kind in ("FLAT", "VMFS") and size < need:
        raise DataError(f"{what}: extent is {size} bytes but {descriptor} describes {need}: it was "
                        "truncated; restore it from a backup")


class FolderState(enum.Enum):
    """What a directory of the datastore is (FORMAT.md 7.1)."""

    PLAIN = "plain"
    ENCRYPTED = "encrypted"
    # No usable folder key file, yet a descriptor carries encryption lines: fail closed
    # (issue 7, case 6). Its encrypted-kind files are refused, never served as plaintext.
    DAMAGED = "damaged"


class VmFolder:
    """One directory of the backing datastore, seen through its (optional) folder key file."""

    def __init__(self, backing_dir: str, shown: str | None = None) -> None:
        self.backing_dir = backing_dir
        self.keys_path = os.path.join(backing_dir, FOLDER_KEYS_NAME)
        # `shown`: the path for messages when backing_dir is a /proc/self/fd path (the mount's)
        self.shown_dir = shown or backing_dir
        self.shown_keys = os.path.join(self.shown_dir, FOLDER_KEYS_NAME)
        # True where the caller itself carries out the folder's operation in flight (the mount,
        # online: issue 10); everyone else refuses such a key file (FORMAT.md 7.8).
        self.allow_reencrypt = False

    def state(self) -> FolderState:
        if os.path.lexists(os.path.join(self.backing_dir, JOURNAL_NAME)):
            return FolderState.DAMAGED  # an interrupted operation that recovery could not finish
        try:
            st = os.lstat(self.keys_path)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:
            return FolderState.PLAIN
        if st is not None:
            return FolderState.ENCRYPTED if stat.S_ISREG(st.st_mode) else FolderState.DAMAGED
        if any(d.has_encryption_lines for d in self.descriptors()):
            return FolderState.DAMAGED
        return FolderState.PLAIN

    @property
    def encrypted(self) -> bool:
        """The rule: a folder is encrypted exactly when it holds a folder key file (a regular file)."""
        return self.state() is FolderState.ENCRYPTED

    def damage(self) -> str:
        """Why a DAMAGED folder cannot be used, and how to repair it (for logs, errors and `info`)."""
        journal = os.path.join(self.backing_dir, JOURNAL_NAME)
        if os.path.lexists(journal):
            from .journal import journal_problem  # journal.py builds on this module
            return journal_problem(self) or (
                f"{journal}: an interrupted operation is not finished yet; the next mount or offline operation "
                "of this folder finishes it")
        what = "is not a regular file" if os.path.lexists(self.keys_path) else "is missing"
        return (f"{self.shown_keys} {what}, but descriptors in {self.shown_dir} carry encryption lines: "
                "the folder's keys are lost; restore the key file from a backup copy (and the provider "
                "with 'vmfs-crypt provider restore' if needed)")

    def load_keys(self, allow_reencrypt: bool | None = None) -> FolderKeys:
        try:
            raw = read_regular(self.keys_path, FOLDER_KEYS_MAX_SIZE)
        except FileNotFoundError:
            raise FormatError(f"{self.shown_keys}: missing; this folder is not encrypted") from None
        except NotRegularFile:
            raise FormatError(f"{self.shown_keys}: not a regular file; restore the folder key file "
                              "from a backup") from None
        return FolderKeys.from_bytes(raw, self.shown_keys,
                                     self.allow_reencrypt if allow_reencrypt is None else allow_reencrypt)

    def save_keys(self, keys: FolderKeys) -> None:
        write_atomic(self.keys_path, keys.to_bytes(), 0o600)

    def descriptors(self) -> list[Descriptor]:
        """Every text descriptor of this folder, by name."""
        out = []
        try:
            names = sorted(os.listdir(self.backing_dir))
        except (FileNotFoundError, NotADirectoryError):
            return out
        for name in names:
            if name.lower().endswith(".vmdk") and not is_hidden_name(name):
                desc = read_descriptor(os.path.join(self.backing_dir, name))
                if desc is not None:
                    out.append(desc)
        return out

    def is_descriptor_file(self, name: str) -> bool:
        return read_descriptor(os.path.join(self.backing_dir, name)) is not None

    def descriptor_record_for(self, name: str) -> tuple[str, KeyRecord, Extent] | None:
        """(descriptor name, key record, extent line) of the encrypted descriptor whose single extent is `name`."""
        for desc in self.descriptors():
            entry = os.path.basename(desc.path)
            if entry == name or b"encryption." not in desc.raw:
                continue
            listed = desc.extents
            if any(ext.file_name == name for ext in listed):
                record = desc.key_record()
                if record is not None:
                    if len(listed) != 1:
                        # One DEK with the same tweaks for several files would repeat keystreams.
                        raise FormatError(f"{desc.path}: has encryption lines but {len(listed)} extents; only "
                                          "single-extent descriptors carry a key (FORMAT.md 6.2)")
                    return entry, record, listed[0]
        return None

    def extent_owners(self) -> dict[str, str]:
        """Extent file name -> name of the descriptor that lists it."""
        out = {}
        for desc in self.descriptors():
            for ext in desc.extents:
                out[ext.file_name] = os.path.basename(desc.path)
        return out

    def key_record_for(self, name: str) -> KeyRecord | None:
        """Where a file's wrapped DEK lives: its disk's descriptor first, else the folder key file."""
        found = self.descriptor_record_for(name)
        if found:
            return found[1]
        return self.load_keys().files.get(name)
