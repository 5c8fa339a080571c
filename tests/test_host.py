"""A Linux host (issue 9): mount -t fuse.vmfs-crypt and fstab, systemd units and readiness, logs, umount in use."""

import json
import os
import pwd
import select
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from support import REPO, is_mounted, mounted

pytestmark = [pytest.mark.cli, pytest.mark.fuse]
UNITS = os.path.join(REPO, "packaging", "systemd")
LAUNCHER = os.path.join(REPO, "packaging", "vmfs-crypt.launcher")
INSTALLED = "/usr/local/sbin/vmfs-crypt"  # where the units and mount.fuse3 find it (make install)
DEADLINE_S = 60

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8), unshare and other mount namespaces need root")


@pytest.fixture
def enc_env(venv_env):
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "4M")
    return venv_env


def _launcher(env, bindir: str) -> str:
    """The launcher `make install` writes, pointing at the Python and checkout under test."""
    os.makedirs(bindir, exist_ok=True)
    path = os.path.join(bindir, "vmfs-crypt")
    with open(LAUNCHER, encoding="utf-8") as f:
        text = f.read()
    target = f"env PYTHONPATH={env.env['PYTHONPATH']} {sys.executable} -m vmfs_crypt.cli"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace("@VMFS_CRYPT@", target))
    os.chmod(path, 0o755)
    return path


def _mount_processes(mountpoint: str) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if b"vmfs_crypt.cli.mountd" in argv and os.fsencode(mountpoint) in argv:
                out.append(int(name))
    return out


def _wait_gone(mountpoint: str) -> bool:
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        if not _mount_processes(mountpoint):
            return True
        time.sleep(0.05)
    return False


# -- mount.fuse calling convention -----------------------------------------------------------------

def test_relative_datastore_and_mountpoint_mount(enc_env):
    """`vmfs-crypt mount ds mnt` from the folder holding them: the mount table has absolute paths only."""
    mnt = os.path.join(enc_env.base, "mnt")
    os.makedirs(mnt)
    enc_env.mounts.append(mnt)
    rel_ds = os.path.relpath(enc_env.datastore, enc_env.base)  # env.run's cwd is env.base
    enc_env.run("mount", rel_ds, "mnt", timeout=60)
    assert is_mounted(mnt)
    assert sorted(os.listdir(os.path.join(mnt, "vm1"))) == ["disk-flat.vmdk", "disk.vmdk"]
    enc_env.run("umount", "mnt", timeout=60)
    assert not is_mounted(mnt)
    # --quiet: errors only, for mount and umount too (fstab and scripts)
    quiet = enc_env.run("-q", "mount", rel_ds, "mnt", timeout=60)
    assert is_mounted(mnt) and quiet.stdout == b"" and b"mounted" not in quiet.stderr
    quiet = enc_env.run("-q", "umount", "mnt", timeout=60)
    assert not is_mounted(mnt) and quiet.stdout == b""


def test_helper_form_mounts_ignores_fstab_options_and_shows_fuse_errors(enc_env):
    """`vmfs-crypt DATASTORE MOUNTPOINT -o OPTS`, as mount.fuse3 runs it: it printed the help and exited 0."""
    mnt = os.path.join(enc_env.base, "mnt")
    os.makedirs(mnt)
    enc_env.mounts.append(mnt)
    bad = enc_env.run(enc_env.datastore, mnt, "-o", "rw,nofail,bogusopt", check=False)
    assert bad.returncode == 8, bad.stderr
    assert b"fuse: unknown option(s): `-o bogusopt'" in bad.stderr, bad.stderr  # libfuse's own words
    assert not is_mounted(mnt)
    opts = "rw,dev,suid,exec,defaults,auto,noauto,nofail,_netdev,user,x-systemd.automount,comment=x"
    ok = enc_env.run(enc_env.datastore, mnt, "-o", opts, check=False)
    assert ok.returncode == 0, ok.stderr
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE,OPTIONS", mnt], capture_output=True,
                             text=True).stdout.split()
        assert out[:2] == ["fuse.vmfs-crypt", os.path.realpath(enc_env.datastore)]
        assert "nosuid" in out[2] and "nodev" in out[2], "dev/suid from mount.fuse3 do not loosen the mount"
        with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
            assert f.read(4096) == bytes(4096)
    finally:
        enc_env.run("umount", mnt)


def test_ro_option_gives_a_read_only_mount(enc_env):
    with mounted(enc_env, None, "-o", "ro") as mnt:
        with pytest.raises(OSError) as exc:
            open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "r+b")
        assert exc.value.errno == 30  # EROFS
        with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
            assert f.read(512) == bytes(512)


NAMESPACE_SCRIPT = textwrap.dedent("""\
    # In a private mount namespace: the launcher over /usr/local/sbin, where mount.fuse3's /bin/sh
    # looks (mount(8) gives its helpers no PATH), then the real mount(8) and umount(8).
    import json, os, subprocess, sys, time
    bindir, ds, mnt, cfg, fstab = sys.argv[1:6]
    subprocess.run(["mount", "--bind", bindir, "/usr/local/sbin"], check=True)
    res = {}
    def run(*cmd):
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin"))
        return {"rc": p.returncode, "out": p.stdout, "err": p.stderr}
    def findmnt():
        return run("findmnt", "-n", "-o", "FSTYPE,SOURCE", mnt)["out"].split()
    def read_back(name):
        path = os.path.join(mnt, "vm1", name)
        with open(path, "wb") as f:
            f.write(b"through mount(8)")
        with open(path, "rb") as f:
            return f.read().decode()
    def daemons():
        out = []
        for n in filter(str.isdigit, os.listdir("/proc")):
            try:
                argv = open(f"/proc/{n}/cmdline", "rb").read().split(b"\\0")
            except OSError:
                continue
            if b"vmfs_crypt.cli.mountd" in argv and os.fsencode(mnt) in argv:
                out.append(int(n))
        return out
    def wait_gone():
        deadline = time.monotonic() + 60
        while daemons() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not daemons()
    opts = f"noauto,nofail,_netdev,config={cfg},x-systemd.device-timeout=5"
    res["mount"] = run("mount", "-t", "fuse.vmfs-crypt", ds, mnt, "-o", opts)
    res["findmnt"] = findmnt()
    res["read"] = read_back("a.nvram") if res["findmnt"] else None
    res["umount"] = run("umount", mnt)
    res["gone"] = wait_gone()
    res["bogus"] = run("mount", "-t", "fuse.vmfs-crypt", ds, mnt, "-o", f"config={cfg},bogusopt")
    res["bogus_findmnt"] = findmnt()
    res["fstab_mount"] = run("mount", "--fstab", fstab, mnt)
    res["fstab_findmnt"] = findmnt()
    res["fstab_read"] = read_back("b.nvram") if res["fstab_findmnt"] else None
    res["fstab_umount"] = run("umount", mnt)
    res["fstab_gone"] = wait_gone()
    print(json.dumps(res))
""")


@needs_root
@pytest.mark.skipif(not shutil.which("mount.fuse3") and not shutil.which("mount.fuse"), reason="no mount.fuse3")
def test_mount_t_fuse_vmfs_crypt_and_fstab_through_the_real_mount_helper(enc_env):
    """mount(8) -> mount.fuse3 -> /bin/sh -> the installed launcher -> vmfs-crypt; then umount(8)."""
    mnt = os.path.join(enc_env.base, "mnt")
    os.makedirs(mnt)
    bindir = os.path.join(enc_env.base, "sbin")
    _launcher(enc_env, bindir)
    fstab = os.path.join(enc_env.base, "fstab")
    with open(fstab, "w", encoding="utf-8") as f:
        f.write(f"{enc_env.datastore} {mnt} fuse.vmfs-crypt defaults,nofail,_netdev,config={enc_env.config} 0 0\n")
    script = os.path.join(enc_env.base, "ns.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(NAMESPACE_SCRIPT)
    env = {k: v for k, v in enc_env.env.items() if k != "VMFS_CRYPT_CONFIG"}  # config= must pick it
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", sys.executable, script, bindir,
                           enc_env.datastore, mnt, enc_env.config, fstab], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ds = os.path.realpath(enc_env.datastore)
    assert res["mount"]["rc"] == 0, res["mount"]
    assert res["findmnt"] == ["fuse.vmfs-crypt", ds]
    assert res["read"] == "through mount(8)"
    assert res["umount"]["rc"] == 0 and res["gone"], res["umount"]
    assert res["bogus"]["rc"] != 0 and "unknown option(s): `-o bogusopt'" in res["bogus"]["err"], res["bogus"]
    assert res["bogus_findmnt"] == []
    assert res["fstab_mount"]["rc"] == 0, res["fstab_mount"]
    assert res["fstab_findmnt"] == ["fuse.vmfs-crypt", ds]
    assert res["fstab_read"] == "through mount(8)"
    assert res["fstab_umount"]["rc"] == 0 and res["fstab_gone"]
    with open(os.path.join(enc_env.datastore, "vm1", "a.nvram"), "rb") as f:
        assert b"through mount(8)" not in f.read(), "the file written through mount(8) is encrypted at rest"


# -- systemd -------------------------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze (Debian package systemd)")
def test_shipped_units_pass_systemd_analyze_verify(tmp_path):
    launcher = tmp_path / "sbin" / "vmfs-crypt"
    launcher.parent.mkdir()
    launcher.write_text("#!/bin/sh\nexit 0\n")
    launcher.chmod(0o755)
    names = sorted(os.listdir(UNITS))
    assert names == ["vmfs-crypt-agent.service", "vmfs-crypt@.service"]
    for name in names:
        text = open(os.path.join(UNITS, name), encoding="utf-8").read()
        assert f"ExecStart={INSTALLED} " in text and "Type=notify" in text
        (tmp_path / name).write_text(text.replace(INSTALLED, str(launcher)))
    assert "Before=libvirtd.service" in (tmp_path / "vmfs-crypt@.service").read_text()
    units = [str(tmp_path / "vmfs-crypt-agent.service"), str(tmp_path / "vmfs-crypt@.service"),
             str(tmp_path / "vmfs-crypt@vm1.service")]  # an instance of the template
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=120)
    if "Failed to initialize" in proc.stderr or "Operation not permitted" in proc.stderr:
        pytest.skip(f"systemd-analyze cannot run here: {proc.stderr.strip()}")
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_make_install_writes_the_launcher_and_units(tmp_path):
    dest = tmp_path / "dest"
    proc = subprocess.run(["make", "-s", "-C", REPO, "install", f"DESTDIR={dest}", "VMFS_CRYPT_BIN=/opt/x/vmfs-crypt"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    launcher = dest / "usr/local/sbin/vmfs-crypt"
    assert stat.S_IMODE(launcher.stat().st_mode) == 0o755
    assert 'exec /opt/x/vmfs-crypt "$@"' in launcher.read_text()
    for name in ("vmfs-crypt-agent.service", "vmfs-crypt@.service"):
        assert (dest / "usr/local/lib/systemd/system" / name).read_text() == open(os.path.join(UNITS, name)).read()


def _notify_socket(base: str) -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = os.path.join(base, "notify")
    sock.bind(path)
    sock.settimeout(DEADLINE_S)
    return sock, path


@pytest.mark.parametrize("stop, how", [("umount", "args"), ("sigterm", "args"), ("sigterm", "name")])
def test_foreground_mount_tells_systemd_ready_when_live_and_stopping_on_unmount(enc_env, stop, how):
    """sigterm: what `systemctl stop` does; name: vmfs-crypt@NAME.service's `mount --foreground --name NAME`."""
    mnt = os.path.join(enc_env.base, "mnt")
    os.makedirs(mnt)
    enc_env.mounts.append(mnt)
    notify, path = _notify_socket(enc_env.runtime)
    from support import CLI
    args = [enc_env.datastore, mnt]
    if how == "name":
        with open(enc_env.config, "a", encoding="utf-8") as f:
            f.write(f'\n[mounts.store1]\ndatastore = "{enc_env.datastore}"\nmountpoint = "{mnt}"\n')
        args = ["--name", "store1"]
    proc = subprocess.Popen(CLI + ["mount", "--foreground", *args], env=dict(enc_env.env,
                            NOTIFY_SOCKET=path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=enc_env.base)
    try:
        msg = notify.recv(4096).decode()
        live = os.path.ismount(mnt) and os.stat(os.path.join(mnt, "vm1", "disk-flat.vmdk")).st_size == 4 << 20
        assert "READY=1" in msg.splitlines(), msg
        assert f"STATUS=serving {os.path.realpath(enc_env.datastore)} at {os.path.realpath(mnt)}" in msg
        assert live, "READY=1 came once the mount was live"
        if stop == "umount":
            enc_env.run("umount", mnt)
        else:
            proc.terminate()
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
        assert proc.wait(timeout=DEADLINE_S) == 0
        assert not is_mounted(mnt)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert b"mount: INFO" not in proc.stderr.read(), "not the journal: plain stderr lines"


def test_foreground_agent_tells_systemd_ready_and_stops_on_sigterm(venv_env):
    notify, path = _notify_socket(venv_env.runtime)
    from support import CLI
    proc = subprocess.Popen(CLI + ["agent", "start", "--foreground"], env=dict(venv_env.env, NOTIFY_SOCKET=path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=venv_env.base)
    try:
        msg = notify.recv(4096).decode()
        assert "READY=1" in msg.splitlines(), msg
        assert venv_env.run("agent", "status").returncode == 0, "READY=1 came once the agent answered"
        proc.terminate()
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert venv_env.run("agent", "status", check=False).returncode != 0


def test_journal_stream_sends_logs_to_stderr_with_priorities(enc_env):
    """Under systemd (JOURNAL_STREAM names our stderr) the mount logs there, with <N> priorities."""
    mnt = os.path.join(enc_env.base, "mnt")
    os.makedirs(mnt)
    enc_env.mounts.append(mnt)
    errfile = os.path.join(enc_env.base, "stderr")
    from support import CLI
    with open(errfile, "wb") as err:
        st = os.fstat(err.fileno())
        proc = subprocess.Popen(CLI + ["mount", "--foreground", enc_env.datastore, mnt], stderr=err,
                                env=dict(enc_env.env, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"), cwd=enc_env.base)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not is_mounted(mnt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(mnt)
        enc_env.run("umount", mnt)
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = open(errfile, encoding="utf-8").read()
    assert "<6>mount: INFO libfuse" in text, text
    assert not [n for n in os.listdir(os.path.join(enc_env.runtime, "vmfs-crypt")) if n.startswith("mount-")]


# -- logs ----------------------------------------------------------------------------------------

def test_mount_and_agent_logs_are_private_and_rotate(enc_env):
    env = dict(enc_env.env, VMFS_CRYPT_LOG_MAX_BYTES="300")
    rt = os.path.join(enc_env.runtime, "vmfs-crypt")
    mnt = os.path.join(enc_env.base, "mnt")
    os.makedirs(mnt)
    enc_env.mounts.append(mnt)
    for _ in range(3):  # each mount logs a few lines to the same file (its name follows the mount point)
        assert enc_env.run("mount", enc_env.datastore, mnt, env=env).returncode == 0
        enc_env.run("umount", mnt, env=env)
    logs = sorted(n for n in os.listdir(rt) if ".log" in n)
    mount_logs = [n for n in logs if n.startswith("mount-")]
    agent_logs = [n for n in logs if n.startswith("agent-")]
    assert any(n.endswith(".log.1") for n in mount_logs), logs
    assert any(n.endswith(".log.1") for n in agent_logs), logs
    for name in logs:
        st = os.lstat(os.path.join(rt, name))
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600, (name, oct(st.st_mode))
        assert st.st_size <= 300 + 400, (name, st.st_size)  # rotated at 300 bytes (plus one record)


def test_mount_log_symlink_is_not_followed(enc_env):
    rt = os.path.join(enc_env.runtime, "vmfs-crypt")
    mnt = os.path.join(enc_env.base, "mnt")
    os.makedirs(mnt)
    enc_env.mounts.append(mnt)
    with mounted(enc_env, mnt):
        name = next(n for n in os.listdir(rt) if n.startswith("mount-") and n.endswith(".log"))
    victim = os.path.join(enc_env.base, "victim")
    with open(victim, "w") as f:
        f.write("precious\n")
    os.unlink(os.path.join(rt, name))
    os.symlink(victim, os.path.join(rt, name))
    proc = enc_env.run("mount", enc_env.datastore, mnt, check=False)
    assert proc.returncode != 0 and not is_mounted(mnt)
    assert open(victim).read() == "precious\n"


# -- umount of a mount in use --------------------------------------------------------------------

def _holder(cmd_prefix: list[str], cwd: str) -> subprocess.Popen:
    """A real process whose working directory is in the mount; it says "ready" once it is there."""
    proc = subprocess.Popen(cmd_prefix + ["sh", "-c", 'cd "$1" && echo ready && exec sleep 600', "sh", cwd],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@needs_root
@pytest.mark.parametrize("where", ["another-namespace", "this-namespace"])
def test_umount_in_use_names_the_holder_and_fails(enc_env, where):
    prefix = ["unshare", "--mount", "--propagation", "private"] if where == "another-namespace" else []
    with mounted(enc_env) as mnt:
        holder = _holder(prefix, os.path.join(mnt, "vm1"))
        try:
            proc = enc_env.run("umount", mnt, check=False, timeout=120)
            err = proc.stderr.decode()
            assert proc.returncode == 11, err  # ExitCode.IN_USE
            assert "unmounted" not in proc.stdout.decode()
            assert "still in use" in err and f"pid {holder.pid} (sleep 600)" in err, err
            assert ("another mount namespace" in err) == (where == "another-namespace"), err
            assert is_mounted(mnt), "refused: nothing was unmounted"
            with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "rb") as f:
                assert f.read(512) == bytes(512)
        finally:
            holder.kill()
            holder.wait()
        assert _mount_processes(mnt)
    assert _wait_gone(mnt), "once the holder is gone, umount works and the mount process ends"


@needs_root
def test_umount_refuses_a_copy_in_a_namespace_it_cannot_reach(enc_env):
    """A private namespace with a copy of the mount but no file open there still keeps the daemon serving."""
    with mounted(enc_env) as mnt:
        holder = _holder(["unshare", "--mount", "--propagation", "private"], "/")
        try:
            proc = enc_env.run("umount", mnt, check=False, timeout=120)
            err = proc.stderr.decode()
            assert proc.returncode == 11, err
            assert f"pid {holder.pid}" in err and "unmounting here does not reach it" in err, err
            assert is_mounted(mnt)
        finally:
            holder.kill()
            holder.wait()


# -- thin disks: SEEK_DATA / SEEK_HOLE -----------------------------------------------------------

def _map(env, disk: str) -> list[dict]:
    out = json.loads(env.tool("qemu-img", "map", "--output=json", "-f", "vmdk", disk).stdout)
    return [{k: v for k, v in e.items() if k != "filename"} for e in out]


@pytest.mark.qemu
@pytest.mark.skipif(not shutil.which("qemu-img") or not shutil.which("qemu-io"), reason="no qemu-img/qemu-io")
def test_qemu_img_map_in_the_mount_matches_the_plaintext_disk(enc_env, tmp_path):
    """A thin encrypted disk looks thin through the mount (issue 9: `qemu-img map` showed one data extent)."""
    plain = str(tmp_path / "plain.vmdk")
    writes = ["write -P 0x11 1M 64k", "write -P 0x22 3M 8k"]
    with mounted(enc_env) as mnt:
        disk = os.path.join(mnt, "vm1", "thin.vmdk")  # the same disk made the same way, encrypted at rest
        for path in (plain, disk):
            enc_env.tool("qemu-img", "create", "-f", "vmdk", "-o", "subformat=monolithicFlat", path, "4M")
            for w in writes:
                enc_env.tool("qemu-io", "-f", "vmdk", "-c", w, path)
        inside, expected = _map(enc_env, disk), _map(enc_env, plain)
        enc_env.tool("qemu-img", "compare", "-f", "vmdk", "-F", "vmdk", plain, disk)
    assert [e for e in expected if not e["zero"]], "the plaintext disk has data extents"
    assert [e for e in expected if e["zero"]], "and holes (a flat VMDK's holes map as zero)"
    assert inside == expected


# -- libvirt's dynamic ownership: a descriptor's extents follow its owner and mode ---------------

@needs_root
def test_chown_and_chmod_of_a_descriptor_reach_its_extent(enc_env):
    """Issue 9: libvirt chowns the descriptor it is given; QEMU (another user) then got EACCES on the extent."""
    from support.users import unix_user
    backing_flat = os.path.join(enc_env.datastore, "vm1", "disk-flat.vmdk")
    with unix_user("qemu") as qemu:
        mnt = tempfile.mkdtemp(prefix="vmfs-mnt-", dir="/tmp")  # reachable by the other user
        os.chmod(mnt, 0o755)
        try:
            with mounted(enc_env, mnt, "--allow-other") as m:
                desc, flat = os.path.join(m, "vm1", "disk.vmdk"), os.path.join(m, "vm1", "disk-flat.vmdk")
                assert qemu.run(["head", "-c", "512", flat]).returncode != 0, "the extent is 0600 root at first"
                os.chown(desc, qemu.uid, qemu.gid)  # what libvirt's dynamic ownership does
                st = os.stat(backing_flat)
                assert (st.st_uid, st.st_gid) == (qemu.uid, qemu.gid)
                read = qemu.run(["head", "-c", "512", flat])
                assert read.returncode == 0 and read.stdout == bytes(512), read.stderr
                info = qemu.run(["qemu-img", "info", "--output=json", desc]) if shutil.which("qemu-img") else None
                assert info is None or info.returncode == 0, info.stderr
                os.chmod(desc, 0o640)
                assert stat.S_IMODE(os.stat(backing_flat).st_mode) == 0o640
                os.chown(desc, 0, 0)  # libvirt gives the files back when the domain stops
                assert os.stat(backing_flat).st_uid == 0
                # an extent with another owner than its descriptor does not follow it
                os.chown(backing_flat, 4242, 4242)
                os.chown(desc, qemu.uid, qemu.gid)
                os.chmod(desc, 0o600)
                st = os.stat(backing_flat)
                assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (4242, 0o640)
        finally:
            os.rmdir(mnt)


# -- a real libvirt ------------------------------------------------------------------------------

LIBVIRT_CONF = """\
unix_sock_dir = "{sock_dir}"
auth_unix_rw = "none"
auth_unix_ro = "none"
"""
DOMAIN_XML = """\
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='vmdk' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def _wait_for(cond, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _read_pid(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0) or None
    except (OSError, ValueError):
        return None


@pytest.fixture
def libvirt():
    """A private libvirtd (its socket in a folder of ours) and virtlogd; stopped by pid afterwards."""
    for tool in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"):
        if not shutil.which(tool):
            pytest.skip(f"needs {tool} (Debian packages libvirt-daemon-system, libvirt-clients, qemu-system-x86)")
    if os.geteuid() != 0:
        pytest.skip("the system libvirtd (QEMU as libvirt-qemu, dynamic ownership) needs root")
    base = tempfile.mkdtemp(prefix="vmfs-lv-", dir="/tmp")  # short: AF_UNIX paths
    started = []
    try:
        if not os.path.exists("/run/libvirt/virtlogd-sock"):
            subprocess.run(["virtlogd", "-d", "-p", f"{base}/virtlogd.pid"], check=True, timeout=60)
            _wait_for(lambda: _read_pid(f"{base}/virtlogd.pid"), "virtlogd")
            started.append(_read_pid(f"{base}/virtlogd.pid"))
        sock_dir = os.path.join(base, "sock")
        os.mkdir(sock_dir)
        with open(os.path.join(base, "libvirtd.conf"), "w") as f:
            f.write(LIBVIRT_CONF.format(sock_dir=sock_dir))
        subprocess.run(["libvirtd", "-d", "-f", f"{base}/libvirtd.conf", "-p", f"{base}/libvirtd.pid"], check=True,
                       timeout=60)
        _wait_for(lambda: _read_pid(f"{base}/libvirtd.pid"), "libvirtd's pid file")
        started.append(_read_pid(f"{base}/libvirtd.pid"))
        uri = f"qemu:///system?socket={sock_dir}/libvirt-sock"
        _wait_for(lambda: subprocess.run(["virsh", "-c", uri, "list"], capture_output=True).returncode == 0,
                  "libvirtd to answer")
        yield uri
    finally:
        for pid in reversed([p for p in started if p]):
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            os.kill(pid, 15)
            select.select([pidfd], [], [], DEADLINE_S)
            os.close(pidfd)
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.qemu
def test_libvirt_domain_runs_from_the_mount_without_a_hand_fix_and_umount_names_qemu(enc_env, libvirt):
    """The README's libvirt recipe: --allow-other, the descriptor in <source file>; libvirt chowns it, the
    extent follows, QEMU (libvirt-qemu, in libvirt's own mount namespace) runs; umount refuses, naming it."""
    mnt = tempfile.mkdtemp(prefix="vmfs-mnt-", dir="/tmp")
    os.chmod(mnt, 0o755)
    name = f"vmfs-crypt-test-{os.getpid()}"
    xml = os.path.join(enc_env.base, "domain.xml")
    backing_flat = os.path.join(enc_env.datastore, "vm1", "disk-flat.vmdk")
    virsh = ["virsh", "-c", libvirt]
    try:
        with mounted(enc_env, mnt, "--allow-other") as m:
            with open(xml, "w") as f:
                f.write(DOMAIN_XML.format(name=name, disk=os.path.join(m, "vm1", "disk.vmdk")))
            created = subprocess.run(virsh + ["create", xml], capture_output=True, text=True, timeout=120)
            assert created.returncode == 0, created.stderr
            try:
                state = subprocess.run(virsh + ["domstate", name], capture_output=True, text=True).stdout.strip()
                assert state == "running"
                qemu_uid = pwd.getpwnam("libvirt-qemu").pw_uid
                assert os.stat(backing_flat).st_uid == qemu_uid, "libvirt's chown of the descriptor reached the extent"
                proc = enc_env.run("umount", m, check=False, timeout=120)
                err = proc.stderr.decode()
                assert proc.returncode == 11, err
                assert "qemu-system" in err and "another mount namespace" in err and "disk-flat.vmdk" in err, err
                assert is_mounted(m)
            finally:
                subprocess.run(virsh + ["destroy", name], capture_output=True, timeout=120)
            assert os.stat(backing_flat).st_uid == 0, "libvirt gave the descriptor back, and the extent with it"
    finally:
        os.rmdir(mnt)
