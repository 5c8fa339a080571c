#!/usr/bin/env python3
"""vmfs-crypt host benchmarks, issue 13 (`make bench` runs `.venv/bin/python scripts/bench.py`).

One run, in this order, every backing file on one fresh tmpfs:
1. Sector cipher micro benchmark (scripts/bench_native.py): the native sector cipher on
   64 KiB calls against one OpenSSL XTS data unit per call, 1 and 2 threads, in-process and in C.
2. fio matrix, targets interleaved (round 1 of every job on every target, rotating the target
   order, then round 2, ...), medians of the rounds:
     vmfs-enc    a `vmfs-crypt create` flat extent, through the mount
     vmfs-plain  a disk of a plain VM folder, through the same mount
     gocryptfs   Debian gocryptfs          securefs  Debian securefs 0.13 (lite format)
     bindfs      Debian bindfs, a C FUSE passthrough (the FUSE round-trip limit)
     raw         the tmpfs itself (reference, no FUSE)
   Columns (all direct=1, time based with a short ramp): seq write and seq read 1 MiB psync;
   4 KiB randread and randwrite psync with 1 and 2 jobs; 4 KiB randread and randwrite libaio
   iodepth 16 (QEMU aio=native's shape). Then fio crc32c verify through the mount and a
   check that the encrypted backing file holds no plaintext sector.
3. qemu-img convert of a fully written disk into an encrypted VM folder of the mount and back
   out, against QEMU's LUKS driver on the same tmpfs; interleaved rounds, medians.
4. Offline `vmfs-crypt encrypt`, `rekey --deep`, `decrypt` of a VM folder (MB/s of allocated data).
5. Peak RSS (VmHWM) of the mount process over 2-3 (target < 200 MB).
6. Online operations (issue 10; scripts/bench_online.py): `rekey --deep` of a fully written disk
   by the idle mount vs offline, and fio randrw 4 KiB IOPS through the mount with and without
   an online deep rekey running (targets >= 0.5 each), with a crc32c verify of the writes.
7. Mount time of a datastore of 200 encrypted disks under a KMIP provider (scripts/kms_bench.py,
   a local PyKMIP server; target < 2 s).
Then one table of ratios per fio column, each target marked met or not: vmfs-enc / best of
gocryptfs and securefs (>= 1.0, aim 1.5), vmfs-enc / bindfs (>= 0.8), vmfs-enc / vmfs-plain (>= 0.8).

The load average is recorded before and after each round, with the CPU other processes used
during it; a warning is printed when the machine was busy (the figures are then noise).
Results: the printed tables and bench-results/latest.json. `--quick`: 1 round, 2 s jobs,
256 MiB files (a smoke run, not figures). A target that cannot run is reported "not
available" and the rest still runs. Needs root (apt-get of missing tools, the tmpfs mount).
Everything started is unmounted and stopped by pid in `finally`, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_online import noisy_rounds, online_benchmark, summarize_online  # noqa: E402
from benchlib import (  # noqa: E402
    CLI, GIB, MIB, PASSWORD, REPO, BindfsProvider, Cleanup, GocryptfsProvider, LoadMeter, RawProvider, SchedMeter,
    SecurefsProvider, VmfsCryptProvider, allocated_bytes, backing_fs, daemon_pids, ensure_tools, fio, fmt, fmt_size,
    install_signal_handlers, load_line, log, make_flat_folder, mark, median_or_none, parse_size, ratio, run,
    run_retrying_pbkdf_timing,
    start_providers, tool_version, vm_hwm_mb, write_pattern,
)

PROVIDERS = [RawProvider, GocryptfsProvider, SecurefsProvider, BindfsProvider, VmfsCryptProvider]
TARGET_ORDER = ["vmfs-enc", "vmfs-plain", "gocryptfs", "securefs", "bindfs", "raw"]
SCHED_KEYS = ("busy_cpus", "daemon_cpu_us", "daemon_rq_wait_us", "daemon_runs")  # SchedMeter
PARTS = ["micro", "fio", "checks", "convert", "offline", "online", "kmip"]
RSS_LIMIT_MB = 200
KMIP_MOUNT_LIMIT_S = 2.0
# (name, numerator, denominators (best of), target, aim) - issue 13
RATIOS = [
    ("enc / best(gocryptfs, securefs)", "vmfs-enc", ("gocryptfs", "securefs"), 1.0, 1.5),
    ("enc / bindfs", "vmfs-enc", ("bindfs",), 0.8, None),
    ("enc / plain (same mount)", "vmfs-enc", ("vmfs-plain",), 0.8, None),
]
INFO_RATIOS = [("plain / bindfs (info)", "vmfs-plain", ("bindfs",))]


# -- 1. sector-cipher micro benchmark -------------------------------------------------------
def micro_benchmark(quick: bool) -> dict:
    """scripts/bench_native.py, and from it the 64 KiB ratios for 1 and 2 threads."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "native.json")
        args = ["--burst", "0.1", "--repeat", "3"] if quick else []
        proc = run([sys.executable, os.path.join(REPO, "scripts", "bench_native.py"), "--json", out, *args],
                   check=False, timeout=900, env=dict(os.environ, PYTHONPATH=REPO))
        if proc.returncode != 0 or not os.path.exists(out):
            return {"error": (proc.stdout + proc.stderr).decode(errors="replace").strip()[-500:]}
        with open(out, encoding="utf-8") as f:
            raw = json.load(f)
    c, cc = raw.get("cipher_MBps", {}), raw.get("c_MBps", {})
    rows = {}
    for n in (1, 2):
        t = f"{n} thread{'s' if n > 1 else ''}"
        row = {"native_MBps": c.get(f"native SectorCipher, {t}", {}).get("65536"),
               "one_unit_xts_MBps": c.get(f"cryptography XTS, 1 unit, {t}", {}).get("65536"),
               "c_native_MBps": cc.get(f"native-sector-cipher, {t}", {}).get("65536"),
               "c_evp_one_unit_MBps": cc.get(f"evp-xts-one-unit, {t}", {}).get("65536"),
               "c_fastest_native_MBps": cc.get(f"fastest call: native-sector-cipher, {t}", {}).get("65536"),
               "c_fastest_evp_MBps": cc.get(f"fastest call: evp-xts-one-unit, {t}", {}).get("65536")}
        row["ratio_in_process"] = ratio(row["native_MBps"], row["one_unit_xts_MBps"])
        row["ratio_c"] = ratio(row["c_native_MBps"], row["c_evp_one_unit_MBps"])
        row["ratio_c_fastest_call"] = ratio(row["c_fastest_native_MBps"], row["c_fastest_evp_MBps"])
        rows[t] = row
    return {"native": raw.get("native"), "call_size": 65536, "rows": rows, "bench_native": raw}


def print_micro(m: dict) -> None:
    if "error" in m:
        log(f"  not available: {m['error']}")
        return
    log(f"  {m['native']}; 64 KiB calls, MB/s (10^6 B/s), best of bursts (scripts/bench_native.py)")
    log(f"  {'threads':<10}{'native':>9}{'1-unit XTS':>11}{'ratio':>7}   {'C native':>9}{'C EVP 1-unit':>13}"
        f"{'ratio':>7}{'fastest-call ratio':>20}")
    for t, r in m["rows"].items():
        def f(v):
            return f"{v:.0f}" if v else "n/a"

        def q(v):
            return f"{v:.2f}" if v else "n/a"
        log(f"  {t:<10}{f(r['native_MBps']):>9}{f(r['one_unit_xts_MBps']):>11}{q(r['ratio_in_process']):>7}   "
            f"{f(r['c_native_MBps']):>9}{f(r['c_evp_one_unit_MBps']):>13}{q(r['ratio_c']):>7}"
            f"{q(r['ratio_c_fastest_call']):>20}")
    dp = (m.get("bench_native") or {}).get("datapath_inproc") or {}
    if dp:
        log("  the data path in-process, no FUSE (native/tests/bench_datapath.c, one thread issuing), us per request:")
        cases = list(next(iter(dp.values())))
        log(f"  {'':<10}" + "".join(f"{c:>17}" for c in cases))
        for mode, rows in dp.items():
            log(f"  {mode:<10}" + "".join(f"{rows[c]['us_per_request']:>17.2f}" if c in rows else f"{'n/a':>17}"
                                          for c in cases))
    if (m.get("bench_native") or {}).get("sha256_MBps"):
        log(f"  hashlib sha256 of 64 MiB: {m['bench_native']['sha256_MBps']:.0f} MB/s (the offline engine's sidecar)")


# -- 2. fio matrix --------------------------------------------------------------------------
def fio_jobs(runtime: float, ramp: float) -> list[dict]:
    tb = dict(time_based=True, runtime=f"{int(runtime * 1000)}ms", ramp=f"{int(ramp * 1000)}ms")
    seq = dict(bs="1M", numjobs=1, metric="MB/s", **tb)
    rnd = dict(bs="4k", metric="IOPS", **tb)
    aio = dict(bs="4k", metric="IOPS", ioengine="libaio", iodepth=16, numjobs=1, **tb)
    return [
        dict(name="seqwr-1M", title="seq write 1M", rw="write", **seq),
        dict(name="seqrd-1M", title="seq read 1M", rw="read", **seq),
        dict(name="rr4k-j1", title="randread 4k 1 job", rw="randread", numjobs=1, **rnd),
        dict(name="rr4k-j2", title="randread 4k 2 jobs", rw="randread", numjobs=2, **rnd),
        dict(name="rw4k-j1", title="randwrite 4k 1 job", rw="randwrite", numjobs=1, **rnd),
        dict(name="rw4k-j2", title="randwrite 4k 2 jobs", rw="randwrite", numjobs=2, **rnd),
        dict(name="rr4k-qd16", title="randread 4k libaio qd16", rw="randread", **aio),
        dict(name="rw4k-qd16", title="randwrite 4k libaio qd16", rw="randwrite", **aio),
    ]


def fio_matrix(results: dict, targets, providers, size: int, rounds: int, jobs: list[dict]) -> None:
    status = results["targets"]
    # Lay the files out once (unmeasured), so that every measured job finds them allocated.
    for t in targets:
        try:
            fio(t.path, dict(name="prefill", rw="write", bs="1M"), size)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            status[t.name] = f"prefill failed: {exc}"
            log(f"  {t.name}: prefill failed: {exc}")
    targets[:] = [t for t in targets if status[t.name] == "ok"]
    samples: dict = {j["name"]: {t.name: [] for t in targets} for j in jobs}
    errors: list = []
    meter = LoadMeter(lambda: daemon_pids(providers))
    results["fio_rounds"] = []
    try:
        for rnd in range(rounds):
            meter.start()
            k = rnd % len(targets) if targets else 0
            order = targets[k:] + targets[:k]
            for job in jobs:
                for t in order:
                    try:
                        sched = SchedMeter(daemon_pids([t.provider]))
                        r = fio(t.path, job, size)
                        r.update(sched.per_request(r["IOPS"]))
                        samples[job["name"]][t.name].append(r)
                        log(f"  round {rnd + 1}/{rounds} {job['name']:<10} {t.name:<11} "
                            f"{fmt(r[job['metric']], job['metric']):>10} {job['metric']}")
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        errors.append(f"round {rnd + 1} {job['name']} {t.name}: {exc}")
                        log(f"  round {rnd + 1}/{rounds} {job['name']:<10} {t.name:<11} ERROR {exc}")
            load = meter.stop()
            load["order"] = [t.name for t in order]
            results["fio_rounds"].append(load)
            log(load_line(f"fio round {rnd + 1}", load))
    finally:  # also the partial medians of an interrupted run
        results["fio_errors"] = errors
        results["fio"] = fio_medians(jobs, samples)


def fio_medians(jobs: list[dict], samples: dict) -> dict:
    return {
        j["name"]: {"title": j["title"], "metric": j["metric"], "rw": j["rw"], "bs": j["bs"],
                    "numjobs": j.get("numjobs", 1), "ioengine": j.get("ioengine", "psync"),
                    "iodepth": j.get("iodepth", 1),
                    "targets": {t: {"median": round(statistics.median([r[j["metric"]] for r in rs]), 1),
                                    "samples": [round(r[j["metric"]], 1) for r in rs],
                                    "lat_us_median": round(statistics.median([r["lat_us"] for r in rs]), 1),
                                    **{k: round(statistics.median([r[k] for r in rs]), 2) for k in SCHED_KEYS
                                       if all(k in r for r in rs)}}
                                for t, rs in samples[j["name"]].items() if rs}}
        for j in jobs}


def correctness(target, size: int) -> dict:
    """fio writes with crc32c verify through the mount; then compare backing and view."""
    n = min(size, 256 * MIB)
    res = {"target": target.name}
    for name, rw, bs in (("verify-seq-1M", "write", "1M"), ("verify-rand-4k", "randwrite", "4k")):
        try:
            fio(target.path, dict(name=name, rw=rw, bs=bs), n if bs == "1M" else min(n, 32 * MIB),
                ("--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0"))
            res[name] = "ok"
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            res[name] = f"FAILED: {exc}"
    if target.backing:
        same = nonzero = 0
        with open(target.path, "rb") as view, open(target.backing, "rb") as back:
            for _ in range(0, min(n, 64 * MIB), MIB):
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


# -- 3. qemu-img convert --------------------------------------------------------------------
def convert_benchmark(vmfs: VmfsCryptProvider, backing: str, size: int, rounds: int) -> dict:
    """qemu-img convert into an encrypted VM folder of the mount and back out, vs QEMU's LUKS on the tmpfs."""
    d = os.path.join(backing, "convert")
    os.makedirs(d)
    src, luks, out = (os.path.join(d, n) for n in ("src.raw", "luks.img", "out.raw"))
    dst = os.path.join(vmfs.mnt, "vm1", "conv.vmdk")
    secret = ["--object", f"secret,id=s,data={PASSWORD}"]
    # iter-time=10: the LUKS key slot's PBKDF2 takes 10 ms instead of 2 s (only open/create get cheaper)
    cmds = {
        "vmfs-enc into": ["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat", src, dst],
        "luks into": ["qemu-img", "convert", *secret, "-f", "raw", "-O", "luks", "-o", "key-secret=s,iter-time=10",
                      src, luks],
        "vmfs-enc out": ["qemu-img", "convert", "-f", "vmdk", "-O", "raw", dst, out],
        # information: the same with an O_DIRECT source, past the FUSE page cache (the bound of "out")
        "vmfs-enc out -T none": ["qemu-img", "convert", "-T", "none", "-f", "vmdk", "-O", "raw", dst, out],
        "luks out": ["qemu-img", "convert", *secret, "--image-opts", f"driver=luks,key-secret=s,file.filename={luks}",
                     "-O", "raw", out],
    }
    res: dict = {"size": size, "commands": {k: " ".join(v) for k, v in cmds.items()}, "samples_s": {k: [] for k in cmds},
                 "rounds": []}
    write_pattern(src, size)
    meter = LoadMeter(lambda: vmfs.pids())

    def clean():
        for p in (dst, os.path.join(vmfs.mnt, "vm1", "conv-flat.vmdk"), luks, out):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    try:
        for rnd in range(rounds):
            meter.start()
            clean()
            order = ["vmfs-enc into", "luks into", "vmfs-enc out", "luks out", "vmfs-enc out -T none"]
            if rnd % 2:
                order = ["luks into", "vmfs-enc into", "luks out", "vmfs-enc out", "vmfs-enc out -T none"]
            for name in order:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(out)
                t = time.perf_counter()
                if name.startswith("luks into"):
                    run_retrying_pbkdf_timing(cmds[name], timeout=1800, say=lambda m: log(f"  {name}: {m}"))
                else:
                    run(cmds[name], timeout=1800)
                s = time.perf_counter() - t
                res["samples_s"][name].append(round(s, 3))
                log(f"  round {rnd + 1}/{rounds} {name:<20} {s:7.2f} s  {size / 1e6 / s:8.1f} MB/s")
                if rnd == 0 and name.endswith("out"):
                    res[f"{name.split()[0]} round trip identical"] = run(["cmp", "-s", src, out],
                                                                         check=False).returncode == 0
            if rnd == 0:
                flat = os.path.join(vmfs.ds, "vm1", "conv-flat.vmdk")
                with open(src, "rb") as a, open(flat, "rb") as b:
                    res["vmfs-enc backing differs from plaintext"] = a.read(MIB) != b.read(MIB)
            load = meter.stop()
            res["rounds"].append(load)
            log(load_line(f"convert round {rnd + 1}", load))
    finally:
        clean()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(src)
    med = {k: median_or_none(v) for k, v in res["samples_s"].items()}
    res["median_s"] = med
    res["median_MBps"] = {k: round(size / 1e6 / v, 1) if v else None for k, v in med.items()}
    res["ratio_vs_luks"] = {way: ratio(res["median_MBps"][f"vmfs-enc {way}"], res["median_MBps"][f"luks {way}"])
                            for way in ("into", "out")}
    return res


# -- 4. offline encrypt / rekey --deep / decrypt --------------------------------------------
def offline_benchmark(vmfs: VmfsCryptProvider, backing: str, size: int, rounds: int) -> dict:
    """`vmfs-crypt encrypt`, `rekey --deep`, `decrypt` of a folder with one fully written disk, MB/s of allocated data."""
    folder = os.path.join(backing, "offline-ds", "offvm")
    make_flat_folder(folder, size)
    ops = {"encrypt": ["encrypt", folder], "rekey --deep": ["rekey", "--deep", folder], "decrypt": ["decrypt", folder]}
    res: dict = {"size": size, "samples_MBps": {k: [] for k in ops}, "rounds": []}
    meter = LoadMeter(lambda: vmfs.pids())
    try:
        for rnd in range(rounds):
            meter.start()
            for name, args in ops.items():
                alloc = allocated_bytes(folder)
                t = time.perf_counter()
                vmfs.cli(*args, timeout=1800)
                s = time.perf_counter() - t
                res["samples_MBps"][name].append(round(alloc / 1e6 / s, 1))
                log(f"  round {rnd + 1}/{rounds} {name:<13} {alloc / 1e6:7.0f} MB allocated  {s:6.2f} s  "
                    f"{alloc / 1e6 / s:7.1f} MB/s")
            load = meter.stop()
            res["rounds"].append(load)
            log(load_line(f"offline round {rnd + 1}", load))
    finally:
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
    res["median_MBps"] = {k: median_or_none(v) for k, v in res["samples_MBps"].items()}
    return res


# -- 6. KMIP ---------------------------------------------------------------------------------
def kmip_mount_benchmark() -> dict:
    """Time to mount 200 encrypted disks (20 folders, one KEK each) under a local PyKMIP server."""
    try:
        from kms_bench import mount_time_200
    except ImportError as exc:
        return {"error": f"not available ({exc})"}
    try:
        return mount_time_200()
    except Exception as exc:  # noqa: BLE001 - report, the other results still count
        return {"error": f"failed: {exc}"}


# -- summary --------------------------------------------------------------------------------
def environment() -> dict:
    env = {"kernel": platform.release(), "python": platform.python_version(), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            env["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    for name, cmd in {"fio": ["fio", "--version"], "gocryptfs": ["gocryptfs", "-version"],
                      "securefs": ["dpkg-query", "-W", "-f=${Version}", "securefs"],
                      "bindfs": ["bindfs", "--version"], "qemu-img": ["qemu-img", "--version"],
                      "vmfs-crypt": CLI + ["--version"]}.items():
        env[name] = tool_version(cmd)
    proc = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], check=False)
    env["git"] = proc.stdout.decode().strip() or None
    return env


# -- what bounds a missed target ------------------------------------------------------------
def _us(value, metric: str, size: int, ncpu: int, saturated: bool) -> float | None:
    """Microseconds one request of a fio column costs: latency (one request in flight) or CPU (2 CPUs busy)."""
    if not value:
        return None
    per_s = value * 1e6 / size if metric == "MB/s" else value
    return (ncpu if saturated else 1) * 1e6 / per_s


def sched_note(cells: dict, who: str) -> str:
    """The scheduler's share of a missed fio column: the encrypted disk's daemon threads
    against `who`'s (SchedMeter medians), or "" when they were not measured."""
    enc, other = cells.get("vmfs-enc", {}), cells.get(who, {})
    if "daemon_rq_wait_us" not in enc or "daemon_rq_wait_us" not in other:
        return ""
    d_wait = enc["daemon_rq_wait_us"] - other["daemon_rq_wait_us"]
    return (f"; per request the mount's threads waited {enc['daemon_rq_wait_us']:.1f} us on run queues after "
            f"wake-ups over {enc['daemon_runs']:.2f} schedulings ({who}: {other['daemon_rq_wait_us']:.1f} us over "
            f"{other['daemon_runs']:.2f}), {d_wait:+.1f} us, and used {enc['daemon_cpu_us']:.1f} us of CPU "
            f"({who}: {other['daemon_cpu_us']:.1f}); the machine had {enc['busy_cpus']:.2f} CPUs busy "
            f"({who}: {other['busy_cpus']:.2f})")


def bounds(results: dict) -> list[str]:
    """One line per missed target: what bounds it, from figures measured in this run (docs/PERFORMANCE.md)."""
    out: list[str] = []
    summary = results.get("summary") or {}
    fio_res = results.get("fio") or {}
    micro = (results.get("micro") or {}).get("bench_native") or {}
    inproc = (micro.get("datapath_inproc") or {}).get("helper") or {}
    ncpu = os.cpu_count() or 1
    kind = {"seqwr-1M": "seqwrite", "seqrd-1M": "seqread", "rr4k-j1": "randread", "rr4k-j2": "randread",
            "rr4k-qd16": "randread", "rw4k-j1": "randwrite", "rw4k-j2": "randwrite", "rw4k-qd16": "randwrite"}
    for name, num, dens, target, _aim in RATIOS:
        for col, cell in (summary.get("ratios", {}).get(name) or {}).items():
            if cell.get("met") is not False or col not in fio_res:
                continue
            j = fio_res[col]
            med = {t: v.get("median") for t, v in j["targets"].items()}
            who = cell["against"]
            enc_in, plain_in = inproc.get(f"enc-{kind[col]}"), inproc.get(f"plain-{kind[col]}")
            size = 1 << 20 if col.startswith("seq") else 4096
            saturated = not col.endswith("j1") and not col.startswith("seq")
            t_plain = _us(med.get("vmfs-plain"), j["metric"], size, ncpu, saturated)
            t_other = _us(med.get(who), j["metric"], size, ncpu, saturated)
            head = f"  {col} {name} {cell['value']:.2f} (target {target}):"
            if not (enc_in and plain_in and t_plain and t_other):
                out.append(f"{head} no in-process figures to bound it (bench_datapath did not run)")
                continue
            # The plain folder's request = its FUSE part + its data path; the encrypted disk's FUSE
            # part is the same code, so it costs at least that FUSE part + the encrypted data path.
            fuse_part = max(0.0, t_plain - plain_in["us_per_request"])
            floor = fuse_part + enc_in["us_per_request"]
            bound = t_other / floor
            unit = "1 MiB request" if size > 4096 else "4 KiB request"
            what = f"per {unit}" if not saturated else f"CPU per {unit} ({ncpu} CPUs busy)"
            other = "" if who == "vmfs-plain" else f"{who} takes {t_other:.1f} us; "
            split = ", split over 2 threads" if size > 4096 else ""
            line = (f"{head} {what}: {other}the plain folder takes {t_plain:.1f} us, {plain_in['us_per_request']:.1f} "
                    f"of it its data path (in-process); the encrypted data path takes {enc_in['us_per_request']:.1f} us "
                    f"in-process (bench_datapath: cipher and copies{split}) -> at most {bound:.2f} with the FUSE "
                    f"part ({fuse_part:.1f} us) unchanged")
            if cell["value"] < bound - 0.05:
                line += (f"; measured {cell['value']:.2f}: {t_other / cell['value'] - floor:.1f} us more per request "
                         "are not the data path's own cost")
                line += sched_note(j["targets"], who)
            out.append(line)
    c = micro.get("c_MBps") or {}
    n1, n2 = (c.get(f"native-sector-cipher, {t}", {}).get("65536") for t in ("1 thread", "2 threads"))
    e1, e2 = (c.get(f"evp-xts-one-unit, {t}", {}).get("65536") for t in ("1 thread", "2 threads"))
    if n1 and n2 and n2 / n1 < 1.8:
        out.append(f"  sector cipher 2 threads {n2 / n1:.2f}x of one (target 1.8x): OpenSSL's own one-unit XTS gets "
                   f"{e2 / e1:.2f}x from the second CPU in the same run ({e1:.0f} -> {e2:.0f} MB/s, bench_xts)"
                   if e1 and e2 else f"  sector cipher 2 threads {n2 / n1:.2f}x of one (target 1.8x)")
    conv = (results.get("qemu_convert") or {}).get("median_MBps") or {}
    if conv.get("vmfs-enc out") and conv.get("luks out") and conv["vmfs-enc out"] < conv["luks out"]:
        direct = conv.get("vmfs-enc out -T none")
        out.append(f"  qemu-img convert out {conv['vmfs-enc out'] / conv['luks out']:.2f}x LUKS (target 1.0): the source "
                   "is read buffered, through the FUSE inode's page cache (128 KiB read-ahead requests)"
                   + (f"; with -T none (O_DIRECT, the mount's reads without that cache) {direct} MB/s = "
                      f"{direct / conv['luks out']:.2f}x LUKS" if direct else ""))
    off = (results.get("offline") or {}).get("median_MBps") or {}
    sha = micro.get("sha256_MBps")
    cipher1 = n1
    io_w, io_r = (inproc.get(k, {}).get("MBps") for k in ("plain-seqwrite", "plain-seqread"))
    for op, ciphers in (("encrypt", 1), ("rekey --deep", 2), ("decrypt", 1)):
        v = off.get(op)
        if not v or v >= 1000:
            continue
        if not (sha and cipher1 and io_w and io_r):
            out.append(f"  offline {op} {v} MB/s (target 1000): no stage figures to bound it")
            continue
        # FORMAT.md 7.8 per byte: read, write to the sidecar, hash it, cipher(s), write in place
        ns = 1e3 / io_r + 2e3 / io_w + 1e3 / sha + ciphers * 1e3 / cipher1
        out.append(f"  offline {op} {v} MB/s (target 1000): each byte is read ({io_r:.0f} MB/s), written to the "
                   f"sidecar and in place ({io_w:.0f}), hashed ({sha:.0f}) and ciphered {ciphers}x ({cipher1:.0f}): "
                   f"{ns:.2f} ns of CPU, at most {1e3 / ns * ncpu:.0f} MB/s on {ncpu} CPUs with every stage "
                   f"overlapped, {1e3 / ns:.0f} MB/s on one; the engine overlaps the cipher and the hash with the "
                   "sidecar's write, and a region's stores wait for its durable sidecar")
    return out


def sched_table(fio_res: dict, present: list[str]) -> None:
    """The SchedMeter medians: what each FUSE daemon's threads cost the scheduler per request."""
    rows = [(col, t, j["targets"][t]) for col, j in fio_res.items() for t in present
            if "daemon_cpu_us" in j["targets"].get(t, {})]
    if not rows:
        return
    log("\n== per request, the FUSE daemon's threads (medians; /proc/TID/schedstat over each fio job)")
    log(f"  {'column':<10} {'target':<11} {'CPU us':>8} {'run-queue wait us':>18} {'times run':>10} "
        f"{'busy CPUs':>10}")
    for col, t, c in rows:
        log(f"  {col:<10} {t:<11} {c['daemon_cpu_us']:>8.1f} {c['daemon_rq_wait_us']:>18.1f} "
            f"{c['daemon_runs']:>10.2f} {c['busy_cpus']:>10.2f}")
    log("  (run-queue wait: from a wake-up or preemption of a thread to its running, summed over the "
        "daemon's threads; the machine's busy CPUs include fio)")


def summarize(results: dict) -> None:
    fio_res = results.get("fio")
    summary: dict = {"ratios": {}, "targets_met": {}}
    results["summary"] = summary
    if isinstance(fio_res, dict) and fio_res:
        present = [n for n in TARGET_ORDER if any(n in j["targets"] for j in fio_res.values())]
        log(f"\n== fio medians of {results['params']['rounds']} round(s) (seq: MB/s, 4k: IOPS)")
        log("  " + f"{'target':<12}" + "".join(f"{n:>11}" for n in fio_res))
        for t in present:
            cells = [fmt(j["targets"].get(t, {}).get("median"), j["metric"]) for j in fio_res.values()]
            log("  " + f"{t:<12}" + "".join(f"{c:>11}" for c in cells))
        log("  (" + "; ".join(f"{n}: {j['title']}" for n, j in fio_res.items()) + "; all direct=1)")
        log("\n== ratios per column (same run; 'ok' target met, 'NO' not met, 'aim' the aim met too)")
        log("  " + f"{'ratio (target)':<50}" + "".join(f"{n:>11}" for n in fio_res))
        for name, num, dens, target, aim in RATIOS + [(n, a, b, None, None) for n, a, b in INFO_RATIOS]:
            row, cells = {}, []
            for col, j in fio_res.items():
                a = j["targets"].get(num, {}).get("median")
                best = max((j["targets"][d]["median"] for d in dens if d in j["targets"]), default=None)
                who = next((d for d in dens if d in j["targets"] and j["targets"][d]["median"] == best), None)
                v = ratio(a, best)
                row[col] = {"value": v, "against": who, "target": target, "aim": aim,
                            "met": None if v is None or target is None else v >= target,
                            "aim_met": None if v is None or aim is None else v >= aim}
                cells.append(mark(v, target, aim) if target is not None else (f"{v:.2f}" if v else "n/a"))
            summary["ratios"][name] = row
            label = f"{name} (>= {target}{', aim ' + str(aim) if aim else ''})" if target else name
            log("  " + f"{label:<50}" + "".join(f"{c:>11}" for c in cells))
            if target is not None:
                vals = [c["met"] for c in row.values() if c["met"] is not None]
                summary["targets_met"][name] = f"{sum(vals)} of {len(vals)} columns"
        best = summary["ratios"].get(RATIOS[0][0], {})
        whos = ", ".join(f"{col} {c['against']}" for col, c in best.items() if c["against"])
        if whos:
            log(f"  (best of gocryptfs/securefs per column: {whos})")
        sched_table(fio_res, present)
    log("\n== other figures")
    micro = results.get("micro") or {}
    for t, r in (micro.get("rows") or {}).items():
        summary[f"cipher_64KiB_native_vs_one_unit_xts_{t.replace(' ', '_')}"] = r["ratio_in_process"]
        log(f"  sector cipher 64 KiB, {t}: native / one-unit XTS {r['ratio_in_process'] or 'n/a'} in-process, "
            f"{r['ratio_c'] or 'n/a'} in C (fastest call {r['ratio_c_fastest_call'] or 'n/a'})")
    conv = results.get("qemu_convert") or {}
    if conv.get("median_MBps"):
        m = conv["median_MBps"]
        log(f"  qemu-img convert {fmt_size(conv['size'])}, MB/s: into vmfs-enc {m['vmfs-enc into']}, into LUKS "
            f"{m['luks into']} (ratio {conv['ratio_vs_luks']['into']}); out of vmfs-enc {m['vmfs-enc out']}, "
            f"out of LUKS {m['luks out']} (ratio {conv['ratio_vs_luks']['out']}); out of vmfs-enc with -T none "
            f"{m.get('vmfs-enc out -T none')} (information); round trips identical: "
            f"{conv.get('vmfs-enc round trip identical')}/{conv.get('luks round trip identical')}")
        summary["convert_MBps"] = m
        summary["convert_ratio_vs_luks"] = conv["ratio_vs_luks"]
    elif conv.get("error"):
        log(f"  qemu-img convert: {conv['error']}")
    off = results.get("offline") or {}
    if off.get("median_MBps"):
        m = off["median_MBps"]
        log(f"  offline, {fmt_size(off['size'])} folder, MB/s of allocated data: encrypt {m['encrypt']}, "
            f"rekey --deep {m['rekey --deep']}, decrypt {m['decrypt']}")
        summary["offline_MBps"] = m
    elif off.get("error"):
        log(f"  offline: {off['error']}")
    rss = results.get("peak_rss") or {}
    for name, r in rss.items():
        log(f"  peak RSS (VmHWM) of the {name} process: {r['VmHWM_MB']} MB")
    enc_rss = rss.get("vmfs-crypt mount", {}).get("VmHWM_MB")
    if enc_rss is not None:
        summary["vmfs_peak_rss_MB"] = enc_rss
        summary["targets_met"]["mount peak RSS < 200 MB"] = enc_rss < RSS_LIMIT_MB
        log(f"  vmfs-crypt mount peak RSS < {RSS_LIMIT_MB} MB: {'ok' if enc_rss < RSS_LIMIT_MB else 'NO'} ({enc_rss} MB)")
    summarize_online(results.get("online") or {}, summary)
    kmip = results.get("kmip_mount_200") or {}
    if "mount_s" in kmip:
        ok = kmip["mount_s"] < KMIP_MOUNT_LIMIT_S
        summary["targets_met"]["200 KMIP disks mount < 2 s"] = ok
        log(f"  200 KMIP-keyed disks mount in {kmip['mount_s']} s (< {KMIP_MOUNT_LIMIT_S} s: {'ok' if ok else 'NO'}); "
            f"{kmip.get('kmip_gets_at_mount')} Gets over {kmip.get('kmip_connections')} connection(s)")
    elif kmip:
        log(f"  200 KMIP disks: {kmip.get('error')}")
    for c in results.get("checks") or []:
        bad = [k for k, v in c.items() if isinstance(v, str) and v.startswith("FAILED")]
        flag = c.get("backing_is_not_plaintext", c.get("backing_is_plaintext"))
        log(f"  check {c['target']}: fio verify {'FAILED ' + ','.join(bad) if bad else 'ok'}; "
            f"backing {'as expected' if flag else 'NOT as expected'} "
            f"({c.get('identical_in_backing')} of {c.get('plaintext_sectors_checked')} sectors identical)")
    noisy = [r for k in ("fio_rounds",) for r in results.get(k, []) if r.get("noisy")]
    noisy += [r for k in ("qemu_convert", "offline") for r in (results.get(k) or {}).get("rounds", []) if r.get("noisy")]
    noisy += noisy_rounds(results.get("online") or {})
    if noisy:
        log(f"  WARNING: {len(noisy)} round(s) ran on a busy machine (see the load lines above): treat the "
            "figures as noise and rerun at a quiet moment")
    summary["noisy_rounds"] = len(noisy)
    lines = bounds(results)
    summary["bounds"] = lines
    if lines:
        log("\n== what bounds each missed target (figures of this run)")
        for line in lines:
            log(line)
    if results.get("quick"):
        log("  (quick mode: 1 round, short jobs, small files: a smoke run, not figures)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 s jobs, 256 MiB files")
    ap.add_argument("--rounds", "--reps", type=int, dest="rounds", help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--size", help="fio file size per target (default 512M, quick 256M)")
    ap.add_argument("--convert-size", help="qemu-img convert and offline folder size (default 1G, quick 256M)")
    ap.add_argument("--online-size", default="1G",
                    help="online part: disk size (default 1G, also quick: a smaller disk is rekeyed before fio is under way)")
    ap.add_argument("--runtime", type=float, help="seconds per fio job (default 5, quick 2)")
    ap.add_argument("--ramp", type=float, help="fio ramp seconds before each job (default 1, quick 0.5)")
    ap.add_argument("--online-rate", help="online part: also fio during an online rekey limited to this --rate, e.g. 50M")
    ap.add_argument("--targets", help="comma-separated subset of: " + ",".join(TARGET_ORDER))
    ap.add_argument("--columns", help="comma-separated subset of the fio columns (default all): "
                    + ",".join(j["name"] for j in fio_jobs(1, 0)))
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: " + ",".join(PARTS))
    ap.add_argument("--only", help="comma-separated parts to run (the others are skipped): " + ",".join(PARTS))
    ap.add_argument("--no-fio", action="store_true", help="only the sector-cipher micro benchmark (= --skip all but micro)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    ap.add_argument("--output", default=os.path.join(REPO, "bench-results", "latest.json"))
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    size = parse_size(args.size or ("256M" if args.quick else "512M"))
    conv_size = parse_size(args.convert_size or ("256M" if args.quick else "1G"))
    runtime = args.runtime or (2 if args.quick else 5)
    ramp = args.ramp if args.ramp is not None else (0.5 if args.quick else 1)
    wanted = set(args.targets.split(",")) if args.targets else None
    skip = set(filter(None, args.skip.split(",")))
    if args.only:
        skip |= set(PARTS) - set(filter(None, args.only.split(",")))
    if args.no_fio:
        skip |= set(PARTS) - {"micro"}
    unknown = (skip | set(filter(None, (args.only or "").split(",")))) - set(PARTS)
    if unknown:
        ap.error(f"unknown part(s): {','.join(sorted(unknown))} (parts: {','.join(PARTS)})")
    install_signal_handlers()

    started = time.time()
    jobs = fio_jobs(runtime, ramp)
    if args.columns:
        names = set(filter(None, args.columns.split(",")))
        if names - {j["name"] for j in jobs}:
            ap.error(f"unknown column(s): {','.join(sorted(names - {j['name'] for j in jobs}))}")
        jobs = [j for j in jobs if j["name"] in names]
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                     "params": {"rounds": rounds, "size": size, "convert_size": conv_size, "runtime_s": runtime,
                                "online_size": args.online_size, "online_rate": args.online_rate,
                                "ramp_s": ramp, "fio": "direct=1, time based; seq bs=1M psync; 4k psync "
                                                       "numjobs 1/2; 4k libaio iodepth 16"}}
    ensure_tools(not args.no_install)
    results["env"] = environment()
    log(f"vmfs-crypt bench: {rounds} round(s), fio files {fmt_size(size)}, {runtime:g} s jobs after {ramp:g} s ramp, "
        f"convert/offline {fmt_size(conv_size)}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    try:
        if "micro" not in skip:
            log("\n== sector-cipher micro benchmark")
            meter = LoadMeter(lambda: [])
            meter.start()
            results["micro"] = micro_benchmark(args.quick)
            results["micro"]["load"] = load = meter.stop()
            print_micro(results["micro"])
            log(load_line("micro", load))
        if not {"fio", "convert", "offline"} <= skip:
            host_benchmarks(results, args, skip, wanted, size, conv_size, rounds, jobs)
        if "online" not in skip:
            online_size = parse_size(args.online_size)
            log(f"\n== online operations (issue 10): deep rekey of a {fmt_size(online_size)} disk online vs offline, "
                "fio IOPS during one")
            online_benchmark(results.setdefault("online", {}), online_size, rounds, runtime, ramp, args.online_rate)
        if "kmip" not in skip:
            log("\n== mounting 200 encrypted disks under a KMIP provider (local PyKMIP server)")
            results["kmip_mount_200"] = kmip_mount_benchmark()
            log(f"  {results['kmip_mount_200']}")
    except KeyboardInterrupt:
        results["interrupted"] = True
        log("interrupted: everything started is stopped; partial results follow")
    finally:
        results["elapsed_s"] = round(time.time() - started, 1)
        summarize(results)
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output + ".tmp", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        os.replace(args.output + ".tmp", args.output)
        log(f"\nresults: {os.path.relpath(args.output)} ({results['elapsed_s']} s)")
    return 130 if results.get("interrupted") else 0


def host_benchmarks(results, args, skip, wanted, size, conv_size, rounds, jobs) -> None:
    # fio files of up to six targets (+ gocryptfs/securefs overhead); then 4 convert files; then the offline folder
    tmpfs_size = max(7 * size, 4 * conv_size + size) + GIB
    with backing_fs(tmpfs_size) as (work, backing, kind), Cleanup() as cleanup:  # cleanup runs first
        log(f"\n== targets on {kind} backing ({backing})")
        results["backing"] = kind
        classes = PROVIDERS if "fio" not in skip else [VmfsCryptProvider]
        providers, targets, status = start_providers(classes, wanted if "fio" not in skip else None,
                                                     backing, work, size, cleanup)
        results["targets"] = status
        results["providers"] = {n: p.describe for p in providers for n in p.names}
        vmfs = next((p for p in providers if isinstance(p, VmfsCryptProvider)), None)
        if vmfs:
            results["vmfs_datapath"] = vmfs.datapath
            log(f"  vmfs-crypt mount {vmfs.mnt} (pid {vmfs.mount_pid}), data path: {vmfs.datapath}")
        targets.sort(key=lambda t: TARGET_ORDER.index(t.name) if t.name in TARGET_ORDER else 99)
        if "fio" not in skip:
            log(f"\n== fio matrix: {len(targets)} targets x {len(jobs)} jobs x {rounds} round(s), "
                f"{fmt_size(size)} files")
            fio_matrix(results, targets, providers, size, rounds, jobs)
            if "checks" not in skip:
                log("\n== checks through the vmfs-crypt mount")
                results["checks"] = [correctness(t, size) for t in targets if t.name.startswith("vmfs-")]
                for c in results["checks"]:
                    log(f"  {c}")
            # Free the other targets' memory before the convert phase (RSS figures first).
            results["peak_rss"] = {}
            for p in providers:
                if p is not vmfs and p.pid():
                    results["peak_rss"][p.names[0]] = {"pid": p.pid(), "VmHWM_MB": round(vm_hwm_mb(p.pid()) or 0, 1)}
            for p in providers:
                if p is not vmfs:
                    p.teardown()
            for name in os.listdir(backing):
                if name != "vmfs-ds":
                    shutil.rmtree(os.path.join(backing, name), ignore_errors=True)
        if vmfs and "convert" not in skip:
            log(f"\n== qemu-img convert {fmt_size(conv_size)} into and out of an encrypted VM folder of the mount "
                "vs QEMU's LUKS driver, same tmpfs")
            try:
                results["qemu_convert"] = convert_benchmark(vmfs, backing, conv_size, rounds)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                results["qemu_convert"] = {"error": f"failed: {exc}"}
                log(f"  failed: {exc}")
        if vmfs:
            hwm = vm_hwm_mb(vmfs.pid())
            results.setdefault("peak_rss", {})["vmfs-crypt mount"] = {"pid": vmfs.pid(),
                                                                      "VmHWM_MB": round(hwm, 1) if hwm else None}
        if vmfs and "offline" not in skip:
            log(f"\n== offline encrypt / rekey --deep / decrypt of a {fmt_size(conv_size)} VM folder (tmpfs)")
            try:
                results["offline"] = offline_benchmark(vmfs, backing, conv_size, rounds)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                results["offline"] = {"error": f"failed: {exc}"}
                log(f"  failed: {exc}")


if __name__ == "__main__":
    sys.exit(main())
