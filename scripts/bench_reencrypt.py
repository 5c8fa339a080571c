#!/usr/bin/env python3
"""`rekey --deep` of a fully written 1 GiB disk on tmpfs, in place (this tree) vs another tree's CLI; peak extra space (issue 10).

Usage: .venv/bin/python scripts/bench_reencrypt.py [--old-tree DIR]
DIR: an exported older tree with its native extension, e.g. the copy path of main:
  git archive main | tar -x -C /tmp/old-main && cp vmfs_crypt/_native*.so /tmp/old-main/vmfs_crypt/
Peak extra space: the folder's allocated bytes (st_blocks), sampled every 5 ms, minus before.
"""
import argparse
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-tree", help="another tree whose `rekey --deep` is timed on the same disk")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--base", default="/dev/shm/vmfs-bench-reencrypt")
    args = ap.parse_args()
    base = args.base
    shutil.rmtree(base, ignore_errors=True)
    vm = os.path.join(base, "ds", "vm1")
    os.makedirs(vm)
    os.makedirs(os.path.join(base, "rt"), mode=0o700)
    env = dict(os.environ, VMFS_CRYPT_CONFIG=os.path.join(base, "cfg", "config.toml"),
               XDG_RUNTIME_DIR=os.path.join(base, "rt"))

    def cli(tree: str, *a: str) -> None:
        subprocess.run([sys.executable, "-m", "vmfs_crypt.cli", *a], env=dict(env, PYTHONPATH=tree), check=True,
                       capture_output=True, cwd=base)

    try:
        cli(HERE, "provider", "add", "native", "local")
        size = args.size_mib << 20
        with open(os.path.join(vm, "disk.vmdk"), "w") as f:
            f.write('# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n'
                    f'createType="monolithicFlat"\n\n# Extent description\nRW {size // 512} FLAT "disk-flat.vmdk" 0\n')
        with open(os.path.join(vm, "disk-flat.vmdk"), "wb") as f:
            chunk = os.urandom(64 << 20)
            for _ in range(size // len(chunk)):
                f.write(chunk)
        cli(HERE, "encrypt", vm)

        def used() -> int:
            return sum(os.lstat(os.path.join(vm, n)).st_blocks * 512 for n in os.listdir(vm))

        runs = [("in place (this tree)", HERE)] + ([("other tree", args.old_tree)] if args.old_tree else [])
        for label, tree in runs:
            before, peak, stop = used(), [0], threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    try:
                        peak[0] = max(peak[0], used())
                    except FileNotFoundError:
                        pass
                    stop.wait(0.005)

            t = threading.Thread(target=sample)
            t.start()
            t0 = time.monotonic()
            cli(tree, "rekey", "--deep", vm)
            dt = time.monotonic() - t0
            stop.set()
            t.join()
            print(f"{label}: rekey --deep of {args.size_mib} MiB: {dt:.2f} s ({size / dt / 1e6:.0f} MB/s), "
                  f"peak extra space {(peak[0] - before) / 2**20:.1f} MiB", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
