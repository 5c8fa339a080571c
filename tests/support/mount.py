"""The one helper that mounts: the real CLI, a time-out, diagnostics on failure, always an unmount."""

import contextlib
import os
import subprocess
import sys

from .env import VmfsEnv, is_mounted

MOUNT_TIMEOUT_S = 60


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
