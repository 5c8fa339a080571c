"""The mount serves reads and writes of decided handles through the compiled core, and says which data path runs."""

import os
import re

import pytest

from support import mounted
from vmfs_crypt.crypto.native import native

pytestmark = [pytest.mark.cli, pytest.mark.fuse]


@pytest.fixture
def enc_env(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    os.makedirs(os.path.join(venv_env.datastore, "plain"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
    return venv_env


def _served(logs: str) -> dict[str, int]:
    line = [ln for ln in logs.splitlines() if "data path native served" in ln][-1]
    return {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", line.split("served", 1)[1])}


@pytest.mark.skipif(native is None, reason="the compiled core is not built")
def test_reads_and_writes_are_served_natively(enc_env):
    data = os.urandom(300_000)
    with mounted(enc_env) as mnt:
        for rel in ("vm1/disk-flat.vmdk", "vm1/new.nvram", "plain/file.bin"):
            path = os.path.join(mnt, rel)
            with open(path, "r+b" if os.path.exists(path) else "w+b") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
                f.seek(0)
                assert f.read(len(data)) == data
        with open(os.path.join(mnt, "vm1", "disk.vmdk"), "rb") as f:
            assert f.read().startswith(b"# Disk DescriptorFile")  # served by Python (a descriptor view)
    assert "data path: native" in enc_env.mount_logs()
    served = _served(enc_env.mount_logs())
    assert served["reads"] > 0 and served["writes"] > 0, served
    assert served["fallback_reads"] >= 1, "the descriptor read went to Python"
    with open(os.path.join(enc_env.datastore, "vm1", "new.nvram"), "rb") as f:
        assert f.read() != data  # ciphertext at rest
    with open(os.path.join(enc_env.datastore, "plain", "file.bin"), "rb") as f:
        assert f.read() == data


def test_the_python_data_path_when_the_core_is_off(enc_env):
    enc_env.env["VMFS_CRYPT_NATIVE"] = "0"
    assert b"data path: python" in enc_env.run("--version").stdout
    data = os.urandom(70_000)
    with mounted(enc_env) as mnt:
        with open(os.path.join(mnt, "vm1", "new.nvram"), "wb") as f:
            f.write(data)
        with open(os.path.join(mnt, "vm1", "new.nvram"), "rb") as f:
            assert f.read() == data
    assert "data path: python" in enc_env.mount_logs()
    assert "data path native served" not in enc_env.mount_logs()
