"""The golden datastore (tests/golden/, written once by vmfs-crypt 0.1.0) still opens with the current code.

If a test here fails, the current code no longer reads bytes that an earlier version wrote:
fix the code, never the fixture (tests/golden/make_golden.py explains why it is not regenerated).
"""

import hashlib
import json
import os
import re
import sys

import pytest

from support import VmfsEnv

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")
REPO = os.path.dirname(HERE)
FORMAT_MD = os.path.join(REPO, "docs", "FORMAT.md")


def _manifest() -> dict:
    with open(os.path.join(GOLDEN, "manifest.json")) as f:
        return json.load(f)


MANIFEST = _manifest()


class Golden(VmfsEnv):
    """A private copy of tests/golden/ whose `cat` results are kept for the module."""

    def __init__(self, base: str) -> None:
        env = VmfsEnv.golden(base)
        self.__dict__.update(env.__dict__)
        self._cats: dict[str, bytes] = {}

    def cat(self, rel: str) -> bytes:
        """`vmfs-crypt cat` of a file of the copy (each file once per module)."""
        if rel not in self._cats:
            self._cats[rel] = self.run("cat", os.path.join(self.ds, rel)).stdout
        return self._cats[rel]


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    g = Golden(str(tmp_path_factory.mktemp("golden")))
    g.run("agent", "start")  # one agent for all the cats below
    yield g
    g.cleanup()


# -- the known plaintexts, restated here independently of make_golden.py --------------------
def expected_flat() -> bytes:
    out = bytearray((7 * o + (o >> 9)) & 0xFF for o in range(64 * 512))
    out[40 * 512:48 * 512] = bytes(8 * 512)
    return bytes(out)


def test_fixture_is_complete_and_small():
    files = {os.path.relpath(os.path.join(d, n), os.path.join(GOLDEN, "ds"))
             for d, _, names in os.walk(os.path.join(GOLDEN, "ds")) for n in names}
    assert files == set(MANIFEST["files"]) | {"vm1/.vmfs-crypt.json"}
    total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(GOLDEN) for n in names)
    assert total < 200_000


@pytest.mark.parametrize("rel", sorted(MANIFEST["files"]))
@pytest.mark.cli
def test_cat_gives_the_known_plaintext(golden, rel):
    want = MANIFEST["files"][rel]
    out = golden.cat(rel)
    assert len(out) == want["size"]
    assert hashlib.sha256(out).hexdigest() == want["sha256"]
    with open(os.path.join(golden.ds, rel), "rb") as f:
        backing = f.read()
    if want["role"] == "encrypted" and any(out):  # (thin-flat.vmdk is all holes: zeros either way)
        assert backing != out, "an encrypted file is stored in plaintext"
        assert len(backing) == len(out), "the format has no header: sizes are equal"


@pytest.mark.cli
def test_plaintexts_match_their_rules(golden):
    cat = golden.cat
    assert cat("vm1/disk-flat.vmdk") == expected_flat()
    assert cat("vm1/vm1.nvram") == hashlib.shake_256(b"vm1.nvram").digest(4684)
    assert cat("vm1/vm1-small.bin") == hashlib.shake_256(b"vm1-small.bin").digest(1029)
    assert cat("vm1/thin-flat.vmdk") == bytes(4096)
    sparse = cat("vm1/sparse.vmdk")
    assert sparse.startswith(b"KDMV")
    assert sparse[65536:65536 + 4096] == b"\xa5" * 4096  # qemu-io's write, in the first grain
    for rel in ("vm1/disk.vmdk", "vm1/thin.vmdk"):
        view = cat(rel)
        assert view.startswith(b"# Disk DescriptorFile\n")
        assert b"encryption." not in view, "the encryption lines are stripped from the plaintext view"
    desc = cat("vm1/disk.vmdk")
    assert len(desc) == 512 and desc.endswith(b"\x00"), "QEMU's NUL padding survives"
    assert re.search(rb'\nRW 64 FLAT "disk-flat.vmdk" 0\n', desc)
    assert re.search(rb'\nRW 8 VMFS "thin-flat.vmdk"\n', cat("vm1/thin.vmdk"))


def test_holes_stay_holes():
    """Sectors that were zero before encryption are stored as zero sectors (they read as zeros)."""
    with open(os.path.join(GOLDEN, "ds", "vm1", "disk-flat.vmdk"), "rb") as f:
        backing = f.read()
    for s in range(64):
        sector = backing[s * 512:(s + 1) * 512]
        assert (sector == bytes(512)) == (40 <= s < 48), s


@pytest.mark.cli
def test_info_reports_the_keys(golden):
    """`info --json`: one spelling of a KEK reference ({"provider", "keyId"}) wherever it appears."""
    want_kek = {"provider": MANIFEST["folder_kek"]["provider"], "keyId": MANIFEST["folder_kek"]["key_id"]}
    info = json.loads(golden.run("info", "--json", os.path.join(golden.ds, "vm1")).stdout)
    assert info["encrypted"] is True and info["state"] == "encrypted"
    assert info["cipher"].startswith("aes-xts-plain64")
    assert info["sector_size"] == 512
    assert info["kek"] == want_kek
    assert info["kek"]["provider"] == "golden"
    assert re.fullmatch(r"[0-9a-f]{32}", info["kek"]["keyId"])
    files = {f["name"]: f for f in info["files"]}
    vm1 = {rel[4:]: v for rel, v in MANIFEST["files"].items() if rel.startswith("vm1/")}
    assert set(files) == set(vm1), "the folder key file is hidden; every other file is listed"
    for name, want in vm1.items():
        got = files[name]
        assert got["role"] == want["role"], name
        assert got["key_in"] == want["key_in"], name
        if want["role"] == "encrypted":
            assert got["kek"] == want_kek
        else:
            assert got["kek"] is None

    one = json.loads(golden.run("info", "--json", os.path.join(golden.ds, "vm1", "disk.vmdk")).stdout)
    assert one["disk"]["kek"] == want_kek
    assert {f["name"] for f in one["files"]} == {"disk.vmdk", "disk-flat.vmdk"}

    plain = json.loads(golden.run("info", "--json", os.path.join(golden.ds, "plain")).stdout)
    assert plain["encrypted"] is False and plain["state"] == "plain"
    assert plain["kek"] is None and plain["cipher"] is None
    assert {f["name"]: f["role"] for f in plain["files"]} == {"data.bin": "plaintext", "notes.txt": "plaintext"}


@pytest.mark.cli
def test_key_file_mode_is_enforced(tmp_path):
    """As committed (git keeps no modes) the key file may be world-readable: the provider must refuse it."""
    g = Golden(str(tmp_path))
    try:
        os.chmod(os.path.join(g.base, "config", "native-golden.key"), 0o644)
        proc = g.run("cat", os.path.join(g.ds, "vm1", "vm1.nvram"), check=False)
        assert proc.returncode != 0
        assert b"chmod 600" in proc.stderr
    finally:
        g.cleanup()


def _make_golden():
    sys.path.insert(0, GOLDEN)
    try:
        import make_golden
    finally:
        sys.path.remove(GOLDEN)
    return make_golden


def _format_md_block(marker: str, what: str, fenced: bool = False) -> str:
    """The text between docs/FORMAT.md's `<!-- MARKER:begin -->` and `<!-- MARKER:end -->` (inside a ```text fence)."""
    with open(FORMAT_MD, encoding="utf-8") as f:
        text = f.read()
    inner = r"```text\n(.*?)\n```" if fenced else r"(.*?)"
    block = re.search(rf"<!-- {marker}:begin -->\n{inner}\n<!-- {marker}:end -->", text, re.S)
    assert block, f"docs/FORMAT.md lost its {what}"
    return block.group(1)


def test_library_reproduces_format_md_vectors():
    """The vectors in docs/FORMAT.md are what vmfs-crypt's own code computes (make_golden.py --vectors)."""
    assert _format_md_block("test-vectors", "test vector block", fenced=True) == _make_golden().format_vectors()


def test_library_reproduces_the_reencrypt_vector():
    """FORMAT.md 9.4 (a deep rekey in flight) is what vmfs-crypt's own code writes (make_golden.py --reencrypt-vectors)."""
    assert _format_md_block("reencrypt-vectors", "re-encryption vector") == _make_golden().reencrypt_vectors()


def test_library_reproduces_the_abort_vector():
    """FORMAT.md 9.5 (an abort in flight) is what vmfs-crypt's own code writes (make_golden.py --abort-vectors)."""
    assert _format_md_block("abort-vectors", "abort vector") == _make_golden().abort_vectors()
