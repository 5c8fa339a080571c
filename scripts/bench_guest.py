#!/usr/bin/env python3
"""Guest benchmark, issue 13 (`make bench-guest`): fio inside a Linux guest whose virtio-blk disk lives in each target.

The guest is built from Debian packages only: the kernel of the `linux-image-amd64`
package (downloaded with `apt-get download`, unpacked with `dpkg-deb -x`, cached in
build/guest/), and an uncompressed initramfs made here of busybox-static, the virtio
modules of that kernel, and the host's /usr/bin/fio with the libraries `ldd` names. It is
booted with qemu-system-x86_64: KVM when /dev/kvm exists and a probe guest boots with it,
else TCG (the output says which, and why). The disk: 1 GiB, virtio-blk-pci,
cache.direct=on (cache=none) and aio=native, as `-blockdev`. Inside the guest, fio on
/dev/vda (libaio, direct=1, time based with a ramp): seq write and seq read 1 MiB at iodepth
4, 4 KiB randread and randwrite at iodepth 1 and 16; the JSON of each job goes to the
serial console between markers and is parsed here.

Targets, every backing file on one fresh tmpfs, the same guest each time:
  vmfs-enc    the flat extent of a `vmfs-crypt create` disk, through the vmfs-crypt mount (raw driver)
  vmfs-plain  a disk of a plain VM folder in the same mount
  luks        QEMU's own LUKS driver (`-blockdev driver=luks`, aes-256-xts-plain64) on a file of the tmpfs
  gocryptfs   a file in a gocryptfs mount      securefs  a file in a securefs mount
Every disk is written in full on the host first. Rounds are interleaved (one boot per target
per round, rotating the order), medians are reported, with the load average of each round.

Results: printed tables and bench-results/guest-latest.json. `--quick`: 1 round, 2 s jobs,
256 MiB disk. Needs root (apt-get, tmpfs). Every mount and QEMU process is stopped by pid
and unmounted in `finally`, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import (  # noqa: E402
    MIB, PASSWORD, REPO, Cleanup, GocryptfsProvider, LoadMeter, Provider, SecurefsProvider, Target,
    VmfsCryptProvider, backing_fs, daemon_pids, ensure_tools, fio, fmt, fmt_size, install_signal_handlers,
    load_line, log, mark, median_or_none, parse_size, ratio, run, run_retrying_pbkdf_timing, start_providers, stop_pid,
    tool_version,
)

CACHE = os.path.join(REPO, "build", "guest")
TARGET_ORDER = ["vmfs-enc", "vmfs-plain", "luks", "gocryptfs", "securefs"]
GUEST_TOOLS = {"fio": "fio", "gocryptfs": "gocryptfs", "securefs": "securefs", "fusermount3": "fuse3",
               "qemu-img": "qemu-utils", "qemu-system-x86_64": "qemu-system-x86"}
MODULES = ("virtio_pci", "virtio_blk")  # with their dependencies from modules.dep
KVM_PROBE_S = 30.0
# (name, title, fio arguments) - issue 13: seq 1M qd4, 4K random qd1 and qd16
JOBS = [
    ("seqwr-1M-qd4", "seq write 1M qd4", "--rw=write --bs=1M --iodepth=4", "MB/s"),
    ("seqrd-1M-qd4", "seq read 1M qd4", "--rw=read --bs=1M --iodepth=4", "MB/s"),
    ("rr4k-qd1", "randread 4k qd1", "--rw=randread --bs=4k --iodepth=1", "IOPS"),
    ("rw4k-qd1", "randwrite 4k qd1", "--rw=randwrite --bs=4k --iodepth=1", "IOPS"),
    ("rr4k-qd16", "randread 4k qd16", "--rw=randread --bs=4k --iodepth=16", "IOPS"),
    ("rw4k-qd16", "randwrite 4k qd16", "--rw=randwrite --bs=4k --iodepth=16", "IOPS"),
]
RATIOS = [
    ("enc / best(gocryptfs, securefs)", "vmfs-enc", ("gocryptfs", "securefs"), 1.0, 1.5),
    ("enc / plain (same mount)", "vmfs-enc", ("vmfs-plain",), 0.8, None),
    ("enc / QEMU LUKS (info)", "vmfs-enc", ("luks",), None, None),
]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu/ceph
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /tmp /dev/shm
mount -t tmpfs tmp /tmp
mount -t tmpfs shm /dev/shm
MODE=probe RUNTIME=2000ms RAMP=500ms
for w in $(cat /proc/cmdline); do
  case "$w" in
    vb.mode=*) MODE=${w#vb.mode=} ;;
    vb.runtime=*) RUNTIME=${w#vb.runtime=} ;;
    vb.ramp=*) RAMP=${w#vb.ramp=} ;;
  esac
done
for m in $(cat /modules.order); do insmod "/$m" 2>/dev/null; done
echo "@@BOOTED@@ $(cut -d' ' -f1 /proc/uptime)"
if [ "$MODE" = run ]; then
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
  [ -b /dev/vda ] || echo "@@ERROR no /dev/vda@@"
  job() {
    name=$1; shift
    echo "@@JOB $name@@"
    fio --name="$name" --filename=/dev/vda --direct=1 --ioengine=libaio --thread --numjobs=1 \
        --time_based --runtime="$RUNTIME" --ramp_time="$RAMP" --randrepeat=0 --output-format=json "$@" 2>&1
    echo "@@END $name@@"
  }
@@JOBS@@
fi
echo "@@DONE@@"
poweroff -f
"""


# -- the guest image -------------------------------------------------------------------------
def apt_download(package: str, dest: str) -> str:
    """The .deb of `package` in dest (downloaded with apt-get download if missing)."""
    os.makedirs(dest, exist_ok=True)
    have = [f for f in os.listdir(dest) if f.startswith(package + "_") and f.endswith(".deb")]
    if have:
        return os.path.join(dest, sorted(have)[-1])
    proc = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 and "Unable to locate" in proc.stderr + proc.stdout:
        run(["apt-get", "update", "-qq"], timeout=600)
        proc = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"apt-get download {package}: {proc.stderr.strip()[-500:]}")
    have = [f for f in os.listdir(dest) if f.startswith(package + "_") and f.endswith(".deb")]
    if not have:
        raise RuntimeError(f"apt-get download {package} left no .deb in {dest}")
    return os.path.join(dest, sorted(have)[-1])


def kernel_package() -> str:
    """linux-image-<version>-amd64, the package the linux-image-amd64 metapackage depends on."""
    out = run(["apt-cache", "depends", "linux-image-amd64"], check=False).stdout.decode()
    m = re.search(r"Depends:\s*(linux-image-\d\S*-amd64)", out)
    if not m:
        run(["apt-get", "update", "-qq"], timeout=600)
        out = run(["apt-cache", "depends", "linux-image-amd64"], check=False).stdout.decode()
        m = re.search(r"Depends:\s*(linux-image-\d\S*-amd64)", out)
    if not m:
        raise RuntimeError("apt-cache finds no linux-image-amd64 (apt-get update, a Debian mirror)")
    return m.group(1)


def unpack(deb: str, into: str) -> str:
    stamp = os.path.join(into, ".unpacked-" + os.path.basename(deb))
    if not os.path.exists(stamp):
        shutil.rmtree(into, ignore_errors=True)
        os.makedirs(into)
        run(["dpkg-deb", "-x", deb, into], timeout=600)
        open(stamp, "w").close()
    return into


class Cpio:
    """An uncompressed newc archive (what the kernel unpacks as initramfs; no cpio binary needed)."""

    def __init__(self, path: str) -> None:
        self.f = open(path, "wb")
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        name = name.lstrip("/")
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % v for v in fields) + name.encode() + b"\0"
        self.f.write(hdr + b"\0" * (-len(hdr) % 4))
        self.f.write(data + b"\0" * (-len(data) % 4))

    def dirs(self, path: str) -> None:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.seen:
                self.seen.add(d)
                self._entry(d, 0o040755)

    def dir(self, path: str) -> None:
        self.dirs(path + "/x")

    def file(self, path: str, data: bytes, mode: int = 0o755) -> None:
        if path.strip("/") in self.seen:
            return
        self.dirs(path)
        self.seen.add(path.strip("/"))
        self._entry(path, 0o100000 | mode, data)

    def close(self) -> None:
        self._entry("TRAILER!!!", 0)
        self.f.close()


def ldd_paths(binary: str) -> list[str]:
    out = run(["ldd", binary]).stdout.decode()
    paths = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            paths.append(m.group(1))
    return paths


def module_order(root: str, version: str) -> list[str]:
    """Paths (relative to root) of MODULES and their dependencies, dependencies first. The package
    ships no modules.dep (depmod makes it at install): dependencies come from each module's
    own `depends=` field (.modinfo)."""
    base = os.path.join("lib", "modules", version)
    files: dict[str, str] = {}
    for d, _, names in os.walk(os.path.join(root, base)):
        for n in names:
            if n.endswith((".ko", ".ko.xz", ".ko.zst", ".ko.gz")):
                files[n.split(".ko")[0].replace("-", "_")] = os.path.relpath(os.path.join(d, n), root)
    order: list[str] = []

    def visit(name: str) -> None:
        path = files.get(name)
        if path is None or path in order:
            return  # built into this kernel, or already there
        if not path.endswith(".ko"):
            raise RuntimeError(f"{path}: compressed kernel modules are not supported here (busybox insmod)")
        with open(os.path.join(root, path), "rb") as f:
            m = re.search(rb"(?:^|\0)depends=([^\0]*)", f.read())
        for dep in filter(None, (m.group(1).decode().split(",") if m else [])):
            visit(dep.replace("-", "_"))
        order.append(path)

    for name in MODULES:
        visit(name)
    return order


def build_guest(cache: str = CACHE) -> dict:
    """Kernel and initramfs of the benchmark guest; returns their paths and versions."""
    kpkg = kernel_package()
    kroot = unpack(apt_download(kpkg, os.path.join(cache, "debs")), os.path.join(cache, "kernel"))
    broot = unpack(apt_download("busybox-static", os.path.join(cache, "debs")), os.path.join(cache, "busybox"))
    version = kpkg.removeprefix("linux-image-")
    kernel = os.path.join(kroot, "boot", f"vmlinuz-{version}")
    if not os.path.exists(kernel):
        raise RuntimeError(f"{kpkg} has no {kernel}")
    fio_bin = shutil.which("fio")
    if not fio_bin:
        raise RuntimeError("fio not installed")
    mods = module_order(kroot, version)
    jobs = "\n".join(f"  job {name} {args}" for name, _, args, _ in JOBS)
    initrd = os.path.join(cache, "initrd.cpio")
    cp = Cpio(f"{initrd}.{os.getpid()}.tmp")
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "lib64"):
        cp.dir(d)
    with open(os.path.join(broot, "bin", "busybox"), "rb") as f:
        cp.file("bin/busybox", f.read())
    cp.file("init", INIT.replace("@@JOBS@@", jobs).encode())
    with open(fio_bin, "rb") as f:
        cp.file("usr/bin/fio", f.read())
    for lib in ldd_paths(fio_bin):
        with open(os.path.realpath(lib), "rb") as f:
            cp.file(lib, f.read())
    for m in mods:
        with open(os.path.join(kroot, m), "rb") as f:
            cp.file(m, f.read(), 0o644)
    cp.file("modules.order", "\n".join(mods).encode() + b"\n", 0o644)
    cp.close()
    os.replace(f"{initrd}.{os.getpid()}.tmp", initrd)
    return {"kernel": kernel, "kernel_package": kpkg, "initrd": initrd, "initrd_MB": round(os.path.getsize(initrd) / 1e6, 1),
            "modules": [os.path.basename(m) for m in mods], "fio": tool_version(["fio", "--version"]),
            "busybox": os.path.basename(apt_download("busybox-static", os.path.join(cache, "debs")))}


# -- QEMU --------------------------------------------------------------------------------------
class Guest:
    """Boots the benchmark guest; one QEMU process at a time, stopped by pid on any exit."""

    def __init__(self, image: dict, work: str, accel: str, cpu: str) -> None:
        self.image, self.work, self.accel, self.cpu = image, work, accel, cpu
        self.proc: subprocess.Popen | None = None

    def cmd(self, serial: str, append: str, disk: list[str]) -> list[str]:
        accel = ["-accel", "kvm"] if self.accel == "kvm" else ["-accel", "tcg,thread=multi"]
        return ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-monitor", "none", "-no-reboot",
                *accel, "-cpu", self.cpu, "-smp", "2", "-m", "1024",
                "-kernel", self.image["kernel"], "-initrd", self.image["initrd"],
                "-append", f"console=ttyS0 quiet loglevel=0 panic=-1 {append}",
                "-serial", f"file:{serial}", *disk]

    def boot(self, append: str, disk: list[str], timeout: float, until: str = "@@DONE@@",
             early: tuple[str, float] | None = None) -> str:
        """Run the guest until it powers off (or `timeout`); its serial output. `early`: (marker, s):
        give up when the marker has not appeared within s seconds (the KVM probe)."""
        serial = os.path.join(self.work, f"serial-{time.monotonic_ns()}.log")
        open(serial, "w").close()
        errlog = serial + ".err"
        with open(errlog, "wb") as err:
            self.proc = subprocess.Popen(self.cmd(serial, append, disk), stdin=subprocess.DEVNULL, stdout=err,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.monotonic()
            while self.proc.poll() is None:
                elapsed = time.monotonic() - t0
                if elapsed > timeout:
                    raise RuntimeError(f"the guest did not finish within {timeout:.0f} s")
                if early and elapsed > early[1] and early[0] not in read_text(serial):
                    raise RuntimeError(f"no {early[0]} from the guest within {early[1]:.0f} s")
                time.sleep(0.1)
        finally:
            self.stop()
        text = read_text(serial)
        if until not in text:
            raise RuntimeError(f"guest output has no {until} (QEMU exit {self.proc.returncode}): "
                               f"{read_text(errlog)[-400:].strip()} / serial: {text[-400:].strip()}")
        return text

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            stop_pid(self.proc.pid, "qemu-system-x86_64", timeout=3)
        if self.proc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def choose_accel(image: dict, work: str, want: str, cleanup: Cleanup) -> tuple[str, str, str]:
    """(accel, cpu model, why): KVM if /dev/kvm exists and a probe guest boots with it, else TCG."""
    if want == "tcg":
        return "tcg", "max", "asked for with --accel tcg"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if want == "kvm":
            raise RuntimeError("--accel kvm: /dev/kvm is missing or not accessible")
        return "tcg", "max", "/dev/kvm is missing or not accessible"
    errors = []
    # "host" first; some nested hypervisors refuse an MSR QEMU sets for it (arch-capabilities)
    for cpu in ("host", "host,-arch-capabilities"):
        g = Guest(image, work, "kvm", cpu)
        cleanup.push("KVM probe guest", g.stop)
        t0 = time.monotonic()
        try:
            g.boot("vb.mode=probe", [], timeout=KVM_PROBE_S + 10, early=("@@BOOTED@@", KVM_PROBE_S))
            return "kvm", cpu, f"-cpu {cpu}; the probe guest booted in {time.monotonic() - t0:.1f} s"
        except RuntimeError as exc:
            errors.append(f"-cpu {cpu}: {exc}")
    why = "; ".join(errors)
    if want == "kvm":
        raise RuntimeError(f"--accel kvm: no guest booted with KVM ({why})")
    return "tcg", "max", f"/dev/kvm exists but no guest booted with KVM ({why})"


def parse_guest(text: str) -> dict:
    """{job: {MB/s, IOPS, lat_us}} from the markers and fio JSON on the serial console."""
    out = {}
    for name, _, args, _ in JOBS:
        m = re.search(rf"@@JOB {re.escape(name)}@@(.*?)@@END {re.escape(name)}@@", text, re.S)
        if not m:
            raise RuntimeError(f"no output of {name} on the guest console")
        body = m.group(1)
        try:
            j = json.loads(body[body.index("{"):body.rindex("}") + 1])["jobs"][0]
        except (ValueError, KeyError, IndexError):
            raise RuntimeError(f"{name}: fio in the guest printed no JSON: {body.strip()[-300:]}") from None
        if j.get("error"):
            raise RuntimeError(f"{name}: fio error {j['error']} in the guest")
        side = j["read"] if "--rw=read" in args or "--rw=randread" in args else j["write"]
        out[name] = {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"], "lat_us": side["lat_ns"]["mean"] / 1000}
    return out


# -- targets -----------------------------------------------------------------------------------
class LuksProvider(Provider):
    """QEMU's LUKS driver on a file of the tmpfs (aes-256-xts-plain64, sha256; PBKDF2 iter-time 10 ms
    only makes opening cheaper)."""

    names = ("luks",)
    describe = "QEMU's LUKS driver (-blockdev driver=luks, aes-256-xts-plain64) on a file of the tmpfs"

    def available(self):
        return None if shutil.which("qemu-img") else "qemu-img not installed"

    def setup(self, backing, work, size):
        d = os.path.join(backing, "luks")
        os.makedirs(d)
        src, img = os.path.join(d, "pattern.raw"), os.path.join(d, "disk.luks")
        block = os.urandom(MIB)
        with open(src, "wb") as f:
            for _ in range(size // MIB):
                f.write(block)
        try:  # convert from a fully written file: every sector of the LUKS payload written
            run_retrying_pbkdf_timing(["qemu-img", "convert", "--object", f"secret,id=s,data={PASSWORD}", "-f", "raw",
                                       "-O", "luks", "-o", "key-secret=s,iter-time=10", src, img], timeout=1800)
        finally:
            os.unlink(src)
        t = Target("luks", img, self, encrypted=True)
        t.prefilled = True
        return [t]


def disk_args(t: Target) -> list[str]:
    proto = ["-blockdev", f"driver=file,node-name=proto,filename={t.path},aio=native,cache.direct=on"]
    if t.name == "luks":
        return ["-object", f"secret,id=s,data={PASSWORD}", *proto,
                "-blockdev", "driver=luks,node-name=disk,file=proto,key-secret=s,cache.direct=on",
                "-device", "virtio-blk-pci,drive=disk"]
    return [*proto, "-blockdev", "driver=raw,node-name=disk,file=proto,cache.direct=on",
            "-device", "virtio-blk-pci,drive=disk"]


# -- main --------------------------------------------------------------------------------------
def guest_medians(results: dict, samples: dict) -> None:
    metric = {n: m for n, _, _, m in JOBS}
    results["samples"] = {t: {n: [round(r[metric[n]], 1) for r in rs] for n, rs in by.items()}
                          for t, by in samples.items()}
    results["medians"] = {t: {n: round(statistics.median(v), 1) for n, v in by.items() if v}
                          for t, by in results["samples"].items() if any(by.values())}
    results["lat_us_median"] = {t: {n: round(median_or_none([r["lat_us"] for r in rs]), 1)
                                    for n, rs in by.items() if rs} for t, by in samples.items()}


def summarize(results: dict) -> None:
    med = results.get("medians") or {}
    summary: dict = {"ratios": {}}
    results["summary"] = summary
    if not med:
        return
    present = [t for t in TARGET_ORDER if t in med]
    cols = [name for name, *_ in JOBS]
    log(f"\n== guest fio medians of {results['params']['rounds']} round(s) ({results.get('accel')}; "
        "seq: MB/s, 4k: IOPS)")
    log("  " + f"{'target':<12}" + "".join(f"{c:>14}" for c in cols))
    metric = {name: m for name, _, _, m in JOBS}
    for t in present:
        log("  " + f"{t:<12}" + "".join(f"{fmt(med[t].get(c), metric[c]):>14}" for c in cols))
    log("\n== ratios per column ('ok' target met, 'NO' not met, 'aim' the aim met too)")
    log("  " + f"{'ratio (target)':<50}" + "".join(f"{c:>14}" for c in cols))
    for name, num, dens, target, aim in RATIOS:
        row, cells = {}, []
        for c in cols:
            a = med.get(num, {}).get(c)
            best = max((med[d][c] for d in dens if d in med and med[d].get(c)), default=None)
            v = ratio(a, best)
            row[c] = {"value": v, "target": target, "aim": aim,
                      "met": None if v is None or target is None else v >= target}
            cells.append(mark(v, target, aim) if target is not None else (f"{v:.2f}" if v else "n/a"))
        summary["ratios"][name] = row
        label = f"{name} (>= {target}{', aim ' + str(aim) if aim else ''})" if target else name
        log("  " + f"{label:<50}" + "".join(f"{x:>14}" for x in cells))
    noisy = [r for r in results.get("rounds", []) if r.get("noisy")]
    if noisy:
        log(f"  WARNING: {len(noisy)} round(s) ran on a busy machine: treat the figures as noise")
    if results.get("accel") == "TCG":
        log("  note: TCG emulates the guest CPU: the guest's own overhead dominates, compare ratios, not figures")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 s jobs, 256 MiB disk")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 3, quick 1)")
    ap.add_argument("--size", help="guest disk size (default 1G, quick 256M)")
    ap.add_argument("--runtime", type=float, help="seconds per fio job in the guest (default 5, quick 2)")
    ap.add_argument("--ramp", type=float, help="fio ramp seconds (default 1, quick 0.5)")
    ap.add_argument("--targets", help="comma-separated subset of: " + ",".join(TARGET_ORDER))
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing tools")
    ap.add_argument("--output", default=os.path.join(REPO, "bench-results", "guest-latest.json"))
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    size = parse_size(args.size or ("256M" if args.quick else "1G"))
    runtime = args.runtime or (2 if args.quick else 5)
    ramp = args.ramp if args.ramp is not None else (0.5 if args.quick else 1)
    wanted = set(args.targets.split(",")) if args.targets else None
    install_signal_handlers()
    started = time.time()
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick,
                     "params": {"rounds": rounds, "size": size, "runtime_s": runtime, "ramp_s": ramp,
                                "disk": "virtio-blk-pci, -blockdev cache.direct=on aio=native",
                                "jobs": {n: a for n, _, a, _ in JOBS}},
                     "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                              "qemu": tool_version(["qemu-system-x86_64", "--version"])}}
    ensure_tools(not args.no_install, GUEST_TOOLS)
    try:
        log("== building the guest (Debian kernel + busybox-static + fio initramfs)")
        image = build_guest()
        results["guest"] = image
        log(f"  kernel {image['kernel_package']}, initramfs {image['initrd_MB']} MB "
            f"(modules {', '.join(image['modules'])}; {image['fio']})")
        tmpfs_size = 6 * size + (1 << 30)
        with backing_fs(tmpfs_size) as (work, backing, kind), Cleanup() as cleanup:
            accel, cpu, why = choose_accel(image, work, args.accel, cleanup)
            results["accel"], results["accel_why"] = accel.upper(), why
            log(f"  accelerator: {accel.upper()} ({why})")
            log(f"\n== targets on {kind} backing ({backing}), {fmt_size(size)} disk")
            classes = [VmfsCryptProvider, LuksProvider, GocryptfsProvider, SecurefsProvider]
            providers, targets, status = start_providers(classes, wanted, backing, work, size, cleanup)
            results["targets"] = status
            results["providers"] = {n: p.describe for p in providers for n in p.names}
            targets.sort(key=lambda t: TARGET_ORDER.index(t.name))
            for t in targets:
                if not getattr(t, "prefilled", False):
                    try:
                        fio(t.path, dict(name="prefill", rw="write", bs="1M"), size, timeout=1800)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        status[t.name] = f"prefill failed: {exc}"
                        log(f"  {t.name}: prefill failed: {exc}")
            targets = [t for t in targets if status[t.name] == "ok"]
            guest = Guest(image, work, accel, cpu)
            cleanup.push("benchmark guest", guest.stop)
            append = f"vb.mode=run vb.runtime={int(runtime * 1000)}ms vb.ramp={int(ramp * 1000)}ms"
            boot_allow = 30 if accel == "kvm" else 180
            timeout = boot_allow + len(JOBS) * (runtime + ramp + 5) * (1 if accel == "kvm" else 3)
            samples: dict = {t.name: {n: [] for n, *_ in JOBS} for t in targets}
            meter = LoadMeter(lambda: daemon_pids(providers) + ([guest.proc.pid] if guest.proc else []))
            results["rounds"], results["errors"] = [], []
            log(f"\n== {len(targets)} targets x {rounds} round(s), {len(JOBS)} fio jobs per boot "
                f"({runtime:g} s + {ramp:g} s ramp each)")
            try:
                for rnd in range(rounds):
                    meter.start()
                    k = rnd % len(targets) if targets else 0
                    order = targets[k:] + targets[:k]
                    for t in order:
                        t0 = time.monotonic()
                        try:
                            text = guest.boot(append, disk_args(t), timeout)
                            res = parse_guest(text)
                        except RuntimeError as exc:
                            results["errors"].append(f"round {rnd + 1} {t.name}: {exc}")
                            log(f"  round {rnd + 1}/{rounds} {t.name:<11} ERROR {exc}")
                            continue
                        for n, r in res.items():
                            samples[t.name][n].append(r)
                        cells = "  ".join(f"{n} {fmt(res[n][m], m)}" for n, _, _, m in JOBS)
                        log(f"  round {rnd + 1}/{rounds} {t.name:<11} ({time.monotonic() - t0:.0f} s) {cells}")
                    load = meter.stop()
                    load["order"] = [t.name for t in order]
                    results["rounds"].append(load)
                    log(load_line(f"guest round {rnd + 1}", load))
            finally:  # also the partial medians of an interrupted run
                guest_medians(results, samples)
    except KeyboardInterrupt:
        results["interrupted"] = True
        log("interrupted: everything started is stopped; partial results follow")
    except RuntimeError as exc:
        results["error"] = str(exc)
        log(f"failed: {exc}")
    finally:
        results["elapsed_s"] = round(time.time() - started, 1)
        summarize(results)
        os.makedirs(os.path.dirname(args.output), exist_ok=True)
        with open(args.output + ".tmp", "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        os.replace(args.output + ".tmp", args.output)
        log(f"\nresults: {os.path.relpath(args.output)} ({results['elapsed_s']} s)")
    return 130 if results.get("interrupted") else (1 if results.get("error") else 0)


if __name__ == "__main__":
    sys.exit(main())
