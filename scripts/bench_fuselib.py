"""Which fusepy-API library to build on: a minimal multithreaded passthrough under fusepy and mfusepy, fio 4 KiB IOPS.

Usage: .venv/bin/python scripts/bench_fuselib.py [--runtime S] [--reps N]
Installs fusepy==3.0.1 into a throw-away virtualenv (it is not a dependency of vmfs-crypt).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

PASSTHROUGH = r'''
import errno, os, sys
lib = __import__(sys.argv[1])
root, mnt = sys.argv[2], sys.argv[3]

class Passthrough(lib.Operations):
    use_ns = True
    def _p(self, path): return os.path.join(root, path.lstrip("/"))
    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        d = {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_size")}
        d.update(st_atime=st.st_atime_ns, st_mtime=st.st_mtime_ns, st_ctime=st.st_ctime_ns)
        if sys.argv[1] == "fuse":  # fusepy wants float seconds
            d.update(st_atime=st.st_atime, st_mtime=st.st_mtime, st_ctime=st.st_ctime)
        return d
    def readdir(self, path, fh): return [".", ".."] + os.listdir(self._p(path))
    def open(self, path, flags): return os.open(self._p(path), flags & ~getattr(os, "O_DIRECT", 0))
    def create(self, path, mode, fi=None): return os.open(self._p(path), os.O_RDWR | os.O_CREAT, mode)
    def read(self, path, size, offset, fh): return os.pread(fh, size, offset)
    def write(self, path, data, offset, fh): return os.pwrite(fh, data, offset)
    def truncate(self, path, length, fh=None): os.truncate(self._p(path), length)
    def release(self, path, fh): os.close(fh)
    def flush(self, path, fh): return 0
    def fsync(self, path, datasync, fh): os.fsync(fh)
    def init(self, path): print("ready", flush=True)

lib.FUSE(Passthrough(), mnt, foreground=True, nothreads=False)
'''


def wait_ready(proc) -> None:
    line = proc.stdout.readline()
    if "ready" not in line:
        raise RuntimeError(f"passthrough did not start: {line!r} {proc.stderr.read()}")


def fio_iops(path: str, rw: str, runtime: int) -> float:
    out = subprocess.run(["fio", "--name=j", f"--filename={path}", "--size=256M", f"--rw={rw}", "--bs=4k",
                          "--ioengine=psync", "--direct=1", "--time_based", f"--runtime={runtime}",
                          "--output-format=json"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]
    return job["read" if "read" in rw else "write"]["iops"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="fuselib-", dir="/dev/shm")
    venv = os.path.join(work, "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", "fusepy==3.0.1"], check=True)
    py = os.path.join(venv, "bin", "python")
    script = os.path.join(work, "pt.py")
    with open(script, "w") as f:
        f.write(PASSTHROUGH)
    results: dict[str, dict[str, list[float]]] = {"fuse": {}, "mfusepy": {}}
    for rep in range(args.reps):
        for lib in ("fuse", "mfusepy"):  # interleaved, so drift hits both alike
            root, mnt = os.path.join(work, f"root-{lib}"), os.path.join(work, f"mnt-{lib}")
            os.makedirs(root, exist_ok=True)
            os.makedirs(mnt, exist_ok=True)
            env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            python = py if lib == "fuse" else sys.executable  # mfusepy lives in the project's venv
            proc = subprocess.Popen([python, script, lib, root, mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env)
            try:
                wait_ready(proc)
                for rw in ("randwrite", "randread"):
                    results[lib].setdefault(rw, []).append(fio_iops(os.path.join(mnt, "f"), rw, args.runtime))
            finally:
                subprocess.run(["fusermount", "-u", mnt], check=False)
                proc.wait(timeout=30)
    print(f"{'library':<10} {'randwrite IOPS':>15} {'randread IOPS':>15}   (4 KiB, psync, direct=1, "
          f"median of {args.reps}, {args.runtime} s each)")
    for lib, name in (("fuse", "fusepy"), ("mfusepy", "mfusepy")):
        print(f"{name:<10} {statistics.median(results[lib]['randwrite']):>15.0f} "
              f"{statistics.median(results[lib]['randread']):>15.0f}")
    subprocess.run(["rm", "-rf", work])
    return 0


if __name__ == "__main__":
    sys.exit(main())
