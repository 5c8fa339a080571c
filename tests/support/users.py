"""Real Unix users for tests about other users: create, run commands as them, and always remove them.

    with unix_user("victim") as victim:
        victim.run([*victim.python(), "-m", "vmfs_crypt.cli", "info", path], env=victim.env())

A user is made with `useradd -M` (no skeleton; a private home under /tmp that the test
removes), commands run as it through `setpriv --reuid --regid --clear-groups` with an
environment the test gives (nothing of the test's own leaks in, no XDG_RUNTIME_DIR), and on
leaving every process of the user is killed by pid before `userdel`. A user left behind by a
test run that was killed is removed by the next one (the comment field names the pytest pid).

`python()` is an interpreter and a PYTHONPATH that any user can run vmfs-crypt with: the
test's own interpreter often lives where other users cannot go (/root/.pyenv), so it is an
interpreter of the same Python version that they can reach, with the packages the CLI needs
hard-linked (or copied) into a world-readable directory.
"""

import atexit
import contextlib
import errno
import importlib.util
import os
import pwd
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time

from .env import CLI_REPO

COMMENT_PREFIX = "vmfs-crypt test user, pytest pid "
# What the vmfs-crypt CLI, agent and mount import outside the standard library.
NEEDED_PACKAGES = ("click", "cryptography", "cffi", "_cffi_backend", "numpy", "tomli_w", "mfusepy")


def _world_reachable(path: str) -> bool:
    """Whether a user with no group in common can execute `path` (every directory on the way o+x)."""
    path = os.path.realpath(path)
    if not os.path.exists(path) or not os.stat(path).st_mode & stat.S_IXOTH:
        return False
    d = os.path.dirname(path)
    while True:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return False
        parent = os.path.dirname(d)
        if parent == d:
            return True
        d = parent


def _interpreter() -> str:
    """An interpreter of this Python version (extension modules must load) that other users can run."""
    want = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [getattr(sys, "_base_executable", sys.executable), sys.executable,
                  shutil.which(f"python{want}") or "", f"/usr/bin/python{want}", f"/usr/local/bin/python{want}"]
    for exe in candidates:
        if exe and _world_reachable(exe):
            out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() == want:
                return os.path.realpath(exe)
    raise RuntimeError(f"no Python {want} interpreter that other users can run (tried {candidates})")


def _link_tree(src: str, dst: str) -> None:
    """Hard-link (or, across file systems, copy) a file or a tree; directories become 0755."""
    if os.path.isdir(src):
        os.makedirs(dst, mode=0o755, exist_ok=True)
        for name in os.listdir(src):
            if name != "__pycache__":
                _link_tree(os.path.join(src, name), os.path.join(dst, name))
        os.chmod(dst, 0o755)
        return
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        shutil.copy2(src, dst)
    if not os.stat(dst).st_mode & stat.S_IROTH:
        os.chmod(dst, os.stat(dst).st_mode | 0o444)  # only copies get here with tighter modes


_SHARED: dict[str, tuple[str, str]] = {}


def shared_python(repo: str = CLI_REPO) -> tuple[str, str]:
    """(interpreter, PYTHONPATH) with which any user can run the vmfs_crypt of `repo`; built once per test run."""
    if repo in _SHARED:
        return _SHARED[repo]
    base = tempfile.mkdtemp(prefix="vmfs-test-py-", dir="/tmp")
    os.chmod(base, 0o755)
    if not _SHARED:
        atexit.register(remove_shared_pythons)
    for name in NEEDED_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        origin = spec.origin
        src = os.path.dirname(origin) if os.path.basename(origin) == "__init__.py" else origin
        _link_tree(src, os.path.join(base, os.path.basename(src)))
        libs = os.path.join(os.path.dirname(src), f"{name}.libs")  # wheels' vendored shared libraries
        if os.path.isdir(libs):
            _link_tree(libs, os.path.join(base, os.path.basename(libs)))
    _link_tree(os.path.join(repo, "vmfs_crypt"), os.path.join(base, "vmfs_crypt"))
    _SHARED[repo] = (_interpreter(), base)
    return _SHARED[repo]


def remove_shared_pythons() -> None:
    for _, base in _SHARED.values():
        shutil.rmtree(base, ignore_errors=True)
    _SHARED.clear()


def _uid_of_process(pid: int) -> int | None:
    """The real uid of a live process (None for a zombie: it has exited, only its parent has not reaped it)."""
    uid = None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("State:") and line.split()[1] == "Z":
                    return None
                if line.startswith("Uid:"):
                    uid = int(line.split()[1])
    except (OSError, ValueError):
        return None
    return uid


def processes_of(uid: int) -> list[int]:
    """Pids of the live processes whose real uid is `uid`."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and _uid_of_process(int(n)) == uid]


def _kill_and_wait(pids: list[int], timeout_s: float = 10.0) -> None:
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout_s
    for fd in fds:
        select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        os.close(fd)


class UnixUser:
    """A throw-away Unix user: its name, uid, gid, a private home, and ways to run programs as it."""

    def __init__(self, name: str) -> None:
        entry = pwd.getpwnam(name)
        self.name, self.uid, self.gid, self.home = name, entry.pw_uid, entry.pw_gid, entry.pw_dir
        self._procs: list[subprocess.Popen] = []

    def __repr__(self) -> str:
        return f"UnixUser({self.name}, uid {self.uid})"

    def env(self, **extra: str) -> dict:
        """A minimal environment of this user (no XDG_RUNTIME_DIR), plus `extra`."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": self.home, "USER": self.name,
               "LOGNAME": self.name, "LANG": "C.UTF-8"}
        env.update(extra)
        return env

    def python(self, repo: str = CLI_REPO) -> list[str]:
        """argv prefix of a Python that runs the vmfs_crypt of `repo` (set PYTHONPATH from `pythonpath`)."""
        return [shared_python(repo)[0]]

    def pythonpath(self, repo: str = CLI_REPO) -> str:
        return shared_python(repo)[1]

    def _argv(self, argv: list[str]) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--", *map(str, argv)]

    def run(self, argv: list, env: dict | None = None, input: bytes | None = None, timeout: float = 60,
            check: bool = False, cwd: str | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._argv(argv), env=env if env is not None else self.env(), input=input,
                              capture_output=True, timeout=timeout, cwd=cwd or self.home)
        if check and proc.returncode:
            raise AssertionError(f"as {self.name}: {' '.join(map(str, argv))} exited {proc.returncode}:\n"
                                 f"{proc.stderr.decode(errors='replace')}")
        return proc

    def popen(self, argv: list, env: dict | None = None, cwd: str | None = None, **kw) -> subprocess.Popen:
        """Start a program as this user (killed, at the latest, when the user is removed)."""
        proc = subprocess.Popen(self._argv(argv), env=env if env is not None else self.env(), cwd=cwd or self.home,
                                **kw)
        self._procs.append(proc)
        return proc

    def own(self, *paths: str) -> None:
        """Give `paths` (recursively) to this user."""
        for path in paths:
            os.lchown(path, self.uid, self.gid)
            if os.path.isdir(path) and not os.path.islink(path):
                for dirpath, dirnames, filenames in os.walk(path):
                    for name in dirnames + filenames:
                        os.lchown(os.path.join(dirpath, name), self.uid, self.gid)

    def mkdir(self, path: str, mode: int = 0o700) -> str:
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        self.own(path)
        return path

    def kill_all(self) -> None:
        """Kill every process of this user (each by its pid: they are all the test's own)."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
        _kill_and_wait(processes_of(self.uid))


def _remove_user(name: str, home: str | None) -> None:
    try:
        uid = pwd.getpwnam(name).pw_uid
    except KeyError:
        uid = None
    if uid is not None:
        _kill_and_wait(processes_of(uid))
        if subprocess.run(["userdel", name], capture_output=True).returncode not in (0, 6):
            subprocess.run(["userdel", "-f", name], capture_output=True)  # e.g. an unreaped zombie of it
        subprocess.run(["groupdel", name], capture_output=True)  # if userdel left the user's group
    if home and home.startswith("/tmp/vmfs-test-home-"):
        shutil.rmtree(home, ignore_errors=True)


def remove_stale_users() -> None:
    """Users that a killed test run left behind (their pytest process is gone)."""
    for entry in pwd.getpwall():
        if entry.pw_gecos.startswith(COMMENT_PREFIX):
            pid = entry.pw_gecos[len(COMMENT_PREFIX):]
            if not pid.isdigit() or not os.path.exists(f"/proc/{pid}"):
                _remove_user(entry.pw_name, entry.pw_dir)


@contextlib.contextmanager
def unix_user(role: str = "user"):
    """A new user named vt<role><random> (useradd -M), removed with its processes and home when the block ends."""
    if os.geteuid() != 0:
        import pytest
        pytest.skip("making Unix users needs root")
    for tool in ("useradd", "userdel", "setpriv"):
        if not shutil.which(tool):
            import pytest
            pytest.skip(f"needs {tool}")
    remove_stale_users()
    name = f"vt{role[:8]}{secrets.token_hex(3)}"
    home = tempfile.mkdtemp(prefix="vmfs-test-home-", dir="/tmp")
    made = False
    try:
        subprocess.run(["useradd", "-M", "-U", "-d", home, "-s", "/usr/sbin/nologin",
                        "-c", f"{COMMENT_PREFIX}{os.getpid()}", name], check=True, capture_output=True)
        made = True
        user = UnixUser(name)
        os.chown(home, user.uid, user.gid)
        os.chmod(home, 0o700)
        try:
            yield user
        finally:
            user.kill_all()
    finally:
        if made:
            _remove_user(name, home)
        else:
            shutil.rmtree(home, ignore_errors=True)


__all__ = ["UnixUser", "unix_user", "shared_python", "remove_shared_pythons", "processes_of"]
