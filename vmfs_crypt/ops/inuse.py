"""Who has a folder's files open, at rest or through a vmfs-crypt mount, so that offline operations refuse to replace them.

Issue 7, case 2: `encrypt`, `decrypt` and `rekey --deep` build each file anew and rename it
over the old one. A program that held the old file open (QEMU on the disk at rest, or a VM
through the mount, whose backing file the mount holds open) went on writing to the unlinked
inode: its later writes were lost and the plaintext stayed there. So these operations refuse
a folder with an open file, naming the file, the holder (pid and command) and whether it
holds it at rest or through a mount; and just before their commit they look again and check
that no file changed meanwhile.

Where the holders come from: /proc/PID/fd (open files), /proc/PID/maps (mapped files) and
/proc/locks (POSIX and OFD locks; QEMU locks its images with OFD locks, which every user can
see even where the process's /proc entries are unreadable, but whose pid the kernel does not
say). A file open through a mount shows as the mount process holding the backing file: the
client is found through the mount's path of the folder. FUSE releases a closed file
asynchronously, so a hold that only the mount process shows is given a moment to go away.

The choice while the datastore is mounted (README "Commands"): an offline operation of a
folder is allowed when nothing in that folder is open through the mount (the mount keeps no
state of a folder without open files, and the plaintext it shows does not change), and
refused, naming the mount, otherwise; a mount this host cannot see into (its lock is held
on another NFS client) refuses it always. Shallow rekey only replaces descriptors that hold
keys, so it refuses only when one of those is open at rest: through the mount it is safe
(the mount writes a descriptor back with the key lines it finds at rest).
"""

import enum
import os
import stat
import time
from dataclasses import dataclass

from ..errors import InUseError
from ..format.descriptor import read_descriptor
from ..format.folder import FOLDER_KEYS_NAME, is_hidden_name
from ..fs.dslock import LOCK_NAME, lock_info, mounted_by
from ..fs.mounts import vmfs_mounts
from ..sysutil import proc_cmdline

RELEASE_WAIT_S = 2.0  # how long a hold seen only in the mount process may take to go away (FUSE release)
_POLL_S = 0.05


class Access(enum.Enum):
    """What an offline operation replaces in the folder, hence which holders it must refuse."""

    DATA = "data"  # data files and descriptors (encrypt, decrypt, rekey --deep): any open file
    KEYS = "keys"  # descriptors that hold keys (shallow rekey): such a descriptor open at rest


@dataclass(frozen=True)
class MountView:
    """A local vmfs-crypt mount that shows the folder."""

    mountpoint: str
    datastore: str
    folder_view: str  # the folder's path inside the mount
    pid: int | None  # the mount process (from the datastore's mount lock)


@dataclass(frozen=True)
class Holder:
    name: str  # the file, in the folder
    pid: int | None  # None: the kernel does not say (an OFD lock of a process we cannot see)
    command: str
    mount: str | None = None  # the mount point when it is held through a vmfs-crypt mount
    internal: bool = False  # only the mount process holds the backing file (its client is unseen, or closing)


def _ancestors(path: str) -> list[str]:
    out = [path]
    while True:
        parent = os.path.dirname(out[-1])
        if parent == out[-1]:
            return out
        out.append(parent)


def folder_mounts(folder_dir: str) -> tuple[list[MountView], list[str]]:
    """The local vmfs-crypt mounts showing this folder, and descriptions of mounts of it this host cannot look into."""
    folder_dir = os.path.realpath(folder_dir)
    views = []
    for m in vmfs_mounts():
        ds = m.datastore
        if folder_dir == ds or folder_dir.startswith(ds.rstrip("/") + "/"):
            info = lock_info(ds)
            pid = info.get("pid") if info.get("mountpoint") == m.mountpoint else None
            rel = os.path.relpath(folder_dir, ds)
            views.append(MountView(m.mountpoint, ds, os.path.normpath(os.path.join(m.mountpoint, rel)),
                                   pid if isinstance(pid, int) else None))
    seen = {v.datastore for v in views}
    unseen = []
    for v in views:
        # Fail closed: a mount whose process or view we cannot look into may hold anything open.
        try:
            if v.pid is None:
                raise PermissionError
            os.listdir(f"/proc/{v.pid}/fd")
            os.listdir(v.folder_view)
        except PermissionError:
            who = f"pid {v.pid}" if v.pid else "a process you cannot identify"
            unseen.append(f"{v.datastore} is mounted at {v.mountpoint} by {who}, whose open files you cannot see "
                          "(run this as root or as the mount's user)")
        except OSError:
            pass  # the mount process just ended, or the folder is not in the mount (yet): nothing held there
    for ds in _ancestors(folder_dir):
        if ds in seen or not os.path.lexists(os.path.join(ds, LOCK_NAME)):
            continue
        holder = mounted_by(ds)  # the mount lock is held, and no mount of it is in our mount table
        if holder:
            unseen.append(f"{ds} is mounted {holder}, where this host cannot see which files are open")
    return views, unseen


def other_pids() -> list[int]:
    """Every process but this one, lowest pid first."""
    me = os.getpid()
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != me)


def _dev_key(st: os.stat_result) -> tuple[int, int, int]:
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _parse_dev(text: str) -> tuple[int, int] | None:
    major, _, minor = text.partition(":")
    try:
        return int(major, 16), int(minor, 16)
    except ValueError:
        return None


def _locks() -> list[tuple[int, tuple[int, int, int]]]:
    """(pid, (major, minor, inode)) of every lock in /proc/locks (pid -1: an OFD lock, owned by no process)."""
    out = []
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        fields = [w for w in line.split() if w != "->"]  # "->": a waiter, which will hold it
        if len(fields) < 6:
            continue
        dev_ino = fields[5].rsplit(":", 1)
        dev = _parse_dev(dev_ino[0]) if len(dev_ino) == 2 else None
        try:
            pid, ino = int(fields[4]), int(dev_ino[1])
        except (ValueError, IndexError):
            continue
        if dev is not None:
            out.append((pid, (dev[0], dev[1], ino)))
    return out


def _scan(folder_dir: str, names: set[str], views: list[MountView]) -> list[Holder]:
    """Every process that has one of `names` of the folder open, mapped or locked, at rest or through a view."""
    dirs: dict[str, MountView | None] = {folder_dir: None}
    dirs.update({v.folder_view: v for v in views})
    inodes: dict[tuple[int, int, int], tuple[str, MountView | None]] = {}
    for d, view in dirs.items():
        for name in names:
            try:
                st = os.lstat(os.path.join(d, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                inodes[_dev_key(st)] = (name, view)
    mount_pids = {v.pid: v for v in views if v.pid}
    found: dict[tuple[int | None, str, str | None], Holder] = {}

    def add(pid: int | None, name: str, view: MountView | None) -> None:
        internal = view is None and pid in mount_pids
        mount = mount_pids[pid].mountpoint if internal else view.mountpoint if view else None
        key = (pid, name, mount)
        if key not in found:
            command = proc_cmdline(pid) if pid else "?"
            found[key] = Holder(name, pid, command, mount, internal)

    for pid in other_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone, or another user's process (its OFD locks still show in /proc/locks)
            fds = []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith("/") or target.endswith(" (deleted)"):
                continue
            d, name = os.path.split(target)
            if name in names and d in dirs:
                add(pid, name, dirs[d])
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                maps = f.read()
        except OSError:
            maps = ""
        for line in maps.splitlines():
            fields = line.split(None, 5)
            if len(fields) == 6 and fields[4] != "0":
                dev = _parse_dev(fields[3])
                hit = inodes.get((dev[0], dev[1], int(fields[4]))) if dev and fields[4].isdigit() else None
                if hit:
                    add(pid, *hit)
    for pid, key in _locks():
        hit = inodes.get(key)
        if hit is None or pid == os.getpid():
            continue
        name, view = hit
        if pid > 0:
            add(pid, name, view)
        elif not any(h.name == name for h in found.values()):
            mount = view.mountpoint if view else None
            found[(None, name, mount)] = Holder(name, None, "a process you cannot see holds an OFD lock on it, "
                                                "as QEMU does", mount)
    holders = list(found.values())
    # The mount process holding a backing file is its client's hold: name the client when we see it.
    clients = {(h.name, h.mount) for h in holders if not h.internal and h.mount}
    return [h for h in holders if not (h.internal and (h.name, h.mount) in clients)]


def holders(folder_dir: str, names: set[str], views: list[MountView]) -> list[Holder]:
    """The holders of `names` in the folder; a hold seen only in the mount process gets RELEASE_WAIT_S to go away."""
    deadline = time.monotonic() + RELEASE_WAIT_S
    while True:
        found = _scan(folder_dir, names, views)
        if not found or not all(h.internal for h in found) or time.monotonic() > deadline:
            return found
        time.sleep(_POLL_S)  # FUSE sends release after close() returned: wait for it, bounded


def describe(holders_: list[Holder]) -> str:
    """One line: each holder with its files and where it holds them."""
    groups: dict[tuple, list[str]] = {}
    for h in holders_:
        groups.setdefault((h.pid, h.command, h.mount, h.internal), []).append(h.name)
    parts = []
    for (pid, command, mount, internal), files in groups.items():
        files = ", ".join(sorted(set(files)))
        if internal:
            parts.append(f"the vmfs-crypt mount at {mount} (pid {pid}) holds {files} open for a process you "
                         "cannot see")
        elif pid is None:
            where = f"through the vmfs-crypt mount at {mount}" if mount else "at rest"
            parts.append(f"{files} {where}: {command}")
        else:
            where = f"through the vmfs-crypt mount at {mount}" if mount else "at rest"
            parts.append(f"pid {pid} ({command}) has {files} open {where}")
    return "; ".join(parts)


def _regular_names(folder_dir: str) -> set[str]:
    out = set()
    for entry in os.scandir(folder_dir):
        if not is_hidden_name(entry.name) and entry.is_file(follow_symlinks=False):
            out.add(entry.name)
    return out


def _keyed_descriptors(folder_dir: str) -> set[str]:
    out = set()
    for name in _regular_names(folder_dir):
        if name.lower().endswith(".vmdk"):
            desc = read_descriptor(os.path.join(folder_dir, name))
            if desc is not None and desc.has_encryption_lines:
                out.add(name)
    return out


def _stamp(path: str):
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class FolderGuard:
    """Refuses an offline operation on a folder whose files are in use, at its start and again just before its commit."""

    def __init__(self, folder_dir: str, op: str, access: Access) -> None:
        self.folder_dir = os.path.realpath(folder_dir)
        self.op = op
        self.access = access
        self._stamps: dict[str, object] = {}
        self._names_before: set[str] | None = None

    def _names(self) -> set[str]:
        return _regular_names(self.folder_dir) if self.access is Access.DATA else _keyed_descriptors(self.folder_dir)

    def check(self) -> None:
        """Raise InUseError if a file the operation replaces is open (by mode), and remember each file's state."""
        names = self._names()
        views, unseen = folder_mounts(self.folder_dir)
        if self.access is Access.DATA and unseen:
            raise InUseError(f"{self.folder_dir}: cannot {self.op}: {'; '.join(unseen)}; unmount it first "
                             "(nothing was changed)")
        found = holders(self.folder_dir, names, views if self.access is Access.DATA else [])
        if self.access is Access.KEYS:
            found = [h for h in found if not h.mount]
        if found:
            raise InUseError(f"{self.folder_dir} is in use: {describe(found)}; {self.op} replaces these files and "
                             "their later writes would be lost: stop them (or unmount) and try again "
                             "(nothing was changed)")
        if self._names_before is None:
            self._names_before = names
            self._stamps = {n: _stamp(os.path.join(self.folder_dir, n)) for n in names | {FOLDER_KEYS_NAME}}

    def check_again(self) -> None:
        """Just before the commit: nothing opened meanwhile, no file came or went, and none changed since `check`."""
        self.check()
        came = self._names() ^ self._names_before
        if came:
            raise InUseError(f"{self.folder_dir}: {', '.join(sorted(came))} appeared or disappeared during {self.op} "
                             "(another program, or a mount, changed the folder); nothing was changed: try again")
        for name, before in self._stamps.items():
            if _stamp(os.path.join(self.folder_dir, name)) != before:
                raise InUseError(f"{os.path.join(self.folder_dir, name)} changed during {self.op} (another program "
                                 "wrote to it, or a mount changed it); nothing was changed: try again")
