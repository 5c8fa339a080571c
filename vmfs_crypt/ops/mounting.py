"""Mount orchestration: start the mount process, wait until the mount is live, unmount and wait for it to end."""

import hashlib
import os
import select
import shutil
import subprocess
import sys

from ..config import Config
from ..errors import MountError
from ..fs.dslock import lock_info
from ..fs.mounts import check_mount_args, is_mounted, vmfs_mounts
from ..procs import raise_for, spawn_detached
from ..runtime import ensure_runtime_dir

MOUNT_TIMEOUT_S = 30.0
UMOUNT_TIMEOUT_S = 30.0


def _tag(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:12]


def log_file(mountpoint: str) -> str:
    return os.path.join(ensure_runtime_dir(), f"mount-{_tag(mountpoint)}.log")


def mount_background(config: Config, datastore: str, mountpoint: str, agent_socket: str | None,
                     options_text: str | None, allow_other: bool) -> str:
    """Start the mount process detached and return once the mount is up (or fail with its message)."""
    check_mount_args(datastore, mountpoint)
    log_path = log_file(mountpoint)
    cmd = [sys.executable, "-m", "vmfs_crypt.fuse", "--config", config.path, datastore, mountpoint]
    if agent_socket:
        cmd += ["--agent", agent_socket]
    if options_text:
        cmd += ["-o", options_text]
    if allow_other:
        cmd.append("--allow-other")
    proc, msg = spawn_detached(cmd, log_path, MOUNT_TIMEOUT_S)
    if msg == "ok":
        return log_path
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    if msg.startswith("error "):
        raise_for(msg, MountError, f"the mount failed; see {log_path}")
    tail = ""
    try:
        with open(log_path, "r", encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-5:]).strip()
    except OSError:
        pass
    raise MountError(f"the mount did not come up within {MOUNT_TIMEOUT_S:.0f} s: {tail or 'see ' + log_path}")


def mount_pid(mountpoint: str) -> int | None:
    """The pid of the process serving a vmfs-crypt mount (from the datastore's mount lock file)."""
    target = os.path.realpath(mountpoint)
    for m in vmfs_mounts():
        if m.mountpoint == target:
            info = lock_info(m.datastore)
            return info.get("pid") if info.get("mountpoint") == target else None
    return None


def umount(mountpoint: str) -> None:
    if not is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is not mounted")
    pid = mount_pid(mountpoint)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MountError(f"{mountpoint}: unmount failed: {proc.stderr.strip() or proc.stdout.strip()} "
                         "(is a program still using it? see 'fuser -m')")
    # Wait for the mount process to exit so that the datastore is quiet when we return.
    if not isinstance(pid, int):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [], UMOUNT_TIMEOUT_S)
    finally:
        os.close(pidfd)
