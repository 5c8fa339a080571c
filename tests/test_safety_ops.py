"""Issue 7, the operations' side: disks in use, one mount per datastore, foreign agents, damaged folders,
crafted journals, `info` inside a mount, nested JSON, FIFOs, agent start-up races, `cat`'s extent rule.

Everything runs the real CLI, real mounts, real qemu-io and real Unix users. Run against the
old code with VMFS_TEST_REPO=/work/baseline to see each case fail there.
"""

import base64
import hashlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import time

import pytest

from support import CLI, mounted, sha256_file
from support.env import CLI_REPO
from support.users import shared_python, unix_user

PATTERN = b"\x5a\xc3\x96\x3c" * 128  # one sector
NVRAM = PATTERN * 17 + b"tail"  # 8708 bytes: a partial last sector
NESTED = b"[" * 100000


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture
def venv_env(venv_env):
    """conftest's environment, and no agent of it left running afterwards (an older CLI under
    VMFS_TEST_REPO may not stop its agents: they are ended here, each by its pid)."""
    yield venv_env
    venv_env.run("agent", "stop", "--force", check=False, timeout=30)
    for pid in _agents_of(venv_env):
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            os.kill(pid, signal.SIGTERM)
            if not select.select([fd], [], [], 10)[0]:
                os.kill(pid, signal.SIGKILL)
        finally:
            os.close(fd)


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.01):
    """Poll `condition` until it returns something true (a condition with a deadline, not a sleep)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def make_vm(env, name: str = "vm1", encrypt: bool = True) -> str:
    """A VM folder as QEMU users have it: a flat disk with data, an nvram file, a log (then encrypted)."""
    vm = os.path.join(env.datastore, name)
    os.makedirs(vm)
    disk = os.path.join(vm, "disk.vmdk")
    env.tool("qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", disk, "8M")
    env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 64k", disk)
    with open(os.path.join(vm, f"{name}.nvram"), "wb") as f:
        f.write(NVRAM)
    with open(os.path.join(vm, "vmware.log"), "wb") as f:
        f.write(b"booted\n")
    if encrypt:
        env.run("encrypt", vm)
    return vm


def hashes(root: str) -> dict[str, str]:
    """Every entry under root: regular files by content, anything else by its type (a FIFO is never opened)."""
    out = {}
    for dirpath, dirnames, files in os.walk(root):
        for name in files + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            if name == ".vmfs-crypt-mount.lock":
                continue
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = sha256_file(p) if stat.S_ISREG(st.st_mode) else stat.filemode(st.st_mode)
    return out


def assert_clean_error(proc, *needles, code=None) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, f"the command should have failed; stdout: {proc.stdout[:300]!r}"
    if code is not None:
        assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, f"not one line: {err}"
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    return err


def info_json(env, path) -> dict:
    return json.loads(env.run("info", "--json", path, check=False).stdout)


def held_paths(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                pass
    except OSError:
        pass
    return out


class QemuIo:
    """An interactive qemu-io that keeps a disk open until closed; commands through its stdin pipe."""

    def __init__(self, env, *args: str) -> None:
        # stdbuf: qemu-io's answers reach the pipe when they are printed, not at exit
        self.proc = subprocess.Popen(["stdbuf", "-o0", "-e0", "qemu-io", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env.env)
        self.pid = self.proc.pid
        self.output = b""

    def wait_holds(self, path: str, timeout_s: float = 20) -> None:
        target = os.path.abspath(path)
        wait_for(lambda: target in held_paths(self.pid) or self.proc.poll() is not None, timeout_s,
                 f"qemu-io to open {target}")
        assert self.proc.poll() is None, f"qemu-io exited: {self.proc.stdout.read().decode(errors='replace')}"

    def run(self, command: str, expect: str, timeout_s: float = 30) -> str:
        start = len(self.output)
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while expect.encode() not in self.output[start:]:
            left = deadline - time.monotonic()
            assert left > 0 and self.proc.poll() is None, f"qemu-io: no {expect!r} after {command!r}: {self.output!r}"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                self.output += os.read(self.proc.stdout.fileno(), 65536)
        return self.output[start:].decode(errors="replace")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "QemuIo":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_sha256(env, path: str) -> str:
    """SHA-256 of `vmfs-crypt cat PATH`, read as it streams (large files)."""
    h = hashlib.sha256()
    proc = subprocess.Popen(CLI + ["cat", path], env=env.env, cwd=env.base, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    for block in iter(lambda: proc.stdout.read(1 << 20), b""):
        h.update(block)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 0, err.decode(errors="replace")
    return h.hexdigest()


_LOCATOR_KEY_ID = re.compile(r"fqid/[^/]*/[^/]*/([^,]*),")


def kek_ids_at_rest(vm: str) -> dict[str, str]:
    """Which KEK each key of an encrypted folder is wrapped under, read from the files themselves."""
    with open(os.path.join(vm, ".vmfs-crypt.json"), "rb") as f:
        doc = json.load(f)
    out = {"(folder)": doc["kek"]["keyId"]}
    out.update({name: _LOCATOR_KEY_ID.search(entry["keySafe"])[1] for name, entry in doc["files"].items()})
    for name in os.listdir(vm):
        if name.endswith(".vmdk") and not name.startswith("."):
            with open(os.path.join(vm, name), "rb") as f:
                head = f.read(1 << 20)
            found = re.search(rb'encryption\.keySafe = "([^"]*)"', head)
            extent = re.search(rb'^RW \d+ \w+ "([^"]+)"', head, re.M)
            if found and extent:
                out[extent[1].decode()] = _LOCATOR_KEY_ID.search(found[1].decode())[1]
    return out


def read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


# -- case 2: a disk in use is not replaced -----------------------------------------------------
@pytest.mark.cli
@pytest.mark.qemu
def test_a_disk_open_at_rest_is_not_replaced(venv_env):
    env = venv_env
    env.run("agent", "start")  # one agent for all the commands below (each would start its own)
    vm = make_vm(env, encrypt=False)
    disk = os.path.join(vm, "disk.vmdk")
    with QemuIo(env, "-f", "vmdk", disk) as q:
        q.wait_holds(os.path.join(vm, "disk-flat.vmdk"))
        before = hashes(vm)
        proc = env.run("encrypt", vm, check=False)
        assert_clean_error(proc, f"pid {q.pid} (", "qemu-io", "disk-flat.vmdk", "disk.vmdk", "at rest", code=11)
        assert hashes(vm) == before, "a refused encrypt changed the folder"
        q.run("write -P 0x77 1M 64k", "wrote 65536/65536")
    assert read_at(os.path.join(vm, "disk-flat.vmdk"), 1 << 20, 65536) == b"\x77" * 65536, "qemu-io's write was lost"

    env.run("encrypt", vm)  # nobody holds it now
    flat = os.path.join(vm, "disk-flat.vmdk")
    with QemuIo(env, "-f", "raw", flat) as q:  # ciphertext at rest: a backup tool, say
        q.wait_holds(flat)
        before = hashes(vm)
        for args in (["decrypt", vm], ["rekey", "--deep", vm]):
            assert_clean_error(env.run(*args, check=False), f"pid {q.pid} (", "qemu-io", "disk-flat.vmdk", code=11)
        assert hashes(vm) == before
        # A shallow rekey replaces only descriptors and the key file: an open extent does not stop it.
        old = info_json(env, vm)["kek"]["keyId"]
        env.run("rekey", vm)
        assert info_json(env, vm)["kek"]["keyId"] != old
    with QemuIo(env, "-f", "raw", disk) as q:  # ...but a descriptor it replaces, held at rest, does
        q.wait_holds(disk)
        assert_clean_error(env.run("rekey", vm, check=False), f"pid {q.pid} (", "disk.vmdk", "at rest", code=11)
    assert env.run("cat", os.path.join(vm, "vm1.nvram")).stdout == NVRAM


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_a_disk_open_through_the_mount_is_re_encrypted_in_place_not_replaced(venv_env):
    """While mounted, encrypt/decrypt/rekey --deep are carried out by the mount (issue 10): the backing
    file QEMU holds keeps its inode, and the writes before, between and after the operations are kept."""
    env = venv_env
    env.run("agent", "start")
    vm1 = make_vm(env, "vm1")
    flat_at_rest = os.path.join(vm1, "disk-flat.vmdk")
    inode = os.stat(flat_at_rest).st_ino
    with mounted(env) as mnt:
        disk = os.path.join(mnt, "vm1", "disk.vmdk")
        with QemuIo(env, "-t", "none", "-f", "vmdk", disk) as q:  # O_DIRECT, a long-lived writer
            q.wait_holds(os.path.join(mnt, "vm1", "disk-flat.vmdk"))
            q.run("write -P 0x77 1M 64k", "wrote 65536/65536")
            for n, args in enumerate((["rekey", "--deep", vm1], ["decrypt", vm1], ["encrypt", vm1],
                                      ["rekey", "--deep", os.path.join(mnt, "vm1")])):
                before = hashes(vm1)
                out = env.run(*args).stdout.decode()
                assert "online" in out, out
                assert hashes(vm1) != before, f"{args[0]} changed nothing at rest"
                assert os.stat(flat_at_rest).st_ino == inode, f"{args[0]} replaced the file QEMU holds"
                q.run(f"write -P 0x{0x78 + n:x} {2 + n}M 64k", "wrote 65536/65536")
                q.run("read -P 0x77 1M 64k", "read 65536/65536")
    with mounted(env) as mnt:
        flat = os.path.join(mnt, "vm1", "disk-flat.vmdk")
        assert read_at(flat, 1 << 20, 65536) == b"\x77" * 65536
        for n in range(4):
            assert read_at(flat, (2 + n) << 20, 65536) == bytes([0x78 + n]) * 65536, f"write {n} was lost"


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_shallow_rekey_while_a_disk_is_open_through_the_mount(venv_env):
    """Safe: the mount's DEK cache is keyed by the exact key record, and the DEKs do not change;
    the descriptor QEMU rewrites through the mount keeps the new key lines."""
    env = venv_env
    vm = make_vm(env)
    old = kek_ids_at_rest(vm)["(folder)"]
    assert set(kek_ids_at_rest(vm).values()) == {old}
    with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
        cid_before = [line for line in f.read().split(b"\n") if line.startswith(b"CID=")]
    with mounted(env) as mnt:
        nvram = os.open(os.path.join(mnt, "vm1", "vm1.nvram"), os.O_RDWR)
        try:
            with QemuIo(env, "-t", "none", "-f", "vmdk", os.path.join(mnt, "vm1", "disk.vmdk")) as q:
                q.wait_holds(os.path.join(mnt, "vm1", "disk-flat.vmdk"))
                q.run("read -P 0x5a 0 64k", "read 65536/65536")  # its DEK is in the mount's cache now
                assert os.pread(nvram, 512, 0) == PATTERN
                env.run("rekey", vm)
                new = kek_ids_at_rest(vm)["(folder)"]
                assert new != old
                # QEMU's first write rewrites the descriptor (a new CID) through the mount.
                q.run("write -P 0x66 1M 64k", "wrote 65536/65536")
                q.run("read -P 0x66 1M 64k", "read 65536/65536")
                os.pwrite(nvram, b"\x99" * 512, 512)
                assert os.pread(nvram, 512, 512) == b"\x99" * 512
        finally:
            os.close(nvram)
    with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
        assert [line for line in f.read().split(b"\n") if line.startswith(b"CID=")] != cid_before, \
            "QEMU did not rewrite the descriptor: the test proves nothing"
    assert kek_ids_at_rest(vm) == {"(folder)": new, "disk-flat.vmdk": new, "vm1.nvram": new}, \
        "the mount wrote the old key lines back"
    with mounted(env) as mnt:  # a fresh mount unwraps under the new KEK only
        assert read_at(os.path.join(mnt, "vm1", "disk-flat.vmdk"), 1 << 20, 65536) == b"\x66" * 65536
        assert read_at(os.path.join(mnt, "vm1", "vm1.nvram"), 0, 1024) == PATTERN + b"\x99" * 512


@pytest.mark.cli
@pytest.mark.fuse
def test_one_mount_per_datastore(venv_env):
    env = venv_env
    make_vm(env, encrypt=False)
    mnt1, mnt2 = os.path.join(env.base, "mnt1"), os.path.join(env.base, "mnt2")
    os.makedirs(mnt2)
    env.mounts.append(mnt2)  # unmounted at cleanup if a (wrongly) accepted second mount came up
    link = os.path.join(env.base, "ds-link")
    os.symlink(env.datastore, link)
    with mounted(env, mnt1):
        for ds in (env.datastore, link):  # the same datastore by another path
            proc = env.run("mount", ds, mnt2, check=False, timeout=90)
            assert_clean_error(proc, "already mounted", os.path.realpath(mnt1), code=11)
            assert not os.path.ismount(mnt2)
        with open(os.path.join(env.datastore, ".vmfs-crypt-mount.lock")) as f:
            holder = json.load(f)
        assert f"pid {holder['pid']}" in proc.stderr.decode()
        # A POSIX record lock (fcntl), which NFS carries between hosts, held by the mount process.
        st = os.stat(os.path.join(env.datastore, ".vmfs-crypt-mount.lock"))
        dev_ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as f:
            locks = [w for w in (line.split() for line in f) if len(w) > 5 and w[5] == dev_ino]
        assert any(w[1] == "POSIX" and w[3] == "WRITE" and w[4] == str(holder["pid"]) for w in locks), locks
        # Nested datastores share folders: a folder of the mounted datastore is not mounted on its own.
        proc = env.run("mount", os.path.join(env.datastore, "vm1"), mnt2, check=False, timeout=90)
        assert_clean_error(proc, "which holds it, is mounted", code=11)
    with mounted(env, mnt2, datastore=os.path.join(env.datastore, "vm1")):  # ...nor the other way round
        proc = env.run("mount", env.datastore, mnt1, check=False, timeout=90)
        assert_clean_error(proc, "inside it, is mounted", code=11)
    with mounted(env, mnt2):  # once unmounted, another mount may serve it
        pass


HOLD_LOCK = r"""
import fcntl, json, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.pwrite(fd, json.dumps(json.loads(sys.argv[2])).encode(), 0)
print("locked", flush=True)
sys.stdin.read()
"""


@pytest.mark.cli
@pytest.mark.qemu
def test_a_mount_this_host_cannot_see_into_refuses_deep_operations(venv_env):
    """Another NFS client's mount: its lock is all this host sees (here held by a helper process)."""
    env = venv_env
    plain = make_vm(env, "vm1", encrypt=False)
    enc = make_vm(env, "vm2")
    info = {"pid": 4242, "host": "elsewhere", "mountpoint": "/mnt/ds"}
    lock = subprocess.Popen([shutil.which("python3"), "-c", HOLD_LOCK, os.path.join(env.datastore,
                            ".vmfs-crypt-mount.lock"), json.dumps(info)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    try:
        assert lock.stdout.readline() == b"locked\n"
        before = hashes(env.datastore)
        for args in (["encrypt", plain], ["rekey", "--deep", enc], ["decrypt", enc]):
            assert_clean_error(env.run(*args, check=False), "on host elsewhere", "/mnt/ds", "unmount", code=11)
        assert hashes(env.datastore) == before
        env.run("rekey", enc)  # shallow: allowed
    finally:
        lock.stdin.close()
        lock.wait(timeout=10)
    env.run("encrypt", plain)


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_offline_operations_on_one_folder_exclude_each_other(venv_env):
    env = venv_env
    vm = make_vm(env, encrypt=False)
    big = os.path.join(vm, "vm1.vmem")
    with open(big, "wb") as f:
        for _ in range(256):
            f.write(PATTERN * 2048)  # 256 MiB without holes: the encrypt runs long enough to be caught
    first = subprocess.Popen(CLI + ["encrypt", vm], env=env.env, cwd=env.base, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        wait_for(lambda: any(n.startswith(".vmfs-crypt-tmp.") for n in os.listdir(vm)) or first.poll() is not None,
                 60, "the first encrypt to stage a file", interval_s=0.001)
        os.kill(first.pid, signal.SIGSTOP)
        assert first.poll() is None, "the first encrypt ended before it could be caught"
        staged = sorted(n for n in os.listdir(vm) if n.startswith(".vmfs-crypt-tmp."))
        assert staged
        proc = env.run("encrypt", vm, check=False)
        assert_clean_error(proc, "another vmfs-crypt operation", f"pid {first.pid} (", code=11)
        with mounted(env):  # a mount's recovery leaves the running operation's files alone
            assert set(staged) <= set(os.listdir(vm)), "the mount deleted the staged files of a running encrypt"
    finally:
        os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err.decode(errors="replace")
    assert stream_sha256(env, big) == hashlib.sha256(PATTERN * 2048 * 256).hexdigest()
    assert not [n for n in os.listdir(vm) if n.startswith(".vmfs-crypt-tmp.") or n.endswith("op.lock")]


# -- case 3: another user's directory or agent ----------------------------------------------
FAKE_AGENT = r"""
import base64, json, os, socket, sys
path, log = sys.argv[1], sys.argv[2]
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o777)
srv.listen(16)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    with open(log, "ab") as f:
        f.write(b"connection\n")
    rfile = conn.makefile("rb")
    for line in rfile:
        with open(log, "ab") as f:
            f.write(b"received " + line)
        op = json.loads(line).get("op")
        dek = base64.b64encode(b"\x41" * 64).decode()  # the attacker knows this DEK
        answer = {"ping": {"pid": os.getpid()}, "new_kek": {"provider": "local", "keyId": "a" * 32},
                  "new_file_key": {"keySafe": "x", "data": "y", "dek": dek}}.get(op)
        reply = dict(answer, ok=True) if answer is not None else {"ok": False, "error": "fake", "code": "agent"}
        conn.sendall(json.dumps(reply).encode() + b"\n")
    conn.close()
"""


class CliUser:
    """A user with a config, a native provider and a VM folder of its own; the CLI as that user."""

    def __init__(self, user) -> None:
        self.user = user
        self.cfg = user.mkdir(os.path.join(user.home, "cfg"))
        self.config = os.path.join(self.cfg, "config.toml")
        self.ds = user.mkdir(os.path.join(user.home, "ds"), 0o755)
        py, path = shared_python(CLI_REPO)
        self.py = py
        self.env = user.env(PYTHONPATH=path, VMFS_CRYPT_CONFIG=self.config)
        self.run("provider", "add", "native", "local", check=True)
        self.vm = user.mkdir(os.path.join(self.ds, "vm1"), 0o755)
        with open(os.path.join(self.vm, "vm1.nvram"), "wb") as f:
            f.write(NVRAM)
        user.own(self.vm)
        # `provider add` ran a private agent, which made the runtime directory: the attacks below
        # start from a host where the victim has none yet.
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    @property
    def runtime_dir(self) -> str:
        return f"/tmp/vmfs-crypt-{self.user.uid}"

    @property
    def socket(self) -> str:
        tag = hashlib.sha256(os.path.abspath(self.config).encode()).hexdigest()[:12]
        return os.path.join(self.runtime_dir, f"agent-{tag}.sock")

    def run(self, *args, check=False, timeout=60):
        return self.user.run([self.py, "-m", "vmfs_crypt.cli", *map(str, args)], env=self.env, check=check,
                             timeout=timeout)


def _timed(fn):
    start = time.monotonic()
    result = fn()
    return result, time.monotonic() - start


@pytest.fixture
def victim_and_attacker():
    with unix_user("victim") as victim_user, unix_user("attack") as attacker:
        if os.path.isdir(f"/run/user/{victim_user.uid}"):
            pytest.skip(f"/run/user/{victim_user.uid} exists: the victim's runtime directory is not under /tmp")
        victim = CliUser(victim_user)
        try:
            yield victim, attacker
        finally:
            attacker.kill_all()
            shutil.rmtree(victim.runtime_dir, ignore_errors=True)  # a fixed path: never leave it behind


@pytest.mark.cli
def test_a_runtime_dir_made_by_another_user_is_refused_quickly(victim_and_attacker):
    victim, attacker = victim_and_attacker
    attacker.run(["mkdir", "-m", "0777", victim.runtime_dir], check=True)
    before = hashes(victim.vm)
    for args in (["encrypt", victim.vm], ["cat", os.path.join(victim.vm, "vm1.nvram")],
                 ["create", os.path.join(victim.vm, "new.vmdk"), "--size", "1M"], ["agent", "start"]):
        proc, took = _timed(lambda: victim.run(*args, timeout=60))
        assert_clean_error(proc, victim.runtime_dir, f"uid {attacker.uid}", code=3)
        assert took < 10, f"{args[0]} took {took:.1f} s to refuse"
    assert hashes(victim.vm) == before
    assert not [n for n in os.listdir(victim.runtime_dir)], "the victim wrote into the attacker's directory"


@pytest.mark.cli
def test_a_fake_agent_of_another_user_receives_nothing(victim_and_attacker, tmp_path):
    victim, attacker = victim_and_attacker
    attacker.run(["mkdir", "-m", "0755", victim.runtime_dir], check=True)
    log = os.path.join(attacker.home, "fake-agent.log")
    fake = attacker.popen(["/usr/bin/python3", "-c", FAKE_AGENT, victim.socket, log], stdout=subprocess.PIPE)
    assert fake.stdout.readline() == b"listening\n"
    # And a victim whose configuration names a socket the attacker serves (the agent's own path check
    # does not apply there; the peer-credential check must).
    named = os.path.join(victim.user.home, "cfg", "named.toml")
    shutil.copy(victim.config, named)
    with open(named, "a") as f:
        f.write(f'\n[agent]\nsocket = "{victim.socket}"\n')
    victim.user.own(named)
    before = hashes(victim.vm)
    victim.user.mkdir(os.path.join(victim.user.home, "mnt"))
    outcomes = []
    for env_config in (victim.config, named):
        victim.env["VMFS_CRYPT_CONFIG"] = env_config
        for args in (["encrypt", victim.vm], ["cat", os.path.join(victim.vm, "vm1.nvram")], ["status"],
                     ["create", os.path.join(victim.vm, "new.vmdk"), "--size", "1M"],
                     ["mount", victim.ds, os.path.join(victim.user.home, "mnt"), "--agent", victim.socket]):
            outcomes.append((args, *_timed(lambda: victim.run(*args, timeout=60))))
    # A victim with a private runtime directory, pointing its mount at the attacker's socket: the
    # mount process itself must check who serves it.
    victim.env["VMFS_CRYPT_CONFIG"] = victim.config
    victim.env["XDG_RUNTIME_DIR"] = victim.user.mkdir(os.path.join(victim.user.home, "run"))
    args = ["mount", victim.ds, os.path.join(victim.user.home, "mnt"), "--agent", victim.socket]
    outcomes.append((args, *_timed(lambda: victim.run(*args, timeout=60))))
    received = open(log, "rb").read() if os.path.exists(log) else b""
    assert b"received" not in received, f"the fake agent got requests: {received[:800]!r}"
    assert f"uid {attacker.uid}".encode() in outcomes[-1][1].stderr, outcomes[-1][1].stderr
    assert hashes(victim.vm) == before
    for args, proc, took in outcomes:
        err = assert_clean_error(proc)
        assert victim.runtime_dir in err or f"uid {attacker.uid}" in err, err
        assert took < 10, f"{args[0]} took {took:.1f} s"


def test_the_unix_user_helper_creates_runs_as_and_removes():
    """tests/support/users.py, which other tests build on: a real user, programs as it, nothing left."""
    import pwd

    from support.users import processes_of
    with unix_user("probe") as user:
        name, uid, home = user.name, user.uid, user.home
        out = user.run(["id", "-u"], check=True).stdout.decode().split()
        assert out == [str(uid)] and uid != 0
        groups = user.run(["sh", "-c", "id -G"], check=True).stdout.decode().split()
        assert groups == [str(user.gid)], "supplementary groups leaked into the user's processes"
        assert os.stat(home).st_uid == uid and stat.S_IMODE(os.stat(home).st_mode) == 0o700
        py, path = shared_python()
        assert user.run([py, "-c", "import vmfs_crypt.cli"], env=user.env(PYTHONPATH=path)).returncode == 0
        sleeper = user.popen(["sleep", "600"])
        orphan = user.run(["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 < /dev/null & echo $!"], check=True)
        assert processes_of(uid), "no process of the user is running"
    assert sleeper.poll() is not None
    assert not os.path.exists(f"/proc/{int(orphan.stdout)}") or not _running(int(orphan.stdout))
    assert not processes_of(uid)
    with pytest.raises(KeyError):
        pwd.getpwnam(name)
    assert not os.path.exists(home)


@pytest.mark.cli
@pytest.mark.fuse
def test_a_mount_of_another_user_refuses_deep_operations_of_one_who_cannot_see_into_it(venv_env):
    """Fail closed: a user who cannot look into the mount process cannot know what it holds open."""
    with unix_user("owner") as owner:
        user = CliUser(owner)
        try:
            with mounted(venv_env, None, datastore=user.ds):  # root's mount, without allow_other
                before = hashes(user.vm)
                proc = user.run("encrypt", user.vm)
                assert_clean_error(proc, "whose open files you cannot see", code=11)
                assert hashes(user.vm) == before
            assert user.run("encrypt", user.vm).returncode == 0
        finally:
            shutil.rmtree(user.runtime_dir, ignore_errors=True)


# -- case 6: a folder whose key file is gone is damaged, not plain -----------------------------
DAMAGES = ("missing", "directory", "symlink", "fifo")


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_a_folder_without_its_key_file_is_damaged_not_plain(venv_env):
    env = venv_env
    env.run("agent", "start")
    ok = make_vm(env, "vm-ok")
    copies = {}
    for how in DAMAGES:
        vm = make_vm(env, f"vm-{how}")
        keys = os.path.join(vm, ".vmfs-crypt.json")
        copies[how] = open(keys, "rb").read()
        os.unlink(keys)
        if how == "directory":
            os.mkdir(keys)
        elif how == "symlink":
            with open(os.path.join(env.base, f"copy-{how}.json"), "wb") as f:
                f.write(copies[how])
            os.symlink(os.path.join(env.base, f"copy-{how}.json"), keys)
        elif how == "fifo":
            os.mkfifo(keys)
    before = hashes(env.datastore)
    with mounted(env) as mnt:
        with open(os.path.join(mnt, "vm-ok", "vm-ok.nvram"), "rb") as f:
            assert f.read() == NVRAM
        for how in DAMAGES:
            folder = os.path.join(mnt, f"vm-{how}")
            for name in ("disk-flat.vmdk", f"vm-{how}.nvram"):
                with pytest.raises(OSError) as exc:
                    with open(os.path.join(folder, name), "rb") as f:
                        f.read(512)
                assert exc.value.errno == 5, (how, name, exc.value)
            with pytest.raises(OSError) as exc:  # a new file would land in clear: refused
                with open(os.path.join(folder, "new.nvram"), "wb") as f:
                    f.write(PATTERN)
            assert exc.value.errno == 5
            with open(os.path.join(folder, "vmware.log"), "rb") as f:  # plaintext kinds stay readable
                assert f.read() == b"booted\n"
        logs = env.mount_logs()
    for how in DAMAGES:
        assert f"vm-{how}" in logs and "restore" in logs, logs[-3000:]
    assert hashes(env.datastore) == before, "the mount changed a damaged folder"
    for how in DAMAGES:
        vm = os.path.join(env.datastore, f"vm-{how}")
        assert_clean_error(env.run("cat", os.path.join(vm, "disk-flat.vmdk"), check=False), "restore", code=9)
        info = json.loads(env.run("info", "--json", vm, check=False).stdout)
        assert info["state"] == "damaged" and not info["encrypted"] and "restore" in info["damage"]
        if how in ("missing", "fifo"):
            proc = env.run("info", vm, check=False)
            assert "DAMAGED" in proc.stdout.decode() and "restore" in proc.stdout.decode()
            assert_clean_error(proc, "damaged", "restore", code=9)
            assert_clean_error(env.run("encrypt", vm, check=False), "restore", code=9)
            assert_clean_error(env.run("create", os.path.join(vm, "new.vmdk"), "--size", "1M", check=False),
                               "restore", code=9)
    assert hashes(env.datastore) == before, "an offline command changed a damaged folder"
    # The repair the messages name: put the key file back.
    vm = os.path.join(env.datastore, "vm-missing")
    with open(os.path.join(vm, ".vmfs-crypt.json"), "wb") as f:
        f.write(copies["missing"])
    assert env.run("cat", os.path.join(vm, "vm-missing.nvram")).stdout == NVRAM
    del ok


# -- case 7: a journal may only do what vmfs-crypt writes ---------------------------------------
def _journal(renames, keys):
    return json.dumps({"version": 1, "renames": renames, "keys": keys}).encode()


def crafted_journals(vm: str) -> dict[str, tuple[bytes, dict[str, bytes]]]:
    """name -> (journal bytes, temporary files to put beside it), for the encrypted folder `vm`."""
    keys = open(os.path.join(vm, ".vmfs-crypt.json"), "rb").read().decode()
    doc = json.loads(keys)
    desc = open(os.path.join(vm, "disk.vmdk"), "rb").read()
    plain_desc = b"".join(line for line in desc.splitlines(keepends=True) if not line.startswith(b"encryption."))
    lines = dict(line.split(b" = ", 1) for line in desc.splitlines() if line.startswith(b"encryption."))
    other = {"keySafe": lines[b"encryption.keySafe"].strip(b'"').decode(),
             "data": lines[b"encryption.data"].strip(b'"').decode()}  # a valid record, of another file
    swapped = dict(doc, files={n: other for n in doc["files"]})
    dropped = dict(doc, files={})
    name = os.path.basename(vm)
    return {
        "keys-null": (_journal([], None), {}),
        "over-key-file": (_journal([[".vmfs-crypt-tmp..vmfs-crypt.json", ".vmfs-crypt.json"]], keys),
                          {".vmfs-crypt-tmp..vmfs-crypt.json": b"{}"}),
        "over-keyed-descriptor": (_journal([[".vmfs-crypt-tmp.disk.vmdk", "disk.vmdk"]], keys),
                                  {".vmfs-crypt-tmp.disk.vmdk": plain_desc}),
        "to-hidden-name": (_journal([[".vmfs-crypt-tmp...vmfs-crypt-x", "..vmfs-crypt-x"]], keys),
                           {".vmfs-crypt-tmp...vmfs-crypt-x": b"x"}),
        "out-of-folder": (_journal([[".vmfs-crypt-tmp.x", "../vm-ok/disk-flat.vmdk"]], keys),
                          {".vmfs-crypt-tmp.x": b"x"}),
        "other-tmp-name": (_journal([[".vmfs-crypt-tmp.zz", f"{name}.nvram"]], keys),
                           {".vmfs-crypt-tmp.zz": b"z" * 512}),
        "over-plaintext-kind": (_journal([[".vmfs-crypt-tmp.vmware.log", "vmware.log"]], keys),
                                {".vmfs-crypt-tmp.vmware.log": b"forged\n"}),
        "drops-keys": (_journal([], json.dumps(dropped, indent=1, sort_keys=True) + "\n"), {}),
        "swaps-records": (_journal([], json.dumps(swapped, indent=1, sort_keys=True) + "\n"), {}),
        "nested": (NESTED, {}),
        "unknown-member": (json.dumps({"version": 1, "renames": [], "keys": keys, "x": 1}).encode(), {}),
    }


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_crafted_journals_leave_their_folders_alone_and_the_rest_mounts(venv_env):
    env = venv_env
    env.run("agent", "start")
    make_vm(env, "vm-ok")
    template = make_vm(env, "vm-template")
    names = list(crafted_journals(template))
    for kind in names:
        shutil.copytree(template, os.path.join(env.datastore, f"vm-{kind}"), symlinks=True)
        vm = os.path.join(env.datastore, f"vm-{kind}")
        os.rename(os.path.join(vm, "vm-template.nvram"), os.path.join(vm, f"vm-{kind}.nvram"))
        doc = json.loads(open(os.path.join(vm, ".vmfs-crypt.json"), "rb").read())
        doc["files"] = {f"vm-{kind}.nvram": doc["files"]["vm-template.nvram"]}
        with open(os.path.join(vm, ".vmfs-crypt.json"), "w") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        journal, tmps = crafted_journals(vm)[kind]
        for tmp, data in tmps.items():
            with open(os.path.join(vm, tmp), "wb") as f:
                f.write(data)
        with open(os.path.join(vm, ".vmfs-crypt-journal.json"), "wb") as f:
            f.write(journal)
    shutil.rmtree(template)
    before = hashes(env.datastore)
    with mounted(env) as mnt:  # one bad journal must not stop the datastore
        with open(os.path.join(mnt, "vm-ok", "vm-ok.nvram"), "r+b") as f:
            assert f.read() == NVRAM
            f.seek(0)
            f.write(b"\x11" * 512)
        for kind in names:
            with pytest.raises(OSError) as exc:
                with open(os.path.join(mnt, f"vm-{kind}", "disk-flat.vmdk"), "rb") as f:
                    f.read(512)
            assert exc.value.errno == 5, kind
        logs = env.mount_logs()
    after = hashes(env.datastore)
    for path, digest in before.items():
        if not path.startswith("vm-ok/"):
            assert after.get(path) == digest, f"{path} changed: a crafted journal was applied"
    assert set(after) - set(before) <= {"vm-ok/.vmfs-crypt.json"}
    proc = env.run("info", "--json", env.datastore, check=False)
    assert proc.returncode == 6, proc.stderr
    states = {os.path.basename(f["folder"]): f for f in json.loads(proc.stdout)["folders"]}
    assert states["vm-ok"]["state"] == "encrypted"
    for kind in names:
        assert f"vm-{kind}" in logs, f"the mount log does not name vm-{kind}"
        folder = states[f"vm-{kind}"]
        assert folder["state"] == "damaged" and ".vmfs-crypt-journal.json" in folder["damage"], (kind, folder)
    for kind in ("keys-null", "over-keyed-descriptor", "nested"):
        vm = os.path.join(env.datastore, f"vm-{kind}")
        assert_clean_error(env.run("encrypt", vm, check=False), ".vmfs-crypt-journal.json", code=6)
    assert hashes(env.datastore) == after


# -- case 11: info on a path inside a mount -----------------------------------------------------
@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_info_inside_the_mount_tells_the_truth(venv_env):
    env = venv_env
    vm = make_vm(env)
    at_rest = info_json(env, vm)
    with mounted(env) as mnt:
        inside = os.path.join(mnt, "vm1")
        text = env.run("info", inside).stdout.decode()
        assert f"{inside}: encrypted" in text and f"at rest {vm}" in text, text
        assert "disk-flat.vmdk" in text and "plaintext" not in text.split("disk-flat.vmdk")[1].split("\n")[0]
        got = info_json(env, inside)
        assert got["encrypted"] and got["kek"] == at_rest["kek"] and got["backing_path"] == vm
        assert got["files"] == at_rest["files"]
        disk = info_json(env, os.path.join(inside, "disk.vmdk"))
        assert disk["disk"]["kek"] == at_rest["kek"]
        assert {f["name"]: (f["role"], f["key_in"]) for f in disk["files"]} == \
            {"disk.vmdk": ("descriptor", None), "disk-flat.vmdk": ("encrypted", "disk.vmdk")}
        nvram = info_json(env, os.path.join(inside, "vm1.nvram"))
        assert [(f["role"], f["key_in"]) for f in nvram["files"]] == [("encrypted", ".vmfs-crypt.json")]
        text = env.run("info", os.path.join(inside, "vm1.nvram")).stdout.decode()
        assert "encrypted" in text and ".vmfs-crypt.json" in text
        root = info_json(env, mnt)
        assert [f["state"] for f in root["folders"]] == ["encrypted"]


# -- case 13: nested JSON, FIFOs, agent races, cat's extent rule ----------------------------------
@pytest.mark.cli
@pytest.mark.qemu
@pytest.mark.parametrize("where", ["native key file", "folder key file", "backup file", "journal",
                                   "encryption.data", pytest.param("mount lock file", marks=pytest.mark.fuse)])
def test_deeply_nested_json_is_a_one_line_format_error(venv_env, where):
    env = venv_env
    vm = make_vm(env)
    key_file = os.path.join(os.path.dirname(env.config), "native-local.key")
    nvram = os.path.join(vm, "vm1.nvram")
    if where == "native key file":
        with open(key_file, "wb") as f:
            f.write(NESTED)
        checks = [("cat", nvram), ("rekey", vm)]
    elif where == "folder key file":
        with open(os.path.join(vm, ".vmfs-crypt.json"), "wb") as f:
            f.write(NESTED)
        checks = [("cat", nvram), ("info", vm), ("info", "--json", vm), ("encrypt", vm)]
    elif where == "backup file":
        backup = os.path.join(env.base, "backup.json")
        with open(backup, "wb") as f:
            f.write(NESTED)
        checks = [("provider", "restore", "other", backup)]
    elif where == "journal":
        with open(os.path.join(vm, ".vmfs-crypt-journal.json"), "wb") as f:
            f.write(NESTED)
        checks = [("info", vm), ("encrypt", vm), ("decrypt", vm)]
    elif where == "encryption.data":
        desc = open(os.path.join(vm, "disk.vmdk"), "rb").read()
        lines = [b'encryption.data = "' + base64.b64encode(NESTED) + b'"' if line.startswith(b"encryption.data")
                 else line for line in desc.split(b"\n")]
        with open(os.path.join(vm, "disk.vmdk"), "wb") as f:
            f.write(b"\n".join(lines))
        checks = [("cat", os.path.join(vm, "disk-flat.vmdk")), ("info", vm)]
    else:  # written into the lock file of a running mount, which commands read to find the mount
        with mounted(env) as mnt:
            with open(os.path.join(env.datastore, ".vmfs-crypt-mount.lock"), "wb") as f:
                f.write(NESTED)
            proc = env.run("info", os.path.join(mnt, "vm1"), check=False)
            assert proc.returncode == 0 and "Traceback" not in proc.stderr.decode(), proc.stderr.decode()
            # The mount process cannot be identified from the file any more: fail closed.
            proc = env.run("rekey", "--deep", vm, check=False)
            assert_clean_error(proc, "a process you cannot identify", code=11)
        return
    for args in checks:
        proc, took = _timed(lambda: env.run(*args, input=b"a good passphrase\n", check=False, timeout=60))
        assert_clean_error(proc, "nested too deeply", code=6)
        assert took < 20
    if where == "native key file":  # the agent lives on and says which provider is broken
        out = env.run("agent", "start").stdout.decode()
        status = env.run("status").stdout.decode()
        assert "BROKEN" in status and "nested too deeply" in status, (out, status)


@pytest.mark.cli
def test_a_fifo_key_file_is_a_clear_error_within_seconds(venv_env):
    env = venv_env
    os.makedirs(os.path.join(env.datastore, "vm1"))
    env.run("create", os.path.join(env.datastore, "vm1", "disk.vmdk"), "--size", "1M")
    key_file = os.path.join(os.path.dirname(env.config), "native-local.key")
    os.rename(key_file, key_file + ".real")
    os.mkfifo(key_file, 0o600)
    backup = os.path.join(env.base, "backup.fifo")
    os.mkfifo(backup, 0o600)
    for args, needle in ((["cat", os.path.join(env.datastore, "vm1", "disk-flat.vmdk")], "not a regular file"),
                         (["create", os.path.join(env.datastore, "vm1", "d2.vmdk"), "--size", "1M"],
                          "not a regular file"),
                         (["provider", "restore", "other", backup], "not a regular file")):
        proc, took = _timed(lambda: env.run(*args, input=b"a good passphrase\n", check=False, timeout=60))
        assert_clean_error(proc, needle)
        assert took < 5, f"{args[0]} took {took:.1f} s"


def _agents_of(env) -> list[int]:
    """Agent processes of this test's environment (by their socket in its runtime directory)."""
    out = []
    for pid in (int(n) for n in os.listdir("/proc") if n.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"vmfs_crypt.agent" in cmd and (env.runtime.encode() in cmd or env.config.encode() in cmd):
            out.append(pid)
    return out


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's parent here may not reap it at once)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.cli
@pytest.mark.qemu
def test_parallel_commands_without_an_agent_all_work_and_leave_none(venv_env):
    env = venv_env
    vm = make_vm(env)
    nvram = os.path.join(vm, "vm1.nvram")
    procs = [subprocess.Popen(CLI + ["cat", nvram], env=env.env, cwd=env.base, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0 and out == NVRAM, err.decode(errors="replace")
    wait_for(lambda: not _agents_of(env), 10, "the commands' agents to exit")


@pytest.mark.cli
@pytest.mark.qemu
def test_a_killed_command_leaves_no_agent(venv_env):
    env = venv_env
    vm = make_vm(env, encrypt=False)
    with open(os.path.join(vm, "vm1.vmem"), "wb") as f:
        f.write(PATTERN * 2048 * 8)  # 8 MiB: more than a pipe holds
    env.run("encrypt", vm)
    wait_for(lambda: not _agents_of(env), 10, "the encrypt's agent to exit")
    r, w = os.pipe()
    proc = subprocess.Popen(CLI + ["cat", os.path.join(vm, "vm1.vmem")], env=env.env, cwd=env.base, stdout=w,
                            stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        agents = wait_for(lambda: _agents_of(env), 30, "the command's agent")
        wait_for(lambda: select.select([r], [], [], 0)[0], 30, "cat to write")  # it holds DEKs now
        proc.kill()
        proc.wait()
    finally:
        os.close(r)
    wait_for(lambda: not any(_running(pid) for pid in agents), 10, "the killed command's agent to exit")


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
@pytest.mark.parametrize("change", ["truncated", "oversized"])
def test_cat_applies_the_mounts_extent_length_rule(venv_env, change):
    env = venv_env
    vm = make_vm(env)
    flat = os.path.join(vm, "disk-flat.vmdk")
    size = os.path.getsize(flat)
    with open(flat, "r+b") as f:
        if change == "truncated":
            f.truncate(size - 4096)
        else:
            f.seek(size)
            f.write(PATTERN * 8)
    proc = env.run("cat", flat, check=False)
    with mounted(env) as mnt:
        try:
            with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
                through_mount = f.read()
        except OSError as exc:
            through_mount = exc
    if isinstance(through_mount, OSError):
        assert through_mount.errno == 5
        assert_clean_error(proc, "truncated", code=9)
    else:
        assert proc.returncode == 0 and proc.stdout == through_mount
    assert (change == "truncated") == isinstance(through_mount, OSError)



# -- the stricter journal rules still finish every journal vmfs-crypt writes ----------------------
@pytest.mark.parametrize("op", ["encrypt", "decrypt", "rekey", "deep rekey", "create"])
def test_a_commit_interrupted_while_applying_is_finished_by_recovery(tmp_path, monkeypatch, op):
    """A crash (here: a failing rename) in the middle of applying a journal that vmfs-crypt wrote:
    the staged files stay, and recovery accepts the half-applied journal and finishes it."""
    import contextlib
    import types

    from support import GOLDEN, VmfsEnv
    from vmfs_crypt.agent.broker import InProcessKeys
    from vmfs_crypt.agent.service import KeyService
    from vmfs_crypt.config import load_config
    from vmfs_crypt.format.folder import JOURNAL_NAME, VmFolder
    from vmfs_crypt.format.journal import recover
    from vmfs_crypt.ops import lifecycle

    env = VmfsEnv.golden(str(tmp_path))
    keys = InProcessKeys(KeyService(load_config(env.config)))
    vm = os.path.join(env.datastore, "vm1")
    with open(os.path.join(GOLDEN, "manifest.json")) as f:
        expected = {rel[4:]: e["sha256"] for rel, e in json.load(f)["files"].items() if rel.startswith("vm1/")}

    @contextlib.contextmanager
    def progress(total, label):
        yield types.SimpleNamespace(update=lambda n: None)

    run = {
        "encrypt": lambda: lifecycle.encrypt_folder(vm, keys, None, progress),
        "decrypt": lambda: lifecycle.decrypt_folder(vm, keys, progress),
        "rekey": lambda: lifecycle.rekey_folder(vm, keys, None, False, progress),
        "deep rekey": lambda: lifecycle.rekey_folder(vm, keys, None, True, progress),
        "create": lambda: lifecycle.create_disk(os.path.join(vm, "new.vmdk"), 1 << 20, keys),
    }[op]
    if op == "encrypt":
        lifecycle.decrypt_folder(vm, keys, progress)
    renames = []
    real_replace = os.replace

    def failing_replace(src, dst, *a, **kw):
        renames.append(dst)
        if len(renames) == 2:
            raise OSError(5, "Input/output error (simulated)", dst)
        return real_replace(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        run()
    monkeypatch.undo()
    assert os.path.exists(os.path.join(vm, JOURNAL_NAME)), "the journal was not written before the renames"
    staged = [n for n in os.listdir(vm) if n.startswith(".vmfs-crypt-tmp.")]
    assert staged, "the staged files of a committed journal were deleted"
    assert recover(VmFolder(vm)) is not None
    assert not os.path.exists(os.path.join(vm, JOURNAL_NAME))
    assert not [n for n in os.listdir(vm) if n.startswith(".vmfs-crypt")and n != ".vmfs-crypt.json"]
    if op in ("decrypt", "deep rekey"):
        # The journal interrupted was the start of the in-place rewrite (FORMAT.md 7.8): recovery
        # finished it, and the next run of the command resumes the rewrite itself.
        assert run().note == "resumed"
    for name, digest in expected.items():
        h = hashlib.sha256()
        lifecycle.cat_file(os.path.join(vm, name), keys, h.update)
        assert h.hexdigest() == digest, f"{name} after {op}"
    if op == "create":
        h = hashlib.sha256()
        lifecycle.cat_file(os.path.join(vm, "new-flat.vmdk"), keys, h.update)
        assert h.hexdigest() == hashlib.sha256(bytes(1 << 20)).hexdigest()
