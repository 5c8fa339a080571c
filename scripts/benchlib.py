"""Shared pieces of the benchmarks (scripts/bench.py, scripts/bench_guest.py): processes, mounts, targets, fio, load.

Everything a benchmark starts is registered with a `Cleanup` stack and torn down by pid and
mount point in a `finally`, also on Ctrl-C, SIGTERM and SIGHUP (turned into
KeyboardInterrupt); FUSE daemons run in their own session so that a Ctrl-C typed in the
terminal reaches only this script, which then unmounts them cleanly (issue 13).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "vmfs_crypt.cli"]
MIB = 1 << 20
GIB = 1 << 30
PASSWORD = "benchmark password"
LOAD_WARN = 1.5  # issue 13: above this 1-minute load average the figures are noise
LOAD_MEMORY_S = 180.0  # the 1-minute load average decays with a 60 s time constant: 3 of them
# Debian packages the host benchmarks need (binary -> package); installed when missing (root).
APT_TOOLS = {"fio": "fio", "gocryptfs": "gocryptfs", "securefs": "securefs", "bindfs": "bindfs",
             "fusermount3": "fuse3", "qemu-img": "qemu-utils"}


def log(msg: str = "") -> None:
    print(msg, flush=True)


def run(cmd, *, check=True, timeout=600, env=None, input=None) -> subprocess.CompletedProcess:
    """Run to completion (subprocess.run kills the child on timeout or Ctrl-C)."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, env=env, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()[-2000:]}")
    return proc


def run_retrying_pbkdf_timing(cmd, *, timeout=600, say=None) -> subprocess.CompletedProcess:
    """run() of a qemu-img that makes a LUKS key slot: QEMU sizes PBKDF2 by the thread's CPU time,
    which reads 0 now and then on this machine ("Unable to get accurate CPU usage"); up to 3 tries."""
    for attempt in range(3):
        try:
            return run(cmd, timeout=timeout)
        except RuntimeError as exc:
            if "Unable to get accurate CPU usage" not in str(exc) or attempt == 2:
                raise
            if say:
                say("qemu-img could not time PBKDF2 (CPU usage read 0); trying again")
    raise AssertionError("unreachable")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` unmounts and stops what it started.
    SIGINT too, even when the script was started with SIGINT ignored (a background job of a shell)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)


class Cleanup:
    """A stack of teardown steps, run last-in first-out; each step runs even if another fails.

    While it runs, SIGINT/SIGTERM are ignored: a second Ctrl-C must not leave a mount behind.
    """

    def __init__(self) -> None:
        self._steps: list[tuple[str, object]] = []

    def push(self, what: str, fn) -> None:
        self._steps.append((what, fn))

    def run_all(self) -> None:
        old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            while self._steps:
                what, fn = self._steps.pop()
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - report and go on with the other steps
                    log(f"  cleanup: {what} failed: {exc}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.run_all()
        return False


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


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is gone for every purpose here
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int | None, what: str, timeout: float = 15.0) -> None:
    """Wait for `pid` to exit, then SIGTERM, then SIGKILL it (by pid only)."""
    if not pid:
        return
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and pid_alive(pid):
            log(f"  cleanup: {what} (pid {pid}) still running: sending {sig.name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            time.sleep(0.05)
        if not pid_alive(pid):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return


def unmount(path: str | None) -> None:
    """Unmount a FUSE (or any) mount point: umount, fusermount3/fusermount -u, then lazily."""
    if not path or not is_mounted(path):
        return
    for cmd in (["umount", path], ["fusermount3", "-u", path], ["fusermount", "-u", path]):
        if shutil.which(cmd[0]) and run(cmd, check=False, timeout=60).returncode == 0 and not is_mounted(path):
            return
    log(f"  cleanup: {path} busy: lazy unmount")
    for cmd in (["umount", "-l", path], ["fusermount3", "-uz", path], ["fusermount", "-uz", path]):
        if shutil.which(cmd[0]) and run(cmd, check=False, timeout=60).returncode == 0:
            return


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


def ensure_tools(install: bool, tools: dict[str, str] = APT_TOOLS) -> None:
    missing = sorted({pkg for binary, pkg in tools.items() if shutil.which(binary) is None})
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


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def fmt_size(n: int) -> str:
    return f"{n // GIB} GiB" if n % GIB == 0 else f"{n // MIB} MiB"


# -- machine load ---------------------------------------------------------------------
_HZ = os.sysconf("SC_CLK_TCK")


def _proc_cpu_s(pid: int, children: bool = False) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[11:15] = utime stime cutime cstime (cutime/cstime: waited-for descendants)
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / _HZ


def _machine_busy_s() -> float:
    with open("/proc/stat", encoding="utf-8") as f:
        cpu = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (cpu + [0] * 8)[:8]
    # steal: time the hypervisor gave to other guests: other tenants too
    return (user + nice + system + irq + softirq + steal) / _HZ


def _threads_schedstat(pids) -> dict:
    """{tid: (ns on a CPU, ns waiting on a run queue, times run)} of every thread of `pids`
    (/proc/TID/schedstat, the kernel's sched_info: the run-queue wait is the delay from a
    wake-up, or a preemption, to running again)."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError, ValueError):
                    with open(f"/proc/{pid}/task/{tid}/schedstat", encoding="utf-8") as f:
                        cpu, wait, runs = (int(x) for x in f.read().split()[:3])
                    out[int(tid)] = (cpu, wait, runs)
    return out


class SchedMeter:
    """What a daemon's threads cost the scheduler over one fio job, per request: CPU time, time
    waiting on a run queue after a wake-up (which the CPU time does not show: on this VM an
    idle vCPU halts, so each cross-CPU wake-up waits for the hypervisor) and times scheduled;
    also the machine's busy CPUs. Threads that exit during the job are lost (libfuse's workers
    live as long as requests keep coming)."""

    def __init__(self, pids) -> None:
        self.pids = list(pids)
        self.t0, self.busy0, self.s0 = time.monotonic(), _machine_busy_s(), _threads_schedstat(self.pids)

    def per_request(self, requests_per_s: float) -> dict:
        wall = max(time.monotonic() - self.t0, 1e-6)
        busy = (_machine_busy_s() - self.busy0) / wall
        s1 = _threads_schedstat(self.pids)
        d = [sum(v[k] - self.s0.get(tid, (0, 0, 0))[k] for tid, v in s1.items()) for k in range(3)]
        n = requests_per_s * wall
        if not self.pids or n <= 0:
            return {"busy_cpus": round(busy, 2)}
        return {"busy_cpus": round(busy, 2), "daemon_cpu_us": round(d[0] / n / 1e3, 2),
                "daemon_rq_wait_us": round(d[1] / n / 1e3, 2), "daemon_runs": round(d[2] / n, 2)}


class LoadMeter:
    """Load average before/after a round, and the CPU that processes other than this
    benchmark's (this script, the children it waited for, the daemons `pids()` names) used
    meanwhile, in cores. The 1-minute load average after a round includes the benchmark's own
    threads, so the CPU of the others is the better noise signal; both are recorded."""

    last_stop = float("-inf")  # when the last round of this run ended

    def __init__(self, pids) -> None:
        self.pids = pids  # callable -> list of live daemon pids that belong to the benchmark

    def _ours_s(self) -> float:
        return _proc_cpu_s(os.getpid(), children=True) + sum(_proc_cpu_s(p, children=True) for p in self.pids())

    def start(self) -> None:
        self.t0, self.busy0, self.ours0 = time.monotonic(), _machine_busy_s(), self._ours_s()
        self.load_before = os.getloadavg()[0]

    def stop(self) -> dict:
        elapsed = max(time.monotonic() - self.t0, 1e-6)
        others = max(0.0, (_machine_busy_s() - self.busy0) - (self._ours_s() - self.ours0)) / elapsed
        load_after = os.getloadavg()[0]
        # The load average before a round that follows another within LOAD_MEMORY_S still holds
        # the benchmark's own threads (fio jobs, daemons): every round after the first was flagged
        # on a machine whose other processes used 0.00 cores. Then only the others' CPU counts.
        own_load = self.t0 - LoadMeter.last_stop < LOAD_MEMORY_S
        noisy = (self.load_before > LOAD_WARN and not own_load) or others > LOAD_WARN / 3
        LoadMeter.last_stop = time.monotonic()
        return {"loadavg_before": round(self.load_before, 2), "loadavg_after": round(load_after, 2),
                "other_processes_cpu_cores": round(others, 2), "elapsed_s": round(elapsed, 1), "noisy": noisy}


def load_line(label: str, m: dict) -> str:
    line = (f"  {label}: load average {m['loadavg_before']:.2f} before, {m['loadavg_after']:.2f} after; "
            f"other processes used {m['other_processes_cpu_cores']:.2f} cores meanwhile ({m['elapsed_s']} s)")
    if m["noisy"]:
        line += (f"\n  WARNING: the machine was busy (load average > {LOAD_WARN} before the round, not"
                 f" counting our own previous round, or other "
                 f"processes used > {LOAD_WARN / 3:.1f} cores): the figures of this round are noise")
    return line


# -- backing filesystem ---------------------------------------------------------------
@contextlib.contextmanager
def backing_fs(size_bytes: int, prefer_tmpfs: bool = True):
    """(work dir, backing dir, kind): a fresh tmpfs under a temp dir (root), else a directory in /dev/shm.
    Every backing file of a benchmark lives on it; the work dir (mount points, logs) is beside it."""
    top = tempfile.mkdtemp(prefix="vmfs-bench-")
    backing = os.path.join(top, "backing")
    os.makedirs(backing)
    kind = "dir"
    mounted = False
    try:
        if prefer_tmpfs and os.geteuid() == 0:
            proc = run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", backing], check=False)
            mounted = kind = proc.returncode == 0 and "tmpfs"
        if not mounted and os.path.isdir("/dev/shm"):
            backing = tempfile.mkdtemp(prefix="vmfs-bench-", dir="/dev/shm")
            kind = "/dev/shm"
        yield top, backing, kind
    finally:
        if mounted:
            unmount(backing)
        elif kind == "/dev/shm":
            shutil.rmtree(backing, ignore_errors=True)
        shutil.rmtree(top, ignore_errors=True)


# -- targets ----------------------------------------------------------------------------
class Target:
    """One file the benchmark works on, reached through a provider."""

    def __init__(self, name: str, path: str, provider: "Provider", backing: str | None = None,
                 encrypted: bool = False) -> None:
        self.name, self.path, self.provider = name, path, provider
        self.backing, self.encrypted = backing, encrypted


class Provider:
    """A way to reach a file on the backing filesystem: set up, targets, daemon pid, tear down."""

    names: tuple[str, ...] = ()
    describe = ""

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
    describe = "a file on the backing tmpfs itself (no FUSE)"

    def setup(self, backing, work, size):
        d = os.path.join(backing, "raw")
        os.makedirs(d, exist_ok=True)
        return [Target("raw", os.path.join(d, "bench.dat"), self)]


class FuseDaemonProvider(Provider):
    """A FUSE filesystem whose daemon runs in the foreground under us, in its own session."""

    binary = ""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.mnt: str | None = None
        self.log_path: str | None = None

    def available(self):
        if not shutil.which(self.binary):
            return f"{self.binary} not installed (Debian package {self.binary})"
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse missing"
        return None

    def start(self, cmd: list[str], mnt: str, work: str, timeout: float = 60) -> None:
        self.mnt = mnt
        self.log_path = os.path.join(work, f"{self.names[0]}.log")
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        wait_for(lambda: is_mounted(mnt) or self.proc.poll() is not None, timeout, f"{self.names[0]} mount")
        if not is_mounted(mnt):
            with open(self.log_path, "rb") as f:
                raise RuntimeError(f"{self.binary} exited {self.proc.returncode}: {f.read().decode(errors='replace')[-500:]}")

    def pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def teardown(self):
        unmount(self.mnt)
        if self.proc:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_pid(self.proc.pid, self.binary, timeout=5)
                self.proc.wait()


class GocryptfsProvider(FuseDaemonProvider):
    names = ("gocryptfs",)
    binary = "gocryptfs"
    describe = "gocryptfs (Debian; AES-256-GCM, 4 KiB blocks, go-fuse), cipher dir on the backing tmpfs"

    def setup(self, backing, work, size):
        cipher = os.path.join(backing, "gocryptfs-cipher")
        mnt = os.path.join(work, "gocryptfs-mnt")
        os.makedirs(cipher)
        os.makedirs(mnt)
        passfile = os.path.join(work, "gocryptfs.pass")
        with open(os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(PASSWORD + "\n")
        # -scryptn only makes the password KDF cheaper; the data path is the same.
        run(["gocryptfs", "-init", "-q", "-scryptn", "10", "-passfile", passfile, cipher])
        self.start(["gocryptfs", "-fg", "-q", "-passfile", passfile, cipher, mnt], mnt, work)
        return [Target("gocryptfs", os.path.join(mnt, "bench.dat"), self, encrypted=True)]


class SecurefsProvider(FuseDaemonProvider):
    """securefs 0.13 (Debian), lite format 4, 4 KiB blocks (the default; larger blocks would make every
    4 KiB write a read-modify-write of the whole block). It links libfuse 2, which cannot
    negotiate 1 MiB requests (FUSE_MAX_PAGES is a libfuse 3 feature): the kernel splits a 1 MiB
    O_DIRECT request into 128 KiB ones. O_DIRECT opens work (the kernel's FUSE direct I/O)."""

    names = ("securefs",)
    binary = "securefs"
    describe = "securefs 0.13 (Debian; lite format, AES-GCM, 4 KiB blocks, libfuse 2: 128 KiB requests)"

    def setup(self, backing, work, size):
        data = os.path.join(backing, "securefs-data")
        mnt = os.path.join(work, "securefs-mnt")
        os.makedirs(data)
        os.makedirs(mnt)
        # PBKDF2 with few rounds instead of argon2id: only the mount's key derivation gets cheaper (8 s -> 0)
        run(["securefs", "create", "--pass", PASSWORD, "--pbkdf", "pkcs5-pbkdf2-hmac-sha256", "--rounds", "1000",
             data], timeout=120)
        # Foreground (the brief's -b daemonises; in the foreground we know the pid, for RSS and teardown).
        self.start(["securefs", "mount", "--pass", PASSWORD, "-o", "big_writes", data, mnt], mnt, work)
        return [Target("securefs", os.path.join(mnt, "bench.dat"), self, encrypted=True)]


class BindfsProvider(FuseDaemonProvider):
    """bindfs (Debian, C, libfuse 2), multithreaded: a FUSE passthrough, the FUSE round-trip limit.
    O_DIRECT is not forwarded (its default), as vmfs-crypt does not forward it to the backing file."""

    names = ("bindfs",)
    binary = "bindfs"
    describe = "bindfs (Debian; C passthrough, --multithreaded, libfuse 2: 128 KiB requests)"

    def setup(self, backing, work, size):
        src = os.path.join(backing, "bindfs-src")
        mnt = os.path.join(work, "bindfs-mnt")
        os.makedirs(src)
        os.makedirs(mnt)
        self.start(["bindfs", "-f", "--multithreaded", "-o", "big_writes", src, mnt], mnt, work)
        return [Target("bindfs", os.path.join(mnt, "bench.dat"), self, backing=os.path.join(src, "bench.dat"))]


class VmfsCryptProvider(Provider):
    """One vmfs-crypt mount of a datastore holding a plain VM folder and an encrypted one.

    The datastore lives on the backing filesystem; config, key file and runtime dir in a
    private temp dir. CLI: `vmfs-crypt create DS/vm1/disk.vmdk --size N`,
    `vmfs-crypt mount DS MNT`, `vmfs-crypt umount MNT`.
    """

    names = ("vmfs-plain", "vmfs-enc")
    describe = "vmfs-crypt: vmfs-enc = a `vmfs-crypt create` flat extent, vmfs-plain = a plain folder, one mount"

    def __init__(self) -> None:
        self.env: dict | None = None
        self.mnt: str | None = None
        self.ds: str | None = None
        self.runtime: str | None = None
        self.mount_pid: int | None = None
        self.agent_pid: int | None = None
        self.datapath: str | None = None

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
        self.ds = ds = os.path.join(backing, "vmfs-ds")
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
        extra = os.environ.get("VMFS_BENCH_MOUNT_OPTIONS")  # e.g. max_idle_threads=32 (A/B runs)
        self.cli("mount", *(["-o", extra] if extra else []), ds, self.mnt, timeout=90)
        wait_for(lambda: is_mounted(self.mnt), 30, "vmfs-crypt mount")
        self.mount_pid = self._find_mount_pid()
        self.agent_pid = self._find_agent_pid()
        self.datapath = self._datapath_line()
        return [Target("vmfs-plain", os.path.join(self.mnt, "plainvm", "disk-flat.vmdk"), self, backing=plain),
                Target("vmfs-enc", os.path.join(self.mnt, "vm1", "disk-flat.vmdk"), self,
                       backing=os.path.join(ds, "vm1", "disk-flat.vmdk"), encrypted=True)]

    def _find_mount_pid(self) -> int | None:
        with contextlib.suppress(Exception):  # the datastore's mount lock names the serving pid
            if REPO not in sys.path:
                sys.path.insert(0, REPO)
            from vmfs_crypt.ops.mounting import mount_pid
            pid = mount_pid(self.mnt)
            if isinstance(pid, int) and pid_alive(pid):
                return pid
        target = os.path.realpath(self.mnt or "/nonexistent").encode()  # fall back: the process serving the mount
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(cmdline, "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if any(b"vmfs_crypt" in a or b"vmfs-crypt" in a for a in args) and target in args \
                    and b"mount" in b" ".join(args) and b"umount" not in args:
                return int(cmdline.split("/")[2])
        return None

    def _find_agent_pid(self) -> int | None:
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(cmdline, "rb") as f:
                    args = f.read().split(b"\0")
            except OSError:
                continue
            if b"vmfs_crypt.agent" in args and any(self.runtime.encode() in a for a in args):
                return int(cmdline.split("/")[2])
        return None

    def _datapath_line(self) -> str | None:
        """The mount log's "data path: ..." line (native or Python)."""
        for path in glob.glob(os.path.join(self.runtime or "/nonexistent", "vmfs-crypt", "*.log")):
            with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    if "data path:" in line:
                        return line.split("data path:", 1)[1].strip()
        return None

    def pid(self):
        return self.mount_pid if self.mount_pid and pid_alive(self.mount_pid) else None

    def pids(self) -> list[int]:
        return [p for p in (self.mount_pid, self.agent_pid) if p and pid_alive(p)]

    def teardown(self):
        if self.mnt and is_mounted(self.mnt):
            try:
                self.cli("umount", self.mnt, timeout=90)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                log(f"  vmfs-crypt umount failed ({exc}); unmounting by hand")
                unmount(self.mnt)
        stop_pid(self.mount_pid, "vmfs-crypt mount")
        if self.env:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                run(CLI + ["agent", "stop"], env=self.env, check=False, timeout=60)
        stop_pid(self.agent_pid, "vmfs-crypt agent")
        if self.runtime:
            shutil.rmtree(self.runtime, ignore_errors=True)


def daemon_pids(providers) -> list[int]:
    out = []
    for p in providers:
        out += p.pids() if hasattr(p, "pids") else [p.pid()]
    return [x for x in out if x]


def start_providers(classes, wanted, backing, work, size, cleanup: Cleanup):
    """Set up each provider (teardown registered with `cleanup` first); (providers, targets, status)."""
    providers, targets, status = [], [], {}
    for cls in classes:
        p = cls()
        if wanted is not None and not wanted.intersection(p.names):
            continue
        why = p.available()
        if why is None:
            cleanup.push(f"teardown of {type(p).__name__}", p.teardown)
            try:
                new = [t for t in p.setup(backing, work, size) if wanted is None or t.name in wanted]
                providers.append(p)
                targets += new
                for t in new:
                    status[t.name] = "ok"
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
                why = f"setup failed: {exc}"
        if why is not None:
            for name in p.names:
                if wanted is None or name in wanted:
                    status[name] = f"not available: {why}"
                    log(f"  {name}: not available: {why}")
    return providers, targets, status


# -- test data ------------------------------------------------------------------------
def write_pattern(path: str, size: int) -> None:
    """A fully written file of non-zero, non-repeating-per-MiB data (no holes for qemu-img to skip)."""
    block = bytearray(os.urandom(MIB))
    with open(path, "wb") as f:
        for i in range(size // MIB):
            block[:8] = i.to_bytes(8, "little")
            f.write(block)


def make_flat_folder(folder: str, size: int) -> str:
    """A plain VM folder holding one fully written monolithicFlat disk (disk.vmdk + disk-flat.vmdk); the extent's path."""
    os.makedirs(folder)
    run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat", os.path.join(folder, "disk.vmdk"),
         str(size)])
    flat = os.path.join(folder, "disk-flat.vmdk")
    write_pattern(flat, size)
    return flat


def allocated_bytes(folder: str) -> int:
    """Bytes allocated (st_blocks) by the regular files of a folder."""
    total = 0
    for name in os.listdir(folder):
        st = os.lstat(os.path.join(folder, name))
        if os.path.isfile(os.path.join(folder, name)):
            total += st.st_blocks * 512
    return total


# -- fio ------------------------------------------------------------------------------
def fio(path: str, job: dict, size: int, extra: tuple[str, ...] = (), timeout: float = 900) -> dict:
    """One fio run of `job` on `path`; MB/s, IOPS and mean latency of the job's direction."""
    cmd = ["fio", f"--name={job['name']}", f"--filename={path}", f"--rw={job['rw']}", f"--bs={job['bs']}",
           f"--size={size}", "--direct=1", f"--ioengine={job.get('ioengine', 'psync')}",
           f"--iodepth={job.get('iodepth', 1)}", f"--numjobs={job.get('numjobs', 1)}",
           "--group_reporting", "--output-format=json", "--randrepeat=0", *extra]
    if job.get("time_based"):
        cmd += ["--time_based", f"--runtime={job['runtime']}"]
        if job.get("ramp"):
            cmd.append(f"--ramp_time={job['ramp']}")
    proc = run(cmd, check=False, timeout=timeout)
    if proc.returncode < 0 or proc.returncode >= 128:
        # fio killed by a signal (a Ctrl-C reaches the whole process group): stop the benchmark,
        # do not record it as a failed job
        raise KeyboardInterrupt
    out = proc.stdout.decode(errors="replace")
    try:
        result = json.loads(out[out.index("{"):])
    except ValueError:
        raise RuntimeError(f"fio failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-1000:]}") from None
    j = result["jobs"][0]
    if proc.returncode != 0 or j.get("error"):
        raise RuntimeError(f"fio error {j.get('error')} (exit {proc.returncode}): "
                           f"{proc.stderr.decode(errors='replace')[-1000:]}")
    rd, wr = j["read"], j["write"]
    if job["rw"] in ("rw", "readwrite", "randrw"):  # mixed: both directions together
        ios = rd["total_ios"] + wr["total_ios"]
        lat = (rd["lat_ns"]["mean"] * rd["total_ios"] + wr["lat_ns"]["mean"] * wr["total_ios"]) / max(ios, 1)
        return {"MB/s": (rd["bw_bytes"] + wr["bw_bytes"]) / 1e6, "IOPS": rd["iops"] + wr["iops"],
                "lat_us": lat / 1000, "read_IOPS": rd["iops"], "write_IOPS": wr["iops"]}
    side = rd if job["rw"] in ("read", "randread") else wr
    return {"MB/s": side["bw_bytes"] / 1e6, "IOPS": side["iops"], "lat_us": side["lat_ns"]["mean"] / 1000}


def fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if metric == "IOPS" else f"{v:,.1f}"


def median_or_none(xs):
    return statistics.median(xs) if xs else None


def ratio(a, b):
    return round(a / b, 3) if a and b else None


def mark(value, target, aim=None) -> str:
    """A ratio cell: value and whether the target (and the aim) is met."""
    if value is None:
        return "n/a"
    if aim is not None and value >= aim:
        return f"{value:.2f} aim"
    return f"{value:.2f} {'ok' if value >= target else 'NO'}"
