"""Issue 10's loose ends: a folder whose in-place re-encryption is in flight, as `info` reports it and as every mount resumes it.

`info` says "re-encryption in progress" (which operation, file, percent, and who carries it out
or resumes it) instead of "damaged", while a genuinely damaged folder stays damaged. Every
mount path (plain, `--name` through the agent, `--foreground` under systemd) resumes such a
folder itself, online, once it is live: under systemd only after READY=1.
"""

import json
import os
import subprocess

import pytest

from support import CLI
from support.env import is_mounted
from test_host import DEADLINE_S, _notify_socket
from test_reencrypt import REGION, make_vm, run_killed, state


@pytest.fixture
def small_regions(venv_env):
    venv_env.env["VMFS_CRYPT_REGION_SIZE"] = str(REGION)
    return venv_env


def _info(env, path, *extra) -> tuple[int, dict]:
    out = env.run("info", "--json", path, *extra, check=False)
    return out.returncode, json.loads(out.stdout)


def _mnt(env) -> str:
    mnt = os.path.join(env.base, "mnt")
    os.makedirs(mnt, exist_ok=True)
    env.mounts.append(mnt)
    return mnt


def _configure(env, name: str, mnt: str) -> None:
    with open(env.config, "a", encoding="utf-8") as f:
        f.write(f'\n[mounts.{name}]\ndatastore = "{env.ds}"\nmountpoint = "{mnt}"\n')


@pytest.mark.cli
def test_info_says_an_interrupted_reencryption_is_in_progress_and_a_damaged_folder_is_damaged(small_regions):
    env = small_regions
    vm, _ = make_vm(env.ds)
    run_killed(env, vm, ["encrypt"], 10, True, [0])  # SIGKILLed inside its 10th region
    at_rest = state(vm)
    lost, _ = make_vm(env.ds, "lost")  # keys lost: encrypted, then its key file removed
    env.run("encrypt", lost)
    os.unlink(os.path.join(lost, ".vmfs-crypt.json"))
    broken, _ = make_vm(env.ds, "broken")  # a state FORMAT.md 7.8 rejects: damaged, not "in progress"
    run_killed(env, broken, ["encrypt"], 3, False, [0])
    with open(os.path.join(broken, ".vmfs-crypt.json"), encoding="utf-8") as f:
        doc = json.load(f)
    doc["reencrypt"]["files"][0]["boundary"] = 512  # neither its size nor a multiple of regionSize
    with open(os.path.join(broken, ".vmfs-crypt.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f)

    rc, one = _info(env, vm)
    assert rc == 0, one
    assert (one["state"], one["damage"], one["damage_code"], one["encrypted"]) == ("reencrypting", None, None, False)
    disk = next(f for f in at_rest["files"] if f["name"] == "disk-flat.vmdk")
    r = one["reencrypt"]
    assert (r["op"], r["where"], r["file"]) == ("encrypt", "at-rest", "disk-flat.vmdk"), r
    total = sum(f["size"] for f in at_rest["files"])
    assert 0 < disk["boundary"] < disk["size"] and r["done_bytes"] == disk["boundary"]
    assert r["percent"] == round(100.0 * disk["boundary"] / total, 1)
    assert {f["name"]: f["role"] for f in one["files"]}["disk-flat.vmdk"] == "reencrypting"
    text = env.run("info", vm).stdout.decode()
    assert f"{vm}: re-encryption in progress: encrypt, file disk-flat.vmdk, {r['percent']:.1f} %" in text, text
    assert "'vmfs-crypt mount'" in text and f"'vmfs-crypt encrypt {vm}'" in text and "DAMAGED" not in text, text

    rc, ds = _info(env, env.ds)
    folders = {f["name"]: f for f in ds["folders"]}
    assert folders["vm1"]["state"] == "reencrypting" and folders["vm1"]["damage"] is None
    assert folders["lost"]["state"] == "damaged" and "lost" in folders["lost"]["damage"]
    assert folders["broken"]["state"] == "damaged" and "boundary" in folders["broken"]["damage"]
    assert folders["broken"]["reencrypt"] is None
    assert rc != 0  # the damaged folders make info fail; the one in flight does not
    out = env.run("info", env.ds, check=False)
    summary = out.stdout.decode()
    assert "3 folder(s), 0 encrypted, 1 being re-encrypted, 2 DAMAGED" in summary, summary
    assert f"vm1: re-encryption in progress: encrypt, file disk-flat.vmdk" in summary, summary
    assert b"vm1 is damaged" not in out.stderr and b"is damaged (and 1 more" in out.stderr, out.stderr


@pytest.mark.cli
@pytest.mark.fuse
def test_info_of_an_online_deep_rekey_says_the_mount_carries_it_out(small_regions):
    env = small_regions
    vm, files = make_vm(env.ds)
    env.run("encrypt", vm)
    mnt = _mnt(env)
    env.run("mount", env.ds, mnt)
    try:
        folder = os.path.join(mnt, "vm1")
        env.run("rekey", "--deep", "--background", "--rate", "1M", folder)  # half a minute: paused long before
        env.run("pause", folder)
        rc, one = _info(env, folder)  # through the mount: answered for the folder at rest
        assert rc == 0 and one["state"] == "reencrypting" and one["damage"] is None, one
        r = one["reencrypt"]
        assert (r["op"], r["where"], r["paused"]) == ("rekey", "online", True), r
        assert r["file"] in ("disk-flat.vmdk", "vm1.nvram") and one["encrypted"] is True
        text = env.run("info", folder).stdout.decode()
        assert ": re-encryption in progress: deep rekey (paused), file " in text, text
        assert f"carried out online by the mount of {os.path.realpath(env.ds)}" in text, text
        env.run("resume", "--rate", "1G", folder)
        env.run("operations", "--wait")
        rc, one = _info(env, folder)
        assert rc == 0 and (one["state"], one["reencrypt"]) == ("encrypted", None), one
        with open(os.path.join(folder, "disk-flat.vmdk"), "rb") as f:
            assert f.read() == files["disk-flat.vmdk"]
    finally:
        env.run("umount", mnt, check=False)


@pytest.mark.cli
@pytest.mark.fuse
def test_a_mount_started_by_the_agent_with_name_resumes_an_interrupted_operation(small_regions):
    """`mount --name` goes through the agent, which runs the mount: it resumes online like any other mount."""
    env = small_regions
    vm, files = make_vm(env.ds)
    run_killed(env, vm, ["encrypt"], 40, True, [0])
    mnt = _mnt(env)
    _configure(env, "store1", mnt)
    env.run("agent", "start")
    out = env.run("mount", "--name", "store1")
    try:
        assert is_mounted(mnt)
        assert f"resuming the interrupted in-place encrypt of {os.path.realpath(vm)} online".encode() in out.stdout, \
            out.stdout
        waited = env.run("operations", "--wait")
        assert f"online encrypt of {os.path.realpath(vm)}: done".encode() in waited.stdout, waited.stdout
        assert state(vm) is None and not os.path.exists(os.path.join(vm, ".vmfs-crypt-region"))
        for name in ("disk-flat.vmdk", "vm1.nvram"):
            with open(os.path.join(mnt, "vm1", name), "rb") as f:
                assert f.read() == files[name], name
    finally:
        env.run("umount", "--name", "store1", check=False)
    with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
        assert b"encryption.keySafe" in f.read()  # the commit gave the key back to the descriptor


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.parametrize("how", ["args", "name"])
def test_under_systemd_the_resume_starts_only_after_ready(small_regions, how):
    """vmfs-crypt@NAME.service (Type=notify): READY=1 first, then the resume, then STATUS back to serving.

    Before, the mount resumed before it mounted, so READY=1 waited for the whole re-encryption
    (systemd's start time-out, 90 s by default, kills a service that is not ready by then).
    """
    env = small_regions
    vm, files = make_vm(env.ds)
    run_killed(env, vm, ["encrypt"], 10, True, [0])
    mnt = _mnt(env)
    args = [env.ds, mnt]
    if how == "name":
        _configure(env, "store1", mnt)
        args = ["--name", "store1"]
    notify, path = _notify_socket(env.runtime)  # a Unix datagram socket, as systemd's NOTIFY_SOCKET
    proc = subprocess.Popen(CLI + ["mount", "--foreground", *args], env=dict(env.env, NOTIFY_SOCKET=path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=env.base)
    serving = f"STATUS=serving {os.path.realpath(env.ds)} at {os.path.realpath(mnt)}"
    try:
        first = notify.recv(4096).decode().splitlines()
        assert "READY=1" in first and serving in first, first
        second = notify.recv(4096).decode().splitlines()
        assert second == [f"{serving}; resuming the interrupted in-place encrypt of {os.path.realpath(vm)}"], second
        third = notify.recv(4096).decode().splitlines()
        assert third == [serving], third  # every resume ended, none failed
        assert state(vm) is None and not os.path.exists(os.path.join(vm, ".vmfs-crypt-region"))
        for name in ("disk-flat.vmdk", "vm1.nvram"):
            with open(os.path.join(mnt, "vm1", name), "rb") as f:
                assert f.read() == files[name], name
        env.run("umount", mnt)
        assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
        assert proc.wait(timeout=DEADLINE_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
