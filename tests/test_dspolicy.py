"""The datastore policy file's MUST-reject rules (docs/FORMAT.md 7.7), without a mount."""

import json
import os

import pytest

from vmfs_crypt.errors import FormatError
from vmfs_crypt.format.dspolicy import POLICY_NAME, DatastorePolicy, read_policy, write_policy

GOOD = {"format": "vmfs-crypt-datastore-policy", "version": 1, "features": [], "encrypt_new_folders": True,
        "provider": "kms"}


def test_round_trip_and_missing_file_is_the_default(tmp_path):
    assert read_policy(str(tmp_path)) == DatastorePolicy(False, None)
    write_policy(str(tmp_path), DatastorePolicy(True, "kms"))
    path = tmp_path / POLICY_NAME
    assert json.loads(path.read_text()) == GOOD and path.read_text().endswith("\n")
    assert read_policy(str(tmp_path)) == DatastorePolicy(True, "kms")


@pytest.mark.parametrize("text", [
    b"\xff\xfe", b"[]", b'{"format": "x"}', json.dumps(dict(GOOD, format="vmfs-crypt-folder")).encode(),
    json.dumps(dict(GOOD, version=2)).encode(), json.dumps(dict(GOOD, version=1.0)).encode(),
    json.dumps(dict(GOOD, features=["x"])).encode(), json.dumps({k: v for k, v in GOOD.items() if k != "features"}).encode(),
    json.dumps(dict(GOOD, extra=1)).encode(), json.dumps({k: v for k, v in GOOD.items() if k != "provider"}).encode(),
    json.dumps(dict(GOOD, encrypt_new_folders=1)).encode(), json.dumps(dict(GOOD, encrypt_new_folders="true")).encode(),
    json.dumps(dict(GOOD, provider="")).encode(), json.dumps(dict(GOOD, provider=3)).encode(),
    b'{"encrypt_new_folders": true, "encrypt_new_folders": false, "format": "vmfs-crypt-datastore-policy"}',
    b" " * (64 << 10) + json.dumps(GOOD).encode(),
])
def test_every_must_reject_rule(tmp_path, text):
    (tmp_path / POLICY_NAME).write_bytes(text)
    with pytest.raises(FormatError):
        read_policy(str(tmp_path))


def test_a_link_or_a_directory_is_rejected(tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps(GOOD))
    os.symlink(target, tmp_path / POLICY_NAME)
    with pytest.raises(FormatError, match="not a regular file"):
        read_policy(str(tmp_path))
    os.unlink(tmp_path / POLICY_NAME)
    os.mkdir(tmp_path / POLICY_NAME)
    with pytest.raises(FormatError):
        read_policy(str(tmp_path))
