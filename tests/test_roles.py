"""Roles and the audit log (issue 11), with real Unix users made here: a vm-operator runs QEMU on a disk of a
configured mount and gets no key; a cryptographer may cat, back up, rekey and decrypt; every attempt is in the
audit log with the principal the kernel reported, and no key byte is in it."""

import base64
import functools
import grp
import json
import os
import pwd
import shutil
import site
import socket
import stat
import subprocess
import sys
import tempfile
import threading

import pytest

from support import VmfsEnv, is_mounted
from support.env import CLI_REPO

from vmfs_crypt.agent.audit import AuditLog, parse_since, read_records
from vmfs_crypt.agent.authz import KEY_OPS, Access, Principal
from vmfs_crypt.config import PRIVILEGES, load_config
from vmfs_crypt.errors import AgentError, ConfigError, PermissionDeniedError, UsageError
from vmfs_crypt.format.folder import VmFolder
from vmfs_crypt.format.keysafe import KeyRecord
from vmfs_crypt.providers.native import NativeKeyProvider, derive_kek

TAG = f"{os.getpid() % 100000}"
OP, CRYPT, GROUP = f"vcrop{TAG}", f"vcrcr{TAG}", f"vcrvm{TAG}"
PASSPHRASE = b"correct horse battery staple"
PATTERN = bytes(range(256)) * 33 + b"nvram tail"  # not a multiple of 512
PERMISSION = 12
ALL_PRIVILEGES = ["mount", "cat", "encrypt", "decrypt", "rekey", "manage-providers", "unlock", "policy",
                  "operate-mounts"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: makes Unix users and starts a root agent")


# -- users and running commands as them -----------------------------------------------------------------------
def _run(cmd, **kw):
    return subprocess.run(cmd, capture_output=True, check=True, **kw)


@pytest.fixture(scope="module")
def users():
    """Two real users made for this module and removed after it: OP and CRYPT, both in GROUP."""
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "setpriv"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool}")
    if os.geteuid() != 0:
        pytest.skip("needs root: makes Unix users")
    _run(["groupadd", GROUP])
    made = []
    try:
        for name in (OP, CRYPT):
            _run(["useradd", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", "-G", GROUP, name])
            made.append(name)
        yield {name: pwd.getpwnam(name) for name in made}
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)
        subprocess.run(["groupdel", GROUP], capture_output=True)


@functools.lru_cache(maxsize=1)
def _python_for_users() -> tuple[str, str]:
    """(interpreter, PYTHONPATH) that another user can run vmfs_crypt with.

    The venv's interpreter may live where other users cannot go (pyenv under a 0700 /root): then
    a system python of the same version runs this checkout with the venv's packages.
    """
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(f"python{here}", path="/usr/bin:/bin") or f"/usr/bin/python{here}"
    # the checkout under test (VMFS_TEST_REPO, to run these tests against an older commit), as VmfsEnv does
    candidates = [(sys.executable, CLI_REPO), (system, os.pathsep.join([CLI_REPO] + site.getsitepackages()))]
    for python, path in candidates:
        if not os.path.exists(python):
            continue
        # Its own standard library, not one found by accident (a pyenv python that cannot reach its
        # prefix falls back to /usr/lib/pythonX.Y).
        stdlib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('stdlib'))"],
                                capture_output=True, text=True).stdout.strip()
        probe = (f"import os, vmfs_crypt.cli, cryptography, click, mfusepy; "
                 f"assert os.__file__.startswith({stdlib!r} + '/'), os.__file__")
        proc = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", python, "-c", probe],
                              env={"PATH": os.environ["PATH"], "PYTHONPATH": path, "PYTHONNOUSERSITE": "1"},
                              capture_output=True, cwd="/")
        if proc.returncode == 0:
            return python, path
    pytest.skip("no Python interpreter that other users may run has vmfs_crypt's packages (the venv's lives under "
                "a private directory); make the venv from a system python3")


class Site:
    """A root agent with roles, a datastore the users' group may use, and the users' own directories."""

    def __init__(self, base: str, users: dict) -> None:
        self.base = base
        self.users = users
        self.etc = os.path.join(base, "etc")  # the agent's configuration, key file and audit log (root, 0700)
        self.run_dir = os.path.join(base, "run")  # the agent's socket: reachable by everyone
        self.ds = os.path.join(base, "ds")
        self.mnt = os.path.join(base, "mnt")
        for d in (self.etc, self.run_dir, self.ds, self.mnt):
            os.makedirs(d)
        os.chmod(base, 0o755)
        os.chmod(self.etc, 0o700)
        os.chmod(self.run_dir, 0o755)
        os.chmod(self.mnt, 0o755)
        self.config = os.path.join(self.etc, "config.toml")
        self.socket = os.path.join(self.run_dir, "agent.sock")
        self.audit = os.path.join(self.etc, "audit.log")
        self.key_file = os.path.join(self.etc, "native-local.key")
        self.syslog_path = os.path.join(self.run_dir, "log.sock")
        self.root = VmfsEnv(base, self.config, self.ds)
        self.pointer = os.path.join(base, "client.toml")  # what users' CLIs read: only where the agent is
        with open(self.pointer, "w") as f:
            f.write(f'version = 1\n[agent]\nsocket = "{self.socket}"\n')
        os.chmod(self.pointer, 0o644)
        self.python, self.pythonpath = _python_for_users()
        self.homes = {}
        for name, pw in users.items():
            home = os.path.join(base, f"home-{name}")
            os.makedirs(home)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            os.chmod(home, 0o700)
            self.homes[name] = home
        self.syslog = SyslogListener(self.syslog_path)

    def write_roles(self) -> None:
        with open(self.config, "a") as f:
            f.write(f'''
[agent]
socket = "{self.socket}"

[audit]
path = "{self.audit}"
syslog = "{self.syslog_path}"

[roles.vm-operator]
groups = ["{GROUP}"]

[roles.cryptographer]
users = ["{CRYPT}"]
privileges = {json.dumps(ALL_PRIVILEGES)}

[mounts.vmstore]
datastore = "{self.ds}"
mountpoint = "{self.mnt}"
allow_other = true
''')

    def share_datastore(self) -> None:
        """GROUP may read and write every folder and file of the datastore (what QEMU needs through the mount)."""
        gid = grp.getgrnam(GROUP).gr_gid
        for dirpath, dirs, files in os.walk(self.ds):
            os.chown(dirpath, 0, gid)
            os.chmod(dirpath, 0o2770)
            for name in files:
                path = os.path.join(dirpath, name)
                os.chown(path, 0, gid)
                os.chmod(path, 0o660)

    def env_for(self, name: str) -> dict:
        return {"PATH": os.environ["PATH"], "HOME": self.homes[name], "VMFS_CRYPT_CONFIG": self.pointer,
                "XDG_RUNTIME_DIR": self.homes[name], "PYTHONPATH": self.pythonpath, "PYTHONNOUSERSITE": "1",
                "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}

    def as_user(self, name: str, *cmd, input: bytes | None = None, timeout: float = 120) -> "Attempt":
        """Run `cmd` as user `name` (setpriv execs it: the pid we see is the pid the agent sees)."""
        pw = self.users[name]
        argv = ["setpriv", f"--reuid={name}", f"--regid={pw.pw_gid}", "--init-groups", "--", *map(str, cmd)]
        proc = subprocess.Popen(argv, env=self.env_for(name), cwd=self.homes[name], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(input, timeout=timeout)
        return Attempt(name, pw.pw_uid, proc.pid, proc.returncode, out, err.decode(errors="replace"))

    def cli(self, name: str, *args, input: bytes | None = None) -> "Attempt":
        return self.as_user(name, self.python, "-m", "vmfs_crypt.cli", *args, input=input)

    def records(self) -> list[dict]:
        out = []
        for path in sorted(p for p in os.listdir(self.etc) if p.startswith("audit.log") and not p.endswith(".lock")):
            with open(os.path.join(self.etc, path), "rb") as f:
                out += [json.loads(line) for line in f]
        return out

    def close(self) -> None:
        if is_mounted(self.mnt):
            subprocess.run(["fusermount", "-uz", self.mnt], capture_output=True)
        self.root.cleanup()
        self.syslog.close()


class Attempt:
    def __init__(self, user, uid, pid, rc, out, err):
        self.user, self.uid, self.pid, self.rc, self.out, self.err = user, uid, pid, rc, out, err

    def __repr__(self):
        return f"<{self.user} pid {self.pid} rc {self.rc}: {self.err.strip()}>"


class SyslogListener:
    """A real syslog socket (AF_UNIX datagrams, as /dev/log): collects what the agent sends."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[bytes] = []
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(65536))
            except OSError:
                return

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


@pytest.fixture
def site_(users):
    base = tempfile.mkdtemp(prefix="vcr-roles-", dir="/tmp")
    s = Site(base, users)
    try:
        s.root.run("provider", "add", "native", "local")
        s.write_roles()
        s.root.run("agent", "start")
        vm1 = os.path.join(s.ds, "vm1")
        os.makedirs(vm1)
        s.root.run("create", os.path.join(vm1, "disk.vmdk"), "--size", "1M")
        vm2 = os.path.join(s.ds, "vm2")
        os.makedirs(vm2)
        with open(os.path.join(vm2, "vm2.nvram"), "wb") as f:
            f.write(PATTERN)
        s.root.run("encrypt", vm2)
        s.share_datastore()
        yield s
    finally:
        s.close()
        shutil.rmtree(base, ignore_errors=True)


# -- what the audit log must say --------------------------------------------------------------------------------
def records_of(site: Site, attempt: Attempt, program: str = "-m vmfs_crypt.cli") -> list[dict]:
    """The audit records of one attempt: those whose principal is the attempt's process (kernel pid and uid)."""
    recs = [r for r in site.records() if r.get("principal", {}).get("pid") == attempt.pid]
    for r in recs:
        who = r["principal"]
        assert who["uid"] == attempt.uid and who["user"] == attempt.user, r
        assert program in who["cmdline"], r
    return recs


def assert_refused(site: Site, attempt: Attempt, privilege: str, word: str) -> None:
    assert attempt.rc == PERMISSION, attempt
    lines = [line for line in attempt.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in attempt.err, attempt
    assert f"'{privilege}'" in lines[0] and attempt.user in lines[0], attempt
    recs = records_of(site, attempt)
    refused = [r for r in recs if r["result"] == "refused"]
    assert len(refused) == 1 and refused[0]["privilege"] == privilege, recs
    assert word in refused[0]["principal"]["cmdline"], refused[0]
    assert all(r["result"] == "refused" for r in recs), recs  # nothing else happened for this process


def key_material(site: Site, records: list[KeyRecord]) -> list[bytes]:
    """Every secret the audit log must not hold: the primary key, every KEK named anywhere, every DEK we saw."""
    with open(site.key_file) as f:
        primary = base64.b64decode(json.load(f)["key"])
    secrets_ = [primary, PASSPHRASE]
    key_ids = {r["key_id"] for r in site.records() if r.get("key_id")}
    key_ids |= {r.get("to_key_id") for r in site.records() if r.get("to_key_id")}
    key_ids |= {rec.keysafe.kek.key_id for rec in records}
    for key_id in key_ids:
        secrets_.append(derive_kek(primary, key_id))
    for rec in records:
        secrets_.append(rec.open(derive_kek(primary, rec.keysafe.kek.key_id), "test"))
    return secrets_


def spellings(secret: bytes) -> list[bytes]:
    """The secret raw, in hex, and in base64 (standard and URL-safe) at each of the three byte alignments."""
    out = [secret, secret.hex().encode(), secret.hex().upper().encode()]
    for shift in range(3):
        for enc in (base64.b64encode, base64.urlsafe_b64encode):
            text = enc(b"\0" * shift + secret)
            out.append(text[4 * ((shift + 2) // 3) if shift else 0:][:len(secret) * 4 // 3 - 4])
    return [s for s in out if len(s) >= 16]


def assert_no_key_bytes(site: Site, records: list[KeyRecord]) -> int:
    blobs = [open(os.path.join(site.etc, n), "rb").read() for n in os.listdir(site.etc) if n.startswith("audit.log")]
    blobs += site.syslog.messages
    secrets_ = key_material(site, records)
    for secret in secrets_:
        for spelling in spellings(secret):
            for blob in blobs:
                assert spelling not in blob, f"a key ({len(secret)} bytes) is in the audit log"
    return len(secrets_)


def folder_records(site: Site, folder: str) -> list[KeyRecord]:
    """Every key record of a folder now (its key file and its descriptors)."""
    vm = VmFolder(os.path.join(site.ds, folder))
    if not vm.encrypted:
        return []
    out = list(vm.load_keys().files.values())
    for name in sorted(os.listdir(vm.backing_dir)):
        found = vm.descriptor_record_for(name)
        if found:
            out.append(found[1])
    return out


# -- the tests ---------------------------------------------------------------------------------------------------

@needs_root
@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.qemu
def test_vm_operator_runs_qemu_in_a_configured_mount_and_is_refused_every_key_operation(site_):
    s = site_
    assert stat.S_IMODE(os.stat(s.socket).st_mode) == 0o666  # with roles: reachable, each request authorised
    disk = os.path.join(s.mnt, "vm1", "disk.vmdk")

    # the vm-operator starts the configured mount (the agent runs it, as root, with allow_other) ...
    start = s.cli(OP, "mount", "--name", "vmstore")
    assert start.rc == 0, start
    assert is_mounted(s.mnt)
    # ... and runs QEMU on the disk through it, reaching the plaintext by the group's file permissions
    io = s.as_user(OP, "qemu-io", "-t", "none", "-f", "vmdk", "-c", "write -P 0x5a 0 64k",
                   "-c", "read -P 0x5a 0 64k", "-c", "read -P 0 64k 64k", disk)
    assert io.rc == 0 and b"read 65536/65536 bytes" in io.out and b"Pattern verification failed" not in io.out, io
    # again: the descriptor QEMU rewrote through the mount (a new CID) is still the group's to open
    again = s.as_user(OP, "qemu-io", "-t", "none", "-f", "vmdk", "-c", "read -P 0x5a 0 64k", disk)
    assert again.rc == 0 and b"read 65536/65536 bytes" in again.out, again
    # a user outside the group gets nothing from the mount
    nobody = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "head", "-c1",
                             os.path.join(s.mnt, "vm1", "disk-flat.vmdk")], capture_output=True)
    assert nobody.returncode != 0 and b"Permission denied" in nobody.stderr

    # every key operation is refused, naming the privilege, exit 12
    backing = os.path.join(s.ds, "vm1")
    cat = s.cli(OP, "cat", os.path.join(backing, "disk-flat.vmdk"))
    assert_refused(s, cat, "cat", "cat")
    assert cat.out == b""
    decrypt = s.cli(OP, "decrypt", backing)
    assert_refused(s, decrypt, "decrypt", "decrypt")
    rekey = s.cli(OP, "rekey", backing)
    assert_refused(s, rekey, "rekey", "rekey")
    backup_file = os.path.join(s.homes[OP], "stolen.backup")
    backup = s.cli(OP, "provider", "backup", "local", backup_file, input=PASSPHRASE + b"\n")
    assert_refused(s, backup, "manage-providers", "backup")
    assert not os.path.exists(backup_file)
    assert VmFolder(backing).encrypted  # nothing was changed

    stop = s.cli(OP, "umount", "--name", "vmstore")
    assert stop.rc == 0, stop
    assert not is_mounted(s.mnt)

    # the audit log: the operator's mount start and stop, the mount's own key requests (as root), the refusals
    recs = s.records()
    for attempt, event in ((start, "mount_start"), (stop, "mount_stop")):
        mine = records_of(s, attempt)
        assert [(r["event"], r["result"], r["privilege"]) for r in mine] == [(event, "ok", "operate-mounts")], mine
        assert mine[0]["mountpoint"] == s.mnt and mine[0]["name"] == "vmstore"
    unwraps = [r for r in recs if r["event"] == "unwrap" and r["result"] == "ok"]
    assert unwraps and all(r["purpose"] == "mount" and r["principal"]["uid"] == 0 for r in unwraps), unwraps
    assert any(r["file"].endswith("vm1/disk-flat.vmdk") for r in unwraps), unwraps
    assert not [r for r in recs if r["result"] == "ok" and r["principal"]["uid"] != 0
                and r["event"] not in ("mount_start", "mount_stop")], "the operator did something with keys"
    checked = assert_no_key_bytes(s, folder_records(s, "vm1") + folder_records(s, "vm2"))
    assert checked >= 5
    # the same records went to syslog
    assert any(f'"pid":{cat.pid}'.encode() in m and b'"refused"' in m for m in s.syslog.messages)


RAW_CLIENT = r"""
import json, socket, sys
from vmfs_crypt.format.folder import VmFolder
sock_path, folder = sys.argv[1], sys.argv[2]
vm = VmFolder(folder)
record = vm.descriptor_record_for("disk-flat.vmdk")[1].as_json()
kek = vm.load_keys().kek.to_json()
s = socket.socket(socket.AF_UNIX); s.connect(sock_path); f = s.makefile("rwb")
def ask(**req):
    f.write(json.dumps(req).encode() + b"\n"); f.flush()
    return json.loads(f.readline())
out = {}
for purpose in ["mount", "cat", "decrypt", "rekey", "create", "encrypt", "", None, "anything"]:
    out[f"unwrap/{purpose}"] = ask(op="unwrap", purpose=purpose, what="x", **record)
    out[f"new_file_key/{purpose}"] = ask(op="new_file_key", purpose=purpose, **kek)
    out[f"new_kek/{purpose}"] = ask(op="new_kek", purpose=purpose, provider="local", label="x")
    out[f"rewrap/{purpose}"] = ask(op="rewrap", purpose=purpose, what="x", **kek, **record)
for op, fields in [("prefetch", {"keys": [dict(kek, disks=["x"])]}), ("hold", {"what": "x"}), ("unlock", {}),
                   ("reload", {}), ("stop", {"force": True}), ("provider_backup", {"name": "local", "passphrase": "x" * 12}),
                   ("provider_add", {"name": "mine", "settings": {"type": "native"}}),
                   ("provider_remove", {"name": "local"}),
                   ("provider_restore", {"name": "local", "backup": "{}", "passphrase": "x" * 12}),
                   ("set_policy", {"default_provider": "local"}), ("authorize", {"privilege": "cat"}),
                   ("mount_start", {"name": "vmstore"})]:
    out[op] = ask(op=op, **fields)
out["whoami"] = ask(op="whoami")
out["status"] = ask(op="status")
print(json.dumps(out))
"""


@needs_root
@pytest.mark.cli
def test_vm_operator_speaking_the_protocol_gets_no_key_whatever_it_claims(site_):
    """A malicious client as the vm-operator: every request that could give, make or move a key is refused."""
    s = site_
    raw = s.as_user(OP, s.python, "-c", RAW_CLIENT, s.socket, os.path.join(s.ds, "vm1"))
    assert raw.rc == 0, raw
    answers = json.loads(raw.out)
    for name, resp in answers.items():
        assert "dek" not in resp and "backup" not in resp, name
    allowed = {"whoami", "status", "mount_start"}
    for name, resp in answers.items():
        if name in allowed:
            continue
        assert resp["ok"] is False and resp["code"] == "permission", (name, resp)
    assert answers["whoami"]["privileges"] == ["operate-mounts"] and answers["whoami"]["roles"] == ["vm-operator"]
    assert GROUP in [grp.getgrgid(g).gr_name for g in answers["whoami"]["groups"]]  # from SO_PEERGROUPS
    assert answers["mount_start"]["ok"] is True  # the one thing it may do: start the configured mount
    assert "'mount'" in answers["unwrap/mount"]["error"] and "'cat'" in answers["unwrap/cat"]["error"]
    assert "not an operation" in answers["unwrap/anything"]["error"]
    s.root.run("umount", s.mnt)
    recs = records_of(s, raw, "import json, socket, sys")
    refused = [r for r in recs if r["result"] == "refused"]
    assert len(refused) == len(answers) - len(allowed)
    assert {r["event"] for r in recs if r["result"] == "ok"} == {"mount_start"}
    assert "you: root (uid 0)" in s.root.run("status").stdout.decode()  # the agent was not stopped

    # a flood of refused requests cannot rotate the other records away: 200 a minute per user are recorded
    flood = s.as_user(OP, s.python, "-c", r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
for i in range(400):
    f.write(b'{"op": "unwrap", "purpose": "cat"}\n'); f.flush()
    assert json.loads(f.readline())["code"] == "permission"
""", s.socket)
    assert flood.rc == 0, flood
    mine = [r for r in s.records() if r.get("principal", {}).get("uid") == s.users[OP].pw_uid]
    assert sum(r["result"] == "refused" and r["event"] != "refusals_suppressed" for r in mine) == 200
    assert [r["count"] for r in mine if r["event"] == "refusals_suppressed"] == [200]
    assert VmFolder(os.path.join(s.ds, "vm1")).encrypted


@needs_root
@pytest.mark.cli
def test_cryptographer_may_cat_back_up_rekey_and_decrypt_and_each_is_audited(site_):
    s = site_
    vm2 = os.path.join(s.ds, "vm2")
    seen = folder_records(s, "vm2") + folder_records(s, "vm1")

    cat = s.cli(CRYPT, "cat", os.path.join(vm2, "vm2.nvram"))
    assert cat.rc == 0 and cat.out == PATTERN, cat
    backup_file = os.path.join(s.homes[CRYPT], "local.backup")
    backup = s.cli(CRYPT, "provider", "backup", "local", backup_file, input=PASSPHRASE + b"\n")
    assert backup.rc == 0, backup
    st = os.stat(backup_file)
    assert st.st_uid == s.users[CRYPT].pw_uid and stat.S_IMODE(st.st_mode) == 0o600
    restored = os.path.join(s.base, "restored.key")
    NativeKeyProvider.restore("local", restored, backup_file, PASSPHRASE)  # the backup opens, to this key
    with open(restored) as a, open(s.key_file) as b:
        assert json.load(a)["key"] == json.load(b)["key"]
    rekey = s.cli(CRYPT, "rekey", vm2)
    assert rekey.rc == 0, rekey
    seen += folder_records(s, "vm2")
    deep = s.cli(CRYPT, "rekey", "--deep", vm2)
    assert deep.rc == 0, deep
    seen += folder_records(s, "vm2")
    decrypt = s.cli(CRYPT, "decrypt", vm2)
    assert decrypt.rc == 0, decrypt
    with open(os.path.join(vm2, "vm2.nvram"), "rb") as f:
        assert f.read() == PATTERN

    def events(attempt):
        return [(r["event"], r.get("purpose"), r["result"]) for r in records_of(s, attempt) if r["event"] != "kek_get"]

    assert events(cat) == [("authorize", "cat", "ok"), ("unwrap", "cat", "ok")]
    unwrap = [r for r in records_of(s, cat) if r["event"] == "unwrap"][0]
    assert unwrap["file"] == os.path.join(vm2, "vm2.nvram") and unwrap["folder"] == vm2
    assert unwrap["provider"] == "local" and unwrap["key_id"] == seen[0].keysafe.kek.key_id
    assert unwrap["privilege"] == "cat"
    assert events(backup) == [("authorize", None, "ok"), ("provider_backup", None, "ok")]
    assert [r for r in records_of(s, backup) if r["event"] == "provider_backup"][0]["target"] == backup_file
    assert events(rekey) == [("authorize", "rekey", "ok"), ("new_kek", "rekey", "ok"), ("rewrap", "rekey", "ok")]
    assert ("unwrap", "rekey", "ok") in events(deep) and ("new_file_key", "rekey", "ok") in events(deep)
    assert events(decrypt) == [("authorize", "decrypt", "ok"), ("unwrap", "decrypt", "ok")]
    # a KMIP Get or a native derivation is audited under whoever caused it
    assert any(r["event"] == "kek_get" for r in records_of(s, rekey))
    checked = assert_no_key_bytes(s, seen)
    assert checked >= 7

    # provider and policy changes are made by the agent, as root, for a user with the privilege ...
    added = s.cli(CRYPT, "provider", "add", "native", "second")
    assert added.rc == 0 and os.path.join(s.etc, "native-second.key") in added.out.decode(), added
    assert os.stat(os.path.join(s.etc, "native-second.key")).st_uid == 0
    elsewhere = s.cli(CRYPT, "provider", "add", "native", "third", "--key-file", os.path.join(s.homes[CRYPT], "k"))
    assert elsewhere.rc == PERMISSION and "may not choose where the agent writes a key file" in elsewhere.err
    policy = s.cli(CRYPT, "policy", "default-provider", "second")
    assert policy.rc == 0 and load_config(s.config).default_provider == "second", policy
    removed = s.cli(CRYPT, "provider", "remove", "second")
    assert removed.rc == 0 and "second" not in load_config(s.config).providers, removed
    assert [(r["event"], r["result"]) for r in records_of(s, policy)] == [("authorize", "ok"), ("set_policy", "ok")]
    assert [r for r in records_of(s, removed) if r["event"] == "provider_remove"][0]["provider"] == "second"
    # ... and refused to one without it
    op_policy = s.cli(OP, "policy", "default-provider", "local")
    assert_refused(s, op_policy, "policy", "policy")

    # the reader: vmfs-crypt audit, as root (the log is 0600 root)
    assert stat.S_IMODE(os.stat(s.audit).st_mode) == 0o600
    text = s.root.run("audit", "--since", "10m").stdout.decode()
    assert f"{CRYPT}({s.users[CRYPT].pw_uid}) pid {cat.pid}  unwrap for cat  OK" in text, text
    as_json = s.root.run("audit", "--json").stdout.decode().splitlines()
    assert len(as_json) == len(s.records()) and all(json.loads(line)["v"] == 1 for line in as_json)
    future = s.root.run("audit", "--since", "2999-01-01T00:00").stdout
    assert future == b""


# -- the agent's decisions, one by one (in process) -------------------------------------------------------------

DEK_PRIVILEGES = {"mount", "cat", "decrypt", "rekey"}  # the privileges whose requests return a DEK of existing data


def _config(tmp_path, text: str):
    path = tmp_path / "config.toml"
    path.write_text("version = 1\n" + text)
    return load_config(str(path))


def _principal(user="bob", uid=4321, groups=(4321,)):
    return Principal(uid, groups[0], tuple(groups), 99, user, "test", False)


def test_only_dek_privileges_ever_get_a_dek_whatever_the_stated_purpose(tmp_path):
    """For every purpose a client might claim, an unwrap needs mount, cat, decrypt or rekey; a rewrap needs rekey."""
    config = _config(tmp_path, '[roles.r]\nusers = ["bob"]\nprivileges = ["encrypt", "unlock", "manage-providers", '
                               '"policy", "operate-mounts"]\n')
    access = Access(config)
    bob = _principal()
    claims = ["mount", "cat", "create", "encrypt", "decrypt", "rekey", "", None, "MOUNT", "cat ", "policy",
              "operate-mounts", "owner", 1, ["cat"]]
    for purpose in claims:
        for op in ("unwrap", "rewrap"):
            with pytest.raises(PermissionDeniedError):
                access.check(bob, {"op": op, "purpose": purpose})
    for (op, purpose), privilege in KEY_OPS.items():
        if op == "unwrap":
            assert privilege in DEK_PRIVILEGES
        if op == "rewrap":
            assert privilege == "rekey"
    assert access.check(bob, {"op": "new_file_key", "purpose": "create"}) == "encrypt"
    assert access.check(bob, {"op": "new_kek", "purpose": "encrypt"}) == "encrypt"
    with pytest.raises(PermissionDeniedError, match="'mount'"):
        access.check(bob, {"op": "new_file_key", "purpose": "mount"})  # a key for a file through a mount


def test_vm_operator_role_may_only_start_and_stop_configured_mounts(tmp_path):
    config = _config(tmp_path, '[roles.vm-operator]\nusers = ["bob"]\n')
    access = Access(config)
    bob = _principal()
    assert access.privileges(bob) == {"operate-mounts"} and access.roles_of(bob) == ["vm-operator"]
    for priv in PRIVILEGES:
        req = {"op": "authorize", "privilege": priv}
        if priv == "operate-mounts":
            assert access.check(bob, req) == priv
        else:
            with pytest.raises(PermissionDeniedError, match=f"'{priv}'"):
                access.check(bob, req)
    for op in ("prefetch", "hold", "unlock", "reload", "provider_add", "provider_remove", "provider_backup",
               "provider_restore", "set_policy", "stop"):
        with pytest.raises(PermissionDeniedError):
            access.check(bob, {"op": op})
    assert access.check(bob, {"op": "mount_start"}) == "operate-mounts"
    assert access.check(bob, {"op": "status"}) is None  # a member may see status
    stranger = _principal("eve", 5555, (5555,))
    with pytest.raises(PermissionDeniedError, match="no role"):
        access.check(stranger, {"op": "status"})
    with pytest.raises(AgentError, match="unknown request"):
        access.check(bob, {"op": "op_unwrap"})
    owner = Principal(os.geteuid(), 0, (0,), 1, "root", "test", True)
    assert access.check(owner, {"op": "unwrap", "purpose": "cat"}) == "cat"
    with pytest.raises(PermissionDeniedError):
        access.check(owner, {"op": "unwrap", "purpose": "steal"})  # not even the owner: no such operation


@pytest.mark.parametrize("text, message", [
    ('[roles.r]\nusers = ["a"]\nprivileges = ["read-everything"]\n', "unknown privilege 'read-everything'"),
    ('[roles.r]\nusers = ["a"]\n', "needs privileges"),
    ('[roles.vm-operator]\nusers = ["a"]\nprivileges = ["cat"]\n', "built-in role with fixed privileges"),
    ('[roles.r]\nuser = ["a"]\nprivileges = ["cat"]\n', "unknown setting 'user'"),
    ('[roles.r]\nusers = "a"\nprivileges = ["cat"]\n', "must be a list of names"),
    ('[audit]\npath = "x"\nmax_bytes = 0\n', "max_bytes must be a positive integer"),
    ('[audit]\nrotate = 1\n', "unknown setting 'rotate'"),
    ('[mounts.m]\ndatastore = "ds"\nmountpoint = "/mnt"\n', "datastore must be an absolute path"),
    ('[mounts.m]\ndatastore = "/ds"\n', "lacks mountpoint"),
    ('[mounts.m]\ndatastore = "/ds"\nmountpoint = "/m"\nallow_other = "yes"\n', "must be true or false"),
    ('roles = 1\n', "roles must be a table"),
])
def test_roles_audit_and_mounts_tables_are_checked_at_load(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, text)


def test_roles_audit_and_mounts_survive_a_save(tmp_path):
    config = _config(tmp_path, '[roles.vm-operator]\ngroups = ["vmops"]\n[roles.c]\nusers = ["a"]\ngroups = []\n'
                               'privileges = ["cat"]\n[audit]\npath = "/var/log/x.log"\nkeep = 2\nsyslog = "off"\n'
                               '[mounts.m]\ndatastore = "/ds"\nmountpoint = "/m"\nallow_other = true\n')
    config.add_provider("local", {"type": "native"})  # what the agent does on 'provider add'
    again = load_config(config.path)
    assert again.roles == config.roles and again.mounts == config.mounts and again.audit == config.audit
    assert again.audit_path == "/var/log/x.log" and again.role_privileges("c") == {"cat"}
    assert _config(tmp_path, "").audit_path == str(tmp_path / "audit.log")


# -- the audit file ---------------------------------------------------------------------------------------------


def test_audit_log_is_0600_from_the_start_and_across_rotations_and_follows_another_writer(tmp_path):
    path = str(tmp_path / "logs" / "audit.log")
    old_umask = os.umask(0)  # the mode must not depend on the umask
    try:
        first = AuditLog(path, max_bytes=3000, keep=3, syslog="off")
        second = AuditLog(path, max_bytes=3000, keep=3, syslog="off")  # another agent on the same log
        for i in range(150):
            (first if i % 2 else second).write("unwrap", "ok", {"uid": i}, file=f"/ds/vm/{i:03d}", purpose="cat")
    finally:
        os.umask(old_umask)
    names = sorted(n for n in os.listdir(tmp_path / "logs") if not n.endswith(".lock"))
    assert names == ["audit.log", "audit.log.1", "audit.log.2", "audit.log.3"]
    for name in os.listdir(tmp_path / "logs"):
        assert stat.S_IMODE(os.stat(tmp_path / "logs" / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(tmp_path / "logs").st_mode) == 0o700
    records, bad = read_records(path)
    assert bad == 0
    files = [r["file"] for r in records]
    assert files == sorted(files) and files[-1] == "/ds/vm/149" and files[0] != "/ds/vm/000"  # the oldest went
    assert all(os.path.getsize(tmp_path / "logs" / n) <= 3000 for n in names)
    # each record is in exactly one file: no writer kept appending to a rotated file
    assert len(files) == len(set(files))
    assert sum(len(open(tmp_path / "logs" / n).read().splitlines()) for n in names) == len(records)


def test_audit_records_take_only_listed_fields_of_plain_types(tmp_path):
    log = AuditLog(str(tmp_path / "a.log"), 1 << 20, 1, "off")
    with pytest.raises(TypeError, match="dek is not an audit field"):
        log.write("unwrap", "ok", None, dek="AAAA")
    with pytest.raises(TypeError, match="must be a string"):
        log.write("unwrap", "ok", None, file=b"\x01\x02")
    assert not os.path.exists(tmp_path / "a.log") or os.path.getsize(tmp_path / "a.log") == 0


def test_since_takes_iso_8601_and_relative_times():
    import datetime as dt
    now = dt.datetime(2025, 1, 31, 14, 0, tzinfo=dt.timezone.utc)
    assert parse_since("1h", now) == now - dt.timedelta(hours=1)
    assert parse_since("30m", now) == now - dt.timedelta(minutes=30)
    assert parse_since("2d", now) == now - dt.timedelta(days=2)
    assert parse_since("2025-01-31T12:00Z") == dt.datetime(2025, 1, 31, 12, 0, tzinfo=dt.timezone.utc)
    assert parse_since("2025-01-31T12:00").tzinfo is not None  # local time
    with pytest.raises(UsageError, match="ISO 8601"):
        parse_since("yesterday")


# -- the agent with and without roles (real agents) -------------------------------------------------------------
@needs_root
@pytest.mark.cli
def test_without_roles_nobody_but_the_agents_user_and_root_gets_in(users, tmp_path):
    """The default (no [roles]): the socket is 0600; a user who reaches it anyway is dropped, and it is audited."""
    base = tempfile.mkdtemp(prefix="vcr-noroles-", dir="/tmp")
    try:
        s = Site(base, users)
        s.root.run("provider", "add", "native", "local")
        with open(s.config, "a") as f:
            f.write(f'[agent]\nsocket = "{s.socket}"\n[audit]\nsyslog = "off"\n')
        s.root.run("agent", "start")
        assert stat.S_IMODE(os.stat(s.socket).st_mode) == 0o600
        denied = s.cli(OP, "status")
        assert denied.rc == 7 and "no key agent runs" in denied.err and "Traceback" not in denied.err, denied
        os.chmod(s.socket, 0o666)  # a mistake an administrator might make: still nobody else gets in
        dropped = s.cli(OP, "status")
        assert dropped.rc == 7 and "Traceback" not in dropped.err, dropped
        recs = [r for r in s.records() if r["event"] == "connect"]
        assert recs and all(r["result"] == "refused" and r["principal"]["uid"] == s.users[OP].pw_uid for r in recs)
        assert "you: root (uid 0), the agent's own user or root: every privilege" in s.root.run("status").stdout.decode()
    finally:
        s.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.cli
def test_agent_refuses_a_configuration_that_others_may_change(venv_env):
    os.chmod(venv_env.config, 0o666)
    proc = venv_env.run("agent", "start", check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 3 and "chmod go-w" in err and "Traceback" not in err, err
    os.chmod(venv_env.config, 0o600)
    venv_env.run("agent", "start")


@needs_root
@pytest.mark.cli
def test_a_key_request_whose_audit_record_cannot_be_written_is_refused(venv_env, tmp_path):
    """Fail closed: a full audit filesystem stops key service instead of serving keys unrecorded."""
    logs = tmp_path / "logs"
    logs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(logs)], check=True)
    try:
        with open(venv_env.config, "a") as f:
            f.write(f'[audit]\npath = "{logs}/audit.log"\nsyslog = "off"\n')
        vm = os.path.join(venv_env.datastore, "vm1")
        os.makedirs(vm)
        with open(os.path.join(vm, "vm1.nvram"), "wb") as f:
            f.write(PATTERN)
        venv_env.run("encrypt", vm)
        venv_env.run("agent", "start")
        fd = os.open(logs / "filler", os.O_WRONLY | os.O_CREAT)  # the filesystem is full after this
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        proc = venv_env.run("cat", os.path.join(vm, "vm1.nvram"), check=False)
        err = proc.stderr.decode()
        assert proc.returncode == 7 and "cannot write the audit log" in err and "Traceback" not in err, err
        assert PATTERN[:64] not in proc.stdout
        os.unlink(logs / "filler")
        assert venv_env.run("cat", os.path.join(vm, "vm1.nvram")).stdout == PATTERN
    finally:
        venv_env.cleanup()
        subprocess.run(["umount", "-l", str(logs)], capture_output=True)


@needs_root
@pytest.mark.cli
@pytest.mark.kmip
def test_kmip_provider_added_by_another_user_is_kept_as_copies_and_its_paths_are_never_opened(site_):
    """The root agent opens no path a user names: it stores the PEM files the user's CLI sends."""
    from kmip_tls import Pki
    s = site_
    pki_dir = os.path.join(s.homes[CRYPT], "pki")
    pki = Pki.create(pki_dir)
    pw = s.users[CRYPT]
    for name in os.listdir(pki_dir) + [""]:
        os.chown(os.path.join(pki_dir, name), pw.pw_uid, pw.pw_gid)
    added = s.cli(CRYPT, "provider", "add", "kmip", "kms", "--server", "127.0.0.1:1", "--cert", pki.client_cert,
                  "--key", pki.client_key, "--ca", pki.ca_path, "--no-check")
    assert added.rc == 0, added
    settings = load_config(s.config).providers["kms"]
    for field, original in (("cert", pki.client_cert), ("key", pki.client_key), ("ca", pki.ca_path)):
        copy = settings[field]
        assert copy == os.path.join(s.etc, "kmip-kms", f"{field}.pem")
        st = os.stat(copy)
        assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
        assert open(copy, "rb").read() == open(original, "rb").read()
    # a client that sends paths only (say, root's own TLS key) is refused: the agent would read them as root
    sneaky = s.as_user(CRYPT, s.python, "-c", r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); f = s.makefile("rwb")
f.write(json.dumps({"op": "provider_add", "name": "sneaky", "check": False, "settings": {
    "type": "kmip", "servers": ["127.0.0.1:1"], "cert": sys.argv[2], "key": sys.argv[2], "ca": sys.argv[2]}}).encode()
    + b"\n"); f.flush()
print(f.readline().decode())
""", s.socket, s.key_file)
    resp = json.loads(sneaky.out)
    assert resp["ok"] is False and "must be sent to the agent" in resp["error"], resp
    assert "sneaky" not in load_config(s.config).providers
    assert [r["result"] for r in records_of(s, added) if r["event"] == "provider_add"] == ["ok"]
    assert [r["result"] for r in records_of(s, sneaky, "import json") if r["event"] == "provider_add"] == ["error"]


def test_malformed_requests_are_refused_and_audited_not_crashed(tmp_path):
    """What a hostile client may send (wrong types everywhere) gets an answer and an audit record."""
    from vmfs_crypt.agent.server import AgentServer
    from vmfs_crypt.agent.service import KeyService
    config = _config(tmp_path, '[roles.vm-operator]\nusers = ["bob"]\n[audit]\nsyslog = "off"\n')
    audit = AuditLog.from_config(config)
    server = AgentServer(str(tmp_path / "s.sock"), KeyService(config, audit), sidecar=False)
    try:
        bob = _principal()
        for req in [{"op": ["unwrap"]}, {"op": "unwrap", "purpose": {"x": 1}, "keySafe": 5, "data": [1]},
                    {"op": "unwrap", "purpose": "cat", "keySafe": {"a": 1}}, {"op": "prefetch", "keys": "x"},
                    {"op": "rewrap", "purpose": "rekey", "keySafe": None, "provider": [1]}, {"op": None},
                    {"op": "authorize", "privilege": ["cat"]}, {"op": "mount_start", "name": {"a": 1}}]:
            resp = server.dispatch(req, bob)
            assert resp["ok"] is False and resp["code"] in ("permission", "agent", "usage"), (req, resp)
        records, bad = read_records(config.audit_path)
        assert bad == 0 and [r["result"] for r in records] == ["refused"] * 7 + ["error"]  # mount_start: allowed
    finally:
        server.server_close()
