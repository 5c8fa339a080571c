#!/usr/bin/env python3
"""Generator of the golden datastore in tests/golden/ and of the test vectors of docs/FORMAT.md.

    DO NOT REGENERATE THE GOLDEN DATASTORE ONCE IT IS COMMITTED.

The golden datastore is a compatibility fixture: the bytes committed under tests/golden/
were written by vmfs-crypt 0.1.0, and every later version of vmfs-crypt MUST still open
them (tests/test_golden.py). Regenerating them with a newer version would make the test
compare the new code with itself. If the on-disk format ever changes, add a NEW golden
datastore next to this one (e.g. tests/golden-v2/) and keep this one.

Usage (from the repository root, in the venv):

    python tests/golden/make_golden.py --vectors      # print the test vectors of docs/FORMAT.md
    python tests/golden/make_golden.py --reencrypt-vectors   # print the vector of FORMAT.md 9.4
    python tests/golden/make_golden.py --out DIR      # write a fresh golden datastore into DIR

Writing into tests/golden/ itself is refused once tests/golden/ds exists (that is: always,
after the first generation). --i-know-this-breaks-compatibility overrides the refusal; do
not use it.

What the golden datastore holds (tests/golden/):

    config/config.toml          a vmfs-crypt config with one native provider "golden" (the default)
    config/native-golden.key    its primary key file: a key used ONLY for these tests (git does not
                                keep file modes: tests chmod it to 0600 after copying)
    ds/vm1/                     an encrypted VM folder (.vmfs-crypt.json), made by `vmfs-crypt encrypt`
                                on a plain folder, then `vmfs-crypt create` of a thin disk:
      disk.vmdk                   QEMU-style monolithicFlat descriptor (NUL-padded to 512 bytes by
                                  qemu-io) with the encryption lines after its first line
      disk-flat.vmdk              its 32 KiB flat extent, pattern flat_pattern() (sectors 40..47 are
                                  zero: holes)
      thin.vmdk / thin-flat.vmdk  an ESXi-style descriptor from `vmfs-crypt create --size 4K`; all holes
      sparse.vmdk                 a monolithicSparse disk (KDMV), 4 KiB of 0xa5 at offset 0, keyed in
                                  .vmfs-crypt.json
      vm1.nvram                   4684 bytes (partial last sector of 76 bytes: ciphertext stealing)
      vm1-small.bin               1029 bytes (partial last sector of 5 bytes: the XOR rule)
      vm1.vmx, vm1.log            plaintext by name
    ds/plain/                   a plain folder (no .vmfs-crypt.json)
    manifest.json               sizes, SHA-256 of every file's plaintext, which key each file uses
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROVIDER = "golden"
FLAT_SECTORS = 64
HOLE_SECTORS = range(40, 48)


# -- the known plaintexts (test_golden.py restates these rules on its own) --------------------
def flat_pattern() -> bytes:
    """disk-flat.vmdk: byte o is (7*o + o//512) mod 256, except sectors 40..47, which are zero."""
    out = bytearray((7 * o + (o >> 9)) & 0xFF for o in range(FLAT_SECTORS * 512))
    for s in HOLE_SECTORS:
        out[s * 512:(s + 1) * 512] = bytes(512)
    return bytes(out)


def shake(label: str, n: int) -> bytes:
    """vm1.nvram, vm1-small.bin, plain/data.bin: SHAKE-256(label) truncated to n bytes."""
    return hashlib.shake_256(label.encode()).digest(n)


# -- test vectors of docs/FORMAT.md ------------------------------------------------------------
VECTOR_PRIMARY = bytes(range(0x00, 0x20))
VECTOR_PROVIDER = "local"
VECTOR_KEY_ID = "00112233445566778899aabbccddeeff"
VECTOR_DEK = bytes(range(0x80, 0xC0))
VECTOR_FILE_ID = "000102030405060708090a0b0c0d0e0f"
VECTOR_SECTORS = (0, 2**32)
VECTOR_PARTIALS = ((3, 20), (5, 5))  # (sector number, length of the partial last sector)


def vector_plaintext() -> bytes:
    return bytes(i & 0xFF for i in range(512))


def _hex_lines(data: bytes, indent: int) -> str:
    h = data.hex()
    rows = [h[i:i + 64] for i in range(0, len(h), 64)]
    return ("\n" + " " * indent).join(rows)


def format_vectors() -> str:
    """The vector block of docs/FORMAT.md, computed with vmfs-crypt's own code."""
    sys.path.insert(0, REPO)
    from vmfs_crypt.crypto import keywrap
    from vmfs_crypt.format.descriptor import format_encryption_lines
    from vmfs_crypt.format.keysafe import EncryptionData, KeyRecord, KeyRef
    from vmfs_crypt.providers.native import derive_kek
    from vmfs_crypt.crypto.xts import SectorCipher

    kek = derive_kek(VECTOR_PRIMARY, VECTOR_KEY_ID)
    record_json = {"cipher": "aes-xts-plain64", "features": [], "id": VECTOR_FILE_ID, "sectorSize": 512,
                   "version": 1}
    raw = json.dumps(record_json, sort_keys=True, separators=(",", ":")).encode("ascii")
    data = EncryptionData(raw=raw, file_id=VECTOR_FILE_ID)
    assert EncryptionData.decode(data.encode(), "vector").raw == raw
    record = KeyRecord.seal(KeyRef(VECTOR_PROVIDER, VECTOR_KEY_ID), kek, VECTOR_DEK, data)
    keysafe_line, data_line = (line.decode("ascii").rstrip("\n") for line in format_encryption_lines(record))
    wrapping_key = keywrap._wrapping_key(kek, raw)
    cipher = SectorCipher(VECTOR_DEK)
    pt = vector_plaintext()
    w = 31
    rows = [
        ("native primary key", VECTOR_PRIMARY.hex()),
        ("native key id", VECTOR_KEY_ID),
        ("KEK", kek.hex()),
        ("DEK", _hex_lines(VECTOR_DEK, w + 3)),
        ("encryption.data JSON", raw.decode("ascii")),
        ("wrapping key", wrapping_key.hex()),
        ("wrapped DEK", _hex_lines(record.keysafe.wrapped, w + 3)),
        ("keySafe line", keysafe_line),
        ("data line", data_line),
        ("sector plaintext", _hex_lines(pt, w + 3)),
    ]
    for s in VECTOR_SECTORS:
        rows.append((f"ciphertext of sector {s}", _hex_lines(cipher.encrypt(s, pt), w + 3)))
    for s, n in VECTOR_PARTIALS:
        rows.append((f"partial sector {s} plaintext", pt[:n].hex()))
        rows.append((f"partial sector {s} ciphertext", cipher.encrypt(s, pt[:n]).hex()))
    return "\n".join(f"{name:<{w}} = {value}" for name, value in rows)


# -- the in-place re-encryption vector of docs/FORMAT.md 9.4 -----------------------------------
RE_NEW_KEY_ID = "ffeeddccbbaa99887766554433221100"
RE_NEW_DEK = bytes(range(0xC0, 0x100))
RE_NEW_FILE_ID = "101112131415161718191a1b1c1d1e1f"
RE_FILE = "vm1.nvram"
RE_REGION = 1024  # 2 sectors per region, 4 regions
RE_SECTORS = 8
RE_BOUNDARY = 2 * RE_REGION  # regions 1 and 2 done
RE_HOLE = 6  # a sector of zeros: a hole under either key


def reencrypt_plaintext() -> bytes:
    """Byte j of sector i is (j + 16*i) mod 256, except sector 6, which is all zero."""
    out = bytearray()
    for i in range(RE_SECTORS):
        out += bytes(512) if i == RE_HOLE else bytes((j + 16 * i) & 0xFF for j in range(512))
    return bytes(out)


def _reencrypt_state():
    """(folder keys, state, old cipher, new cipher, plaintext) of the one-file deep rekey of FORMAT.md 9.4 and 9.5."""
    sys.path.insert(0, REPO)
    from vmfs_crypt.crypto.xts import SectorCipher
    from vmfs_crypt.format.folder import FolderKeys
    from vmfs_crypt.format.keysafe import EncryptionData, KeyRecord, KeyRef
    from vmfs_crypt.format.reencrypt import ReencryptFile, ReencryptState
    from vmfs_crypt.providers.native import derive_kek

    def record(key_id: str, dek: bytes, file_id: str) -> KeyRecord:
        raw = json.dumps({"cipher": "aes-xts-plain64", "features": [], "id": file_id, "sectorSize": 512,
                          "version": 1}, sort_keys=True, separators=(",", ":")).encode("ascii")
        return KeyRecord.seal(KeyRef(VECTOR_PROVIDER, key_id), derive_kek(VECTOR_PRIMARY, key_id), dek,
                              EncryptionData(raw=raw, file_id=file_id))

    old_rec, new_rec = record(VECTOR_KEY_ID, VECTOR_DEK, VECTOR_FILE_ID), record(RE_NEW_KEY_ID, RE_NEW_DEK, RE_NEW_FILE_ID)
    plain = reencrypt_plaintext()
    state = ReencryptState("rekey", RE_REGION, KeyRef(VECTOR_PROVIDER, RE_NEW_KEY_ID),
                           [ReencryptFile(RE_FILE, len(plain), RE_BOUNDARY, old_rec, new_rec, None)])
    keys = FolderKeys(KeyRef(VECTOR_PROVIDER, VECTOR_KEY_ID), {RE_FILE: old_rec}, state)
    return keys, state, SectorCipher(VECTOR_DEK), SectorCipher(RE_NEW_DEK), plain


def _sector_rows(backing: bytes, saved: bytes) -> list[tuple[str, str]]:
    rows = []
    for i in range(RE_SECTORS):
        sector = bytes(backing[i * 512:(i + 1) * 512])
        rows.append((f"backing sector {i}", "zeros (a hole)" if not any(sector) else _hex_lines(sector, 34)))
    for i in range(2):
        rows.append((f"sidecar sector {i}", _hex_lines(saved[i * 512:(i + 1) * 512], 34)))
    return rows


def reencrypt_vectors() -> str:
    """The block of docs/FORMAT.md 9.4: a deep rekey of one file stopped inside region 3, by vmfs-crypt's own code.

    The backing bytes are what the engine's own transform makes of them: the file under the old
    DEK, regions 1-2 rewritten under the new DEK, then the first half of region 3 (sector 4) with
    its sidecar written first, as a crash in step 2 of FORMAT.md 7.8 leaves it.
    """
    from vmfs_crypt.format.folder import FolderKeys
    from vmfs_crypt.format.reencrypt import read_region, region_path, write_region
    from vmfs_crypt.ops.reencrypt import transform
    from vmfs_crypt.providers.native import derive_kek
    keys, state, old, new, plain = _reencrypt_state()
    backing = bytearray(transform(plain, 0, None, old))  # the file before the operation
    backing[:RE_BOUNDARY] = transform(bytes(backing[:RE_BOUNDARY]), 0, old, new)
    r3 = bytes(backing[RE_BOUNDARY:RE_BOUNDARY + RE_REGION])  # region 3's old bytes: the sidecar's
    half = RE_REGION // 2
    backing[RE_BOUNDARY:RE_BOUNDARY + half] = transform(r3[:half], RE_BOUNDARY // 512, old, new)
    assert FolderKeys.from_bytes(keys.to_bytes(), "vector", allow_reencrypt=True).reencrypt.to_json() == state.to_json()
    with tempfile.TemporaryDirectory() as d:
        write_region(d, RE_FILE, RE_BOUNDARY, r3)
        with open(region_path(d), "rb") as f:
            sidecar = f.read()
        assert read_region(d, state) == (RE_BOUNDARY, r3)
    header = sidecar.split(b"\n", 1)[0].decode("ascii")
    w = 31
    rows = [("native primary key", VECTOR_PRIMARY.hex()),
            ("old KEK key id", VECTOR_KEY_ID), ("old KEK", derive_kek(VECTOR_PRIMARY, VECTOR_KEY_ID).hex()),
            ("old DEK", _hex_lines(VECTOR_DEK, w + 3)),
            ("new KEK key id", RE_NEW_KEY_ID), ("new KEK", derive_kek(VECTOR_PRIMARY, RE_NEW_KEY_ID).hex()),
            ("new DEK", _hex_lines(RE_NEW_DEK, w + 3)),
            ("sidecar header line", header)] + _sector_rows(backing, r3)
    text = "\n".join(f"{name:<{w}} = {value}" for name, value in rows)
    return f"```json\n{keys.to_bytes().decode('utf-8')}```\n\n```text\n{text}\n```"


RE_ABORT_LOW = RE_BOUNDARY - RE_REGION  # the abort's region in flight: [L, B) = region 2


def abort_vectors() -> str:
    """The block of docs/FORMAT.md 9.5: the deep rekey of 9.4 (stopped at B = 2048) aborted, and stopped inside
    the abort's first region [1024, 2048): its sidecar (under the new DEK) written, sector 2 back under the old."""
    from vmfs_crypt.format.reencrypt import read_region, region_path, write_region
    from vmfs_crypt.ops.reencrypt import transform
    keys, state, old, new, plain = _reencrypt_state()
    state.aborting = True
    backing = bytearray(transform(plain, 0, None, old))  # the file before the operation
    backing[:RE_BOUNDARY] = transform(bytes(backing[:RE_BOUNDARY]), 0, old, new)  # regions 1-2 done forward
    r2 = bytes(backing[RE_ABORT_LOW:RE_BOUNDARY])  # the abort's region, under the new DEK: the sidecar's
    half = RE_REGION // 2
    backing[RE_ABORT_LOW:RE_ABORT_LOW + half] = transform(r2[:half], RE_ABORT_LOW // 512, new, old)
    with tempfile.TemporaryDirectory() as d:
        write_region(d, RE_FILE, RE_ABORT_LOW, r2)
        with open(region_path(d), "rb") as f:
            header = f.read().split(b"\n", 1)[0].decode("ascii")
        assert read_region(d, state) == (RE_ABORT_LOW, r2)
    rows = [("sidecar header line", header)] + _sector_rows(backing, r2)
    text = "\n".join(f"{name:<31} = {value}" for name, value in rows)
    return f"```json\n{keys.to_bytes().decode('utf-8')}```\n\n```text\n{text}\n```"


# -- the golden datastore --------------------------------------------------------------------
def _run(cmd, env, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout.decode()}\n{proc.stderr.decode()}")
    return proc


def make_golden(out: str) -> None:
    cli = [sys.executable, "-m", "vmfs_crypt.cli"]
    work = tempfile.mkdtemp(prefix="golden-")
    runtime = tempfile.mkdtemp(prefix="vcrt-", dir="/tmp")
    cfg_dir = os.path.join(work, "config")
    ds = os.path.join(work, "ds")
    vm1, plain = os.path.join(ds, "vm1"), os.path.join(ds, "plain")
    env = dict(os.environ, VMFS_CRYPT_CONFIG=os.path.join(cfg_dir, "config.toml"), XDG_RUNTIME_DIR=runtime,
               PYTHONPATH=REPO)
    try:
        _run(cli + ["provider", "add", "native", PROVIDER], env)
        os.makedirs(vm1)
        os.makedirs(plain)
        plaintexts: dict[str, bytes] = {}

        _run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
              os.path.join(vm1, "disk.vmdk"), str(FLAT_SECTORS * 512)], env)
        # Through qemu-io, so that QEMU also rewrites the descriptor as it does: NUL-padded to 512 bytes.
        pattern_file = os.path.join(work, "pattern.bin")
        with open(pattern_file, "wb") as f:
            f.write(flat_pattern())
        _run(["qemu-io", "-f", "vmdk", "-c", f"write -s {pattern_file} 0 {FLAT_SECTORS * 512}",
              os.path.join(vm1, "disk.vmdk")], env)
        _run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicSparse",
              os.path.join(vm1, "sparse.vmdk"), "1M"], env)
        _run(["qemu-io", "-f", "vmdk", "-c", "write -P 0xa5 0 4k", os.path.join(vm1, "sparse.vmdk")], env)
        files = {
            "vm1/vm1.nvram": shake("vm1.nvram", 4684),
            "vm1/vm1-small.bin": shake("vm1-small.bin", 1029),
            "vm1/vm1.vmx": b'.encoding = "UTF-8"\ndisplayName = "vm1"\nnvram = "vm1.nvram"\n'
                           b'scsi0:0.fileName = "disk.vmdk"\n',
            "vm1/vm1.log": b"golden datastore of vmfs-crypt 0.1.0: a log stays in plaintext\n",
            "plain/notes.txt": b"a plain folder: no .vmfs-crypt.json, nothing here is encrypted\n",
            "plain/data.bin": shake("plain/data.bin", 1000),
        }
        for rel, data in files.items():
            with open(os.path.join(ds, rel), "wb") as f:
                f.write(data)
        for rel in ("vm1/disk.vmdk", "vm1/disk-flat.vmdk", "vm1/sparse.vmdk", *files):
            with open(os.path.join(ds, rel), "rb") as f:
                plaintexts[rel] = f.read()

        _run(cli + ["encrypt", vm1], env)
        _run(cli + ["create", os.path.join(vm1, "thin.vmdk"), "--size", "4K"], env)
        for rel in ("vm1/thin.vmdk", "vm1/thin-flat.vmdk"):
            plaintexts[rel] = _run(cli + ["cat", os.path.join(ds, rel)], env).stdout
        assert plaintexts["vm1/thin-flat.vmdk"] == bytes(4096)
        for rel, data in plaintexts.items():
            got = _run(cli + ["cat", os.path.join(ds, rel)], env).stdout
            assert got == data, f"{rel}: cat does not give the plaintext back"

        info = json.loads(_run(cli + ["info", "--json", vm1], env).stdout)
        roles = {f["name"]: f for f in info["files"]}
        manifest = {
            "comment": "Written by tests/golden/make_golden.py with vmfs-crypt 0.1.0. Never regenerate: "
                       "every later version must open these bytes.",
            "provider": PROVIDER,
            "folder_kek": info["folder_kek"],
            "files": {
                rel: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                      "role": roles[rel[4:]]["role"] if rel.startswith("vm1/") else "plaintext",
                      "key_in": roles[rel[4:]]["key_in"] if rel.startswith("vm1/") else None}
                for rel, data in sorted(plaintexts.items())
            },
        }
        with open(os.path.join(work, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)
            f.write("\n")
        # A config that finds the key file next to it (no absolute key_file path).
        with open(os.path.join(cfg_dir, "config.toml"), "w") as f:
            f.write(f'version = 1\ndefault_provider = "{PROVIDER}"\n\n[providers.{PROVIDER}]\ntype = "native"\n')
        for name in ("config", "ds", "manifest.json"):
            src = os.path.join(work, name)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(out, name))
        # The backup marker would only silence a warning; it names a path of the generating machine.
        marker = os.path.join(out, "config", f"native-{PROVIDER}.key.backed-up")
        if os.path.exists(marker):
            os.unlink(marker)
    finally:
        subprocess.run(cli + ["agent", "stop"], env=env, capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", action="store_true", help="print the test vectors of docs/FORMAT.md")
    parser.add_argument("--reencrypt-vectors", action="store_true",
                        help="print the in-place re-encryption vector of docs/FORMAT.md 9.4")
    parser.add_argument("--abort-vectors", action="store_true",
                        help="print the vector of docs/FORMAT.md 9.5 (an abort in flight)")
    parser.add_argument("--out", help="directory to write a golden datastore into")
    parser.add_argument("--i-know-this-breaks-compatibility", dest="force", action="store_true",
                        help="allow writing into tests/golden/ itself")
    args = parser.parse_args()
    if args.vectors:
        print(format_vectors())
        return
    if args.reencrypt_vectors:
        print(reencrypt_vectors())
        return
    if args.abort_vectors:
        print(abort_vectors())
        return
    if not args.out:
        parser.error("give --vectors or --out DIR")
    out = os.path.abspath(args.out)
    if os.path.realpath(out) == os.path.realpath(HERE):
        if os.path.exists(os.path.join(HERE, "ds")) and not args.force:
            raise SystemExit("refusing to regenerate the committed golden datastore: later versions must open "
                             "the OLD bytes. Write a new fixture elsewhere instead (see the docstring).")
        for name in ("config", "ds", "manifest.json"):
            path = os.path.join(HERE, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.unlink(path)
    elif os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"{out} is not empty")
    os.makedirs(out, exist_ok=True)
    make_golden(out)
    print(f"wrote a golden datastore into {out}")


if __name__ == "__main__":
    main()
