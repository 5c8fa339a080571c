"""Online operations (issue 10, "Throughput"), the `online` part of scripts/bench.py: online vs offline deep rekey, guest fio IOPS during one.

On one fresh tmpfs, one vmfs-crypt mount (benchlib.VmfsCryptProvider) whose encrypted disk
vm1/disk-flat.vmdk is written in full through the mount, and a folder outside the mounted
datastore with a fully written flat disk of the same size, encrypted offline (unmeasured):
1. `rekey --deep` of the offline folder against `rekey --deep` of vm1 handed to the idle mount
   (wall time of the command, MB/s of allocated data); rounds interleave, order alternating.
   Target: online / offline >= 0.5.
2. fio randrw 4 KiB direct=1 psync, 1 job (qd1, a guest's synchronous I/O), time based, on the
   mounted disk: IOPS with no operation and while `rekey --deep --background` of vm1 runs; the
   operation must be running when fio starts and still running when it ends (`operations
   --json` before and after), else the sample is discarded. Also the operation's MB/s over the
   fio window. Target: IOPS under the operation / without >= 0.5. `--online-rate R` (bench.py)
   adds fio during an online rekey limited to `--rate R`, for the guest/operation trade-off.
3. A check: fio randwrite 4 KiB with crc32c verify on a range just ahead of the operation's
   boundary while it runs, then a verify-only pass after it ended: acknowledged writes read back;
   once at full speed, once with the operation limited (`--online-rate`, else 100M), so that the
   writes really interleave with the rewrite (at full speed the guest is mostly shut out).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from benchlib import (
    CLI, GIB, MIB, Cleanup, LoadMeter, VmfsCryptProvider, allocated_bytes, backing_fs, fio, fmt_size, load_line, log,
    make_flat_folder, mark, median_or_none, ratio, run, wait_for, write_pattern,
)

RATIO_TARGET = 0.5  # issue 10: online at >= 50 % of offline speed; the guest keeps >= 50 % of its IOPS
FIO_ENGINE = dict(ioengine="psync", iodepth=1, numjobs=1)
VERIFY_BYTES = 32 * MIB
VERIFY_RATE = "100M"  # the check's limited run when no --online-rate is given


def operation(vmfs: VmfsCryptProvider, folder: str) -> dict | None:
    """The mount's record of the online operation of `folder` (`vmfs-crypt operations --json`), None if none."""
    out = run(CLI + ["operations", "--json"], env=vmfs.env, timeout=60).stdout
    ops = json.loads(out.decode()).get("operations", [])
    real = os.path.realpath(folder)
    return next((o for o in ops if os.path.realpath(o["folder"]) == real), None)


def wait_op(vmfs: VmfsCryptProvider, folder: str, pred, timeout: float, what: str) -> dict:
    found: dict = {}

    def check() -> bool:
        found["op"] = operation(vmfs, folder)
        return found["op"] is not None and pred(found["op"])

    wait_for(check, timeout, what)
    return found["op"]


def finished(vmfs: VmfsCryptProvider, folder: str, timeout: float = 1800) -> dict:
    """Wait for the online operation of `folder` to end; it must end "done"."""
    op = wait_op(vmfs, folder, lambda o: o["state"] not in ("starting", "running", "paused"), timeout,
                 f"the online operation of {folder} to end")
    if op["state"] != "done":
        raise RuntimeError(f"online operation of {folder} ended {op['state']}: {op.get('error')}")
    return op


def start_background(vmfs: VmfsCryptProvider, folder: str, rate: str | None = None) -> dict:
    """`rekey --deep --background [--rate RATE]`; the op once it runs."""
    vmfs.cli("rekey", "--deep", "--background", folder, *(["--rate", rate] if rate else []), timeout=300)
    op = wait_op(vmfs, folder, lambda o: o["state"] != "starting", 300, f"the online rekey of {folder} to start")
    if op["state"] != "running":
        raise RuntimeError(f"online rekey of {folder} is {op['state']} before fio began: make the disk larger")
    return op


def fio_job(runtime: float, ramp: float) -> dict:
    return dict(name="online-randrw-4k", rw="randrw", bs="4k", time_based=True, runtime=f"{int(runtime * 1000)}ms",
                ramp=f"{int(ramp * 1000)}ms", **FIO_ENGINE)


# -- 1. offline vs online deep rekey of an idle disk -----------------------------------------
def rekey_rounds(vmfs, res, offline_folder, online_folder, rounds) -> None:
    samples = res["rekey"] = {"offline_MBps": [], "online_MBps": [], "offline_s": [], "online_s": [],
                              "online_op_bytes_per_s": [], "rounds": []}
    meter = LoadMeter(vmfs.pids)
    for rnd in range(rounds):
        meter.start()
        order = [("offline", offline_folder), ("online", online_folder)]
        for kind, folder in order if rnd % 2 == 0 else order[::-1]:
            alloc = allocated_bytes(folder)
            t = time.perf_counter()
            vmfs.cli("rekey", "--deep", folder, timeout=1800)
            s = time.perf_counter() - t
            samples[f"{kind}_s"].append(round(s, 3))
            samples[f"{kind}_MBps"].append(round(alloc / 1e6 / s, 1))
            extra = ""
            if kind == "online":
                op = operation(vmfs, folder) or {}
                samples["online_op_bytes_per_s"].append(op.get("bytes_per_s"))
                extra = f"  (the mount's own figure {op.get('bytes_per_s', 0) / 1e6:.1f} MB/s)"
            log(f"  round {rnd + 1}/{rounds} rekey --deep {kind:<8} {alloc / 1e6:7.0f} MB allocated  {s:6.2f} s  "
                f"{alloc / 1e6 / s:7.1f} MB/s{extra}")
        load = meter.stop()
        samples["rounds"].append(load)
        log(load_line(f"rekey round {rnd + 1}", load))
    off, on = median_or_none(samples["offline_MBps"]), median_or_none(samples["online_MBps"])
    samples.update(offline_median_MBps=off, online_median_MBps=on, ratio=ratio(on, off), target=RATIO_TARGET)


# -- 2. guest IOPS with and without an online deep rekey ----------------------------------------
def fio_rounds(vmfs, res, disk, folder, size, rounds, runtime, ramp, rate: str | None) -> None:
    """Per round: fio alone, fio during an online rekey --deep (and one limited to --rate `rate`), order rotating."""
    job = fio_job(runtime, ramp)
    kinds = ["idle", "under_op"] + (["under_op_rate"] if rate else [])
    samples = res["fio"] = {"job": "fio rw=randrw bs=4k direct=1 ioengine=psync iodepth=1 numjobs=1 time_based "
                                   f"runtime={runtime:g}s ramp={ramp:g}s on the whole {fmt_size(size)} disk",
                            "rate": rate, "discarded": [], "rounds": []}
    for k in kinds:
        samples[k] = {"IOPS": [], "lat_us": [], "op_MBps_in_window": [], "op_MBps_whole": []}
    meter = LoadMeter(vmfs.pids)
    for rnd in range(rounds):
        meter.start()
        for kind in kinds[rnd % len(kinds):] + kinds[:rnd % len(kinds)]:
            if kind == "idle":
                r = fio(disk, job, size)
                samples[kind]["IOPS"].append(round(r["IOPS"], 1))
                samples[kind]["lat_us"].append(round(r["lat_us"], 1))
                log(f"  round {rnd + 1}/{rounds} fio randrw 4k, no operation            {r['IOPS']:9,.0f} IOPS "
                    f"(read {r['read_IOPS']:,.0f}, write {r['write_IOPS']:,.0f}), mean latency {r['lat_us']:.0f} us")
                continue
            for _ in range(3):  # a window the operation outlasted, shorter after each miss
                if under_op(vmfs, samples, kind, disk, folder, size, job, rnd, rounds,
                            rate if kind == "under_op_rate" else None):
                    break
                runtime = max(0.5, runtime / 2)
                job = fio_job(runtime, ramp)
                log(f"  retrying with a {runtime:g} s fio window (the rounds after this one use it too)")
        load = meter.stop()
        samples["rounds"].append(load)
        log(load_line(f"fio round {rnd + 1}", load))
    samples["runtime_s_last"] = runtime
    for k in kinds:
        samples[k]["median"] = {m: median_or_none(v) for m, v in samples[k].items() if isinstance(v, list)}
    idle = samples["idle"]["median"]["IOPS"]
    for k in kinds[1:]:
        samples[k]["ratio"] = ratio(samples[k]["median"]["IOPS"], idle)
    samples["ratio"], samples["target"] = samples["under_op"]["ratio"], RATIO_TARGET


def under_op(vmfs, samples, kind, disk, folder, size, job, rnd, rounds, rate) -> bool:
    """One fio run during an online rekey --deep; False (sample discarded) when the operation did not outlast it."""
    op0 = start_background(vmfs, folder, rate)
    t0 = time.monotonic()
    r = fio(disk, job, size)
    t1 = time.monotonic()
    op1 = operation(vmfs, folder) or {}
    op_end = finished(vmfs, folder)
    whole = op_end["bytes_per_s"] / 1e6  # the mount's figure: bytes over the op's own run time
    label = f"online rekey{' --rate ' + rate if rate else ''} runs"
    if op1.get("state") != "running":
        samples["discarded"].append(f"round {rnd + 1}, {label}: the operation was {op1.get('state')} when fio ended "
                                    f"({r['IOPS']:.0f} IOPS, {job['runtime']})")
        log(f"  round {rnd + 1}/{rounds} fio, {label}: DISCARDED, the operation ended before fio "
            f"did ({r['IOPS']:,.0f} IOPS)")
        return False
    in_window = (op1["done_bytes"] - op0["done_bytes"]) / 1e6 / (t1 - t0)
    for m, v in (("IOPS", r["IOPS"]), ("lat_us", r["lat_us"]), ("op_MBps_in_window", in_window),
                 ("op_MBps_whole", whole)):
        samples[kind][m].append(round(v, 1))
    log(f"  round {rnd + 1}/{rounds} fio randrw 4k, {label:<24} {r['IOPS']:9,.0f} IOPS "
        f"(read {r['read_IOPS']:,.0f}, write {r['write_IOPS']:,.0f}), mean latency {r['lat_us']:.0f} us; "
        f"op {op0['percent']:.0f} % -> {op1['percent']:.0f} % in the window: {in_window:.1f} MB/s; whole op "
        f"{whole:.1f} MB/s, {op_end['state']}")
    return True


# -- 3. the writes fio made during the operation read back -------------------------------------
def verify_check(vmfs, disk, folder, size, rate: str | None = None) -> dict:
    """fio randwrite with crc32c verify just ahead of the boundary of an online rekey (at `rate`), verify-only after."""
    op0 = start_background(vmfs, folder, rate)
    # Just ahead of the boundary: the rewrite passes through the range while fio writes it.
    off = min((op0["done_bytes"] + 2 * MIB) // MIB * MIB, size - VERIFY_BYTES)
    span = min(VERIFY_BYTES, size - off)
    args = (f"--offset={off}", "--randseed=4242", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0")
    job = dict(name="online-verify", rw="randwrite", bs="4k", **FIO_ENGINE)
    res = {"rate": rate, "range": [off, off + span], "during": None, "after": None}
    try:
        fio(disk, job, span, args + ("--do_verify=1",))
        res["during"] = "ok"
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res["during"] = f"FAILED: {exc}"
    op1 = operation(vmfs, folder) or {}
    res["boundary_bytes"] = [op0["done_bytes"], op1.get("done_bytes")]
    res["op_state_after_writes"] = op1.get("state")
    # the boundary crossed the range while fio wrote it (or the op finished meanwhile)
    res["boundary_crossed_range"] = op0["done_bytes"] <= off and (op1.get("state") == "done"
                                                                    or op1.get("done_bytes", 0) > off)
    finished(vmfs, folder)
    try:
        fio(disk, job, span, args + ("--verify_only",))
        res["after"] = "ok"
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        res["after"] = f"FAILED: {exc}"
    res["ok"] = res["during"] == "ok" and res["after"] == "ok"
    return res


def online_benchmark(res: dict, size: int, rounds: int, runtime: float, ramp: float, rate: str | None = None) -> dict:
    """All of the above on a fresh tmpfs, into `res` (partial results survive a Ctrl-C); everything it starts is
    stopped and unmounted before it returns."""
    res.update(size=size, target=RATIO_TARGET, loadavg_start=[round(x, 2) for x in os.getloadavg()])
    with backing_fs(2 * size + GIB) as (work, backing, kind), Cleanup() as cleanup:
        vmfs = VmfsCryptProvider()
        why = vmfs.available()
        if why:
            res["error"] = f"not available: {why}"
            return res
        cleanup.push("teardown of the vmfs-crypt mount", vmfs.teardown)
        target = next(t for t in vmfs.setup(backing, work, size) if t.name == "vmfs-enc")
        log(f"  {kind} backing; vmfs-crypt mount {vmfs.mnt} (pid {vmfs.mount_pid}), data path: {vmfs.datapath}")
        res["vmfs_datapath"] = vmfs.datapath
        online_folder = os.path.join(vmfs.ds, "vm1")
        write_pattern(target.path, size)  # fully written, through the mount
        offline_folder = os.path.join(backing, "offline-ds", "offvm")
        make_flat_folder(offline_folder, size)
        vmfs.cli("encrypt", offline_folder, timeout=1800)
        try:
            log(f"\n  -- rekey --deep of a fully written {fmt_size(size)} disk, offline vs online (mounted, idle)")
            rekey_rounds(vmfs, res, offline_folder, online_folder, rounds)
            # fio must end before the operation: at most 40 % of the idle online rekey's time
            idle_s = median_or_none(res["rekey"]["online_s"]) or 10.0
            fio_runtime = round(max(1.0, min(runtime, 0.4 * idle_s - ramp)), 1)
            res["fio_runtime_s"] = fio_runtime
            log(f"\n  -- fio randrw 4k psync qd1 through the mount, {fio_runtime:g} s (+{ramp:g} s ramp): no "
                "operation vs during an online rekey --deep --background")
            fio_rounds(vmfs, res, target.path, online_folder, size, rounds, fio_runtime, ramp, rate)
            log("\n  -- check: fio randwrite 4k crc32c verify ahead of the boundary during an online rekey, "
                "verify-only after it; at full speed (fio is mostly shut out) and limited (the writes interleave)")
            res["verify"] = [verify_check(vmfs, target.path, online_folder, size, r) for r in (None, rate or VERIFY_RATE)]
            for v in res["verify"]:
                log(f"  {v}")
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            res["error"] = f"failed: {exc}"
            log(f"  failed: {exc}")
    return res


def summarize_online(res: dict, summary: dict) -> None:
    """Print the part's table (bench.py's "other figures") and put its ratios in the summary."""
    if not res:
        return
    if res.get("error") and "rekey" not in res:
        log(f"  online: {res['error']}")
        return
    rk, fi, ve = res.get("rekey") or {}, res.get("fio") or {}, res.get("verify") or []
    log(f"  online operations (issue 10), {fmt_size(res['size'])} fully written disk, medians:")
    if rk.get("ratio") is not None:
        log(f"    rekey --deep: offline {rk['offline_median_MBps']} MB/s, online (mounted, idle) "
            f"{rk['online_median_MBps']} MB/s: online / offline {mark(rk['ratio'], RATIO_TARGET)} (>= {RATIO_TARGET})")
        summary["online_rekey_vs_offline"] = rk["ratio"]
        summary["targets_met"]["online rekey >= 0.5 x offline"] = rk["ratio"] >= RATIO_TARGET
    if fi.get("ratio") is not None:
        idle, under = fi["idle"]["median"], fi["under_op"]["median"]
        log(f"    fio randrw 4k psync qd1: {idle['IOPS']:,.0f} IOPS without an operation, {under['IOPS']:,.0f} during an "
            f"online rekey --deep: {mark(fi['ratio'], RATIO_TARGET)} (>= {RATIO_TARGET}); mean latency "
            f"{idle['lat_us']:.0f} -> {under['lat_us']:.0f} us; the operation meanwhile {under['op_MBps_in_window']} MB/s")
        summary["online_fio_iops_kept"] = fi["ratio"]
        summary["targets_met"]["guest keeps >= 0.5 of its IOPS during an online rekey"] = fi["ratio"] >= RATIO_TARGET
    elif fi:
        log(f"    fio under the operation: no valid sample ({'; '.join(fi.get('discarded', []))})")
    lim = fi.get("under_op_rate") or {}
    if lim.get("ratio") is not None:
        m = lim["median"]
        log(f"    the same with --rate {fi['rate']}: {m['IOPS']:,.0f} IOPS, {mark(lim['ratio'], RATIO_TARGET)}; mean "
            f"latency {m['lat_us']:.0f} us; the operation meanwhile {m['op_MBps_in_window']} MB/s")
        summary["online_fio_iops_kept_at_rate"] = {"rate": fi["rate"], "ratio": lim["ratio"]}
    if fi.get("discarded"):
        log(f"    discarded fio samples: {'; '.join(fi['discarded'])}")
    for v in ve:
        log(f"    check: fio crc32c verify of writes made during an online rekey{' --rate ' + v['rate'] if v['rate'] else ''}"
            f": {'ok' if v.get('ok') else 'FAILED'} (during {v['during']}, after {v['after']}; the boundary crossed the "
            f"range while fio wrote: {v['boundary_crossed_range']})")
    if ve:
        summary["online_verify_ok"] = all(v.get("ok") for v in ve)
    if res.get("error"):
        log(f"    online: {res['error']}")


def noisy_rounds(res: dict) -> list[dict]:
    return [r for k in ("rekey", "fio") for r in (res.get(k) or {}).get("rounds", []) if r.get("noisy")]
