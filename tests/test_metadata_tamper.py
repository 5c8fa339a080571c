"""Flip every bit of the key metadata: each flip is refused cleanly or changes nothing, never a wrong plaintext.

Covered (docs/FORMAT.md sections 4 to 8): the encryption.keySafe and encryption.data lines of a
QEMU-style and of an ESXi-style descriptor, the folder key file (.vmfs-crypt.json) and the
native provider's key file. Each flipped copy goes through the library code that a mount or
`vmfs-crypt cat` uses (the parsers behind VmFolder's key lookup, the agent's KEK lookup, the
unwrap), not through a mount, so that tens of thousands of flips take a few seconds; every 37th
flip, and every flip that is accepted, also goes through the whole lookup on disk (VmFolder)
and, when accepted, through `ops.lifecycle.cat_file`. The allowed outcomes of one flip:

- a VmfsCryptError subclass (FormatError, KeyUnwrapError, ProviderError, KeyNotFoundError,
  DataError for "no key for this file"), or
- the very same DEK as before the flip, hence the same plaintext (e.g. `%2d` -> `%2D`, or the
  folder's default KEK reference, which only new files use); such flips are then also decrypted
  end to end and compared with the known plaintext.

Any other exception, or a different DEK that unwraps, fails the test.
"""

import base64
import hashlib
import json
import os

import pytest

from support import VmfsEnv
from vmfs_crypt.agent.broker import InProcessKeys
from vmfs_crypt.format.journal import recover
from vmfs_crypt.ops.lifecycle import cat_file
from vmfs_crypt.agent.service import KeyService
from vmfs_crypt.config import load_config
from vmfs_crypt.errors import (DataError, FormatError, KeyFilePermissionError, KeyUnwrapError, ProviderError,
                               VmfsCryptError)
from vmfs_crypt.format.descriptor import read_key_record
from vmfs_crypt.format.folder import FOLDER_KEYS_NAME, FolderKeys, VmFolder
from vmfs_crypt.format.keysafe import KeyRecord
from vmfs_crypt.providers.native import NativeKeyProvider
from vmfs_crypt.crypto.xts import SectorCipher

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
BITS = tuple(1 << b for b in range(8))  # every single-bit flip of every byte


class Store:
    """A private copy of the golden datastore and the right keys for it."""

    def __init__(self, base: str) -> None:
        env = VmfsEnv.golden(base)  # the files only: everything below runs in-process
        self.key_file = os.path.join(base, "config", "native-golden.key")
        self.config = load_config(env.config)
        self.vm = os.path.join(base, "ds", "vm1")
        self.folder = VmFolder(self.vm)
        with open(os.path.join(GOLDEN, "manifest.json")) as f:
            self.manifest = json.load(f)
        self.service = KeyService(self.config)
        self.deks = {name: self.dek_of(name, self.service) for name in self.encrypted_names()}
        for name in self.deks:
            assert self.plaintext_sha256(name) == self.manifest["files"][f"vm1/{name}"]["sha256"]

    def encrypted_names(self) -> list[str]:
        return [rel[4:] for rel, f in self.manifest["files"].items() if rel.startswith("vm1/") and f["role"] == "encrypted"]

    def dek_of(self, name: str, service: KeyService) -> bytes:
        """The lookup and unwrap of a mount or of `vmfs-crypt cat` (ops.lifecycle.cat_file, fs.core._key_record)."""
        record = self.folder.key_record_for(name)
        if record is None:
            raise DataError(f"{name}: no key in its descriptor or {FOLDER_KEYS_NAME}")
        return InProcessKeys(service).unwrap(record, name)

    def plaintext_sha256(self, name: str, service: KeyService | None = None) -> str:
        h = hashlib.sha256()
        cat_file(os.path.join(self.vm, name), InProcessKeys(service or self.service), h.update)
        return h.hexdigest()

    def write(self, name: str, data: bytes) -> None:
        with open(os.path.join(self.vm, name), "wb") as f:
            f.write(data)

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.vm, name), "rb") as f:
            return f.read()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(str(tmp_path_factory.mktemp("tamper")))


class Tally:
    def __init__(self) -> None:
        self.refused: dict[str, int] = {}
        self.same: list[str] = []
        self.bad: list[str] = []

    def run(self, where: str, fn) -> str:
        """Run one attempt (fn returns whether the unwrapped DEK is the right one); classify its outcome."""
        outcome = classify(fn)
        if outcome.startswith("refused"):
            name = outcome.split()[1]
            self.refused[name] = self.refused.get(name, 0) + 1
            if name == "VmfsCryptError":
                self.bad.append(f"{where}: the bare base class VmfsCryptError")
        elif outcome == "same":
            self.same.append(where)
        else:
            self.bad.append(f"{where}: {outcome}")
        return outcome

    def check(self) -> None:
        assert not self.bad, "\n".join(self.bad[:30])
        assert self.refused, "nothing was refused: the flips did not reach the parser"


def classify(fn) -> str:
    try:
        ok = fn()
    except VmfsCryptError as exc:
        return f"refused {type(exc).__name__}"
    except Exception as exc:  # noqa: BLE001 - exactly what these tests look for
        return f"unexpected {type(exc).__name__}: {exc}"
    return "same" if ok else "a WRONG key was accepted"


def _flips(data: bytes, start: int, end: int):
    for pos in range(start, end):
        for mask in BITS:
            out = bytearray(data)
            out[pos] ^= mask
            yield pos, mask, bytes(out)


def _line_span(raw: bytes, key: bytes) -> tuple[int, int]:
    start = raw.index(b"\n" + key) + 1
    return start, raw.index(b"\n", start) + 1  # the line and its LF


def _is_escape_digit(raw: bytes, pos: int) -> bool:
    """Is raw[pos] one of the two hex digits of a %-escape (whose case does not matter)?"""
    return b"%" in (raw[pos - 1:pos], raw[pos - 2:pos - 1])


FULL_PATH_EVERY = 37  # every so many flips, also write the file and go through VmFolder's lookup


@pytest.mark.parametrize("descriptor, extent", [("disk.vmdk", "disk-flat.vmdk"), ("thin.vmdk", "thin-flat.vmdk")])
def test_flip_descriptor_encryption_lines(store, descriptor, extent):
    original = store.read(descriptor)
    path = os.path.join(store.vm, descriptor)
    assert store.folder.descriptor_record_for(extent)[0] == descriptor
    want = store.deks[extent]
    tally = Tally()

    def direct(raw: bytes) -> bool:
        """VmFolder.descriptor_record_for's parse of the descriptor that names the extent, then the unwrap."""
        record = read_key_record(raw, path)
        if record is None:
            raise DataError("no key")
        return InProcessKeys(store.service).unwrap(record, extent) == want

    n = 0
    try:
        for key in (b"encryption.keySafe", b"encryption.data"):
            start, end = _line_span(original, key)
            for pos, mask, flipped in _flips(original, start, end):
                where = f"{descriptor} byte {pos} ^ {mask:#04x}"
                outcome = tally.run(where, lambda: direct(flipped))
                n += 1
                if outcome == "same" or n % FULL_PATH_EVERY == 0:
                    store.write(descriptor, flipped)
                    assert classify(lambda: store.dek_of(extent, store.service) == want) == outcome, where
                    if outcome == "same":
                        sha = store.plaintext_sha256(extent)
                        assert sha == store.manifest["files"][f"vm1/{extent}"]["sha256"], where
    finally:
        store.write(descriptor, original)
    tally.check()
    assert tally.refused.get("FormatError") and tally.refused.get("KeyUnwrapError")
    # The only harmless flips: the case of a %-escape's hex digit (%2d <-> %2D, %2f <-> %2F).
    for where in tally.same:
        assert _is_escape_digit(original, int(where.split()[2])), where


def test_flip_folder_key_file(store):
    original = store.read(FOLDER_KEYS_NAME)
    path = os.path.join(store.vm, FOLDER_KEYS_NAME)
    keyed_here = [n for n in store.deks if store.manifest["files"][f"vm1/{n}"]["key_in"] == FOLDER_KEYS_NAME]
    assert sorted(keyed_here) == ["sparse.vmdk", "vm1-small.bin", "vm1.nvram"]
    for name in keyed_here:
        assert store.folder.descriptor_record_for(name) is None  # so key_record_for = load_keys().files.get
    tally = Tally()

    def direct(parsed, name: str) -> bool:
        """VmFolder.key_record_for for a file without a descriptor: the folder key file's entry."""
        if isinstance(parsed, Exception):
            raise parsed
        record = parsed.files.get(name)
        if record is None:
            raise DataError("no key")
        return InProcessKeys(store.service).unwrap(record, name) == store.deks[name]

    n = 0
    try:
        for pos, mask, flipped in _flips(original, 0, len(original)):
            try:
                parsed = FolderKeys.from_bytes(flipped, path)  # VmFolder.load_keys, once for the three files
            except Exception as exc:  # noqa: BLE001 - classified per file below
                parsed = exc
            for name in keyed_here:
                where = f"{FOLDER_KEYS_NAME} byte {pos} ^ {mask:#04x} for {name}"
                outcome = tally.run(where, lambda: direct(parsed, name))
                n += 1
                if n % FULL_PATH_EVERY == 0:
                    store.write(FOLDER_KEYS_NAME, flipped)
                    assert classify(lambda: store.dek_of(name, store.service) == store.deks[name]) == outcome, where
    finally:
        store.write(FOLDER_KEYS_NAME, original)
    tally.check()
    assert tally.refused.get("FormatError") and tally.refused.get("KeyUnwrapError") and tally.refused.get("DataError")
    # Harmless for a file: a flip outside its own entry that keeps the JSON valid (another entry's
    # content, the folder's default KEK reference, which only new files use), or the case of a
    # %-escape digit inside its entry.
    spans = {}
    for name in keyed_here:
        a = original.index(f'"{name}": {{'.encode())
        spans[name] = (a, original.index(b"}", a) + 1)
    for where in tally.same:
        pos, name = int(where.split()[2]), where.split()[-1]
        a, b = spans[name]
        assert not a <= pos < b or _is_escape_digit(original, pos), where
    # End to end through `cat`: a changed default KEK reference leaves every file readable;
    # a renamed top-level member leaves none.
    kek_start = original.index(b'"kek": {')
    pos = original.index(b'"keyId": "') + len(b'"keyId": "')
    store.write(FOLDER_KEYS_NAME, original[:pos] + b"X" + original[pos + 1:])
    try:
        for name in keyed_here:
            assert store.plaintext_sha256(name) == store.manifest["files"][f"vm1/{name}"]["sha256"]
        pos = kek_start + 2
        store.write(FOLDER_KEYS_NAME, original[:pos] + b"E" + original[pos + 1:])
        for name in keyed_here:
            with pytest.raises(FormatError):
                store.plaintext_sha256(name)
    finally:
        store.write(FOLDER_KEYS_NAME, original)


def test_flip_native_key_file(store):
    with open(store.key_file, "rb") as f:
        original = f.read()
    rec = store.folder.key_record_for("disk-flat.vmdk")
    want = store.deks["disk-flat.vmdk"]
    primary = base64.b64decode(json.loads(original)["key"])
    tally = Tally()

    def attempt() -> bool:
        provider = NativeKeyProvider("golden", store.key_file)  # a fresh provider: no cached primary key
        return rec.open(provider.get_kek(rec.keysafe.kek.key_id), "disk-flat.vmdk") == want

    try:
        for pos, mask, flipped in _flips(original, 0, len(original)):
            with open(store.key_file, "wb") as f:
                f.write(flipped)
            if tally.run(f"key file byte {pos} ^ {mask:#04x}", attempt) == "same":
                # Harmless only if the primary key decodes to the same bytes (or a field we do not use changed).
                assert NativeKeyProvider("golden", store.key_file)._primary_key() == primary
                service = KeyService(store.config)
                assert store.plaintext_sha256("vm1.nvram", service) == \
                    store.manifest["files"]["vm1/vm1.nvram"]["sha256"]
    finally:
        with open(store.key_file, "wb") as f:
            f.write(original)
    tally.check()
    assert tally.refused.get("FormatError") and tally.refused.get("KeyUnwrapError")
    # The only flips that may be harmless: the informational "provider" member's value. (The set
    # below is an upper bound from the lenient 0.1.0 parser; the strict parser refuses the rest.)
    harmless = set()
    for token in (b'"features"', b'"provider": "golden"'):
        a = original.index(token)
        harmless |= set(range(a + 1, a + len(token) - 1))
    harmless.add(original.index(b'=",') - 1 if b'=",' in original else original.index(b'="') - 1)
    for where in tally.same:
        assert int(where.split()[3]) in harmless, where


def test_key_file_permissions(store):
    provider = lambda: NativeKeyProvider("golden", store.key_file)  # noqa: E731
    try:
        for mode in (0o640, 0o604, 0o660, 0o644, 0o602, 0o610):
            os.chmod(store.key_file, mode)
            with pytest.raises(KeyFilePermissionError):
                provider().get_kek("00112233445566778899aabbccddeeff")
        os.chmod(store.key_file, 0o400)
        provider().get_kek("00112233445566778899aabbccddeeff")
    finally:
        os.chmod(store.key_file, 0o600)


def _swap_line(raw: bytes, key: bytes, new_line: bytes) -> bytes:
    start, end = _line_span(raw, key)
    return raw[:start] + new_line + raw[end:]


def test_keysafe_pasted_into_another_descriptor_is_refused(store):
    disk, thin = store.read("disk.vmdk"), store.read("thin.vmdk")
    s, e = _line_span(disk, b"encryption.keySafe")
    try:
        store.write("thin.vmdk", _swap_line(thin, b"encryption.keySafe", disk[s:e]))
        with pytest.raises(KeyUnwrapError):
            store.dek_of("thin-flat.vmdk", store.service)
        s, e = _line_span(disk, b"encryption.data")
        store.write("thin.vmdk", _swap_line(thin, b"encryption.data", disk[s:e]))
        with pytest.raises(KeyUnwrapError):
            store.dek_of("thin-flat.vmdk", store.service)
    finally:
        store.write("thin.vmdk", thin)
    assert store.dek_of("thin-flat.vmdk", store.service) == store.deks["thin-flat.vmdk"]


def test_keysafe_pasted_between_folder_key_entries_is_refused(store):
    original = store.read(FOLDER_KEYS_NAME)
    doc = json.loads(original)
    doc["files"]["vm1.nvram"]["keySafe"] = doc["files"]["vm1-small.bin"]["keySafe"]
    try:
        store.write(FOLDER_KEYS_NAME, json.dumps(doc).encode())
        with pytest.raises(KeyUnwrapError):
            store.dek_of("vm1.nvram", store.service)
        assert store.dek_of("vm1-small.bin", store.service) == store.deks["vm1-small.bin"]
        # The descriptor's keySafe with an entry's data record: refused as well.
        disk = store.read("disk.vmdk")
        s, e = _line_span(disk, b"encryption.keySafe")
        doc = json.loads(original)
        doc["files"]["vm1.nvram"]["keySafe"] = disk[s:e].decode().split('"')[1]
        store.write(FOLDER_KEYS_NAME, json.dumps(doc).encode())
        with pytest.raises(KeyUnwrapError):
            store.dek_of("vm1.nvram", store.service)
    finally:
        store.write(FOLDER_KEYS_NAME, original)


def test_wrong_kek_is_refused(store, tmp_path):
    # Another primary key under the same provider name: every unwrap fails.
    other_key = str(tmp_path / "other.key")
    NativeKeyProvider.generate("golden", other_key)
    rec = store.folder.key_record_for("disk-flat.vmdk")
    with pytest.raises(KeyUnwrapError):
        rec.open(NativeKeyProvider("golden", other_key).get_kek(rec.keysafe.kek.key_id), "t")
    # The right primary key, another key id: another KEK.
    with pytest.raises(KeyUnwrapError):
        rec.open(NativeKeyProvider("golden", store.key_file).get_kek("0" * 32), "t")
    # A configuration that does not know the provider named in the locator.
    cfg = tmp_path / "cfg" / "config.toml"
    cfg.parent.mkdir()
    cfg.write_text(f'version = 1\n[providers.elsewhere]\ntype = "native"\nkey_file = "{store.key_file}"\n')
    with pytest.raises(ProviderError):
        store.dek_of("disk-flat.vmdk", KeyService(load_config(str(cfg))))


# -- no key bytes in any repr ------------------------------------------------------------------------
def _secret_forms(secret: bytes) -> list[str]:
    return [secret.hex(), secret[:8].hex(), secret[-8:].hex(), base64.b64encode(secret).decode(),
            base64.b64encode(secret[:9]).decode(), repr(secret)[2:20]]


def test_reprs_never_show_key_bytes(store):
    provider = NativeKeyProvider("golden", store.key_file)
    primary = provider._primary_key()
    rec = store.folder.key_record_for("disk-flat.vmdk")
    kek = provider.get_kek(rec.keysafe.kek.key_id)
    dek = rec.open(kek, "t")
    keys = store.folder.load_keys()
    texts = [repr(rec), str(rec), repr(rec.keysafe), str(rec.keysafe), repr(rec.data), str(rec.data),
             repr(SectorCipher(dek)), str(SectorCipher(dek)), repr(provider), str(provider), repr(keys),
             repr(keys.files), repr(rec.keysafe.kek), str(rec.keysafe.kek)]
    secrets = {"primary key": primary, "KEK": kek, "DEK": dek, "DEK half 2": dek[32:],
               "wrapped DEK": rec.keysafe.wrapped}
    for text in texts:
        assert "b'" not in text and 'b"' not in text, text
        for what, secret in secrets.items():
            for form in _secret_forms(secret):
                assert form not in text, f"{what} shows in {text[:80]}"
    # Error messages of refused unwraps name the disk and the key id, never key bytes.
    for exc_source in (lambda: rec.open(bytes(32), "disk-flat.vmdk"),
                       lambda: KeyRecord(rec.keysafe, keys.files["vm1.nvram"].data).open(kek, "disk-flat.vmdk")):
        with pytest.raises(KeyUnwrapError) as err:
            exc_source()
        for what, secret in secrets.items():
            for form in _secret_forms(secret):
                assert form not in str(err.value), what


# -- crafted metadata that once escaped as a Python error: now clean FormatErrors --------------------
def _b64json(obj) -> str:
    return base64.b64encode(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).decode()


@pytest.mark.parametrize("feature", [[], {}])
def test_unhashable_feature_is_a_format_error(store, feature):
    from vmfs_crypt.format.keysafe import EncryptionData

    with pytest.raises(FormatError):
        EncryptionData.decode(_b64json({"cipher": "aes-xts-plain64", "features": [feature], "id": "0" * 32,
                                        "sectorSize": 512, "version": 1}), "t")
    doc = json.loads(store.read(FOLDER_KEYS_NAME))
    doc["features"] = [feature]
    with pytest.raises(FormatError):
        FolderKeys.from_bytes(json.dumps(doc).encode(), "t")


@pytest.mark.parametrize("journal", [
    {"version": 1, "renames": [[".vmfs-crypt-tmp.x", "../escaped"]], "keys": None},
    {"version": 1, "keys": None},
    {"version": 2, "renames": [], "keys": None},
    {"version": 1, "renames": [], "keys": "not a folder key file"},
])
def test_a_bad_journal_is_refused_and_changes_nothing(tmp_path, journal):
    from vmfs_crypt.format.folder import JOURNAL_NAME

    folder = tmp_path / "vm"
    folder.mkdir()
    keys = b'{"features": [], "files": {}, "format": "vmfs-crypt-folder", "kek": {"keyId": "k", "provider": "p"}, ' \
           b'"version": 1}'
    (folder / FOLDER_KEYS_NAME).write_bytes(keys)
    (folder / ".vmfs-crypt-tmp.x").write_bytes(b"x")
    (folder / JOURNAL_NAME).write_text(json.dumps(journal))
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        with pytest.raises(FormatError):
            recover(VmFolder(str(folder)))
    finally:
        assert sorted(p.name for p in tmp_path.rglob("*")) == before
        assert (folder / FOLDER_KEYS_NAME).read_bytes() == keys


@pytest.mark.parametrize("change", [{"kdf": "scrypt"}, {"nonce": ""}, {"kdf": {"name": "scrypt", "n": 2, "r": 1,
                                                                              "p": 1, "salt": "AAAA"}, "nonce": ""}])
def test_a_damaged_backup_is_a_clean_error(tmp_path, change):
    doc = {"format": "vmfs-crypt-native-backup", "version": 1, "features": [], "provider": "p",
           "kdf": {"name": "scrypt", "n": 2, "r": 1, "p": 1, "salt": "AAAA"}, "nonce": "AAAAAAAAAAAAAAAA",
           "sealed": base64.b64encode(bytes(48)).decode()}
    doc.update(change)
    backup = tmp_path / "backup.json"
    backup.write_text(json.dumps(doc))
    with pytest.raises(VmfsCryptError):
        NativeKeyProvider.restore("p", str(tmp_path / "p.key"), str(backup), b"passphrase")
