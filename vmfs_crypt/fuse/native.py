"""Point libfuse's read and write entries at the compiled core, so those requests never enter the interpreter.

mfusepy builds a ctypes `fuse_operations` table and passes it to `fuse_main_real` without
a hook in between; `serving_natively` wraps that one call, writes the native entries'
addresses into the table's `read` and `write` slots, and hands mfusepy's own callbacks to
the core as the fallback for handles it does not serve (descriptors, undecided new files).
The callbacks stay alive as long as mfusepy's table does. mfusepy is pinned (setup.cfg);
tests/test_native.py mounts through this under libfuse 2 and 3 and checks the core's counters.
"""

import contextlib
import ctypes

import mfusepy

from ..crypto.native import native


def install_into(ops, fuse_major: int) -> dict:
    """Write the native read/write entries into a ctypes `fuse_operations` (libfuse `fuse_major` ABI)."""
    fields = type(ops)
    slots = {name: ctypes.c_void_p.from_buffer(ops, getattr(fields, name).offset) for name in ("read", "write")}
    fallback_read, fallback_write = slots["read"].value or 0, slots["write"].value or 0
    native_read, native_write = native.install(fallback_read, fallback_write, fuse_major=fuse_major)
    slots["read"].value, slots["write"].value = native_read, native_write
    return {"read": native_read, "write": native_write}


@contextlib.contextmanager
def serving_natively():
    """While the block runs, mfusepy's fuse_main_real gets the native read/write entries installed first."""
    real = mfusepy.fuse_main_real

    def fuse_main_real(argc, argv, ops_p, size, user_data):
        install_into(ops_p.contents, mfusepy.fuse_version_major)
        return real(argc, argv, ops_p, size, user_data)

    mfusepy.fuse_main_real = fuse_main_real
    try:
        yield
    finally:
        mfusepy.fuse_main_real = real
