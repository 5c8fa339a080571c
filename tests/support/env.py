"""An isolated vmfs-crypt environment: private config, runtime directory and datastore; the real CLI.

The CLI under test is the checkout at $VMFS_TEST_REPO when set (e.g. an older commit, to show
that a new test fails there), else this repository.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
GOLDEN = os.path.join(TESTS, "golden")
CLI_REPO = os.environ.get("VMFS_TEST_REPO") or REPO
CLI = [sys.executable, "-m", "vmfs_crypt.cli"]


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: str) -> dict[str, str]:
    """Hash of every file under root: to prove an operation that failed changed nothing."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == ".vmfs-crypt-mount.lock":  # made by every mount of the datastore (fs/dslock.py)
                continue
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, root)] = sha256_file(p)
    return out


def is_mounted(path: str) -> bool:
    """Written here again on purpose: the tests check mounts independently of the code under test."""
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


class VmfsEnv:
    """A private config, runtime dir and datastore; `run` calls the real CLI as a user would."""

    def __init__(self, base: str, config: str | None = None, datastore: str | None = None) -> None:
        self.base = base
        self.config = config or os.path.join(base, "cfg", "config.toml")
        self.datastore = datastore or os.path.join(base, "ds")
        self.runtime = tempfile.mkdtemp(prefix="vcrt-", dir="/tmp")  # short: AF_UNIX paths are <108 bytes
        os.makedirs(self.datastore, exist_ok=True)
        self.env = dict(os.environ, VMFS_CRYPT_CONFIG=self.config, XDG_RUNTIME_DIR=self.runtime,
                        PYTHONPATH=CLI_REPO)
        self.mounts: list[str] = []

    @classmethod
    def golden(cls, base: str) -> "VmfsEnv":
        """A private copy of tests/golden/ (its config with the native key, and its datastore)."""
        for name in ("config", "ds"):
            shutil.copytree(os.path.join(GOLDEN, name), os.path.join(base, name))
        # git keeps no file modes: the native key file must be private again, or the provider refuses it.
        os.chmod(os.path.join(base, "config", "native-golden.key"), 0o600)
        return cls(base, os.path.join(base, "config", "config.toml"), os.path.join(base, "ds"))

    @property
    def ds(self) -> str:
        return self.datastore

    def run(self, *args, input=None, check=True, timeout=300, env=None) -> subprocess.CompletedProcess:
        # cwd: not the repository, so that PYTHONPATH (the CLI under test) decides which vmfs_crypt runs
        proc = subprocess.run(CLI + [str(a) for a in args], env=env or self.env, input=input, capture_output=True,
                              timeout=timeout, cwd=self.base)
        if check and proc.returncode != 0:
            raise AssertionError(f"vmfs-crypt {' '.join(map(str, args))} exited {proc.returncode}:\n"
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc

    def tool(self, *cmd, check=True, timeout=300) -> subprocess.CompletedProcess:
        """Run another program (qemu-img, qemu-io, fio...) in this environment."""
        proc = subprocess.run([str(c) for c in cmd], env=self.env, capture_output=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n"
                                 f"{proc.stdout.decode(errors='replace')}\n{proc.stderr.decode(errors='replace')}")
        return proc

    def mount_logs(self) -> str:
        logs = []
        for dirpath, _, files in os.walk(self.runtime):
            for name in files:
                if name.endswith(".log"):
                    with open(os.path.join(dirpath, name), errors="replace") as f:
                        logs.append(f"--- {name}\n{f.read()[-8000:]}")
        return "\n".join(logs)

    def cleanup(self) -> None:
        for mp in self.mounts:
            if is_mounted(mp):
                subprocess.run(["fusermount", "-uz", mp], capture_output=True)
        self.run("agent", "stop", "--force", check=False, timeout=30)
        shutil.rmtree(self.runtime, ignore_errors=True)
