"""The kernel's mount table as vmfs-crypt needs it: is a path a mount point, and which datastore serves a mount."""

import os
from dataclasses import dataclass

from ..errors import MountError, UsageError

SUBTYPE = "vmfs-crypt"  # the mount's type is fuse.vmfs-crypt and its source the datastore (issue 9)
FSTYPE = "fuse." + SUBTYPE
OLD_FSNAME_PREFIX = "vmfs-crypt:"  # the source of mounts made before issue 9: "vmfs-crypt:DATASTORE"


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit() and len(field[i + 1:i + 4]) == 3:
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@dataclass(frozen=True)
class MountEntry:
    mountpoint: str
    fstype: str
    source: str
    mount_id: int = 0
    dev: str = ""  # "major:minor" of the filesystem (a FUSE connection's number)
    propagation: tuple = ()  # the optional fields, e.g. ("shared:1",) or ("master:3",)

    @property
    def datastore(self) -> str | None:
        """The backing datastore of a vmfs-crypt mount (None for any other filesystem)."""
        if self.fstype == FSTYPE and self.source.startswith("/"):
            return self.source
        if self.fstype.startswith("fuse") and self.source.startswith(OLD_FSNAME_PREFIX):
            return self.source[len(OLD_FSNAME_PREFIX):]
        return None


def parse_mountinfo(text: str) -> list[MountEntry]:
    out = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        out.append(MountEntry(_unescape(fields[4]), fields[sep + 1], _unescape(fields[sep + 2]),
                              int(fields[0]), fields[2], tuple(fields[6:sep])))
    return out


def mounts(pid: int | str = "self") -> list[MountEntry]:
    """The mount table of process `pid`'s mount namespace (ours by default)."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8") as f:
        return parse_mountinfo(f.read())


def is_mounted(mountpoint: str) -> bool:
    target = os.path.realpath(mountpoint)
    return any(m.mountpoint == target for m in mounts())


def vmfs_mounts() -> list[MountEntry]:
    return [m for m in mounts() if m.datastore is not None]


def backing_path(path: str) -> str:
    """The datastore path behind `path` when it lies inside a vmfs-crypt mount, else `path` itself."""
    real = os.path.realpath(path)
    best = None
    for m in vmfs_mounts():
        if real == m.mountpoint or real.startswith(m.mountpoint.rstrip("/") + "/"):
            if best is None or len(m.mountpoint) > len(best.mountpoint):
                best = m
    if best is None:
        return path
    rel = os.path.relpath(real, best.mountpoint)
    return os.path.normpath(os.path.join(best.datastore, rel))


def mounts_of(datastore: str) -> list[MountEntry]:
    ds = os.path.realpath(datastore)
    return [m for m in vmfs_mounts() if m.datastore == ds]


def check_mount_args(datastore: str, mountpoint: str) -> None:
    if not os.path.isdir(datastore):
        raise UsageError(f"{datastore}: the datastore must be a directory")
    if not os.path.isdir(mountpoint):
        raise UsageError(f"{mountpoint}: the mount point must be an existing directory (mkdir -p {mountpoint})")
    if is_mounted(mountpoint):
        raise MountError(f"{mountpoint} is already a mount point; unmount it first")
    if os.listdir(mountpoint):
        raise UsageError(f"{mountpoint} is not empty; mount on an empty directory")
    ds, mp = os.path.realpath(datastore), os.path.realpath(mountpoint)
    if mp == ds or mp.startswith(ds + os.sep):
        raise UsageError(f"{mountpoint} lies inside the datastore {datastore}; choose a mount point outside it")
