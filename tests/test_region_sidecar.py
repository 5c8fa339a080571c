"""format/reencrypt.py's region sidecar writer (FORMAT.md 7.8), which overwrites the previous
sidecar in place and hashes while it writes (issue 13): only a complete sidecar of the region
in flight reads back as valid, and a hard-linked sidecar path is refused."""

import hashlib
import os

import pytest

from vmfs_crypt.errors import FormatError
from vmfs_crypt.format.reencrypt import (REGION_NAME, ReencryptFile, ReencryptState, _region_header, read_region,
                                         write_region)

R = 4096


def _state(boundary: int, size: int = 5 * R) -> ReencryptState:
    return ReencryptState(op="encrypt", region_size=R, kek=None,
                          files=[ReencryptFile(name="disk-flat.vmdk", size=size, boundary=boundary, frm=None, to=None,
                                               descriptor=None)])


def test_each_region_replaces_the_last_and_the_file_is_cut_to_size(tmp_path):
    d = str(tmp_path)
    first, last = os.urandom(R), os.urandom(R // 2)
    write_region(d, "disk-flat.vmdk", 0, first)
    assert read_region(d, _state(0)) == (0, first)
    # the last region of a 4.5-region file is shorter: the longer sidecar's tail must go
    write_region(d, "disk-flat.vmdk", 4 * R, last)
    size = os.path.getsize(os.path.join(d, REGION_NAME))
    assert size == len(_region_header("disk-flat.vmdk", 4 * R, len(last), "0" * 64)) + len(last)
    assert read_region(d, _state(4 * R, size=4 * R + R // 2)) == (4 * R, last)
    assert read_region(d, _state(0)) is None  # the earlier region's sidecar is gone


def test_a_sidecar_overwritten_halfway_is_not_valid(tmp_path):
    d = str(tmp_path)
    old, new = os.urandom(R), os.urandom(R)
    write_region(d, "disk-flat.vmdk", 0, old)
    path = os.path.join(d, REGION_NAME)
    # a crash after the new region's bytes went in, before its header: the old header's offset
    with open(path, "r+b") as f:
        head = f.readline()
        f.write(new)
    assert read_region(d, _state(R)) is None
    # a crash after the new header, with half of the new bytes in: the hash
    with open(path, "r+b") as f:
        f.write(_region_header("disk-flat.vmdk", R, R, hashlib.sha256(new).hexdigest()))
        f.seek(len(head))
        f.write(old[: R // 2])
    assert read_region(d, _state(R)) is None


def test_a_hard_linked_sidecar_path_is_refused_and_the_other_file_kept(tmp_path):
    d = tmp_path / "vm1"
    d.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n" * 100)
    os.link(victim, d / REGION_NAME)
    with pytest.raises(FormatError, match="one link"):
        write_region(str(d), "disk-flat.vmdk", 0, os.urandom(R))
    assert victim.read_bytes() == b"precious\n" * 100
