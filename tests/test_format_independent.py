"""docs/FORMAT.md is enough to decrypt a disk: an implementation written from that document alone.

Everything in the section "independent implementation" below uses only the standard library
(re, base64, json) and plain `cryptography` calls (HKDF, aes_key_unwrap, AES-XTS); it imports
nothing from vmfs_crypt. The disks it decrypts are written by the real vmfs-crypt CLI (and by
QEMU), or come from the golden datastore written by vmfs-crypt 0.1.0. It also recomputes the
test vectors printed in FORMAT.md.
"""

import base64
import hashlib
import json
import os
import re

import pytest
from support import mounted
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap, aes_key_wrap

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
FORMAT_MD = os.path.join(REPO, "docs", "FORMAT.md")
GOLDEN = os.path.join(HERE, "golden")


# ==== independent implementation (from docs/FORMAT.md only) ==================================
class Refused(Exception):
    """The document says: reject."""


SECTOR = 512
DEK_WRAP_INFO = b"vmfs-crypt dek wrap v1\x00"     # section 4.2
NATIVE_KEK_INFO = b"vmfs-crypt native kek v1\x00"  # section 8.3
WRAP_ALG = "AES-256-KW-HKDF-SHA-256"
LOCATOR = re.compile(r"vmware:key/list/\(pair/\(fqid/([^/,()]*)/([^/,()]*)/([^/,()]*),([^/,()]*),([^/,()]*)\)\)")
SAFE = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.<>+")
ENC_LINE = re.compile(rb"^[ \t]*encryption\.[^\n]*(?:\n|$)", re.M)
ENC_KV = re.compile(r'^[ \t]*(encryption\.[A-Za-z]+)[ \t]*=[ \t]*"([^"]*)"[ \t]*\r?$')
EXTENT = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)\s+"([^"]+)"(?:\s+(\d+))?', re.M)
PLAINTEXT_SUFFIXES = (".log", ".vmx", ".vmxf", ".vmsd", ".vmtx", ".hlog", ".lck")
OPS = ("encrypt", "decrypt", "rekey")


def hkdf32(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(ikm)


def b64(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9+/]*={0,2}", text) or len(text) % 4:
        raise Refused("not base64")
    return base64.b64decode(text)


def native_kek(key_file_bytes: bytes, key_id: str) -> bytes:
    doc = json.loads(key_file_bytes.decode("utf-8"))
    if doc.get("format") != "vmfs-crypt-native-key" or doc.get("version") != 1 or doc.get("features", []) != []:
        raise Refused("not a version 1 native key file")
    primary = b64(doc["key"])
    if len(primary) != 32:
        raise Refused("primary key is not 32 bytes")
    return hkdf32(primary, NATIVE_KEK_INFO + key_id.encode("utf-8"))


def escape(text: str) -> str:
    return "".join(ch if ch in SAFE else "".join(f"%{b:02x}" for b in ch.encode()) for ch in text)


def unescape(field: str) -> str:
    out, i = bytearray(), 0
    while i < len(field):
        if field[i] == "%":
            pair = field[i + 1:i + 3]
            if not re.fullmatch(r"[0-9a-fA-F]{2}", pair):
                raise Refused("bad %-escape")
            out.append(int(pair, 16))
            i += 3
        else:
            out += field[i].encode()
            i += 1
    return out.decode("utf-8")


def parse_locator(text: str) -> tuple[str, str, bytes]:
    m = LOCATOR.fullmatch(text)
    if not m:
        raise Refused("not a key locator")
    null, provider, key_id, alg, blob = (unescape(g) for g in m.groups())
    if null != "<VMWARE-NULL>" or not provider or not key_id or alg != WRAP_ALG:
        raise Refused("bad locator fields")
    wrapped = b64(blob)
    if len(wrapped) != 72:
        raise Refused("wrapped key is not 72 bytes")
    return provider, key_id, wrapped


def parse_data(text: str) -> bytes:
    raw = b64(text)
    rec = json.loads(raw.decode("utf-8"))
    if (not isinstance(rec, dict) or rec.get("version") != 1 or rec.get("features") != []
            or set(rec) != {"cipher", "features", "id", "sectorSize", "version"}
            or rec["cipher"] != "aes-xts-plain64" or rec["sectorSize"] != 512
            or not re.fullmatch(r"[0-9a-f]{32}", rec["id"])):
        raise Refused("bad data record")
    return raw


def unwrap(kek: bytes, wrapped: bytes, record_bytes: bytes) -> bytes:
    dek = aes_key_unwrap(hkdf32(kek, DEK_WRAP_INFO + record_bytes), wrapped)
    if dek[:32] == dek[32:]:
        raise Refused("DEK halves are equal")
    return dek


def xts_unit(dek: bytes, sector_no: int, data: bytes, encrypt: bool) -> bytes:
    """One data unit (section 3.2/3.3): a whole sector, or a partial last sector."""
    tweak = sector_no.to_bytes(16, "little")
    if len(data) >= 16:
        cipher = Cipher(algorithms.AES(dek), modes.XTS(tweak))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        return ctx.update(data) + ctx.finalize()
    pad = Cipher(algorithms.AES(dek), modes.XTS(tweak)).encryptor().update(bytes(16))
    return bytes(a ^ b for a, b in zip(data, pad))


def decrypt_file(dek: bytes, backing: bytes) -> bytes:
    out = bytearray()
    for i in range(0, len(backing), SECTOR):
        unit = backing[i:i + SECTOR]
        is_hole = not any(unit) and len(unit) >= 16  # section 3.4: short last sectors are never holes
        out += bytes(len(unit)) if is_hole else xts_unit(dek, i // SECTOR, unit, encrypt=False)
    return bytes(out)


def key_lines(descriptor: bytes) -> dict[str, str] | None:
    values = {}
    for line in ENC_LINE.findall(descriptor):
        m = ENC_KV.fullmatch(line.rstrip(b"\n").decode("utf-8", "replace"))
        if not m or m[1] not in ("encryption.keySafe", "encryption.data") or m[1] in values:
            raise Refused("bad encryption line")
        values[m[1]] = m[2]
    if values and len(values) != 2:
        raise Refused("only one encryption line")
    return values or None


def is_descriptor(folder: str, name: str) -> bool:
    path = os.path.join(folder, name)
    if not name.lower().endswith(".vmdk") or not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        return f.read(21) == b"# Disk DescriptorFile"


def is_encrypted(folder: str, name: str) -> bool:
    """Section 7.1/7.2."""
    if not os.path.isfile(os.path.join(folder, ".vmfs-crypt.json")):
        return False
    return not (name.startswith(".vmfs-crypt") or name.lower().endswith(PLAINTEXT_SUFFIXES)
                or is_descriptor(folder, name))


def find_key(folder: str, name: str) -> tuple[str, str, str]:
    """(keySafe, data, where) of a file (section 7.4)."""
    for entry in sorted(os.listdir(folder)):
        if entry == name or not is_descriptor(folder, entry):
            continue
        with open(os.path.join(folder, entry), "rb") as f:
            raw = f.read(1 << 20)
        names = [m[4] for m in EXTENT.finditer(raw.rstrip(b"\0").decode("utf-8", "replace"))]
        lines = key_lines(raw) if b"encryption." in raw else None
        if name in names and lines:
            return lines["encryption.keySafe"], lines["encryption.data"], entry
    keys = folder_keys(folder)
    entry = keys["files"][name]
    return entry["keySafe"], entry["data"], ".vmfs-crypt.json"


def folder_keys(folder: str) -> dict:
    """The folder key file (section 7.3), with its in-place operation checked if it has one (7.8)."""
    with open(os.path.join(folder, ".vmfs-crypt.json"), "rb") as f:
        keys = json.loads(f.read().decode("utf-8"))
    if keys.get("format") != "vmfs-crypt-folder" or keys.get("version") != 1 or type(keys["version"]) is not int:
        raise Refused("not a version 1 folder key file")
    if keys.get("features") == ["reencrypt"]:
        parse_in_flight(keys)
    elif keys.get("features") != [] or set(keys) != {"format", "version", "features", "kek", "files"}:
        raise Refused("unknown features or members")
    return keys


# -- section 7.8: a folder in the middle of an in-place re-encryption ----------------------------
SIDECAR = ".vmfs-crypt-region"


def parse_in_flight(doc: dict) -> dict:
    """The `reencrypt` member of a folder key file, checked by the MUST-reject rules of 7.3 and 7.8."""
    if doc.get("features") != ["reencrypt"] or set(doc) != {"format", "version", "features", "kek", "files", "reencrypt"}:
        raise Refused("the feature and the member go together")
    st = doc["reencrypt"]
    members = {"op", "regionSize", "kek", "files"}
    if not isinstance(st, dict) or set(st) - {"aborting"} != members or st["op"] not in OPS:
        raise Refused("bad reencrypt member")
    if "aborting" in st and st["aborting"] is not True:  # optional; when present exactly true
        raise Refused("aborting is not true")
    region = st["regionSize"]
    if type(region) is not int or region % SECTOR or not SECTOR <= region <= 1 << 30:
        raise Refused("bad regionSize")
    if (st["kek"] is None) != (st["op"] == "decrypt"):
        raise Refused("kek is null exactly for decrypt")
    if not isinstance(st["files"], list) or not st["files"]:
        raise Refused("no files")
    names, started = set(), False
    for fs in st["files"]:
        if not isinstance(fs, dict) or set(fs) != {"name", "size", "boundary", "from", "to", "descriptor"}:
            raise Refused("bad file state")
        name, size, b = fs["name"], fs["size"], fs["boundary"]
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or name in names:
            raise Refused("bad or repeated name")
        names.add(name)
        if type(size) is not int or type(b) is not int or not 0 <= b <= size or (b != size and b % region):
            raise Refused("bad boundary")
        if started and b:
            raise Refused("a later file was started first")
        started = started or b < size
        if (fs["from"] is None) != (st["op"] == "encrypt") or (fs["to"] is None) != (st["op"] == "decrypt"):
            raise Refused("from/to null for the wrong op")
        if fs["from"] is None and name in doc["files"] or fs["from"] is not None and doc["files"].get(name) != fs["from"]:
            raise Refused("files[name] is not the from record")
    return st


def region_in_flight(st: dict, fs: dict) -> tuple[int, int]:
    """(offset, length) of fs's region that may be in flight: at its boundary B, or, aborting, the one below it."""
    b, r = fs["boundary"], st["regionSize"]
    if st.get("aborting"):
        lo = (b - 1) // r * r if b else 0
        return lo, b - lo
    return b, min(r, fs["size"] - b)


def valid_sidecar(folder: str, st: dict, fs: dict) -> bytes | None:
    """The saved bytes of fs's region in flight, if the sidecar is valid for it (else it is ignored)."""
    if st.get("aborting"):  # the current file: the last one with a boundary above 0
        current = next((f for f in reversed(st["files"]) if f["boundary"] > 0), None)
    else:
        current = next((f for f in st["files"] if f["boundary"] < f["size"]), None)
    if current is not fs:
        return None
    try:
        with open(os.path.join(folder, SIDECAR), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    head, lf, body = raw.partition(b"\n")
    try:
        h = json.loads(head.decode("utf-8"))
    except ValueError:
        return None
    off, n = region_in_flight(st, fs)
    if (not lf or not isinstance(h, dict) or set(h) != {"file", "format", "length", "offset", "sha256", "version"}
            or h["format"] != "vmfs-crypt-region" or h["version"] != 1 or h["file"] != fs["name"]
            or h["offset"] != off or h["length"] != n or len(body) != n
            or h["sha256"] != hashlib.sha256(body).hexdigest()):
        return None
    return body


def entry_dek(entry: dict, key_files: dict[str, bytes]) -> bytes:
    provider, key_id, wrapped = parse_locator(entry["keySafe"])
    return unwrap(native_kek(key_files[provider], key_id), wrapped, parse_data(entry["data"]))


def read_in_flight(folder: str, name: str, key_files: dict[str, bytes]) -> bytes:
    """7.8 "Reading a sector": in a valid sidecar's region from it (under `from`; aborting, under `to`), else
    below the boundary (or all of a finished file) under `to`, else under `from`."""
    doc = folder_keys(folder)
    st = parse_in_flight(doc)
    fs = next(f for f in st["files"] if f["name"] == name)
    for entry in sorted(os.listdir(folder)):
        if is_descriptor(folder, entry):
            with open(os.path.join(folder, entry), "rb") as f:
                raw = f.read(1 << 20)
            if key_lines(raw) and name in [m[4] for m in EXTENT.finditer(raw.rstrip(b"\0").decode("utf-8", "replace"))]:
                raise Refused("a descriptor keys a file of the operation")
    with open(os.path.join(folder, name), "rb") as f:
        backing = f.read()
    if len(backing) < fs["size"]:
        raise Refused("the file is shorter than the state's size")
    # a finished file is all under `to`, bytes past `size` included (it may grow online)
    b = len(backing) if fs["boundary"] == fs["size"] else fs["boundary"]
    saved = valid_sidecar(folder, st, fs)
    off = region_in_flight(st, fs)[0]
    saved_side = "to" if st.get("aborting") else "from"  # the bytes as they were before the region's rewrite
    deks = {side: entry_dek(fs[side], key_files) if fs[side] is not None else None for side in ("from", "to")}
    out = bytearray()
    for i in range(0, len(backing), SECTOR):
        if saved is not None and off <= i < off + len(saved):
            unit, dek = saved[i - off:i - off + SECTOR], deks[saved_side]
        elif i < b:
            unit, dek = backing[i:i + SECTOR], deks["to"]
        else:
            unit, dek = backing[i:i + SECTOR], deks["from"]
        hole = not any(unit) and len(unit) >= 16
        out += unit if dek is None else bytes(len(unit)) if hole else xts_unit(dek, i // SECTOR, unit, encrypt=False)
    return bytes(out)


def read_plaintext(folder: str, name: str, key_files: dict[str, bytes]) -> tuple[bytes, str]:
    """A file's plaintext and where its key was found; key_files maps provider id -> native key file bytes."""
    with open(os.path.join(folder, name), "rb") as f:
        backing = f.read()
    if not is_encrypted(folder, name):
        if is_descriptor(folder, name):
            return ENC_LINE.sub(b"", backing), "-"  # section 6.3: the plaintext view
        return backing, "-"
    keys = folder_keys(folder)
    if "reencrypt" in keys and any(f["name"] == name for f in keys["reencrypt"]["files"]):
        return read_in_flight(folder, name, key_files), "reencrypt"
    keysafe, data, where = find_key(folder, name)
    provider, key_id, wrapped = parse_locator(keysafe)
    kek = native_kek(key_files[provider], key_id)
    return decrypt_file(unwrap(kek, wrapped, parse_data(data)), backing), where


def apply_journal(folder: str) -> str:
    """Section 7.6, before a folder is used: roll a journal forward, else delete the leftovers. What it did."""
    def remove_leftovers() -> None:
        for name in os.listdir(folder):
            if name.startswith((".vmfs-crypt-tmp.", ".vmfs-crypt-atomic.", "..vmfs-crypt")):
                os.unlink(os.path.join(folder, name))

    path = os.path.join(folder, ".vmfs-crypt-journal.json")
    if not os.path.exists(path):
        remove_leftovers()
        return "no journal"
    with open(path, "rb") as f:
        doc = json.loads(f.read().decode("utf-8"))
    if set(doc) != {"version", "renames", "keys"} or doc["version"] != 1 or type(doc["version"]) is not int:
        raise Refused("not a journal")
    for pair in doc["renames"]:
        if (not isinstance(pair, list) or len(pair) != 2 or pair[0] != ".vmfs-crypt-tmp." + pair[1]
                or "/" in pair[1] or pair[1].startswith((".vmfs-crypt", "..vmfs-crypt"))):
            raise Refused("a rename the journal may not make")
    if doc["keys"] is not None:
        with open(os.path.join(folder, ".vmfs-crypt.json"), "wb") as f:
            f.write(doc["keys"].encode("utf-8"))
    for tmp, final in doc["renames"]:
        if os.path.exists(os.path.join(folder, tmp)):
            os.replace(os.path.join(folder, tmp), os.path.join(folder, final))
    if doc["keys"] is None and os.path.exists(os.path.join(folder, ".vmfs-crypt.json")):
        os.unlink(os.path.join(folder, ".vmfs-crypt.json"))
    os.unlink(path)
    remove_leftovers()  # no journal now: what is left is the killed writer's
    return "rolled forward"


# ==== the test vectors of FORMAT.md ==========================================================
def format_vectors() -> dict[str, str]:
    with open(FORMAT_MD, encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"<!-- test-vectors:begin -->\n```text\n(.*?)\n```\n<!-- test-vectors:end -->", text, re.S)
    assert block, "docs/FORMAT.md lost its test vector block"
    vectors: dict[str, str] = {}
    name = None
    for line in block.group(1).split("\n"):
        if line.startswith(" "):
            vectors[name] += line.strip()  # a hex value continued
        else:
            name, value = line.split(" = ", 1)
            name = name.strip()
            vectors[name] = value
    return vectors


def test_format_md_vectors():
    v = format_vectors()
    h = bytes.fromhex
    kek = native_kek(json.dumps({"format": "vmfs-crypt-native-key", "version": 1, "features": [],
                                 "provider": "local",
                                 "key": base64.b64encode(h(v["native primary key"])).decode()}).encode(),
                     v["native key id"])
    assert kek.hex() == v["KEK"]
    dek = h(v["DEK"])
    assert len(dek) == 64
    record = v["encryption.data JSON"].encode("ascii")
    assert len(record) == 111
    assert json.loads(record)["id"] == "000102030405060708090a0b0c0d0e0f"
    wk = hkdf32(kek, DEK_WRAP_INFO + record)
    assert wk.hex() == v["wrapping key"]
    wrapped = aes_key_wrap(wk, dek)
    assert wrapped.hex() == v["wrapped DEK"]

    blob = base64.b64encode(wrapped).decode()
    locator = (f"vmware:key/list/(pair/(fqid/{escape('<VMWARE-NULL>')}/{escape('local')}/{escape(v['native key id'])}"
               f",{escape(WRAP_ALG)},{escape(blob)}))")
    assert v["keySafe line"] == f'encryption.keySafe = "{locator}"'
    assert v["data line"] == f'encryption.data = "{base64.b64encode(record).decode()}"'

    # ... and the other way round: parse the two lines as a reader does.
    lines = key_lines((f"# Disk DescriptorFile\n{v['keySafe line']}\n{v['data line']}\nversion=1\n").encode())
    provider, key_id, wrapped2 = parse_locator(lines["encryption.keySafe"])
    assert (provider, key_id, wrapped2) == ("local", v["native key id"], wrapped)
    assert unwrap(kek, wrapped2, parse_data(lines["encryption.data"])) == dek

    pt = h(v["sector plaintext"])
    assert pt == bytes(i & 0xFF for i in range(512))
    for s in (0, 2**32):
        ct = h(v[f"ciphertext of sector {s}"])
        assert xts_unit(dek, s, pt, encrypt=True) == ct
        assert xts_unit(dek, s, ct, encrypt=False) == pt
    assert decrypt_file(dek, h(v["ciphertext of sector 0"]) + bytes(512)) == pt + bytes(512)  # + a hole
    assert h(v["ciphertext of sector 0"]) != h(v["ciphertext of sector 4294967296"])
    for s, n in ((3, 20), (5, 5)):
        ppt, pct = h(v[f"partial sector {s} plaintext"]), h(v[f"partial sector {s} ciphertext"])
        assert ppt == pt[:n] and len(pct) == n
        assert xts_unit(dek, s, ppt, encrypt=True) == pct
        assert xts_unit(dek, s, pct, encrypt=False) == ppt
    # A partial sector of >= 16 bytes is XTS with ciphertext stealing: not a prefix of the whole
    # sector's ciphertext; one of < 16 bytes is the XOR pad (a prefix of XTS of zeros).
    pad = xts_unit(dek, 5, bytes(16), encrypt=True)
    assert h(v["partial sector 5 ciphertext"]) == bytes(a ^ b for a, b in zip(pt[:5], pad))


def test_reader_refuses_a_pasted_keysafe():
    """Section 4.3, with the vectors: the keySafe with another disk's data record does not unwrap."""
    v = format_vectors()
    kek = bytes.fromhex(v["KEK"])
    _, _, wrapped = parse_locator(v["keySafe line"].split('"')[1])
    other = v["encryption.data JSON"].replace("000102030405060708090a0b0c0d0e0f", "f" * 32).encode()
    with pytest.raises(Exception) as err:
        unwrap(kek, wrapped, other)
    assert type(err.value).__name__ == "InvalidUnwrap"


def _vector_block(marker: str, what: str, values: dict[str, str]) -> tuple[dict, dict[str, str]]:
    """A FORMAT.md vector between `<!-- MARKER:begin/end -->`: its JSON, and its named values added to `values`."""
    with open(FORMAT_MD, encoding="utf-8") as f:
        text = f.read()
    block = re.search(rf"<!-- {marker}:begin -->\n```json\n(.*?)```\n\n```text\n(.*?)\n```\n"
                      rf"<!-- {marker}:end -->", text, re.S)
    assert block, f"docs/FORMAT.md lost its {what}"
    name = None
    for line in block.group(2).split("\n"):
        if line.startswith(" "):
            values[name] += line.strip()
        else:
            name, value = (part.strip() for part in line.split(" = ", 1))
            values[name] = value
    return json.loads(block.group(1)), values


def reencrypt_vector() -> tuple[dict, dict[str, str]]:
    """FORMAT.md 9.4: (the folder key file, the named values)."""
    return _vector_block("reencrypt-vectors", "re-encryption vector", {})


def vector_folder(path: str, doc: dict, v: dict[str, str], sidecar_tail: bytes = b"") -> dict[str, bytes]:
    """Lay the vector out as a folder (key file, file, sidecar); returns the native key file for its provider."""
    os.makedirs(path)
    with open(os.path.join(path, ".vmfs-crypt.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f)
    sectors = [bytes(512) if v[f"backing sector {i}"] == "zeros (a hole)" else bytes.fromhex(v[f"backing sector {i}"])
               for i in range(8)]
    with open(os.path.join(path, "vm1.nvram"), "wb") as f:
        f.write(b"".join(sectors))
    with open(os.path.join(path, SIDECAR), "wb") as f:
        f.write(v["sidecar header line"].encode() + b"\n" + bytes.fromhex(v["sidecar sector 0"] + v["sidecar sector 1"])
                + sidecar_tail)
    primary = base64.b64encode(bytes.fromhex(v["native primary key"])).decode()
    return {"local": json.dumps({"format": "vmfs-crypt-native-key", "version": 1, "features": [], "provider": "local",
                                 "key": primary}).encode()}


def vector_plaintext_in_flight() -> bytes:
    """FORMAT.md 9.4: byte j of sector i is (j + 16 i) mod 256, sector 6 all zero."""
    return b"".join(bytes(512) if i == 6 else bytes((j + 16 * i) & 0xFF for j in range(512)) for i in range(8))


def test_format_md_reencrypt_vector(tmp_path):
    """A deep rekey stopped inside region 3 (FORMAT.md 9.4) decrypts by section 7.8 alone."""
    doc, v = reencrypt_vector()
    key_files = vector_folder(str(tmp_path / "vm1"), doc, v)
    vm = str(tmp_path / "vm1")
    st = parse_in_flight(doc)
    fs = st["files"][0]
    assert (st["op"], st["regionSize"], fs["name"], fs["size"], fs["boundary"]) == ("rekey", 1024, "vm1.nvram", 4096, 2048)
    for side in ("old", "new"):
        assert native_kek(key_files["local"], v[f"{side} KEK key id"]).hex() == v[f"{side} KEK"]
    old, new = entry_dek(fs["from"], key_files), entry_dek(fs["to"], key_files)
    assert (old.hex(), new.hex()) == (v["old DEK"], v["new DEK"])
    assert fs["from"] == doc["files"]["vm1.nvram"] and st["kek"]["keyId"] == v["new KEK key id"]
    assert parse_locator(fs["from"]["keySafe"])[1] == v["old KEK key id"] == doc["kek"]["keyId"]

    plain = vector_plaintext_in_flight()
    # Each backing sector is what the text says: 0-4 under the new DEK (4: the half of region 3
    # rewritten before the crash), 5 and 7 under the old one, 6 a hole; the sidecar holds region 3's old bytes.
    with open(os.path.join(vm, "vm1.nvram"), "rb") as f:
        backing = f.read()
    for i in range(8):
        unit = backing[i * 512:(i + 1) * 512]
        want = bytes(512) if i == 6 else xts_unit(new if i <= 4 else old, i, plain[i * 512:(i + 1) * 512], True)
        assert unit == want, f"backing sector {i}"
    saved = valid_sidecar(vm, st, fs)
    assert saved == xts_unit(old, 4, plain[2048:2560], True) + xts_unit(old, 5, plain[2560:3072], True)
    assert hashlib.sha256(saved).hexdigest() == json.loads(v["sidecar header line"])["sha256"]

    got, where = read_plaintext(vm, "vm1.nvram", key_files)
    assert where == "reencrypt" and got == plain
    # Without the sidecar's old bytes, sector 4 (already under the new DEK) would be misread under the old one.
    assert decrypt_file(old, backing)[2048:2560] != plain[2048:2560]


def abort_vector() -> tuple[dict, dict[str, str]]:
    """FORMAT.md 9.5: (the folder key file, the named values; the keys are those of 9.4)."""
    return _vector_block("abort-vectors", "abort vector", dict(reencrypt_vector()[1]))


def test_format_md_abort_vector(tmp_path):
    """The deep rekey of 9.4 being aborted, stopped inside the abort's first region (FORMAT.md 9.5): decrypts by
    7.8's aborting rule alone (the sidecar covers [L, B) and holds its bytes under `to`)."""
    doc, v = abort_vector()
    vm = str(tmp_path / "vm1")
    key_files = vector_folder(vm, doc, v)
    st = parse_in_flight(doc)
    fs = st["files"][0]
    assert st["aborting"] is True and (fs["boundary"], region_in_flight(st, fs)) == (2048, (1024, 1024))
    old, new = entry_dek(fs["from"], key_files), entry_dek(fs["to"], key_files)
    plain = vector_plaintext_in_flight()
    with open(os.path.join(vm, "vm1.nvram"), "rb") as f:
        backing = f.read()
    for i in range(8):  # 0, 1 and 3 under the new DEK, 2 (the half rewritten back) and 4-7 under the old one
        unit = backing[i * 512:(i + 1) * 512]
        want = bytes(512) if i == 6 else xts_unit(new if i in (0, 1, 3) else old, i, plain[i * 512:(i + 1) * 512], True)
        assert unit == want, f"backing sector {i}"
    saved = valid_sidecar(vm, st, fs)
    assert saved == xts_unit(new, 2, plain[1024:1536], True) + xts_unit(new, 3, plain[1536:2048], True)
    got, where = read_plaintext(vm, "vm1.nvram", key_files)
    assert where == "reencrypt" and got == plain
    # By the forward rule (no `aborting`), sector 2 would be misread under the new key: the member matters.
    forward = json.loads(json.dumps(doc))
    del forward["reencrypt"]["aborting"]
    vector_folder(str(tmp_path / "fwd"), forward, v)
    assert read_plaintext(str(tmp_path / "fwd"), "vm1.nvram", key_files)[0][1024:1536] != plain[1024:1536]


@pytest.mark.parametrize("tail", [b"x", b""], ids=["sidecar with a byte too many", "sidecar for another offset"])
def test_an_invalid_sidecar_is_ignored(tmp_path, tail):
    """7.8: a sidecar that is not valid (torn, or left from an earlier region) is ignored, and then the
    vector's half-rewritten sector 4 is read from the backing file under the old key (garbage, as the text says)."""
    doc, v = reencrypt_vector()
    if not tail:
        v = dict(v, **{"sidecar header line": v["sidecar header line"].replace('"offset": 2048', '"offset": 1024')})
    vm = str(tmp_path / "vm1")
    key_files = vector_folder(vm, doc, v, tail)
    assert valid_sidecar(vm, parse_in_flight(doc), doc["reencrypt"]["files"][0]) is None
    got = read_in_flight(vm, "vm1.nvram", key_files)
    plain = vector_plaintext_in_flight()
    assert got[:2048] == plain[:2048] and got[2560:] == plain[2560:] and got[2048:2560] != plain[2048:2560]


def _state_mutations():
    yield "boundary off the region grid", lambda d: d["reencrypt"]["files"][0].__setitem__("boundary", 1536)
    yield "boundary past the size", lambda d: d["reencrypt"]["files"][0].__setitem__("boundary", 5120)
    yield "from is not files[name]", lambda d: d["reencrypt"]["files"][0].__setitem__("from", d["reencrypt"]["files"][0]["to"])
    yield "regionSize not a sector multiple", lambda d: d["reencrypt"].__setitem__("regionSize", 1000)
    yield "kek null for a rekey", lambda d: d["reencrypt"].__setitem__("kek", None)
    yield "feature without the member", lambda d: d.pop("reencrypt")
    yield "member without the feature", lambda d: d.__setitem__("features", [])
    yield "unknown op", lambda d: d["reencrypt"].__setitem__("op", "shred")


@pytest.mark.parametrize("what,mutate", list(_state_mutations()), ids=[m[0] for m in _state_mutations()])
def test_the_independent_reader_rejects_a_broken_state(tmp_path, what, mutate):
    doc, v = reencrypt_vector()
    mutate(doc)
    vm = str(tmp_path / "vm1")
    key_files = vector_folder(vm, doc, v)
    with pytest.raises(Refused):
        read_plaintext(vm, "vm1.nvram", key_files)


# ==== disks written by vmfs-crypt, read by the independent implementation ======================
def _expected_flat() -> bytes:
    """What the qemu-io writes below leave in the 1 MiB disk."""
    buf = bytearray(1 << 20)
    buf[0:65536] = b"\x5a" * 65536
    buf[700001:701001] = b"\x3c" * 1000
    buf[1048064:1048576] = b"\xe1" * 512  # the last sector
    return bytes(buf)


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_decrypt_a_disk_encrypted_by_the_cli(venv_env):
    env = venv_env
    vm = os.path.join(env.datastore, "vm1")
    os.makedirs(vm)
    disk = os.path.join(vm, "disk.vmdk")
    env.tool("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", disk, "1M")
    for cmd in ("write -P 0x5a 0 64k", "write -P 0x3c 700001 1000", "write -P 0xe1 1048064 512"):
        env.tool("qemu-io", "-f", "vmdk", "-c", cmd, disk)
    others = {
        "vm1.nvram": hashlib.shake_256(b"nvram").digest(8684),  # last sector: 492 bytes (ciphertext stealing)
        "core.bin": hashlib.shake_256(b"core").digest(1030),  # last sector: 6 bytes (the XOR rule)
        "tiny.bin": b"\x01\x02\x03",  # a file smaller than one XTS block
        "tail-zero.bin": hashlib.shake_256(b"tz").digest(1024) + bytes(7),  # a zero partial last sector
        "vm1.vmx": b'displayName = "vm1"\n',
        "vm1.log": b"a log line\n",
    }
    for name, data in others.items():
        with open(os.path.join(vm, name), "wb") as f:
            f.write(data)
    with open(disk, "rb") as f:
        descriptor_before = f.read()
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        assert f.read() == _expected_flat(), "qemu-io wrote what the test expects"

    env.run("encrypt", vm)

    key_file = os.path.join(os.path.dirname(env.config), "native-local.key")
    with open(key_file, "rb") as f:
        key_files = {"local": f.read()}
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        backing = f.read()
    assert len(backing) == 1 << 20, "no header, no padding"
    assert backing[:65536] != _expected_flat()[:65536]
    for s in range(2048):  # sectors QEMU never wrote were zeros, and stay holes
        written = s < 128 or 1367 <= s <= 1369 or s == 2047
        assert any(backing[s * 512:(s + 1) * 512]) == written, s

    plain, where = read_plaintext(vm, "disk-flat.vmdk", key_files)
    assert where == "disk.vmdk", "a single-extent disk keeps its key in its descriptor"
    assert plain == _expected_flat()
    for name, data in others.items():
        got, where = read_plaintext(vm, name, key_files)
        assert got == data, name
        if name.endswith((".vmx", ".log")):
            with open(os.path.join(vm, name), "rb") as f:
                assert f.read() == data, "stored in plaintext"
        else:
            assert where == ".vmfs-crypt.json", name
            with open(os.path.join(vm, name), "rb") as f:
                stored = f.read()
            assert len(stored) == len(data)
            if name == "tail-zero.bin":
                assert stored[1024:] != bytes(7), "a partial last sector under 16 bytes is never a hole"
            else:
                assert stored != data, name

    view, _ = read_plaintext(vm, "disk.vmdk", key_files)
    assert view == descriptor_before, "the view of the descriptor is the descriptor QEMU wrote"
    with open(disk, "rb") as f:
        stored = f.read()
    first_line = descriptor_before.index(b"\n") + 1
    assert stored.startswith(descriptor_before[:first_line] + b"encryption.keySafe = \"vmware:key/list/")
    assert stored.endswith(descriptor_before[first_line:]), "encryption lines go right after the first line"

    # Section 4.3: the descriptor's keySafe next to nvram's data record does not unwrap.
    keysafe, _, _ = find_key(vm, "disk-flat.vmdk")
    _, nvram_data, _ = find_key(vm, "vm1.nvram")
    provider, key_id, wrapped = parse_locator(keysafe)
    with pytest.raises(Exception) as err:
        unwrap(native_kek(key_files[provider], key_id), wrapped, parse_data(nvram_data))
    assert type(err.value).__name__ == "InvalidUnwrap"


def test_decrypt_the_golden_datastore(tmp_path):
    with open(os.path.join(GOLDEN, "manifest.json")) as f:
        manifest = json.load(f)
    with open(os.path.join(GOLDEN, "config", "native-golden.key"), "rb") as f:
        key_files = {"golden": f.read()}
    ds = os.path.join(GOLDEN, "ds")
    for rel, want in manifest["files"].items():
        folder, name = os.path.split(os.path.join(ds, rel))
        got, where = read_plaintext(folder, name, key_files)
        assert hashlib.sha256(got).hexdigest() == want["sha256"], rel
        assert is_encrypted(folder, name) == (want["role"] == "encrypted"), rel
        if want["role"] == "encrypted":
            assert where == want["key_in"], rel


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_decrypt_a_disk_written_through_the_mount(venv_env):
    """Sectors written by the FUSE write path (read-modify-write, partial sectors) decrypt by the document."""
    env = venv_env
    vm = os.path.join(env.datastore, "vm1")
    os.makedirs(vm)
    env.run("create", os.path.join(vm, "disk.vmdk"), "--size", "64K")
    expected = bytearray(65536)
    writes = [(0, b"\x11" * 4096), (5000, b"\x22" * 3), (10239, b"\x33" * 2), (65535, b"\x44")]
    with mounted(env) as mnt:
        with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "r+b") as f:
            for off, data in writes:
                f.seek(off)
                f.write(data)
                expected[off:off + len(data)] = data
        with open(os.path.join(mnt, "vm1", "notes.bin"), "wb") as f:
            f.write(b"x" * 517)  # created through the mount: key in the folder key file
    key_file = os.path.join(os.path.dirname(env.config), "native-local.key")
    with open(key_file, "rb") as f:
        key_files = {"local": f.read()}
    got, where = read_plaintext(vm, "disk-flat.vmdk", key_files)
    assert where == "disk.vmdk" and got == bytes(expected)
    got, where = read_plaintext(vm, "notes.bin", key_files)
    assert where == ".vmfs-crypt.json" and got == b"x" * 517


# ==== vmfs-crypt's own reader: short last sectors that encrypt to zeros ==============================
def test_short_last_sector_that_encrypts_to_zeros():
    """Section 3.4: a partial last sector under 16 bytes is never a hole, even when its ciphertext is zero."""
    from vmfs_crypt.format.holes import decrypt_sectors
    from vmfs_crypt.crypto.xts import SectorCipher

    dek = bytes(range(0x80, 0xC0))
    cipher = SectorCipher(dek)
    plain = xts_unit(dek, 1, bytes(1), encrypt=True)  # the one-byte pad of sector 1: a non-zero byte here
    assert plain != b"\x00"
    stored = cipher.encrypt(1, plain)
    assert stored == b"\x00", "the XOR rule maps this plaintext byte to a zero byte"
    assert decrypt_sectors(cipher, 1, stored) == plain
