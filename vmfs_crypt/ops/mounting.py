"""Mount orchestration: start the mount process, wait until the mount is live, unmount and wait for it to end."""

import hashlib
import os
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass

from ..config import Config
from ..daemon import under_journal
from ..errors import InUseError, MountError
from ..fs.dslock import lock_info
from ..fs.mounts import MountEntry, check_mount_args, mounts, vmfs_mounts
from ..procs import raise_for, spawn_detached
from ..runtime import ensure_runtime_dir
from ..sysutil import proc_cmdline
from .inuse import other_pids

MOUNT_TIMEOUT_S = 30.0
UMOUNT_TIMEOUT_S = 30.0


def _tag(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:12]


def log_file(mountpoint: str) -> str:
    return os.path.join(ensure_runtime_dir(), f"mount-{_tag(mountpoint)}.log")


# Options of mount(8), fstab and systemd, not of the filesystem: accepted and dropped (issue 9).
# dev, suid and exec too: mount.fuse3 adds "dev,suid" for root, and libfuse's safe defaults
# (nodev, nosuid) stay; nodev, nosuid, noexec, ro and the other kernel flags reach libfuse.
MOUNT_ONLY_OPTIONS = frozenset({"defaults", "auto", "noauto", "nofail", "_netdev", "user", "users", "nouser",
                                "owner", "group", "rw", "dev", "suid", "exec", "sw", "loop"})
MOUNT_ONLY_PREFIXES = ("x-", "X-", "comment=")


def split_mount_options(text: str | None) -> tuple[dict, str]:
    """(ours, fuse): `config=`, `agent=` and `allow_other` for vmfs-crypt; the mount-only options
    dropped; the rest, for libfuse, which names any it does not know."""
    ours: dict = {}
    fuse: list[str] = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, eq, value = item.partition("=")
        if key in ("config", "agent") and eq:
            ours[key] = value
        elif item == "allow_other":
            ours["allow_other"] = True
        elif item in MOUNT_ONLY_OPTIONS or item.startswith(MOUNT_ONLY_PREFIXES):
            continue
        else:
            fuse.append(item)
    return ours, ",".join(fuse)


def mount_background(config: Config, datastore: str, mountpoint: str, agent_socket: str | None,
                     options_text: str | None, allow_other: bool) -> str:
    """Start the mount process detached and return once the mount is up (or fail with its message)."""
    check_mount_args(datastore, mountpoint)
    log_path = log_file(mountpoint)
    cmd = [sys.executable, "-m", "vmfs_crypt.cli.mountd", "--config", config.path, datastore, mountpoint]
    if agent_socket:
        cmd += ["--agent", agent_socket]
    if options_text:
        cmd += ["-o", options_text]
    if allow_other:
        cmd.append("--allow-other")
    proc, msg = spawn_detached(cmd, log_path, MOUNT_TIMEOUT_S)
    if msg == "ok":
        return "the journal" if under_journal() else log_path
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


@dataclass(frozen=True)
class Holder:
    """A process that keeps a mount in use: `what` it holds there, and whether from another mount namespace."""

    pid: int
    command: str
    what: str
    other_namespace: bool

    def __str__(self) -> str:
        where = " in another mount namespace" if self.other_namespace else ""
        return f"pid {self.pid} ({self.command}){where}: {self.what}"


def _mnt_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _uses(pid: int, ids: set[int], dev: str, paths: list[str]) -> str | None:
    """What process `pid` holds on the mounts `ids` (of filesystem `dev`, at `paths` in its namespace):
    its cwd or root (by path: a stat could hang on another, dead filesystem), an open or mapped file."""
    major, _, minor = dev.partition(":")
    for link, what in (("cwd", "its working directory"), ("root", "its root directory")):
        try:
            here = os.readlink(f"/proc/{pid}/{link}")
        except OSError:
            continue
        if any(here == p or here.startswith(p.rstrip("/") + "/") for p in paths):
            return f"{what} is {here}"
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        fds = []
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
                mnt_id = next((int(line.split()[1]) for line in f if line.startswith("mnt_id:")), None)
            if mnt_id in ids:
                return f"has {os.readlink(f'/proc/{pid}/fd/{fd}')} open"
        except (OSError, ValueError):
            pass
    maps_dev = f"{int(major):02x}:{int(minor):02x}"
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[3] == maps_dev and fields[4] != "0":
                    return f"has {fields[5].strip()} mapped"
    except OSError:
        pass
    return None


def mount_holders(entry: MountEntry, server_pid: int | None) -> list[Holder]:
    """Who keeps the mount `entry` in use, in this mount namespace or another (issue 9: libvirt runs
    QEMU in a private namespace; `umount` here left the daemon serving it there and said
    "unmounted"). A namespace with a copy of the mount that our unmount would not reach (not a
    peer or slave of ours) holds it even when no file is open there: its first process is named.
    """
    mine = _mnt_ns("self")
    groups = {f.split(":", 1)[1] for f in entry.propagation if f.startswith("shared:")}
    tables: dict[str, list[MountEntry]] = {}
    holders: list[Holder] = []
    stranded: dict[str, int] = {}  # namespace -> its first pid, where our unmount does not propagate
    for pid in other_pids():
        if pid == server_pid:
            continue
        ns = _mnt_ns(pid)
        if ns is None:
            continue
        if ns == mine:
            ids, paths = {entry.mount_id}, [entry.mountpoint]
        else:
            if ns not in tables:
                try:
                    tables[ns] = [m for m in mounts(pid) if m.dev == entry.dev]
                except (OSError, ValueError):
                    continue
            copies = tables[ns]
            ids, paths = {m.mount_id for m in copies}, [m.mountpoint for m in copies]
            if not ids:
                continue
            reached = any(f.split(":", 1)[1] in groups for m in copies for f in m.propagation
                          if f.startswith(("shared:", "master:")))
            if not reached:
                stranded.setdefault(ns, pid)
        what = _uses(pid, ids, entry.dev, paths)
        if what:
            holders.append(Holder(pid, proc_cmdline(pid, 80), what, ns != mine))
    named = {ns for ns in stranded if any(h.other_namespace and _mnt_ns(h.pid) == ns for h in holders)}
    for ns, pid in stranded.items():
        if ns not in named:
            holders.append(Holder(pid, proc_cmdline(pid, 80), f"its mount namespace ({ns}) has the mount too, "
                                  "and unmounting here does not reach it", True))
    return holders


def _in_use(mountpoint: str, holders: list[Holder]) -> InUseError:
    shown = "; ".join(map(str, holders[:5])) + (f"; and {len(holders) - 5} more" if len(holders) > 5 else "")
    return InUseError(f"{mountpoint} is still in use, not unmounted: {shown}")


def umount(mountpoint: str) -> None:
    """Unmount, and wait until the mount process has ended; refuse, naming the holders, while it is in use."""
    target = os.path.realpath(mountpoint)
    entry = next((m for m in mounts() if m.mountpoint == target), None)
    if entry is None:
        raise MountError(f"{mountpoint} is not mounted")
    pid = mount_pid(mountpoint)
    holders = mount_holders(entry, pid) if entry.datastore else []
    if holders:
        raise _in_use(mountpoint, holders)
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", mountpoint] if tool else ["umount", mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        holders = mount_holders(entry, pid) if entry.datastore else []
        if holders:
            raise _in_use(mountpoint, holders)
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
        ended, _, _ = select.select([pidfd], [], [], UMOUNT_TIMEOUT_S)
    finally:
        os.close(pidfd)
    if not ended:  # unmounted here, yet still serving: a holder we could not see (another user's namespace)
        raise InUseError(f"{mountpoint} is unmounted here, but its mount process {pid} still serves it after "
                         f"{UMOUNT_TIMEOUT_S:.0f} s: another mount namespace or process still uses it")
