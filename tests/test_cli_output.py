"""The CLI for people and scripts (issue 9): install, the README's quick start, --json, exit codes, help, progress, man page."""

import configparser
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from support import REPO, is_mounted, mounted

CLI_BIN = os.path.join(os.path.dirname(sys.executable), "vmfs-crypt")


def readme() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_pykmip_is_an_install_dependency_pinned_like_the_extra():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    install = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if line.strip()]
    extra = [line.strip() for line in cfg["options.extras_require"]["kmip"].splitlines() if line.strip()]
    assert "pykmip==0.11.0" in install
    assert extra == ["pykmip==0.11.0"]  # the old extra is an alias of the same pin


@pytest.mark.cli
@pytest.mark.fuse
def test_readme_quick_start_runs_as_written(venv_env, tmp_path):
    """The README's block, with /srv and /mnt moved into the test's folder, run by a shell."""
    text = readme()
    block = text.split("The commands a user needs", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    assert "mkdir -p /srv/ds/vm1 /mnt/ds" in block  # the mount point is made before the mount
    root = str(tmp_path / "root")
    script = block.replace("/srv/", root + "/srv/").replace("/mnt/", root + "/mnt/")
    env = dict(venv_env.env, VMFS_CRYPT_CONFIG=str(tmp_path / "qs" / "config.toml"))
    if os.path.exists(CLI_BIN):  # where `make deps` puts the command
        env["PATH"] = os.path.dirname(CLI_BIN) + os.pathsep + env["PATH"]
    else:
        pytest.skip(f"no console script at {CLI_BIN}")
    mnt = os.path.join(root, "mnt", "ds")
    venv_env.mounts.append(mnt)
    proc = subprocess.run(["bash", "-e", "-x", "-c", script], env=env, capture_output=True, timeout=300,
                          cwd=str(tmp_path))
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    out = proc.stdout.decode()
    assert "vm1: encrypted" in out, out
    assert not is_mounted(mnt)
    with open(os.path.join(root, "srv", "ds", "vm1", "disk.vmdk"), "rb") as f:
        assert b"encryption.keySafe" in f.read()
    subprocess.run([CLI_BIN, "agent", "stop", "--force"], env=env, capture_output=True, timeout=30)
