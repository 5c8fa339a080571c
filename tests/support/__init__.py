"""Test support: one environment class for every test that runs vmfs-crypt, the one mount helper, markers."""

from .env import CLI, GOLDEN, REPO, VmfsEnv, is_mounted, sha256_file, tree_hashes
from .mount import MOUNT_TIMEOUT_S, mounted

__all__ = ["CLI", "GOLDEN", "REPO", "VmfsEnv", "is_mounted", "sha256_file", "tree_hashes", "mounted",
           "MOUNT_TIMEOUT_S"]
