"""Process hardening for processes that hold keys: no core dumps, not dumpable (no ptrace by peers)."""

import ctypes
import ctypes.util
import resource

PR_SET_DUMPABLE = 4


def disable_core_dumps() -> None:
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def is_dumpable() -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    return libc.prctl(3, 0, 0, 0, 0) == 1  # PR_GET_DUMPABLE
