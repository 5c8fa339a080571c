"""Linux system calls the standard library lacks (fallocate, mallopt, prctl, peer credentials) and process hardening."""

import ctypes
import ctypes.util
import errno
import fcntl
import os
import resource
import socket
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
M_ARENA_MAX = -8  # mallopt parameter, <malloc.h>
M_TOP_PAD = -2  # mallopt parameters, <malloc.h>
M_MMAP_THRESHOLD = -3


def libc_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def cap_malloc_arenas(count: int) -> None:
    """glibc gives each thread that mallocs its own arena; cap them (bounds a multithreaded daemon's RSS)."""
    _libc.mallopt(M_ARENA_MAX, count)


def keep_heap_top(pad_bytes: int) -> bool:
    """Let malloc serve buffers of up to 32 MiB from its heap and keep `pad_bytes` free at its
    top instead of giving them back to the kernel at each free (M_MMAP_THRESHOLD at glibc's
    maximum, M_TOP_PAD): a process that allocates and frees buffers of megabytes over and over
    then stops paying page faults for them. M_TOP_PAD alone does nothing once the heap exists:
    large requests keep going to mmap. False if glibc refused either."""
    return _libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1 and _libc.mallopt(M_TOP_PAD, pad_bytes) == 1


def disable_core_dumps() -> None:
    """No core dumps and not dumpable (no ptrace by same-uid peers): for processes that hold keys."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def is_dumpable() -> bool:
    return _libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) == 1


@dataclass(frozen=True)
class PeerCred:
    """Who is at the other end of a Unix socket, as the kernel says (SO_PEERCRED), not as the peer claims."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred:
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return PeerCred(pid, uid, gid)


RENAME_NOREPLACE = 1
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


def renameat2(src_dir_fd: int, src: str, dst_dir_fd: int, dst: str, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE: fail with EEXIST instead of replacing, atomically)."""
    if _libc.renameat2(src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+; Python 3.11 does not name it
NGROUPS_MAX = 65536


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The supplementary groups of the peer's credentials at connect time, from the kernel (SO_PEERGROUPS).

    Race-free, unlike reading /proc/PID/status of a pid that may have exited and been reused.
    """
    size = 4 * 256
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
            return struct.unpack(f"{len(raw) // 4}I", raw[:len(raw) // 4 * 4])
        except OSError as exc:
            if exc.errno != errno.ERANGE or size >= 4 * NGROUPS_MAX:
                raise
            size = 4 * NGROUPS_MAX
def proc_cmdline(pid: int, limit: int = 200) -> str:
    """A process's command line as one line (at most `limit` characters), "?" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(4 * limit)
    except OSError:
        return "?"
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace").strip()
    if not text:  # a kernel thread or a zombie: its name
        try:
            with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as f:
                text = f"[{f.read().strip()}]"
        except OSError:
            return "?"
    return text if len(text) <= limit else text[:limit - 3] + "..."


_FLOCK = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid


def posix_lock_conflict(fd: int, exclusive: bool) -> tuple[bool, int] | None:
    """(exclusive, pid) of a POSIX record lock that would block ours on the whole file (F_GETLK), or None.

    The pid is the holder's as the kernel knows it (0 or meaningless for a lock held by
    another NFS client).
    """
    wanted = fcntl.F_WRLCK if exclusive else fcntl.F_RDLCK
    l_type, _, _, _, l_pid = _FLOCK.unpack(fcntl.fcntl(fd, fcntl.F_GETLK, _FLOCK.pack(wanted, 0, 0, 0, 0)))
    if l_type == fcntl.F_UNLCK:
        return None
    return l_type == fcntl.F_WRLCK, l_pid
