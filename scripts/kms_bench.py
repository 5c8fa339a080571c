#!/usr/bin/env python3
"""KMIP scale benchmark: mount a datastore of 200 encrypted disks (20 VM folders, one KEK each) under one
KMIP provider and report the mount time and how many KMIP requests the agent made.

Entry point for `make bench`: mount_time_200() -> dict. Run alone: python scripts/kms_bench.py
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "devtools"))

from vmfs_crypt.agent.client import AgentClient  # noqa: E402
from vmfs_crypt.agent.launcher import shared_agent  # noqa: E402
from vmfs_crypt.config import Config, load_config  # noqa: E402
from vmfs_crypt.ops.lifecycle import create_disk  # noqa: E402
from kmip_tls import Pki, PyKmipServer  # noqa: E402

CLI = [sys.executable, "-m", "vmfs_crypt.cli"]


def _run(env: dict, *args: str) -> str:
    proc = subprocess.run(CLI + list(args), env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"vmfs-crypt {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def build_datastore(config: Config, datastore: str, folders: int, per_folder: int, size: int) -> float:
    """Create folders x per_folder thin encrypted disks in-process through one agent; seconds taken."""
    start = time.perf_counter()
    sock, _ = shared_agent(config, sidecar=False)
    agent = AgentClient(sock, purpose="create")  # issue 11: every key request states its purpose
    try:
        for i in range(folders):
            vm = os.path.join(datastore, f"vm{i:02d}")
            os.makedirs(vm)
            for j in range(per_folder):
                create_disk(os.path.join(vm, f"disk{j:02d}.vmdk"), size, agent)
    finally:
        agent.stop()
    return time.perf_counter() - start


def mount_time_200(folders: int = 20, per_folder: int = 10, size: int = 1 << 20, keep: bool = False) -> dict:
    """Build the datastore, mount it through the CLI, read a sector of every disk; report times and requests."""
    base = tempfile.mkdtemp(prefix="vmfs-crypt-kmsbench-")
    runtime = tempfile.mkdtemp(prefix="vckb-", dir="/tmp")  # short: AF_UNIX paths
    env = dict(os.environ, VMFS_CRYPT_CONFIG=os.path.join(base, "cfg", "config.toml"), XDG_RUNTIME_DIR=runtime)
    pki = Pki.create(os.path.join(base, "pki"))
    server = PyKmipServer(os.path.join(base, "kms"), pki).start()
    datastore, mnt = os.path.join(base, "ds"), os.path.join(base, "mnt")
    os.makedirs(datastore)
    os.makedirs(mnt)
    mounted = False
    try:
        _run(env, "provider", "add", "kmip", "bench", "--server", server.address, "--cert", pki.client_cert,
             "--key", pki.client_key, "--ca", pki.ca_path)
        old = os.environ.get("VMFS_CRYPT_CONFIG"), os.environ.get("XDG_RUNTIME_DIR")
        os.environ.update(VMFS_CRYPT_CONFIG=env["VMFS_CRYPT_CONFIG"], XDG_RUNTIME_DIR=runtime)
        try:
            config = load_config(env["VMFS_CRYPT_CONFIG"])
            build_s = build_datastore(config, datastore, folders, per_folder, size)
            sock = config.agent_socket
        finally:
            for k, v in zip(("VMFS_CRYPT_CONFIG", "XDG_RUNTIME_DIR"), old):
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        start = time.perf_counter()
        _run(env, "mount", datastore, mnt)  # returns once the mount is up (the sidecar agent prefetched)
        mount_s = time.perf_counter() - start
        mounted = True
        status = AgentClient(sock).request("status")
        after_mount = dict(status["providers"][0]["requests"])
        start = time.perf_counter()
        n = 0
        for vm in sorted(os.listdir(mnt)):
            for name in sorted(os.listdir(os.path.join(mnt, vm))):
                if name.endswith("-flat.vmdk"):
                    with open(os.path.join(mnt, vm, name), "rb") as f:
                        f.read(512)
                    n += 1
        open_all_s = time.perf_counter() - start
        after_open = AgentClient(sock).request("status")["providers"][0]["requests"]
        return {"disks": n, "folders": folders, "distinct_keks": folders, "build_s": round(build_s, 3),
                "mount_s": round(mount_s, 3), "open_all_s": round(open_all_s, 3),
                "kmip_gets_at_mount": after_mount["Get"], "kmip_get_attributes_at_mount": after_mount["GetAttributes"],
                "kmip_gets_after_opening_all": after_open["Get"], "kmip_connections": after_open["connections"]}
    finally:
        if mounted:
            subprocess.run(CLI + ["umount", mnt], env=env, capture_output=True, timeout=60)
        server.stop()
        shutil.rmtree(runtime, ignore_errors=True)
        if not keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(mount_time_200(), indent=1))
