#!/usr/bin/env python3
"""vmfs-crypt benchmarks (`make bench` runs `.venv/bin/python scripts/bench.py`).

1. Sector-cipher micro benchmark: SectorCipher.encrypt/decrypt on 4 KiB, 64 KiB and
   1 MiB calls against one-data-unit XTS from the same OpenSSL (cryptography's XTS, a new
   context per call as any caller with a new tweak needs), and the ratio.
2. fio job matrix against "mount providers" sharing one tmpfs backing filesystem:
   raw        the backing directory itself
   gocryptfs  gocryptfs on the same backing filesystem
   vmfs-plain an unencrypted disk (a plain VM folder) through a vmfs-crypt mount
   vmfs-enc   an encrypted disk (`vmfs-crypt create`) through the same mount
   Jobs: sequential write and read of the whole file with 1 MiB blocks, 4 KiB random
   read and random write with 1 and 2 jobs (time based); all direct=1, ioengine=psync.
   Repetitions are interleaved (rep 1 of every job on every target, then rep 2, ...)
   so drift hits all targets alike; the tables show medians.
3. Checks: fio --verify=crc32c through the vmfs-crypt mount, the encrypted backing file
   holds no plaintext sector, peak RSS (VmHWM) of the FUSE processes.

Results: a printed table and bench-results/latest.json. `--quick` is a short smoke run.
A provider that cannot run (tool missing, CLI not usable) is reported "not available"
and the rest still runs. Needs root for apt-get (fio, gocryptfs) and the tmpfs mount;
falls back to /dev/shm when tmpfs cannot be mounted.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
CLI = [sys.executable, "-m", "vmfs_crypt.cli"]
APT_TOOLS = {"fio": "fio", "gocryptfs": "gocryptfs", "fusermount": "fuse3"}
RSS_LIMIT_MB = 200
MIB = 1 << 20


def log(msg: str = "") -> None:
    print(msg, flush=True)


def run(cmd, *, check=True, timeout=600, env=None, input=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, env=env, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc


def is_mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4].encode().decode("unicode_escape") == target for line in f)


def wait_for(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def vm_hwm_mb(pid: int | None) -> float | None:
    """Peak resident set size of a process (VmHWM), in MB (10^6 bytes)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / 1e6
    except OSError:
        return None
    return None


def ensure_tools(install: bool) -> None:
    missing = sorted({pkg for binary, pkg in APT_TOOLS.items() if shutil.which(binary) is None})
    if not missing:
        return
    if not install:
        log(f"missing tools (not installing, --no-install): {' '.join(missing)}")
        return
    if os.geteuid() != 0:
        log(f"missing tools {' '.join(missing)} and not root: run `apt-get install {' '.join(missing)}` first")
        return
    log(f"installing with apt-get: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "update", "-qq"], env=env, timeout=600)
        run(["apt-get", "install", "-y", "-qq", *missing], env=env, timeout=1200)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        log(f"apt-get failed: {exc}")


def tool_version(cmd: list[str]) -> str | None:
    try:
        proc = run(cmd, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (proc.stdout or proc.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else None


# -- 1. sector-cipher micro benchmark -------------------------------------------------------
def best_rate(fn, size: int, min_time: float) -> float:
    """MB/s of the fastest of 5 timings of `fn` (each about min_time/5 s long)."""
    fn()
    number = 1
    while True:  # calibrate
        t = timeit.timeit(fn, number=number)
        if t >= min_time / 10 or number > 1 << 20:
            break
        number *= 2
    number = max(1, int(number * (min_time / 5) / max(t, 1e-9)))
    best = min(timeit.repeat(fn, number=number, repeat=5)) / number
    return size / best / 1e6


def micro_benchmark(reps: int, min_time: float) -> dict:
    from cryptography.hazmat.backends.openssl import backend
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from vmfs_crypt.crypto.xts import SectorCipher

    dek = os.urandom(64)
    sc = SectorCipher(dek)
    alg = algorithms.AES(dek)
    tweak = (123456).to_bytes(16, "little")
    sizes = [4096, 65536, MIB]
    data = {size: os.urandom(size) for size in sizes}
    out = bytearray(MIB)
    kinds = {
        "sector_encrypt": lambda d: sc.encrypt(123456, d),
        "sector_decrypt": lambda d: sc.decrypt(123456, d),
        # the baseline: one XTS data unit per call (a new context: each call has a new tweak)
        "xts_one_unit": lambda d: Cipher(alg, modes.XTS(tweak)).encryptor().update(d),
        # the same into a preallocated buffer (no allocation at all, unlike SectorCipher)
        "xts_one_unit_into": lambda d: Cipher(alg, modes.XTS(tweak)).encryptor().update_into(d, out),
    }
    samples: dict[str, dict[int, list[float]]] = {k: {s: [] for s in sizes} for k in kinds}
    for rep in range(reps):
        for size in sizes:
            for kind, fn in kinds.items():
                d = data[size]
                samples[kind][size].append(best_rate(lambda: fn(d), size, min_time))
    med = {k: {s: statistics.median(v) for s, v in by.items()} for k, by in samples.items()}
    # Conservative: against the faster of the two baselines.
    base = {s: max(med["xts_one_unit"][s], med["xts_one_unit_into"][s]) for s in sizes}
    ratio = {s: med["sector_encrypt"][s] / base[s] for s in sizes}
    ratio_dec = {s: med["sector_decrypt"][s] / base[s] for s in sizes}
    return {"openssl": backend.openssl_version_text(), "reps": reps,
            "MBps_median": {k: {str(s): round(v, 1) for s, v in by.items()} for k, by in med.items()},
            "MBps_samples": {k: {str(s): [round(x, 1) for x in v] for s, v in by.items()} for k, by in samples.items()},
            "ratio_encrypt_vs_xts_one_unit": {str(s): round(r, 4) for s, r in ratio.items()},
            "ratio_decrypt_vs_xts_one_unit": {str(s): round(r, 4) for s, r in ratio_dec.items()}}


def print_micro(m: dict) -> None:
    log(f"\nSector cipher vs one-data-unit XTS ({m['openssl']}), MB/s, median of {m['reps']} rep(s);")
    log("ratios against the faster XTS column:")
    log(f"  {'call size':>10} {'encrypt':>9} {'decrypt':>9} {'XTS 1 unit':>11} {'XTS into':>9} "
        f"{'enc ratio':>10} {'dec ratio':>10}")
    med = m["MBps_median"]
    for s in med["sector_encrypt"]:
        label = f"{int(s) // 1024} KiB" if int(s) < MIB else f"{int(s) // MIB} MiB"
        log(f"  {label:>10} {med['sector_encrypt'][s]:9.0f} {med['sector_decrypt'][s]:9.0f} "
            f"{med['xts_one_unit'][s]:11.0f} {med['xts_one_unit_into'][s]:9.0f} "
            f"{m['ratio_encrypt_vs_xts_one_unit'][s]:10.1%} {m['ratio_decrypt_vs_xts_one_unit'][s]:10.1%}")


# -- 2. mount providers ---------------------------------------------------------------
class Target:
    """One file fio works on, reached through a provider."""

    def __init__(self, name: str, path: str, provider: "Provider", backing: str | None = None,
                 encrypted: bool = False) -> None:
        self.name, self.path, self.provider = name, path, provider
        self.backing, self.encrypted = backing, encrypted


class Provider:
    """A way to reach a file on the backing filesystem: set up, targets, pid, tear down."""

    names: tuple[str, ...] = ()

    def available(self) -> str | None:
        """None when usable, else why not."""
        return None

    def setup(self, backing: str, work: str, size: int) -> list[Target]:
        raise NotImplementedError

    def pid(self) -> int | None:
        return None

    def teardown(self) -> None:
        pass


class RawProvider(Provider):
    names = ("raw",)

    def setup(self, backing, work, size):
        d = os.path.join(backing, "raw")
        os.makedirs(d, exist_ok=True)
        return [Target("raw", os.path.join(d, "bench.dat"), self)]


class GocryptfsProvider(Provider):
    names = ("gocryptfs",)

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.mnt: str | None = None

    def available(self):
        if not shutil.which("gocryptfs"):
            return "gocryptfs not installed"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse missing"
        return None

    def setup(self, backing, work, size):
        cipher = os.path.join(backing, "gocryptfs-cipher")
        self.mnt = os.path.join(work, "gocryptfs-mnt")
        os.makedirs(cipher)
        os.makedirs(self.mnt)
        passfile = os.path.join(work, "gocryptfs.pass")
        with open(os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write("benchmark password\n")
        # -scryptn only makes the password KDF cheaper; the data path is the same.
        run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", passfile, cipher])
        self.proc = subprocess.Popen(["gocryptfs", "-fg", "-q", "-passfile", passfile, cipher, self.mnt],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: is_mounted(self.mnt) or self.proc.poll() is not None, 30, "gocryptfs mount")
        if not is_mounted(self.mnt):
            raise RuntimeError(f"gocryptfs exited: {self.proc.stderr.read().decode(errors='replace')}")
        return [Target("gocryptfs", os.path.join(self.mnt, "bench.dat"), self, encrypted=True)]

    def pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def teardown(self):
        if self.mnt and is_mounted(self.mnt):
            run(["fusermount", "-u", self.mnt], check=False)
            if is_mounted(self.mnt):
                run(["fusermount", "-uz", self.mnt], check=False)
        if self.proc:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class VmfsCryptProvider(Provider):
    """One vmfs-crypt mount of a datastore holding a plain VM folder and an encrypted one.

    The datastore lives on the backing filesystem; config, key file and runtime dir in a
    private temp dir. CLI: `vmfs-crypt create DS/vm1/disk.vmdk --size N`,
    `vmfs-crypt mount DS MNT`, `vmfs-crypt umount MNT`.
    """

    names = ("vmfs-plain", "vmfs-enc")

    def __init__(self) -> None:
        self.env: dict | None = None
        self.mnt: str | None = None
        self.runtime: str | None = None

    def available(self):
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse missing"
        try:
            proc = run(CLI + ["--help"], check=False, timeout=60, env=dict(os.environ, PYTHONPATH=REPO))
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"vmfs-crypt CLI not usable: {exc}"
        text = proc.stdout.decode(errors="replace")
        if proc.returncode != 0 or not all(c in text for c in ("create", "mount", "umount")):
            return f"vmfs-crypt CLI not usable (exit {proc.returncode}): {proc.stderr.decode(errors='replace')[-300:]}"
        return None

    def cli(self, *args, timeout=120):
        return run(CLI + [str(a) for a in args], env=self.env, timeout=timeout)

    def setup(self, backing, work, size):
        ds = os.path.join(backing, "vmfs-ds")
        self.mnt = os.path.join(work, "vmfs-mnt")
        self.runtime = tempfile.mkdtemp(prefix="vb-", dir="/tmp")  # AF_UNIX paths must stay short
        cfg = os.path.join(work, "vmfs-cfg")
        for d in (ds, self.mnt, cfg, os.path.join(ds, "vm1"), os.path.join(ds, "plainvm")):
            os.makedirs(d, exist_ok=True)
        self.env = dict(os.environ, VMFS_CRYPT_CONFIG=os.path.join(cfg, "config.toml"),
                        XDG_RUNTIME_DIR=self.runtime, PYTHONPATH=REPO)
        self.cli("provider", "add", "native", "bench")
        self.cli("create", os.path.join(ds, "vm1", "disk.vmdk"), "--size", str(size))
        plain = os.path.join(ds, "plainvm", "disk-flat.vmdk")  # a plain folder: passes through
        with open(plain, "wb") as f:
            f.truncate(size)
        self.cli("mount", ds, self.mnt, timeout=90)
        wait_for(lambda: is_mounted(self.mnt), 30, "vmfs-crypt mount")
        return [Target("vmfs-plain", os.path.join(self.mnt, "plainvm", "disk-flat.vmdk"), self, backing=plain),
                Target("vmfs-enc", os.path.join(self.mnt, "vm1", "disk-flat.vmdk"), self,
                       backing=os.path.join(ds, "vm1", "disk-flat.vmdk"), encrypted=True)]

    def pid(self):
        for path in glob.glob(os.path.join(self.runtime or "/nonexistent", "vmfs-crypt", "mount-*.pid")):
            try:
                with open(path, encoding="utf-8") as f:
                    pid = int(f.read().strip())
                os.kill(pid, 0)
                return pid
            except (OSError, ValueError):
                continue
        target = os.path.realpath(self.mnt or "/nonexistent")  # fall back: the process serving the mount
        for status in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(status, "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if any(b"vmfs_crypt" in a or b"vmfs-crypt" in a for a in args) and target.encode() in args:
                return int(status.split("/")[2])
        return None

    def teardown(self):
        if self.mnt and is_mounted(self.mnt):
            try:
                self.cli("umount", self.mnt, timeout=90)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"  vmfs-crypt umount failed ({exc}); lazy unmount")
                run(["fusermount", "-uz", self.mnt], check=False)
        if self.env:
            run(CLI + ["agent", "stop"], env=self.env, check=False, timeout=60)
        if self.runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)


PROVIDERS = [RawProvider, GocryptfsProvider, VmfsCryptProvider]


# -- fio ------------------------------------------------------------------------------
def fio_jobs(runtime: int) -> list[dict]:
    seq = dict(bs="1M", numjobs=1, time_based=False)
    rnd = dict(bs="4k", time_based=True, runtime=runtime)
    return [
        dict(name="seq-write", rw="write", metric="MB/s", **seq),
        dict(name="seq-read", rw="read", metric="MB/s", **seq),
        dict(name="randread-4k-j1", rw="randread", numjobs=1, metric="IOPS", **rnd),
        dict(name="randread-4k-j2", rw="randread", numjobs=2, metric="IOPS", **rnd),
        dict(name="randwrite-4k-j1", rw="randwrite", numjobs=1, metric="IOPS", **rnd),
        dict(name="randwrite-4k-j2", rw="randwrite", numjobs=2, metric="IOPS", **rnd),
    ]


def fio(path: str, job: dict, size: int, extra: tuple[str, ...] = ()) -> dict:
    cmd = ["fio", f"--name={job['name']}", f"--filename={path}", f"--rw={job['rw']}", f"--bs={job['bs']}",
           f"--size={size}", "--direct=1", "--ioengine=psync", f"--numjobs={job['numjobs']}",
           "--group_reporting", "--output-format=json", "--randrepeat=0", *extra]
    if job.get("time_based"):
        cmd += ["--time_based", f"--runtime={job['runtime']}"]
    proc = run(cmd, check=False, timeout=900)
    out = proc.stdout.decode(errors="replace")
    try:
        result = json.loads(out[out.index("{"):])
    except ValueError:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-1000:]}") from None
    j = result["jobs"][0]
    side = j["read"] if job["rw"] in ("read", "randread") else j["write"]
    if proc.returncode != 0 or j.get("error"):
        raise RuntimeError(f"fio error {j.get('error')} (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-1000:]}")
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"], "lat_us": side["lat_ns"]["mean"] / 1000,
            "read_MB/s": j["read"]["bw_bytes"] / 1e6, "write_MB/s": j["write"]["bw_bytes"] / 1e6}


# -- 3. checks ------------------------------------------------------------------------
def correctness(target: Target, size: int) -> dict:
    """fio writes with crc32c verify through the mount; then compare backing and view."""
    n = min(size, 256 * MIB)
    res = {"target": target.name}
    for name, rw, bs in (("verify-seq-1M", "write", "1M"), ("verify-rand-4k", "randwrite", "4k")):
        job = dict(name=name, rw=rw, bs=bs, numjobs=1)
        try:
            fio(target.path, job, n if bs == "1M" else min(n, 32 * MIB),
                ("--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"))
            res[name] = "ok"
        except RuntimeError as exc:
            res[name] = f"FAILED: {exc}"
    if target.backing:
        same = nonzero = 0
        with open(target.path, "rb") as view, open(target.backing, "rb") as back:
            for off in range(0, min(n, 64 * MIB), MIB):
                a, b = view.read(MIB), back.read(MIB)
                for i in range(0, len(a), 512):
                    sa = a[i:i + 512]
                    if sa.count(0) != len(sa):
                        nonzero += 1
                        same += sa == b[i:i + 512]
        res["plaintext_sectors_checked"] = nonzero
        res["identical_in_backing"] = same
        if target.encrypted:
            res["backing_is_not_plaintext"] = nonzero > 0 and same == 0
        else:
            res["backing_is_plaintext"] = nonzero > 0 and same == nonzero
    return res


# -- main -----------------------------------------------------------------------------
@contextlib.contextmanager
def backing_fs(size_bytes: int, prefer_tmpfs: bool):
    """A fresh tmpfs under a temp dir (root), else a directory in /dev/shm."""
    top = tempfile.mkdtemp(prefix="vmfs-bench-")
    backing = os.path.join(top, "backing")
    os.makedirs(backing)
    kind = "dir"
    if prefer_tmpfs and os.geteuid() == 0:
        proc = run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", backing], check=False)
        if proc.returncode == 0:
            kind = "tmpfs"
    if kind != "tmpfs" and os.path.isdir("/dev/shm"):
        backing = tempfile.mkdtemp(prefix="vmfs-bench-", dir="/dev/shm")
        kind = "/dev/shm"
    try:
        yield top, backing, kind
    finally:
        if kind == "tmpfs":
            if run(["umount", backing], check=False).returncode != 0:
                run(["umount", "-l", backing], check=False)
        else:
            shutil.rmtree(backing, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


def fmt(v: float, metric: str) -> str:
    return f"{v:,.0f}" if metric == "IOPS" else f"{v:,.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short smoke run (small file, 2 s jobs, 1 rep)")
    ap.add_argument("--reps", type=int, help="interleaved repetitions (default 3, quick 1)")
    ap.add_argument("--size", help="file size per target, e.g. 1G (default 1G, quick 128M)")
    ap.add_argument("--runtime", type=int, help="seconds per random job (default 10, quick 2)")
    ap.add_argument("--targets", help="comma-separated subset of: raw,gocryptfs,vmfs-plain,vmfs-enc")
    ap.add_argument("--no-fio", action="store_true", help="only the sector-cipher micro benchmark")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    ap.add_argument("--output", default=os.path.join(REPO, "bench-results", "latest.json"))
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    size = parse_size(args.size or ("128M" if args.quick else "1G"))
    runtime = args.runtime or (2 if args.quick else 10)
    wanted = set(args.targets.split(",")) if args.targets else None
    signal.signal(signal.SIGTERM, _interrupt)  # clean up mounts on kill too

    started = time.time()
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                     "params": {"reps": reps, "size": size, "rand_runtime_s": runtime,
                                "fio": "direct=1 ioengine=psync, seq bs=1M, random bs=4k"}}
    ensure_tools(not args.no_install)
    results["env"] = environment()

    log("== sector-cipher micro benchmark")
    micro = micro_benchmark(reps, 0.25 if args.quick else 1.0)
    results["micro"] = micro
    print_micro(micro)

    if not args.no_fio:
        if not shutil.which("fio"):
            log("fio not available: skipping the fio matrix")
            results["fio"] = "not available"
        else:
            fio_matrix(results, size, reps, runtime, wanted)
    if not args.no_fio:
        log("\n== qemu-img convert into and out of the mount (encrypted VM folder)")
        conv = qemu_convert_benchmark(size)
        results["qemu_convert"] = conv
        log(f"  {size >> 20} MiB: into the mount {conv.get('into_mount_s')} s ({conv.get('into_mount_MBps')} MB/s), "
            f"out of it {conv.get('out_of_mount_s')} s ({conv.get('out_of_mount_MBps')} MB/s), "
            f"round trip identical: {conv.get('identical')}")
        log("\n== mounting 200 encrypted disks under a KMIP provider (local PyKMIP server)")
        kmip = kmip_mount_benchmark()
        results["kmip_mount_200"] = kmip
        log(f"  {kmip}")
    results["elapsed_s"] = round(time.time() - started, 1)
    summarize(results)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    os.replace(args.output + ".tmp", args.output)
    log(f"\nresults: {os.path.relpath(args.output)} ({results['elapsed_s']} s)")
    return 0


def qemu_convert_benchmark(size: int) -> dict:
    """Seconds for `qemu-img convert` of a fully written disk into an encrypted VM folder of the mount and back out."""
    base = tempfile.mkdtemp(prefix="vmfs-crypt-convert-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    runtime = tempfile.mkdtemp(prefix="vccv-", dir="/tmp")
    env = dict(os.environ, VMFS_CRYPT_CONFIG=os.path.join(base, "cfg", "config.toml"), XDG_RUNTIME_DIR=runtime,
               PYTHONPATH=REPO)
    cli = [sys.executable, "-m", "vmfs_crypt.cli"]
    ds, mnt, src, out = (os.path.join(base, n) for n in ("ds", "mnt", "src.raw", "out.raw"))
    os.makedirs(os.path.join(ds, "vm1"))
    os.makedirs(mnt)
    result: dict = {"size": size}
    try:
        run(cli + ["provider", "add", "native", "bench"], env=env)
        run(cli + ["create", os.path.join(ds, "vm1", "seed.vmdk"), "--size", "1M"], env=env)
        run(["qemu-img", "create", "-f", "raw", src, str(size)])
        run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {size}", src], timeout=600)  # no holes to skip
        run(cli + ["mount", ds, mnt], env=env)
        try:
            dst = os.path.join(mnt, "vm1", "conv.vmdk")
            t = time.perf_counter()
            run(["qemu-img", "convert", "-O", "vmdk", "-o", "subformat=monolithicFlat", src, dst], timeout=1200)
            result["into_mount_s"] = round(time.perf_counter() - t, 2)
            t = time.perf_counter()
            run(["qemu-img", "convert", "-O", "raw", dst, out], timeout=1200)
            result["out_of_mount_s"] = round(time.perf_counter() - t, 2)
            result["identical"] = run(["cmp", "-s", src, out], check=False).returncode == 0
        finally:
            run(cli + ["umount", mnt], env=env, check=False)
        for k in ("into_mount_s", "out_of_mount_s"):
            result[k.replace("_s", "_MBps")] = round(size / 1e6 / result[k], 1)
    finally:
        run(cli + ["agent", "stop"], env=env, check=False)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    return result


def kmip_mount_benchmark() -> dict | str:
    """Time to mount 200 encrypted disks (20 folders, one KEK each) under a local PyKMIP server."""
    try:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from kms_bench import mount_time_200
    except ImportError as exc:
        return f"not available ({exc})"
    return mount_time_200()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def environment() -> dict:
    env = {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            env["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    with contextlib.suppress(Exception):
        import cryptography
        import numpy
        env["cryptography"], env["numpy"] = cryptography.__version__, numpy.__version__
    env["fio"] = tool_version(["fio", "--version"])
    env["gocryptfs"] = tool_version(["gocryptfs", "-version"])
    proc = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False)
    env["git"] = proc.stdout.decode().strip() or None
    return env


def fio_matrix(results: dict, size: int, reps: int, runtime: int, wanted: set | None) -> None:
    jobs = fio_jobs(runtime)
    providers, targets, status = [], [], {}
    tmpfs_size = size * 5 + 512 * MIB  # four files, gocryptfs overhead, verify scratch
    with backing_fs(tmpfs_size, prefer_tmpfs=True) as (work, backing, kind):
        log(f"\n== fio matrix on {kind} backing ({backing}), file {size // MIB} MiB, {reps} rep(s)")
        results["backing"] = kind
        try:
            for cls in PROVIDERS:
                p = cls()
                if wanted is not None and not wanted.intersection(p.names):
                    continue
                why = p.available()
                if why is None:
                    try:
                        new = [t for t in p.setup(backing, work, size) if wanted is None or t.name in wanted]
                        providers.append(p)
                        targets += new
                        for t in new:
                            status[t.name] = "ok"
                    except Exception as exc:  # noqa: BLE001 - report and go on with the others
                        why = f"setup failed: {exc}"
                        p.teardown()
                if why is not None:
                    for name in p.names:
                        status[name] = f"not available: {why}"
                        log(f"  {name}: not available: {why}")
            results["targets"] = status
            # Lay the files out once (unmeasured), so that every measured job finds them allocated.
            for t in targets:
                try:
                    fio(t.path, dict(name="prefill", rw="write", bs="1M", numjobs=1), size)
                except RuntimeError as exc:
                    status[t.name] = f"prefill failed: {exc}"
            targets = [t for t in targets if status[t.name] == "ok"]
            samples: dict = {j["name"]: {t.name: [] for t in targets} for j in jobs}
            errors: list = []
            for rep in range(reps):
                for job in jobs:
                    order = targets[rep % len(targets):] + targets[:rep % len(targets)] if targets else []
                    for t in order:
                        try:
                            r = fio(t.path, job, size)
                            samples[job["name"]][t.name].append(r)
                            log(f"  rep {rep + 1}/{reps} {job['name']:<16} {t.name:<11} "
                                f"{fmt(r[job['metric']], job['metric']):>10} {job['metric']}")
                        except (RuntimeError, subprocess.TimeoutExpired) as exc:
                            errors.append(f"rep {rep + 1} {job['name']} {t.name}: {exc}")
                            log(f"  rep {rep + 1}/{reps} {job['name']:<16} {t.name:<11} ERROR {exc}")
            results["fio_errors"] = errors
            results["fio"] = {
                j["name"]: {"metric": j["metric"], "rw": j["rw"], "bs": j["bs"], "numjobs": j["numjobs"],
                            "targets": {t: {"median": round(statistics.median([r[j["metric"]] for r in rs]), 1),
                                            "samples": [round(r[j["metric"]], 1) for r in rs],
                                            "lat_us_median": round(statistics.median([r["lat_us"] for r in rs]), 1)}
                                        for t, rs in samples[j["name"]].items() if rs}}
                for j in jobs}
            log("\n== checks")
            results["checks"] = [correctness(t, size) for t in targets if t.name.startswith("vmfs-")]
            for c in results["checks"]:
                log(f"  {c}")
            rss = {}
            for p in providers:
                pid = p.pid()
                hwm = vm_hwm_mb(pid)
                for t in targets:
                    if t.provider is p and pid:  # FUSE providers only
                        rss[t.name] = {"pid": pid, "VmHWM_MB": round(hwm, 1) if hwm else None}
            results["peak_rss"] = rss
        finally:
            for p in reversed(providers):
                try:
                    p.teardown()
                except Exception as exc:  # noqa: BLE001
                    log(f"  teardown of {type(p).__name__} failed: {exc}")


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def summarize(results: dict) -> None:
    fio_res = results.get("fio")
    summary: dict = {}
    micro = results.get("micro")
    if micro:
        summary["cipher_64KiB_vs_xts_one_unit"] = micro["ratio_encrypt_vs_xts_one_unit"]["65536"]
    if isinstance(fio_res, dict):
        names = ["raw", "gocryptfs", "vmfs-plain", "vmfs-enc"]
        present = [n for n in names if any(n in j["targets"] for j in fio_res.values())]
        log("\n== fio medians (seq: MB/s, random: IOPS)")
        log("  " + f"{'job':<18}" + "".join(f"{n:>13}" for n in present))
        for name, j in fio_res.items():
            cells = [fmt(j["targets"][n]["median"], j["metric"]) if n in j["targets"] else "-" for n in present]
            log("  " + f"{name:<18}" + "".join(f"{c:>13}" for c in cells))
        for k, (a, b) in {"vmfs-enc_vs_gocryptfs": ("vmfs-enc", "gocryptfs"),
                          "vmfs-enc_vs_vmfs-plain": ("vmfs-enc", "vmfs-plain"),
                          "vmfs-plain_vs_raw": ("vmfs-plain", "raw"),
                          "gocryptfs_vs_raw": ("gocryptfs", "raw")}.items():
            summary[k] = {name: ratio(j["targets"].get(a, {}).get("median"), j["targets"].get(b, {}).get("median"))
                          for name, j in fio_res.items()}
    for name, rss in (results.get("peak_rss") or {}).items():
        summary.setdefault("peak_rss_MB", {})[name] = rss["VmHWM_MB"]
    enc_rss = (results.get("peak_rss") or {}).get("vmfs-enc", {}).get("VmHWM_MB")
    if enc_rss is not None:
        summary["vmfs_peak_rss_below_200MB"] = enc_rss < RSS_LIMIT_MB
    results["summary"] = summary
    log("\n== ratios")
    if "cipher_64KiB_vs_xts_one_unit" in summary:
        log(f"  sector cipher 64 KiB calls vs one-unit XTS: {summary['cipher_64KiB_vs_xts_one_unit']:.1%} (target >= 25%)")
    for k in ("vmfs-enc_vs_gocryptfs", "vmfs-enc_vs_vmfs-plain", "vmfs-plain_vs_raw", "gocryptfs_vs_raw"):
        if k in summary:
            cells = ", ".join(f"{n} {v:.2f}" if v is not None else f"{n} n/a" for n, v in summary[k].items())
            log(f"  {k}: {cells}")
    for name, mb in (summary.get("peak_rss_MB") or {}).items():
        log(f"  peak RSS (VmHWM) of the {name} FUSE process: {mb} MB" if mb is not None else f"  peak RSS {name}: n/a")
    if "vmfs_peak_rss_below_200MB" in summary:
        log(f"  vmfs-crypt mount peak RSS < {RSS_LIMIT_MB} MB: {'yes' if summary['vmfs_peak_rss_below_200MB'] else 'NO'}")
    for c in results.get("checks") or []:
        bad = [k for k, v in c.items() if isinstance(v, str) and v.startswith("FAILED")]
        flag = c.get("backing_is_not_plaintext", c.get("backing_is_plaintext"))
        log(f"  check {c['target']}: fio verify {'FAILED ' + ','.join(bad) if bad else 'ok'}; "
            f"backing {'as expected' if flag else 'NOT as expected'} "
            f"({c.get('identical_in_backing')} of {c.get('plaintext_sectors_checked')} sectors identical)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)
