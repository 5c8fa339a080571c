"""Unit tests of the key metadata: locator escaping, the key locator, the data record, descriptors, AES-KW.

The rules tested here are those of docs/FORMAT.md sections 4 to 6.
"""

import base64
import json
import os
import random

import pytest

from vmfs_crypt.crypto import keywrap
from vmfs_crypt.format.descriptor import (encryption_lines, extents, flat_descriptor, format_encryption_lines,
                                   insert_encryption_lines, is_descriptor, read_key_record,
                                   strip_encryption_lines)
from vmfs_crypt.errors import FormatError, KeyUnwrapError
from vmfs_crypt.format.keysafe import (EncryptionData, KeyRecord, KeyRef, KeySafe, escape_field, unescape_field)

KEK = bytes(range(32))
DEK = bytes(range(0x80, 0xC0))
WRAPPED = bytes(range(72))
SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.<>+"


def data_b64(**changes) -> str:
    record = {"cipher": "aes-xts-plain64", "features": [], "id": "0123456789abcdef0123456789abcdef",
              "sectorSize": 512, "version": 1}
    record.update(changes)
    record = {k: v for k, v in record.items() if v is not ...}
    return base64.b64encode(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).decode()


# -- escaping -----------------------------------------------------------------------------------
@pytest.mark.parametrize("text, escaped", [
    (SAFE, SAFE),
    ("<VMWARE-NULL>", "<VMWARE%2dNULL>"),
    ("AES-256-KW-HKDF-SHA-256", "AES%2d256%2dKW%2dHKDF%2dSHA%2d256"),
    ("a/b=c", "a%2fb%3dc"),
    ("100%", "100%25"),
    ("x y,(z)", "x%20y%2c%28z%29"),
    ("é", "%c3%a9"),
    ("\U0001f512", "%f0%9f%94%92"),
    ("", ""),
])
def test_escape_field(text, escaped):
    assert escape_field(text) == escaped
    assert unescape_field(escaped, "t") == text


def test_escape_round_trip_of_random_text():
    rng = random.Random(1)
    alphabet = SAFE + "-/=%,()\"' \t\n:;é€\U0001f512\x00\x7f"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        escaped = escape_field(text)
        assert not set(escaped) - set(SAFE + "%0123456789abcdef")
        assert "/" not in escaped and "," not in escaped and "(" not in escaped and ")" not in escaped
        assert unescape_field(escaped, "t") == text


def test_unescape_is_lenient_where_the_format_says_so():
    assert unescape_field("%2D%2d-", "t") == "---", "hex digits of either case; raw characters stand for themselves"
    assert unescape_field("%41", "t") == "A"
    assert unescape_field("é", "t") == "é"


@pytest.mark.parametrize("bad", ["%", "%4", "a%", "%zz", "%g0", "%%41", "%ff", "%c3", "%c3%28", "%ed%a0%80"])
def test_unescape_rejects(bad):
    with pytest.raises(FormatError):
        unescape_field(bad, "t")


# -- the key locator ------------------------------------------------------------------------------
@pytest.mark.parametrize("provider, key_id", [
    ("local", "00112233445566778899aabbccddeeff"),
    ("kms-prod/eu", "key=1,(2)"),
    ("é", "%"),
    ("p", "4f6c2e1a-9b0d-4c1e-8f3a-2b5d7e9c1a30"),
])
def test_locator_round_trip(provider, key_id):
    ks = KeySafe(KeyRef(provider, key_id), WRAPPED)
    text = ks.to_locator()
    assert text.startswith("vmware:key/list/(pair/(fqid/<VMWARE%2dNULL>/")
    assert text.endswith("))")
    back = KeySafe.from_locator(text, "t")
    assert back == ks
    assert back.wrapped == WRAPPED and back.kek == KeyRef(provider, key_id)


def test_locator_of_the_vector_in_format_md():
    blob = base64.b64encode(WRAPPED).decode().replace("/", "%2f").replace("=", "%3d")
    text = f"vmware:key/list/(pair/(fqid/<VMWARE%2dNULL>/local/k1,AES%2d256%2dKW%2dHKDF%2dSHA%2d256,{blob}))"
    assert KeySafe(KeyRef("local", "k1"), WRAPPED).to_locator() == text
    upper = text.replace("%2d", "%2D")
    assert KeySafe.from_locator(upper, "t") == KeySafe.from_locator(text, "t")


def _locator(null="<VMWARE%2dNULL>", provider="local", key_id="k1", alg="AES%2d256%2dKW%2dHKDF%2dSHA%2d256",
             blob=None) -> str:
    blob = blob if blob is not None else base64.b64encode(WRAPPED).decode().replace("/", "%2f")
    return f"vmware:key/list/(pair/(fqid/{null}/{provider}/{key_id},{alg},{blob}))"


@pytest.mark.parametrize("text", [
    "",
    _locator() + " ",
    " " + _locator(),
    _locator() + "\n",
    _locator().replace("vmware:", "VMWARE:"),
    _locator().replace("(pair/", "(pairs/"),
    _locator().replace("))", ")"),
    _locator(null="<VMWARE-NULL>/x"),  # a raw '/' makes a field too many
    _locator(provider="lo/cal"),
    _locator(key_id="k,1"),
    _locator(key_id="k(1)"),
    _locator(null="NULL"),
    _locator(null="%3cVMWARE%2dNULL%3e%20"),
    _locator(provider=""),
    _locator(key_id=""),
    _locator(alg="AES%2d128%2dKW"),
    _locator(alg="aes%2d256%2dkw%2dhkdf%2dsha%2d256"),
    _locator(blob=""),
    _locator(blob=base64.b64encode(WRAPPED[:64]).decode().replace("/", "%2f")),
    _locator(blob=base64.b64encode(WRAPPED + b"\0" * 3).decode().replace("/", "%2f")),
    _locator(blob=base64.b64encode(WRAPPED).decode().replace("/", "%2f")[:-1]),
    _locator(blob="!" + base64.b64encode(WRAPPED).decode().replace("/", "%2f")[1:]),
    _locator(blob=base64.b64encode(WRAPPED).decode().replace("/", "%2f")[:-4] + "%0a" + "AAAA"),
    _locator(provider="%ff"),
    _locator(provider="%"),
])
def test_locator_rejects(text):
    with pytest.raises(FormatError):
        KeySafe.from_locator(text, "t")


def test_locator_accepts_unescaped_characters():
    """Readers take characters outside the safe set literally (FORMAT.md section 5)."""
    raw = _locator(null="<VMWARE-NULL>", alg="AES-256-KW-HKDF-SHA-256")
    assert KeySafe.from_locator(raw, "t") == KeySafe(KeyRef("local", "k1"), WRAPPED)


def test_non_canonical_base64_is_rejected():
    """FORMAT.md section 1: only canonical base64 (re-encoding gives the input back) is accepted."""
    blob = base64.b64encode(WRAPPED).decode().replace("/", "%2f")
    with pytest.raises(FormatError):
        KeySafe.from_locator(_locator(blob=blob + "%3d"), "t")
    with pytest.raises(FormatError):
        EncryptionData.decode(data_b64() + "=", "t")


# -- the data record ------------------------------------------------------------------------------
def test_new_data_record_is_canonical():
    seen = set()
    for _ in range(20):
        d = EncryptionData.new()
        record = json.loads(d.raw)
        assert list(record) == ["cipher", "features", "id", "sectorSize", "version"]
        assert d.raw == json.dumps(record, sort_keys=True, separators=(",", ":")).encode()
        assert len(d.raw) == 111 and len(d.encode()) == 148 and not d.encode().endswith("=")
        assert d.file_id == record["id"] and len(d.file_id) == 32
        assert EncryptionData.decode(d.encode(), "t") == d
        seen.add(d.file_id)
    assert len(seen) == 20


def test_data_record_keeps_the_exact_bytes():
    """Readers bind to the stored bytes, never to a re-serialization."""
    spaced = b'{"version": 1, "sectorSize": 512, "id": "0123456789abcdef0123456789abcdef", ' \
             b'"features": [], "cipher": "aes-xts-plain64"}'
    d = EncryptionData.decode(base64.b64encode(spaced).decode(), "t")
    assert d.raw == spaced and d.encode() == base64.b64encode(spaced).decode()


@pytest.mark.parametrize("text", [
    data_b64(version=2),
    data_b64(version=0),
    data_b64(version="1"),
    data_b64(version=...),
    data_b64(features=["sparse-v2"]),
    data_b64(features="none"),
    data_b64(features=...),
    data_b64(extra=1),
    data_b64(cipher=...),
    data_b64(id=...),
    data_b64(cipher="aes-xts-plain"),
    data_b64(cipher="AES-XTS-PLAIN64"),
    data_b64(sectorSize=4096),
    data_b64(sectorSize="512"),
    data_b64(id="0123456789ABCDEF0123456789ABCDEF"),
    data_b64(id="0123456789abcdef"),
    data_b64(id="0123456789abcdef0123456789abcdeg"),
    data_b64(id=12345),
    base64.b64encode(b"[1, 2]").decode(),
    base64.b64encode(b"not json").decode(),
    base64.b64encode(b"\xff\xfe{}").decode(),
    base64.b64encode(b"\xef\xbb\xbf" + base64.b64decode(data_b64())).decode(),
    "",
    data_b64()[:-1],
    " " + data_b64(),
    data_b64()[:40] + "\n" + data_b64()[40:],
    data_b64().replace("e", "é", 1),
])
def test_data_record_rejects(text):
    with pytest.raises(FormatError):
        EncryptionData.decode(text, "t")


# -- the wrap ----------------------------------------------------------------------------------------
def test_wrap_round_trip_and_binding():
    d1, d2 = EncryptionData.new(), EncryptionData.new()
    rec = KeyRecord.seal(KeyRef("local", "k1"), KEK, DEK, d1)
    assert len(rec.keysafe.wrapped) == 72
    assert rec.open(KEK, "t") == DEK
    parsed = KeyRecord.from_json(rec.as_json(), "t")
    assert parsed == rec and parsed.open(KEK, "t") == DEK
    with pytest.raises(KeyUnwrapError):
        KeyRecord(rec.keysafe, d2).open(KEK, "t")  # pasted next to another record
    with pytest.raises(KeyUnwrapError):
        rec.open(bytes(32), "t")  # wrong KEK
    with pytest.raises(KeyUnwrapError):
        keywrap.unwrap_dek(KEK, rec.keysafe.wrapped[:-8], d1.raw, "t")
    with pytest.raises(ValueError):
        keywrap.wrap_dek(KEK, DEK[:32], d1.raw)
    with pytest.raises(ValueError):
        keywrap.wrap_dek(KEK[:16], DEK, d1.raw)


def test_unwrap_refuses_equal_halves():
    d = EncryptionData.new()
    bad = keywrap.aes_key_wrap(keywrap._wrapping_key(KEK, d.raw), DEK[:32] * 2)
    with pytest.raises(KeyUnwrapError):
        keywrap.unwrap_dek(KEK, bad, d.raw, "t")


@pytest.mark.parametrize("obj", [None, [], "x", {"keySafe": "x"}, {"data": "x"}, {"keySafe": 1, "data": "x"},
                                 {"keySafe": "x", "data": None}])
def test_key_entry_shape(obj):
    with pytest.raises(FormatError):
        KeyRecord.from_json(obj, "t")


# -- descriptors ---------------------------------------------------------------------------------------
QEMU_VIEW = (b'# Disk DescriptorFile\nversion=1\nCID=f73e7726\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
             b'# Extent description\nRW 2048 FLAT "x-flat.vmdk" 0\n\n# The Disk Data Base\n#DDB\n\n'
             b'ddb.virtualHWVersion = "4"\nddb.geometry.cylinders = "2"\nddb.geometry.heads = "16"\n'
             b'ddb.geometry.sectors = "63"\nddb.adapterType = "ide"\n')
QEMU_VIEW = QEMU_VIEW + bytes(512 - len(QEMU_VIEW))  # QEMU pads its descriptor with NULs
ESXI_VIEW = flat_descriptor("x-flat.vmdk", 2048, "fffffffe")


def _record() -> KeyRecord:
    return KeyRecord.seal(KeyRef("local", "k1"), KEK, DEK, EncryptionData.new())


@pytest.mark.parametrize("view", [QEMU_VIEW, ESXI_VIEW, QEMU_VIEW.replace(b"\n", b"\r\n")], ids=["qemu", "esxi", "crlf"])
def test_descriptor_strip_insert_round_trip(view):
    rec = _record()
    lines = format_encryption_lines(rec)
    assert [ln.split(b" = ")[0] for ln in lines] == [b"encryption.keySafe", b"encryption.data"]
    stored = insert_encryption_lines(view, lines)
    first = view.index(b"\n") + 1
    assert stored == view[:first] + b"".join(lines) + view[first:], "right after the first line"
    assert stored.endswith(view[first:]), "everything else (NUL padding too) is kept byte for byte"
    assert is_descriptor(stored)
    assert strip_encryption_lines(stored) == view
    assert encryption_lines(stored) == lines
    assert read_key_record(stored, "t") == rec
    assert read_key_record(view, "t") is None
    assert insert_encryption_lines(strip_encryption_lines(stored), encryption_lines(stored)) == stored
    assert insert_encryption_lines(view, []) == view
    assert extents(stored) == extents(view)


def test_descriptor_lines_anywhere_are_stripped():
    rec = _record()
    ks, data = format_encryption_lines(rec)
    moved = ESXI_VIEW + b"  " + ks + b"\t" + data.rstrip(b"\n")  # indented, last line without LF
    assert strip_encryption_lines(moved) == ESXI_VIEW
    assert read_key_record(moved, "t") == rec
    spaced = ESXI_VIEW + ks.replace(b" = ", b'\t=  ') + data.replace(b'"\n', b'"  \r\n')
    assert read_key_record(spaced, "t") == rec


def test_insert_needs_a_first_line():
    with pytest.raises(FormatError):
        insert_encryption_lines(b"# Disk DescriptorFile", [b'encryption.data = "x"\n'])


def test_descriptor_key_lines_are_checked():
    ks, data = format_encryption_lines(_record())
    head = b"# Disk DescriptorFile\n"
    cases = [
        head + ks,  # only one
        head + data,
        head + ks + ks + data,  # twice
        head + ks + data + data,
        head + ks + data + b'encryption.other = "x"\n',  # an unknown key
        head + ks + data + b"encryption.keySafe\n",  # malformed
        head + ks.replace(b'"', b"", 1) + data,
        head + ks.replace(b"keySafe", b"keysafe") + data,
        head + ks + data.replace(b'"\n', b'" trailing\n'),
    ]
    for i, raw in enumerate(cases):
        with pytest.raises(FormatError):
            read_key_record(raw, f"case {i}")
    # A byte that is not UTF-8 becomes U+FFFD (FORMAT.md 6.2): the provider id no longer names a provider.
    rec = read_key_record(head + ks.replace(b"local", b"lo\xffal") + data, "t")
    assert rec.keysafe.kek.provider_id == "lo\ufffdal"


def test_descriptor_recognition():
    assert is_descriptor(b"# Disk DescriptorFile\nversion=1\n")
    assert not is_descriptor(b"KDMV\x01\x00\x00\x00")
    assert not is_descriptor(b"COWD")
    assert not is_descriptor(b" # Disk DescriptorFile")
    assert not is_descriptor(b"")


def test_extents_esxi_and_qemu_styles():
    (e,) = extents(ESXI_VIEW)
    assert (e.access, e.sectors, e.kind, e.file_name, e.offset) == ("RW", 2048, "VMFS", "x-flat.vmdk", 0)
    (q,) = extents(QEMU_VIEW)
    assert (q.access, q.sectors, q.kind, q.file_name, q.offset) == ("RW", 2048, "FLAT", "x-flat.vmdk", 0)
    assert extents(b'# Disk DescriptorFile\nRW 2048 VMFS "x-flat.vmdk"\n') == [e]
    assert extents(b'# Disk DescriptorFile\nRW 2048 FLAT "x-flat.vmdk" 0') == [q]


def test_extents_of_split_and_sparse_descriptors():
    text = (b'# Disk DescriptorFile\ncreateType="twoGbMaxExtentFlat"\n'
            b'RW 4192256 FLAT "big-f001.vmdk" 0\nRW 4192256 FLAT "big-f002.vmdk" 0\n'
            b'RDONLY 64 FLAT "base.img" 128\nNOACCESS 8 SPARSE "s-s001.vmdk"\nRW 2048 ZERO\n'
            b'# RW 1 FLAT "comment.vmdk" 0\n' + bytes(300))
    got = [(e.access, e.sectors, e.kind, e.file_name, e.offset) for e in extents(text)]
    assert got == [("RW", 4192256, "FLAT", "big-f001.vmdk", 0), ("RW", 4192256, "FLAT", "big-f002.vmdk", 0),
                   ("RDONLY", 64, "FLAT", "base.img", 128), ("NOACCESS", 8, "SPARSE", "s-s001.vmdk", 0)]


def test_extent_names_with_spaces_and_utf8():
    (e,) = extents('# Disk DescriptorFile\nRW 8 VMFS "my disk é-flat.vmdk"\n'.encode())
    assert e.file_name == "my disk é-flat.vmdk"


# -- AES-KW against NIST SP 800-38F vectors (the primitive keywrap.py relies on) -----------------------
def _nist_kw(name: str) -> list[dict]:
    import cryptography_vectors

    path = os.path.join(os.path.dirname(cryptography_vectors.__file__), "keywrap", "kwtestvectors", name)
    entries, cur = [], None
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith("COUNT"):
                cur = {}
                entries.append(cur)
            elif cur is not None and line == "FAIL":
                cur["FAIL"] = True
            elif cur is not None and " = " in line and not line.startswith("["):
                k, v = line.split(" = ")
                cur[k] = bytes.fromhex(v)
    return entries


def test_aes_kw_encrypt_vectors():
    entries = _nist_kw("KW_AE_256.txt")
    assert len(entries) == 500
    for e in entries:
        assert keywrap.aes_key_wrap(e["K"], e["P"]) == e["C"]
        assert keywrap.aes_key_unwrap(e["K"], e["C"]) == e["P"]


def test_aes_kw_decrypt_vectors():
    entries = _nist_kw("KW_AD_256.txt")
    assert len(entries) == 500
    fails = 0
    for e in entries:
        if e.get("FAIL"):
            fails += 1
            with pytest.raises(keywrap.InvalidUnwrap):
                keywrap.aes_key_unwrap(e["K"], e["C"])
        else:
            assert keywrap.aes_key_unwrap(e["K"], e["C"]) == e["P"]
    assert fails == 100


def test_aes_kw_rfc3394_256_bit_kek_vector():
    """RFC 3394 section 4.6: 256 bits of key data with a 256-bit KEK."""
    kek = bytes.fromhex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")
    data = bytes.fromhex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F")
    want = bytes.fromhex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21")
    assert keywrap.aes_key_wrap(kek, data) == want
