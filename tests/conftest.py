"""Test fixtures: an isolated vmfs-crypt environment and the one helper that mounts through the real CLI."""

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "vmfs_crypt.cli"]
MOUNT_TIMEOUT_S = 60


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
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


class VmfsEnv:
    """A private config, runtime dir and datastore; `run` calls the real CLI as a user would."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.config = os.path.join(base, "cfg", "config.toml")
        self.datastore = os.path.join(base, "ds")
        self.runtime = tempfile.mkdtemp(prefix="vcrt-", dir="/tmp")  # short: AF_UNIX paths are <108 bytes
        os.makedirs(self.datastore)
        self.env = dict(os.environ, VMFS_CRYPT_CONFIG=self.config, XDG_RUNTIME_DIR=self.runtime,
                        PYTHONPATH=REPO)
        self.mounts: list[str] = []

    def run(self, *args, input=None, check=True, timeout=300) -> subprocess.CompletedProcess:
        proc = subprocess.run(CLI + [str(a) for a in args], env=self.env, input=input, capture_output=True,
                              timeout=timeout)
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
                        logs.append(f"--- {name}\n{f.read()[-4000:]}")
        return "\n".join(logs)

    def cleanup(self) -> None:
        for mp in self.mounts:
            if is_mounted(mp):
                subprocess.run(["fusermount", "-uz", mp], capture_output=True)
        self.run("agent", "stop", check=False, timeout=30)
        shutil.rmtree(self.runtime, ignore_errors=True)


@pytest.fixture
def venv_env(tmp_path):
    """An environment with a native provider 'local' as the default."""
    env = VmfsEnv(str(tmp_path))
    env.run("provider", "add", "native", "local")
    yield env
    env.cleanup()


@contextlib.contextmanager
def mounted(env: VmfsEnv, mountpoint: str | None = None, *extra, datastore: str | None = None):
    """Mount through the real CLI, yield the mount point, always unmount; dump logs if anything failed."""
    mountpoint = mountpoint or os.path.join(env.base, "mnt")
    os.makedirs(mountpoint, exist_ok=True)
    env.mounts.append(mountpoint)
    proc = env.run("mount", datastore or env.datastore, mountpoint, *extra, check=False, timeout=MOUNT_TIMEOUT_S + 10)
    if proc.returncode != 0 or not is_mounted(mountpoint):
        raise AssertionError(f"mount failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}\n"
                             f"{env.mount_logs()}")
    try:
        yield mountpoint
    except BaseException:
        print(env.mount_logs(), file=sys.stderr)
        raise
    finally:
        if is_mounted(mountpoint):
            result = env.run("umount", mountpoint, check=False, timeout=60)
            if result.returncode != 0:
                subprocess.run(["fusermount", "-uz", mountpoint], capture_output=True)
                raise AssertionError(f"umount failed: {result.stderr.decode(errors='replace')}")
