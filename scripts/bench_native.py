#!/usr/bin/env python3
"""Micro benchmarks of the native data path (vmfs_crypt._native), short enough for a shared machine.

    .venv/bin/python scripts/bench_native.py [--json FILE] [--burst S] [--repeat N]

- the same in C without Python (native/tests/bench_xts.c, built here with gcc): the
  sector cipher vs EVP aes-256-xts one data unit per call, 1 and 2 pthreads;
- sector cipher MB/s at 4 KiB and 64 KiB calls, 1 and 2 threads: native SectorCipher,
  the Python SectorCipher (vmfs_crypt.xts), and one XTS data unit of the same size through
  `cryptography` (OpenSSL's own XTS, the ceiling the batched cipher is measured against);
- `openssl speed -evp aes-256-xts` at the same sizes (1 process and -multi 2);
- in-process latency of 4 KiB handle_read / handle_write on an encrypted and a plain
  registered handle (the code a FUSE request runs, minus the kernel round trip), and of the
  same 4 KiB read/write done the Python way (os.pread/pwrite + the Python SectorCipher).

Throughput is the best of --repeat bursts of --burst seconds (other tenants' load makes
averages meaningless on a shared machine); the C part also reports each thread's fastest
single call, which preemption cannot inflate (the stable figure under load); latency is the
median over a burst.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402

from vmfs_crypt.crypto.native import native, reason  # noqa: E402

try:
    from vmfs_crypt.crypto.xts import PySectorCipher  # noqa: E402
except ImportError:
    from vmfs_crypt.xts import SectorCipher as PySectorCipher  # noqa: E402

SIZES = (4096, 65536)


def throughput(make_fn, size: int, threads: int, burst: float, repeat: int) -> float:
    """Best MB/s (10^6 bytes) of `repeat` bursts, `threads` threads each calling its own
    make_fn() result (size bytes per call)."""
    best = 0.0
    for _ in range(repeat):
        counts = [0] * threads
        start = threading.Barrier(threads + 1)
        stop_at = [0.0]

        def work(k):
            fn = make_fn()
            start.wait()
            n = 0
            while time.perf_counter() < stop_at[0]:
                for _ in range(16):
                    fn()
                n += 16
            counts[k] = n

        ts = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
        for t in ts:
            t.start()
        stop_at[0] = time.perf_counter() + burst
        t0 = time.perf_counter()
        start.wait()
        for t in ts:
            t.join()
        elapsed = time.perf_counter() - t0
        best = max(best, sum(counts) * size / elapsed / 1e6)
    return best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def openssl_speed(size: int, multi: int) -> float | None:
    cmd = ["openssl", "speed", "-evp", "aes-256-xts", "-bytes", str(size), "-seconds", "1"]
    if multi > 1:
        cmd[2:2] = ["-multi", str(multi)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^(?:evp|aes-256-xts|AES-256-XTS)\s+([\d.]+)k\s*$", out, re.M | re.I)
    return float(m.group(1)) * 1000 / 1e6 if m else None  # "k" = 1000 bytes/s


def latency_us(fn, burst: float) -> float:
    samples = []
    end = time.perf_counter() + burst
    while time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return statistics.median(samples) / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--burst", type=float, default=0.25)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if native is None:
        print(f"native data path off: {reason}")
        return 1
    dek = os.urandom(64)
    nat, py = native.SectorCipher(dek), PySectorCipher(dek)
    res: dict = {"native": reason, "cipher_MBps": {}, "openssl_speed_MBps": {}, "latency_us": {}}
    print(f"{reason}; best of {args.repeat} x {args.burst} s bursts, MB = 10^6 bytes, "
          f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    res["loadavg_before"] = os.getloadavg()[0]

    def one_unit(d):
        """OpenSSL's XTS through cryptography, one data unit per update (a context per thread)."""
        update = Cipher(algorithms.AES(dek), modes.XTS(bytes(16))).encryptor().update
        return lambda: update(d)

    print(f"{'cipher MB/s':28} {'4 KiB':>9} {'64 KiB':>9}")
    for threads in (1, 2):
        for label, make in (("native SectorCipher", lambda d: lambda: nat.encrypt(12345, d)),
                            ("Python SectorCipher", lambda d: lambda: py.encrypt(12345, d)),
                            ("cryptography XTS, 1 unit", one_unit)):
            row = []
            for size in SIZES:
                data = os.urandom(size)
                row.append(throughput(lambda: make(data), size, threads, args.burst, args.repeat))
            key = f"{label}, {threads} thread{'s' if threads > 1 else ''}"
            res["cipher_MBps"][key] = dict(zip(map(str, SIZES), row))
            print(f"{key:28} " + " ".join(f"{v:9.0f}" for v in row))
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as d:
        exe = os.path.join(d, "bench_xts")
        cflags = subprocess.run(["pkg-config", "--cflags", "--libs", "libcrypto"], capture_output=True,
                                text=True).stdout.split()
        build = subprocess.run(["gcc", "-O2", "-I", os.path.join(here, "native"), os.path.join(here, "native/tests/bench_xts.c"),
                                os.path.join(here, "native/xts_batch.c"), "-o", exe, *cflags, "-lpthread"],
                               capture_output=True, text=True)
        if build.returncode == 0:
            res["c_MBps"] = {}
            print(f"{'in C, no Python (bench_xts)':28} {'4 KiB':>9} {'64 KiB':>9}")
            rows: dict = {}
            for line in subprocess.run([exe], capture_output=True, text=True, timeout=120).stdout.splitlines():
                *what, size, threads, mbps = line.split()
                label = " ".join(what).replace("minlat ", "fastest call: ")
                rows.setdefault(f"{label}, {threads} thread{'s' if threads != '1' else ''}", {})[size] = float(mbps)
            for key, row in rows.items():
                res["c_MBps"][key] = row
                print(f"{key:28} " + " ".join(f"{row[str(s)]:9.0f}" for s in SIZES))
        else:
            print(f"bench_xts not built: {build.stderr.strip()[:200]}")
        # The data path in-process, no FUSE (native/tests/bench_datapath.c): what a request costs
        # the daemon apart from its FUSE round trip, encrypted and plain; with and without the
        # helper thread for large requests. On /dev/shm (a tmpfs, like make bench's backing).
        exe = os.path.join(d, "bench_datapath")
        fuse_cflags = subprocess.run(["pkg-config", "--cflags", "fuse3"], capture_output=True, text=True).stdout.split()
        build = subprocess.run(["gcc", "-O2", "-I", os.path.join(here, "native"), *fuse_cflags,
                                os.path.join(here, "native/tests/bench_datapath.c"),
                                os.path.join(here, "native/datapath.c"), os.path.join(here, "native/xts_batch.c"),
                                "-o", exe, *cflags, "-lpthread"], capture_output=True, text=True)
        if build.returncode == 0 and os.path.isdir("/dev/shm"):
            res["datapath_inproc"] = {}
            print("data path in-process, no FUSE (bench_datapath), one thread issuing: MB/s, us per request")
            for split in ("1", "0"):
                out = subprocess.run([exe, "/dev/shm"], capture_output=True, text=True, timeout=300,
                                     env=dict(os.environ, VMFS_CRYPT_SPLIT=split))
                rows = {}
                for line in out.stdout.splitlines():
                    what, size, mbps, us = line.split()
                    rows[what] = {"request_bytes": int(size), "MBps": float(mbps), "us_per_request": float(us)}
                    print(f"  {'helper' if split == '1' else 'no helper':10} {what:16} {size:>8} {float(mbps):9.0f} "
                          f"{float(us):9.2f}")
                res["datapath_inproc"]["helper" if split == "1" else "no helper"] = rows
        else:
            print(f"bench_datapath not built: {build.stderr.strip()[:200]}")
    # SHA-256 of a 64 MiB region (hashlib, one thread): what the offline engine's sidecar costs
    blob = os.urandom(64 << 20)
    best = min(_timed(lambda: hashlib.sha256(blob).digest()) for _ in range(3))
    res["sha256_MBps"] = round(len(blob) / best / 1e6, 1)
    print(f"{'hashlib sha256, 64 MiB':28} {res['sha256_MBps']:9.0f} MB/s")
    del blob
    for multi in (1, 2):
        row = [openssl_speed(size, multi) for size in SIZES]
        key = f"openssl speed -evp aes-256-xts{' -multi 2' if multi > 1 else ''}"
        res["openssl_speed_MBps"][key] = dict(zip(map(str, SIZES), row))
        print(f"{key:28} " + " ".join(f"{v:9.0f}" if v else "      n/a" for v in row))

    c = res["cipher_MBps"]
    one = c["native SectorCipher, 1 thread"]["65536"]
    two = c["native SectorCipher, 2 threads"]["65536"]
    unit1 = c["cryptography XTS, 1 unit, 1 thread"]["65536"]
    speed1 = res["openssl_speed_MBps"]["openssl speed -evp aes-256-xts"]["65536"]
    res["targets"] = {"native_1t_vs_one_unit_xts_64k": one / unit1,
                      "native_1t_vs_openssl_speed_64k": one / speed1 if speed1 else None,
                      "native_2t_vs_native_1t_64k": two / one}
    print(f"64 KiB: native 1 thread = {one / unit1:.0%} of one-unit XTS in-process"
          + (f", {one / speed1:.0%} of openssl speed" if speed1 else "")
          + f"; 2 threads = {two / one:.2f}x 1 thread")
    if "c_MBps" in res:
        cc = res["c_MBps"]
        n1, n2 = cc["native-sector-cipher, 1 thread"]["65536"], cc["native-sector-cipher, 2 threads"]["65536"]
        e1 = cc["evp-xts-one-unit, 1 thread"]["65536"]
        f1 = cc["fastest call: native-sector-cipher, 1 thread"]["65536"]
        f2 = cc["fastest call: native-sector-cipher, 2 threads"]["65536"]
        fe = cc["fastest call: evp-xts-one-unit, 1 thread"]["65536"]
        res["targets"].update({"c_native_1t_vs_evp_one_unit_64k": n1 / e1, "c_native_2t_vs_1t_64k": n2 / n1,
                               "c_fastest_native_vs_evp_one_unit_64k": f1 / fe,
                               "c_fastest_2t_aggregate_vs_1t_64k": 2 * f2 / f1})
        print(f"64 KiB in C, bursts: native 1 thread = {n1 / e1:.0%} of EVP one-unit XTS; 2 threads = {n2 / n1:.2f}x")
        print(f"64 KiB in C, fastest call (stable under load): native = {f1 / fe:.0%} of EVP one-unit XTS; "
              f"with 2 threads at once each keeps {f2 / f1:.0%}, i.e. {2 * f2 / f1:.2f}x aggregate")

    with tempfile.TemporaryDirectory() as d:
        fds = []
        try:
            enc_fd = os.open(os.path.join(d, "enc"), os.O_RDWR | os.O_CREAT, 0o600)
            pla_fd = os.open(os.path.join(d, "pla"), os.O_RDWR | os.O_CREAT, 0o600)
            pyf_fd = os.open(os.path.join(d, "py"), os.O_RDWR | os.O_CREAT, 0o600)
            fds = [enc_fd, pla_fd, pyf_fd]
            blob = os.urandom(1 << 20)
            native.register(900_001, enc_fd, native.FileState(nat, "bench/enc"))
            native.register(900_002, pla_fd, native.FileState(None, "bench/pla"))
            native.handle_write(900_001, blob, 0)
            native.handle_write(900_002, blob, 0)
            os.pwrite(pyf_fd, py.encrypt(0, blob), 0)
            page = os.urandom(4096)
            offs = iter(range(0, 1 << 40, 4096))

            def off():
                return next(offs) % (1 << 20)

            def py_read():  # what fs.py does for an aligned 4 KiB read, minus locks and checks
                o = off()
                os.fstat(pyf_fd)
                bytes(py.decrypt(o // 512, os.pread(pyf_fd, 4096, o)))

            def py_write():
                o = off()
                os.fstat(pyf_fd)
                os.pwrite(pyf_fd, py.encrypt(o // 512, page), o)

            for label, fn in (("handle_read 4 KiB encrypted", lambda: native.handle_read(900_001, 4096, off())),
                              ("handle_write 4 KiB encrypted", lambda: native.handle_write(900_001, page, off())),
                              ("handle_read 4 KiB plain", lambda: native.handle_read(900_002, 4096, off())),
                              ("handle_write 4 KiB plain", lambda: native.handle_write(900_002, page, off())),
                              ("Python pread+decrypt 4 KiB", py_read),
                              ("Python encrypt+pwrite 4 KiB", py_write)):
                v = latency_us(fn, args.burst * 2)
                res["latency_us"][label] = v
                print(f"{label:32} {v:7.1f} us (median, in-process, includes the Python call)")
        finally:
            for fh in (900_001, 900_002):
                try:
                    native.unregister(fh)
                except KeyError:
                    pass
            for fd in fds:
                os.close(fd)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
