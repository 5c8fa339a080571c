"""The FUSE adapter: the only code that imports the FUSE library (mfusepy); a thin layer over the filesystem core.

The mount runs on libfuse 3 where it is installed (mfusepy otherwise picks libfuse 2 first):
it has the lseek operation (SEEK_DATA/SEEK_HOLE for thin disks), 1 MiB write requests and
rename flags. FUSE_LIBRARY_PATH or FUSE_LIBRARY_NAME in the environment still decide.
"""

import ctypes.util
import os

if not (os.environ.get("FUSE_LIBRARY_PATH") or os.environ.get("FUSE_LIBRARY_NAME")) and ctypes.util.find_library("fuse3"):
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"  # read by mfusepy when it is first imported
