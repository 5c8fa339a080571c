"""The compiled data path, vmfs_crypt._native, if it can be used.

`native` is the extension module or None; `reason` says in one line why not, or which
libcrypto it runs on. Setting VMFS_CRYPT_NATIVE=0 turns it off (the pure Python path
is used). The module runs its own known-answer self-test when it loads; a failure shows
here as an ImportError reason, and `native` stays None (fail closed to the Python path).
"""

from __future__ import annotations

import os

native = None
reason: str

if os.environ.get("VMFS_CRYPT_NATIVE", "1") == "0":
    reason = "disabled by VMFS_CRYPT_NATIVE=0"
else:
    try:
        from .. import _native as native  # noqa: F811
    except ImportError as exc:
        native = None
        reason = f"vmfs_crypt._native unavailable: {exc}"
    else:
        reason = f"vmfs_crypt._native on {native.openssl_version()}"


def install_into(ops, fuse_major: int) -> dict:
    """Point the read and write entries of a ctypes `fuse_operations` struct at the native path.

    `ops` is the struct mfusepy built (its `read`/`write` fields hold mfusepy's callbacks,
    which become the fallback for handles not registered with `native.register`);
    `fuse_major` is `mfusepy.fuse_version_major` (2 or 3: the two ABIs lay out
    `fuse_file_info` differently). The callbacks stay alive as long as `ops` does.
    Returns the addresses written. Raises RuntimeError if the native module is off.
    """
    import ctypes

    if native is None:
        raise RuntimeError(f"native data path off: {reason}")
    fields = type(ops)
    slots = {}
    for name in ("read", "write"):
        slot = ctypes.c_void_p.from_buffer(ops, getattr(fields, name).offset)
        slots[name] = slot
    fallback_read, fallback_write = slots["read"].value or 0, slots["write"].value or 0
    native_read, native_write = native.install(fallback_read, fallback_write, fuse_major=fuse_major)
    slots["read"].value, slots["write"].value = native_read, native_write
    return {"read": native_read, "write": native_write, "fallback_read": fallback_read,
            "fallback_write": fallback_write}
