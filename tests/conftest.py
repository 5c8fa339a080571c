"""Fixtures and markers. Helpers live in tests/support (import them from there, not from here).

Markers say what a test needs and skip it, with the reason, where that is missing:
  cli   - runs the real vmfs-crypt command and agent processes
  fuse  - mounts (needs /dev/fuse and fusermount)
  qemu  - runs qemu-img / qemu-io / qemu-system-x86_64
  kmip  - runs PyKMIP servers with TLS on 127.0.0.1
`make test-unit` runs what needs none of them.
"""

import os
import shutil

import pytest

from support import VmfsEnv

MARKERS = {
    "cli": "runs the real vmfs-crypt CLI and agent processes",
    "fuse": "mounts a datastore through FUSE",
    "qemu": "runs QEMU tools",
    "kmip": "runs PyKMIP key servers",
}


def _missing(marker: str) -> str | None:
    if marker == "fuse":
        if not os.path.exists("/dev/fuse"):
            return "no /dev/fuse"
        if not (shutil.which("fusermount3") or shutil.which("fusermount")):
            return "no fusermount (Debian package fuse3)"
    if marker == "qemu":
        for tool in ("qemu-img", "qemu-io"):
            if not shutil.which(tool):
                return f"no {tool} (Debian package qemu-utils)"
    if marker == "kmip":
        try:
            import kmip  # noqa: F401
        except ImportError:
            return "PyKMIP is not installed"
    return None


def pytest_configure(config):
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config, items):
    reasons = {m: _missing(m) for m in MARKERS}
    for item in items:
        for marker, reason in reasons.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=f"needs {marker}: {reason}"))


@pytest.fixture
def venv_env(tmp_path):
    """An environment with a native provider 'local' as the default."""
    env = VmfsEnv(str(tmp_path))
    env.run("provider", "add", "native", "local")
    yield env
    env.cleanup()
