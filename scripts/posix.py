#!/usr/bin/env python3
"""`make posix PJDFSTEST=DIR`: pjdfstest through a throw-away mount, in an encrypted and a plain folder (issue 12).

DIR is a pjdfstest checkout the user built (`autoreconf -ifs && ./configure && make pjdfstest`;
no package registry carries it, and its code is not part of this repository). The script
makes a private config, runtime directory and datastore under /tmp (the native provider, a
VM folder made encrypted by `vmfs-crypt create`, and a plain folder), mounts it with
--allow-other (which turns on default_permissions: pjdfstest switches to other uids), runs
`prove -r DIR/tests` as root inside a new folder of each, and prints the failed tests by
category (the directory under tests/) and in total. The verbose output of each run is kept
in posix-results/ (with the mount's log) for reading the failures. The mount is unmounted, the agent stopped and
the directory removed in every case, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "vmfs_crypt.cli"]
RESULTS = os.path.join(REPO, "posix-results")
# prove's summary: "/x/tests/chown/00.t (Wstat: 256 (exited 1) Tests: 171 Failed: 10)" and, for a
# file that stopped early, "Parse errors: Bad plan.  You planned 171 tests but ran 40."
_FILE_LINE = re.compile(r"^(\S+\.t)\s+\(Wstat: .*?Tests: (\d+) Failed: (\d+)\)")
_BAD_PLAN = re.compile(r"You planned (\d+) tests? but ran (\d+)")


def fail(msg: str) -> None:
    print(f"make posix: {msg}", file=sys.stderr)
    sys.exit(2)


def check_pjdfstest(top: str | None) -> str:
    if not top:
        fail("set PJDFSTEST to a built pjdfstest checkout, e.g. make posix PJDFSTEST=/tmp/pjdfstest "
             "(git clone https://github.com/pjd/pjdfstest; autoreconf -ifs && ./configure && make pjdfstest)")
    top = os.path.abspath(top)
    if not os.path.isdir(os.path.join(top, "tests")):
        fail(f"{top}: not a pjdfstest checkout (no tests/ directory)")
    binary = os.path.join(top, "pjdfstest")
    if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
        fail(f"{top}: no built pjdfstest binary ({binary}); run autoreconf -ifs && ./configure && make pjdfstest there")
    if shutil.which("prove") is None:
        fail("prove (Perl's TAP harness, Debian package perl) is not installed")
    if os.geteuid() != 0:
        fail("pjdfstest runs as root (it switches to other uids and makes device nodes)")
    return top


def parse_summary(output: str, tests_dir: str) -> dict[str, int]:
    """Failed tests per category from prove's summary; a file that stopped early counts its missing tests."""
    by_cat: dict[str, int] = {}
    current = None
    for line in output.splitlines():
        m = _FILE_LINE.match(line)
        if m:
            current = os.path.relpath(m.group(1), tests_dir).split(os.sep)[0]
            by_cat[current] = by_cat.get(current, 0) + int(m.group(3))
            continue
        m = _BAD_PLAN.search(line)
        if m and current is not None:
            planned, ran = int(m.group(1)), int(m.group(2))
            by_cat[current] = by_cat.get(current, 0) + max(0, planned - ran)
    return by_cat


def total_tests(output: str) -> int | None:
    m = re.search(r"Files=\d+, Tests=(\d+)", output)
    return int(m.group(1)) if m else None


class Run:
    """The throw-away datastore, its mount, and everything to undo."""

    def __init__(self) -> None:
        self.base = tempfile.mkdtemp(prefix="vmfs-posix-", dir="/tmp")
        os.chmod(self.base, 0o755)  # pjdfstest's other uids must reach the mount point
        self.ds = os.path.join(self.base, "ds")
        self.mnt = os.path.join(self.base, "mnt")
        runtime = tempfile.mkdtemp(prefix="vcrt-", dir="/tmp")
        self.env = dict(os.environ, VMFS_CRYPT_CONFIG=os.path.join(self.base, "config.toml"),
                        XDG_RUNTIME_DIR=runtime, PYTHONPATH=REPO)
        self.runtime = runtime
        self.mounted = False

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(CLI + list(args), env=self.env, capture_output=True, text=True, cwd=self.base,
                              timeout=120)
        if check and proc.returncode != 0:
            raise RuntimeError(f"vmfs-crypt {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def setup(self) -> None:
        os.makedirs(os.path.join(self.ds, "vm1"))
        os.makedirs(os.path.join(self.ds, "plain"))
        os.makedirs(self.mnt)
        self.cli("provider", "add", "native", "local")
        self.cli("create", os.path.join(self.ds, "vm1", "disk.vmdk"), "--size", "1M")  # vm1 becomes encrypted
        self.cli("mount", "--allow-other", self.ds, self.mnt)
        self.mounted = True

    def keep_logs(self) -> None:
        """The mount's and agent's logs, beside prove's output (the run's directory goes away)."""
        with open(os.path.join(RESULTS, "mount.log"), "w") as out:
            for dirpath, _, files in os.walk(self.runtime):
                for name in sorted(files):
                    if name.endswith(".log"):
                        with open(os.path.join(dirpath, name), errors="replace") as f:
                            out.write(f"--- {name}\n{f.read()}")

    def cleanup(self) -> None:
        if self.mounted:
            self.keep_logs()
            if self.cli("umount", self.mnt, check=False).returncode != 0:
                subprocess.run(["fusermount", "-uz", self.mnt], capture_output=True)
            self.mounted = False
        self.cli("agent", "stop", "--force", check=False)
        shutil.rmtree(self.base, ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)


def run_prove(top: str, folder: str, log_path: str, only: list[str]) -> str:
    tests = [os.path.join(top, "tests", c) for c in only] if only else [os.path.join(top, "tests")]
    os.makedirs(folder)
    with open(log_path, "w") as log:
        # its own process group: on Ctrl-C, prove and the test scripts it runs are stopped by that id
        proc = subprocess.Popen(["prove", "-r", "-v", *tests], cwd=folder, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
            proc.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
            raise
    with open(log_path) as log:
        return log.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pjdfstest", nargs="?", default=os.environ.get("PJDFSTEST"))
    ap.add_argument("--only", action="append", default=[], help="one category (e.g. chown); may repeat")
    ap.add_argument("--folders", default="encrypted,plain", help="encrypted,plain (default both)")
    args = ap.parse_args()
    top = check_pjdfstest(args.pjdfstest)
    # Ctrl-C and SIGTERM end the run through the finally below (the mount is always undone).
    # SIGINT too: a process started in the background of a shell begins with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    os.makedirs(RESULTS, exist_ok=True)
    run = Run()
    results: dict[str, dict[str, int]] = {}
    totals: dict[str, int | None] = {}
    try:
        run.setup()
        for which in args.folders.split(","):
            folder = os.path.join(run.mnt, "vm1" if which == "encrypted" else "plain", "pjd")
            log_path = os.path.join(RESULTS, f"{which}.log")
            print(f"== pjdfstest in the {which} folder ({folder}); verbose output: {log_path}", flush=True)
            out = run_prove(top, folder, log_path, args.only)
            results[which] = parse_summary(out, os.path.join(top, "tests"))
            totals[which] = total_tests(out)
    except KeyboardInterrupt:
        print("\ninterrupted: unmounting and cleaning up", file=sys.stderr)
        return 130
    finally:
        run.cleanup()
    cats = sorted({c for r in results.values() for c, n in r.items() if n})  # (a file can list 0 failed)
    print()
    print(f"{'failed tests':<16}" + "".join(f"{w:>12}" for w in results))
    for cat in cats:
        print(f"{cat:<16}" + "".join(f"{results[w].get(cat, 0):>12}" for w in results))
    print(f"{'total':<16}" + "".join(f"{sum(results[w].values()):>12}" for w in results))
    print(f"{'of tests run':<16}" + "".join(f"{totals[w] if totals[w] is not None else '?':>12}" for w in results))
    return 0  # a report: the listed EXDEV cases always fail (README, "POSIX conformance")


if __name__ == "__main__":
    sys.exit(main())
