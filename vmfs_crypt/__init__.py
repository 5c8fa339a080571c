"""vmfs-crypt: vSphere-style VM disk encryption at rest for Linux and QEMU, as a FUSE filesystem."""
__version__ = "0.1.0"
