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
