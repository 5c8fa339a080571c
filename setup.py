"""Build of the native data path, vmfs_crypt._native (metadata stays in setup.cfg).

Needs gcc (or clang), pkg-config and the headers of libcrypto (OpenSSL 3) and libfuse 3
(Debian: libssl-dev libfuse3-dev). Warnings are errors. VMFS_CRYPT_NATIVE_SANITIZE=1
builds with AddressSanitizer and UBSan (`make test-native-asan`).
"""

import os
import shlex
import subprocess

from setuptools import Extension, setup

WARNINGS = [
    "-Wall", "-Wextra", "-Werror", "-Wconversion", "-Wsign-conversion", "-Wshadow", "-Wcast-align",
    "-Wstrict-prototypes", "-Wmissing-prototypes", "-Wformat=2", "-Wundef", "-Wvla", "-Wpointer-arith",
]


def pkg_config(flag: str) -> list[str]:
    try:
        out = subprocess.run(["pkg-config", flag, "libcrypto", "fuse3"], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"vmfs_crypt._native: pkg-config {flag} libcrypto fuse3 failed ({exc}); "
                         "install pkg-config, libssl-dev and libfuse3-dev") from None
    return shlex.split(out)


def native_extension() -> Extension:
    compile_args = ["-std=gnu11", "-O2", "-fvisibility=hidden", "-fstack-protector-strong",
                    "-D_FORTIFY_SOURCE=2", *WARNINGS, *pkg_config("--cflags")]
    # libfuse is used for its headers only (struct fuse_operations / fuse_file_info): with
    # --as-needed the module does not pull libfuse3 into a process that runs libfuse 2.
    link_args = ["-Wl,--as-needed", "-Wl,-z,relro,-z,now", *pkg_config("--libs")]
    if os.environ.get("VMFS_CRYPT_NATIVE_SANITIZE") == "1":
        san = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"]
        compile_args = [a for a in compile_args if a not in ("-O2", "-D_FORTIFY_SOURCE=2")] + ["-O1", "-g", *san]
        link_args = san + link_args
    return Extension(
        "vmfs_crypt._native",
        sources=["native/module.c", "native/fuse_entry.c", "native/datapath.c", "native/xts_batch.c"],
        depends=["native/datapath.h", "native/fuse_entry.h", "native/xts_batch.h", "native/vc_util.h"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )


setup(ext_modules=[native_extension()])
