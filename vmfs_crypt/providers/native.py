"""The embedded native key provider: a local primary key file, KEKs derived from it by id, passphrase backups."""

import base64
import json
import os
import secrets
import stat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import ConfigError, FormatError, KeyFilePermissionError, KeyNotFoundError
from ..format.atomicio import NotRegularFile, open_regular, read_fd, write_atomic
from ..format.strict import b64decode_canonical, check_members, check_version_features, json_object
from .base import KeyProvider

PRIMARY_KEY_SIZE = 32
KEY_FILE_FORMAT = "vmfs-crypt-native-key"
BACKUP_FORMAT = "vmfs-crypt-native-backup"
KEY_FILE_VERSION = 1
_KEK_INFO_PREFIX = b"vmfs-crypt native kek v1\x00"
# scrypt cost: N=2^17, r=8, p=1 (128 MiB, about 0.5 s): RFC 7914's interactive-login advice raised for file backups.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**17, 8, 1


def derive_kek(primary_key: bytes, key_id: str) -> bytes:
    """KEK = HKDF-SHA-256(ikm=primary key, salt=none, info=prefix || key id), 32 bytes."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_KEK_INFO_PREFIX + key_id.encode("utf-8"))
    return hkdf.derive(primary_key)


KEY_FILE_MAX_SIZE = 64 << 10


def _read_private(path: str) -> bytes:
    """A key file's bytes: a regular file (never a symlink or a FIFO), ours, readable by nobody else."""
    fd = open_regular(path)
    try:
        st = os.fstat(fd)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFilePermissionError(
                f"{path}: key file is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run 'chmod 600 {path}' and check nobody copied it")
        if st.st_uid != os.geteuid():
            raise KeyFilePermissionError(f"{path}: key file belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})")
        return read_fd(fd, KEY_FILE_MAX_SIZE)
    finally:
        os.close(fd)


def _parse_key_doc(raw: bytes, path: str, fmt: str, members: set[str]) -> dict:
    doc = json_object(raw, path)
    if doc.get("format") != fmt:
        raise FormatError(f"{path}: not a {fmt} file")
    check_version_features(doc, KEY_FILE_VERSION, frozenset(), path)
    check_members(doc, members, path)
    return doc


_KEY_FILE_MEMBERS = {"format", "version", "features", "provider", "key"}
_BACKUP_MEMBERS = {"format", "version", "features", "provider", "kdf", "nonce", "sealed"}


class NativeKeyProvider(KeyProvider):
    """Like vSphere's Native Key Provider: needs no server; the primary key file is the secret."""

    kind = "native"
    has_backup = True

    def __init__(self, name: str, key_file: str) -> None:
        super().__init__(name)
        self.key_file = key_file
        self._primary: bytes | None = None

    @staticmethod
    def generate(name: str, key_file: str) -> "NativeKeyProvider":
        """Create a new primary key file (0600, refusing to overwrite one)."""
        os.makedirs(os.path.dirname(os.path.abspath(key_file)), mode=0o700, exist_ok=True)
        if os.path.exists(key_file):
            raise ConfigError(f"{key_file}: a key file already exists; remove it first or choose another name")
        doc = {"format": KEY_FILE_FORMAT, "version": KEY_FILE_VERSION, "features": [], "provider": name,
               "key": base64.b64encode(secrets.token_bytes(PRIMARY_KEY_SIZE)).decode("ascii")}
        write_atomic(key_file, json.dumps(doc).encode("utf-8"), 0o600)
        return NativeKeyProvider(name, key_file)

    def _primary_key(self) -> bytes:
        if self._primary is None:
            try:
                raw = _read_private(self.key_file)
            except FileNotFoundError:
                raise ConfigError(f"provider {self.name}: key file {self.key_file} is missing; restore it with "
                                  f"'vmfs-crypt provider restore {self.name} BACKUP'") from None
            except NotRegularFile:
                raise ConfigError(f"provider {self.name}: key file {self.key_file} is not a regular file "
                                  "(a symlink, FIFO or device); replace it with the real key file") from None
            doc = _parse_key_doc(raw, self.key_file, KEY_FILE_FORMAT, _KEY_FILE_MEMBERS)
            if not isinstance(doc["key"], str):
                raise FormatError(f"{self.key_file}: the key field must be a base64 string")
            key = b64decode_canonical(doc["key"], self.key_file, "the key field")
            if len(key) != PRIMARY_KEY_SIZE:
                raise FormatError(f"{self.key_file}: the primary key is {len(key)} bytes, expected {PRIMARY_KEY_SIZE}")
            self._primary = key
        return self._primary

    def check(self) -> None:
        """Load the primary key now, so that permission and format errors show at start-up."""
        self._primary_key()

    def get_kek(self, key_id: str) -> bytes:
        if not key_id or len(key_id) > 128:
            raise KeyNotFoundError(f"provider {self.name}: key id {key_id!r} is not a native key id")
        return derive_kek(self._primary_key(), key_id)

    def new_kek(self, label: str) -> str:
        self._primary_key()
        return secrets.token_hex(16)

    @property
    def backup_marker(self) -> str:
        return self.key_file + ".backed-up"

    def warnings(self) -> list[str]:
        if not os.path.exists(self.backup_marker):
            return [f"provider {self.name} has no backup: if {self.key_file} is lost, every disk under it is lost. "
                    f"Run 'vmfs-crypt provider backup {self.name} FILE'"]
        return []

    def describe(self) -> dict:
        return {"name": self.name, "type": self.kind, "key_file": self.key_file,
                "backed_up": os.path.exists(self.backup_marker)}

    # -- backup and restore ------------------------------------------------------------
    @staticmethod
    def _backup_key(passphrase: bytes, salt: bytes) -> bytes:
        return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)

    def sealed_backup(self, passphrase: bytes) -> bytes:
        """The backup document: the primary key sealed with AES-256-GCM under scrypt(passphrase)."""
        if len(passphrase) < 8:
            raise ConfigError("the backup passphrase must be at least 8 characters")
        salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
        header = {"format": BACKUP_FORMAT, "version": KEY_FILE_VERSION, "features": [], "provider": self.name,
                  "kdf": {"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                          "salt": base64.b64encode(salt).decode()},
                  "nonce": base64.b64encode(nonce).decode()}
        aad = json.dumps(header, sort_keys=True).encode("utf-8")
        sealed = AESGCM(self._backup_key(passphrase, salt)).encrypt(nonce, self._primary_key(), aad)
        return json.dumps(dict(header, sealed=base64.b64encode(sealed).decode()), indent=1).encode("utf-8")

    def mark_backed_up(self, where: str) -> None:
        """Record that a backup exists (it silences the 'no backup' warning)."""
        write_atomic(self.backup_marker, f"{where}\n".encode("utf-8"), 0o600)

    def backup(self, backup_path: str, passphrase: bytes) -> None:
        """Write the sealed backup document to `backup_path` (0600)."""
        write_atomic(backup_path, self.sealed_backup(passphrase), 0o600)
        self.mark_backed_up(backup_path)

    @staticmethod
    def read_backup(backup_path: str) -> bytes:
        try:
            fd = open_regular(backup_path)
        except FileNotFoundError:
            raise ConfigError(f"{backup_path}: no such backup file") from None
        except NotRegularFile:
            raise ConfigError(f"{backup_path}: not a regular file") from None
        try:
            return read_fd(fd, KEY_FILE_MAX_SIZE)
        finally:
            os.close(fd)

    @staticmethod
    def restore(name: str, key_file: str, backup_path: str, passphrase: bytes) -> "NativeKeyProvider":
        """Recreate a primary key file from a backup file (refusing to overwrite a different key)."""
        return NativeKeyProvider.restore_document(name, key_file, NativeKeyProvider.read_backup(backup_path),
                                                  backup_path, passphrase)

    @staticmethod
    def restore_document(name: str, key_file: str, raw: bytes, backup_path: str,
                         passphrase: bytes) -> "NativeKeyProvider":
        """Recreate a primary key file from a backup document (`backup_path`: where it came from, for messages)."""
        if len(raw) > KEY_FILE_MAX_SIZE:
            raise FormatError(f"{backup_path}: not a backup file (longer than {KEY_FILE_MAX_SIZE} bytes)")
        doc = _parse_key_doc(raw, backup_path, BACKUP_FORMAT, _BACKUP_MEMBERS)
        kdf = doc["kdf"]
        # Only the parameters we write: a crafted file must not make scrypt take unbounded memory.
        if (not isinstance(kdf, dict) or set(kdf) != {"name", "n", "r", "p", "salt"} or kdf["name"] != "scrypt"
                or (kdf["n"], kdf["r"], kdf["p"]) != (SCRYPT_N, SCRYPT_R, SCRYPT_P)
                or not all(type(kdf[k]) is int for k in ("n", "r", "p"))):
            raise FormatError(f"{backup_path}: unsupported key derivation {kdf!r}; expected scrypt "
                              f"n={SCRYPT_N} r={SCRYPT_R} p={SCRYPT_P}")
        if not all(isinstance(v, str) for v in (kdf["salt"], doc["nonce"], doc["sealed"])):
            raise FormatError(f"{backup_path}: damaged backup file (salt, nonce and sealed must be base64 strings)")
        salt = b64decode_canonical(kdf["salt"], backup_path, "kdf.salt")
        nonce = b64decode_canonical(doc["nonce"], backup_path, "nonce")
        sealed = b64decode_canonical(doc["sealed"], backup_path, "sealed")
        if len(salt) != 16 or len(nonce) != 12 or len(sealed) != PRIMARY_KEY_SIZE + 16:
            raise FormatError(f"{backup_path}: damaged backup file (salt, nonce or sealed key has the wrong length)")
        header = {k: doc[k] for k in ("format", "version", "features", "provider", "kdf", "nonce")}
        key = Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
        aad = json.dumps(header, sort_keys=True).encode("utf-8")
        try:
            primary = AESGCM(key).decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise ConfigError(f"{backup_path}: wrong passphrase, or the backup file was altered") from None
        if os.path.exists(key_file):
            existing = NativeKeyProvider(name, key_file)
            if secrets.compare_digest(existing._primary_key(), primary):
                return existing
            raise ConfigError(f"{key_file}: a different key file already exists; move it away before restoring")
        os.makedirs(os.path.dirname(os.path.abspath(key_file)), mode=0o700, exist_ok=True)
        out = {"format": KEY_FILE_FORMAT, "version": KEY_FILE_VERSION, "features": [], "provider": name,
               "key": base64.b64encode(primary).decode("ascii")}
        write_atomic(key_file, json.dumps(out).encode("utf-8"), 0o600)
        write_atomic(key_file + ".backed-up", f"{backup_path}\n".encode("utf-8"), 0o600)
        return NativeKeyProvider(name, key_file)
