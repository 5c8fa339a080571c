"""Key safe: the VMware-style key locator string and the encryption.data record that together hold a wrapped DEK."""

import base64
import json
import re
import secrets
from dataclasses import dataclass, field

from ..errors import FormatError
from ..crypto.keywrap import WRAP_ALGORITHM, WRAPPED_DEK_SIZE, unwrap_dek, wrap_dek
from .strict import b64decode_canonical, check_members, check_version_features, exact_int, json_object

FORMAT_VERSION = 1
KNOWN_FEATURES: frozenset[str] = frozenset()  # none yet; any listed feature fails closed
CIPHER_NAME = "aes-xts-plain64"
VMWARE_NULL = "<VMWARE-NULL>"
# Characters written as themselves inside a locator field; every other byte is %xx
# (VMware escapes at least '-', '/', '=': govmomi crypto/keylocator.go).
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.<>+")
_FIELD = r"([^/,()]*)"
_LOCATOR_RE = re.compile(
    r"vmware:key/list/\(pair/\(fqid/" + _FIELD + "/" + _FIELD + "/" + _FIELD + "," + _FIELD + "," + _FIELD + r"\)\)"
)
_ID_RE = re.compile(r"[0-9a-f]{32}")


def escape_field(text: str) -> str:
    """%-escape a locator field (UTF-8 bytes outside the safe set become %xx, lowercase hex)."""
    out = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def unescape_field(text: str, what: str) -> str:
    """Undo escape_field; reject stray '%' and non-UTF-8 results."""
    raw = bytearray()
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "%":
            pair = text[i + 1:i + 3]
            if len(pair) != 2 or not all(c in "0123456789abcdefABCDEF" for c in pair):
                raise FormatError(f"{what}: bad %-escape in the key locator")
            raw.append(int(pair, 16))
            i += 3
        else:
            raw.extend(ch.encode("utf-8"))
            i += 1
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(f"{what}: the key locator is not valid UTF-8") from None


@dataclass(frozen=True)
class KeyRef:
    """Which KEK: a provider id and the provider's key id."""

    provider_id: str
    key_id: str

    def __str__(self) -> str:
        return f"key {self.key_id} of provider {self.provider_id}"

    # The one spelling of a KEK reference in JSON (folder key file, agent protocol, CLI output).
    def to_json(self) -> dict:
        return {"provider": self.provider_id, "keyId": self.key_id}

    @classmethod
    def from_json(cls, obj, what: str) -> "KeyRef":
        if (not isinstance(obj, dict) or set(obj) != {"provider", "keyId"}
                or not all(isinstance(v, str) and v for v in obj.values())):
            raise FormatError(f"{what}: a KEK reference must be {{\"provider\": ..., \"keyId\": ...}} "
                              "with non-empty strings")
        return cls(obj["provider"], obj["keyId"])


@dataclass(frozen=True)
class EncryptionData:
    """The non-secret record a DEK is bound to (the `encryption.data` line), exactly as stored."""

    raw: bytes = field(repr=False)
    file_id: str

    @classmethod
    def new(cls) -> "EncryptionData":
        record = {"cipher": CIPHER_NAME, "features": [], "id": secrets.token_hex(16),
                  "sectorSize": 512, "version": FORMAT_VERSION}
        raw = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("ascii")
        return cls(raw=raw, file_id=record["id"])

    def encode(self) -> str:
        return base64.b64encode(self.raw).decode("ascii")

    @classmethod
    def decode(cls, text: str, what: str) -> "EncryptionData":
        raw = b64decode_canonical(text, what, "encryption.data")
        record = json_object(raw, f"{what}: encryption.data")
        check_version_features(record, FORMAT_VERSION, KNOWN_FEATURES, f"{what}: encryption.data")
        check_members(record, {"cipher", "features", "id", "sectorSize", "version"}, f"{what}: encryption.data")
        if record["cipher"] != CIPHER_NAME or not exact_int(record["sectorSize"], 512):
            raise FormatError(f"{what}: cipher {record['cipher']!r} with sector size {record['sectorSize']!r} "
                              f"is not supported (only {CIPHER_NAME} with 512-byte sectors)")
        if not isinstance(record["id"], str) or not _ID_RE.fullmatch(record["id"]):
            raise FormatError(f"{what}: encryption.data has a malformed id")
        return cls(raw=raw, file_id=record["id"])


@dataclass(frozen=True)
class KeySafe:
    """A wrapped DEK with the reference of the KEK that wraps it (the `encryption.keySafe` line)."""

    kek: KeyRef
    wrapped: bytes = field(repr=False)
    algorithm: str = WRAP_ALGORITHM

    def to_locator(self) -> str:
        blob = base64.b64encode(self.wrapped).decode("ascii")
        fields = [VMWARE_NULL, self.kek.provider_id, self.kek.key_id]
        fqid = "/".join(escape_field(f) for f in fields)
        return f"vmware:key/list/(pair/(fqid/{fqid},{escape_field(self.algorithm)},{escape_field(blob)}))"

    @classmethod
    def from_locator(cls, text: str, what: str) -> "KeySafe":
        match = _LOCATOR_RE.fullmatch(text)
        if not match:
            raise FormatError(f"{what}: encryption.keySafe is not a key locator of the form "
                              "vmware:key/list/(pair/(fqid/<VMWARE-NULL>/PROVIDER/KEYID,ALGORITHM,BLOB))")
        null, provider_id, key_id, algorithm, blob = (unescape_field(g, what) for g in match.groups())
        if null != VMWARE_NULL:
            raise FormatError(f"{what}: the key locator's fqid must start with {VMWARE_NULL}")
        if not provider_id or not key_id:
            raise FormatError(f"{what}: the key locator names no provider or no key id")
        if algorithm != WRAP_ALGORITHM:
            raise FormatError(f"{what}: wrap algorithm {algorithm!r} is not supported (only {WRAP_ALGORITHM})")
        wrapped = b64decode_canonical(blob, what, "the wrapped key")
        if len(wrapped) != WRAPPED_DEK_SIZE:
            raise FormatError(f"{what}: the wrapped key is {len(wrapped)} bytes, expected {WRAPPED_DEK_SIZE}")
        return cls(kek=KeyRef(provider_id, key_id), wrapped=wrapped, algorithm=algorithm)


@dataclass(frozen=True)
class KeyRecord:
    """keySafe plus encryption.data: everything needed, with the KEK, to recover one file's DEK."""

    keysafe: KeySafe
    data: EncryptionData

    @classmethod
    def parse(cls, locator: str, data: str, what: str) -> "KeyRecord":
        return cls(KeySafe.from_locator(locator, what), EncryptionData.decode(data, what))

    @classmethod
    def seal(cls, kek_ref: KeyRef, kek: bytes, dek: bytes, data: EncryptionData) -> "KeyRecord":
        return cls(KeySafe(kek_ref, wrap_dek(kek, dek, data.raw)), data)

    def open(self, kek: bytes, what: str) -> bytes:
        return unwrap_dek(kek, self.keysafe.wrapped, self.data.raw, f"{what} ({self.keysafe.kek})")

    def as_json(self) -> dict:
        return {"keySafe": self.keysafe.to_locator(), "data": self.data.encode()}

    @classmethod
    def from_json(cls, obj, what: str) -> "KeyRecord":
        if (not isinstance(obj, dict) or set(obj) != {"keySafe", "data"}
                or not isinstance(obj["keySafe"], str) or not isinstance(obj["data"], str)):
            raise FormatError(f"{what}: a key entry must be exactly {{\"keySafe\": ..., \"data\": ...}} with string values")
        return cls.parse(obj["keySafe"], obj["data"], what)
