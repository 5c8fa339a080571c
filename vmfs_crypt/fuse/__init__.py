"""The FUSE adapter: the only code that imports the FUSE library (mfusepy); a thin layer over the filesystem core."""
