"""Issue 10: `vmfs-crypt abort` returns an interrupted in-place encrypt, decrypt or deep rekey to the old keys.

The real CLI runs with small regions (as tests/test_reencrypt.py): the forward operation is
SIGKILLed inside a region, then the abort is SIGKILLed at its own stop points (after a region,
inside a region) and run again until it finishes. Between kills the folder is read by the
independent reader written from FORMAT.md alone; at the end every byte at rest is what it was
before the operation began (XTS is deterministic: the same plaintext under the old DEK gives
the same ciphertext), the new DEK decrypts nothing, and the key metadata is the old one.
"""

import json
import os

import pytest

from test_format_independent import read_plaintext
from test_reencrypt import (REGION, assert_holes_kept, assert_old_dek_decrypts_nothing, dek_of, key_file,
                            make_vm, run_killed, state)

OPS = {"encrypt": ["encrypt"], "decrypt": ["decrypt"], "rekey": ["rekey", "--deep"]}


def _at_rest(vm: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(vm)):
        if name.startswith(".vmfs-crypt-region"):
            continue
        with open(os.path.join(vm, name), "rb") as f:
            out[name] = f.read()
    return out


def _disk_state(st: dict) -> dict:
    return next(f for f in st["files"] if f["name"] == "disk-flat.vmdk")


@pytest.fixture
def small_regions(venv_env):
    venv_env.env["VMFS_CRYPT_REGION_SIZE"] = str(REGION)
    return venv_env


@pytest.mark.cli
@pytest.mark.parametrize("op", ["encrypt", "decrypt", "rekey"])
def test_a_killed_abort_resumes_and_every_file_is_back_under_its_old_key(small_regions, op):
    env = small_regions
    vm, files = make_vm(env.ds)
    keys = key_file(env)
    if op != "encrypt":
        env.run("encrypt", vm)
    before = _at_rest(vm)  # every file's bytes, the key file and the descriptor's key lines included

    # The forward operation, killed inside region 60 of the disk: a valid sidecar, half the region rewritten.
    fwd = run_killed(env, vm, OPS[op], 60, True, [0])
    assert _disk_state(fwd)["boundary"] == 59 * REGION and "aborting" not in fwd
    new_dek = dek_of(_disk_state(fwd)["to"], keys) if op == "rekey" else None

    # The abort, killed after its 10th region, then inside its 20th (counted from where it starts).
    peak = [0]
    st = run_killed(env, vm, ["abort"], 10, False, peak)
    assert st["aborting"] is True and _disk_state(st)["boundary"] == 49 * REGION, _disk_state(st)
    forward = env.run(*OPS[op], vm, check=False)  # never resumed forward while its abort is in flight
    assert forward.returncode == 2 and b"vmfs-crypt abort" in forward.stderr, forward.stderr
    assert len(forward.stderr.strip().splitlines()) == 1, forward.stderr
    st = run_killed(env, vm, ["abort"], 20, True, peak)
    b = _disk_state(st)["boundary"]
    assert st["aborting"] is True and b == 30 * REGION, b
    with open(os.path.join(vm, ".vmfs-crypt-region"), "rb") as f:  # the abort's sidecar: the region below B
        head, body = f.read().split(b"\n", 1)
    assert (json.loads(head)["offset"], len(body)) == (b - REGION, REGION)
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        f.seek(b - REGION)
        now = f.read(REGION)
    assert now[:REGION // 2] != body[:REGION // 2] and now[REGION // 2:] == body[REGION // 2:]
    assert 0 < peak[0] <= REGION + 4096
    # FORMAT.md alone reads the folder in the middle of the abort (7.8, the reading rule while aborting).
    for name in files:
        got, where = read_plaintext(vm, name, keys)
        assert got == files[name], f"{name} unreadable in the middle of the abort"
        assert (where == "reencrypt") == (name in ("disk-flat.vmdk", "vm1.nvram")), (name, where)
    refused = env.run("cat", os.path.join(vm, "disk-flat.vmdk"), check=False)
    assert refused.returncode != 0 and b"vmfs-crypt abort" in refused.stderr
    info = json.loads(env.run("info", "--json", vm).stdout)["reencrypt"]
    assert (info["aborting"], info["command"], info["where"]) == (True, f"vmfs-crypt abort {vm}", "at-rest"), info

    out = env.run("abort", vm)
    assert b"aborted" in out.stdout, out.stdout
    assert state(vm) is None and not os.path.exists(os.path.join(vm, ".vmfs-crypt-region"))
    after = _at_rest(vm)
    for name in ("disk-flat.vmdk", "vm1.nvram", "vm1.vmx"):
        assert after[name] == before[name], f"{name}: not the bytes it had before the {op}"
    assert_holes_kept(vm)
    if op == "encrypt":
        assert ".vmfs-crypt.json" not in after, "an aborted encrypt of a plain folder left it encrypted"
        assert after["disk.vmdk"] == before["disk.vmdk"]
    else:
        keys_doc = json.loads(after[".vmfs-crypt.json"])
        assert keys_doc["features"] == [] and "reencrypt" not in keys_doc
        assert keys_doc["kek"] == json.loads(before[".vmfs-crypt.json"])["kek"]
        if op == "rekey":  # the descriptor has its old key lines back
            assert after["disk.vmdk"] == before["disk.vmdk"]
            assert_old_dek_decrypts_nothing(new_dek, after["disk-flat.vmdk"], files["disk-flat.vmdk"],
                                            "disk-flat.vmdk")
        for name in ("disk-flat.vmdk", "vm1.nvram"):
            assert env.run("cat", os.path.join(vm, name)).stdout == files[name]
            assert read_plaintext(vm, name, keys)[0] == files[name]
    again = env.run("abort", vm, check=False)  # nothing in flight any more
    assert again.returncode == 2, again.stderr
    assert again.stderr.decode().strip() == f"vmfs-crypt: {vm}: no encrypt, decrypt or deep rekey is in flight " \
                                            "there; nothing to abort"


@pytest.mark.cli
def test_an_abort_killed_before_its_first_region_and_after_its_last_finishes(small_regions):
    """The kills at the edges: right after the state became the abort's (no region of it yet), and with every
    boundary back at 0 but the commit not written (the folder is still in flight, all under `from`)."""
    env = small_regions
    vm, files = make_vm(env.ds)
    env.run("encrypt", vm)
    before = _at_rest(vm)
    run_killed(env, vm, ["rekey", "--deep"], 3, False, [0])  # 3 regions of the disk under the new DEK
    st = run_killed(env, vm, ["abort"], 3, False, [0])  # the abort's 3rd region brings the disk back to 0
    assert st["aborting"] is True and all(f["boundary"] == 0 for f in st["files"]), st
    for name in ("disk-flat.vmdk", "vm1.nvram"):
        assert read_plaintext(vm, name, key_file(env))[0] == files[name]
    env.run("abort", vm)
    assert state(vm) is None
    after = _at_rest(vm)
    assert all(after[n] == before[n] for n in before if not n.startswith(".vmfs-crypt-region")), \
        [n for n in before if after.get(n) != before[n]]


@pytest.mark.cli
def test_abort_of_a_folder_with_nothing_in_flight_is_one_line_and_changes_nothing(venv_env):
    env = venv_env
    vm, _ = make_vm(env.ds)
    before = _at_rest(vm)
    out = env.run("abort", vm, check=False)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and b"nothing to abort" in out.stderr
    assert b"Traceback" not in out.stderr
    env.run("encrypt", vm)
    encrypted = _at_rest(vm)
    out = env.run("abort", os.path.join(vm, "disk.vmdk"), check=False)
    assert out.returncode == 2 and b"nothing to abort" in out.stderr
    assert _at_rest(vm) == encrypted and before != encrypted


# -- the MUST-reject rules of the `aborting` member (FORMAT.md 7.8), on the parser and on the journal ----------
def _aborting_doc() -> dict:
    from test_reencrypt import in_flight_doc
    doc = in_flight_doc()  # vm1.nvram finished, vm1-small.bin at 1 MiB of 3 MiB
    doc["reencrypt"]["aborting"] = True
    return doc


def test_an_aborting_state_parses_round_trips_and_its_region_is_below_the_boundary():
    from test_reencrypt import _parse
    keys = _parse(_aborting_doc())
    st = keys.reencrypt
    assert st.aborting and st.current().name == "vm1-small.bin"
    assert st.region_of(st.current()) == (0, 1 << 20)
    assert json.loads(keys.to_bytes())["reencrypt"]["aborting"] is True
    st.files[1].boundary = 0  # the second file is back: the first (finished) one is next, from its end
    assert st.current().name == "vm1.nvram" and st.region_of(st.current()) == (0, 8708)  # R is 1 MiB
    st.files[0].boundary = 0
    assert st.current() is None
    forward = _parse({k: v for k, v in _aborting_doc().items()} | {"reencrypt": {
        k: v for k, v in _aborting_doc()["reencrypt"].items() if k != "aborting"}})
    assert not forward.reencrypt.aborting and "aborting" not in json.loads(forward.to_bytes())["reencrypt"]


@pytest.mark.parametrize("value", [False, None, 1, "true", [True]], ids=repr)
def test_an_aborting_member_that_is_not_true_is_rejected(value):
    from test_format_independent import Refused, parse_in_flight
    from test_reencrypt import _parse
    from vmfs_crypt.errors import FormatError
    doc = _aborting_doc()
    doc["reencrypt"]["aborting"] = value
    with pytest.raises(FormatError, match="aborting"):
        _parse(doc)
    with pytest.raises(Refused):  # the reader written from FORMAT.md alone agrees
        parse_in_flight(doc)


def test_readers_outside_the_engine_refuse_a_folder_whose_abort_is_in_flight():
    from test_reencrypt import _parse
    from vmfs_crypt.errors import FormatError
    with pytest.raises(FormatError, match="vmfs-crypt abort"):
        _parse(_aborting_doc(), allow=False)


def test_a_journal_commits_an_abort_only_with_every_boundary_back_at_0(tmp_path):
    from test_reencrypt import _parse
    from vmfs_crypt.errors import FormatError
    from vmfs_crypt.format.folder import FolderKeys, VmFolder
    from vmfs_crypt.format.journal import check_journal
    vm = tmp_path / "vm"
    vm.mkdir()
    for name, size in (("vm1.nvram", 8708), ("vm1-small.bin", 3 << 20)):
        (vm / name).write_bytes(b"x" * size)
    doc = _aborting_doc()
    current = _parse(doc)
    back = {"version": 1, "renames": [], "keys": FolderKeys(current.kek, dict(current.files)).to_bytes().decode()}
    to = FolderKeys(current.kek, {f.name: f.to for f in current.reencrypt.files})
    forward = {"version": 1, "renames": [], "keys": to.to_bytes().decode()}

    def check(d, journal):
        (vm / ".vmfs-crypt.json").write_text(json.dumps(d))
        check_journal(VmFolder(str(vm)), journal, "j")

    with pytest.raises(FormatError, match="not finished"):
        check(doc, back)  # the second file is still partly under `to`
    doc["reencrypt"]["files"][1]["boundary"] = 3 << 20  # every file finished, but aborting: no forward commit
    with pytest.raises(FormatError, match="not finished"):
        check(doc, forward)
    for f in doc["reencrypt"]["files"]:
        f["boundary"] = 0
    check(doc, back)  # every boundary back at 0: the old records are the commit
    with pytest.raises(FormatError, match="new key record"):
        check(doc, forward)


# -- online: the mount aborts the operation it runs, with writers on the disk ---------------------------------
def _poll(cond, what: str, env, timeout: float = 300):
    """Wait for a real condition of the system (never a fixed sleep), with a deadline."""
    import time
    deadline = time.monotonic() + timeout
    while not (got := cond()):
        assert time.monotonic() < deadline, f"{what} did not happen; {env.mount_logs()}"
        time.sleep(0.05)
    return got


def _disk_boundary(vm: str) -> int:
    st = state(vm)
    return _disk_state(st)["boundary"] if st else -1


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.parametrize("op", ["encrypt", "rekey"])
def test_an_online_abort_killed_with_the_mount_is_finished_by_the_next_mount(small_regions, op):
    """Forward at 512 KiB/s (2 regions/s) to at least 12 regions, then `abort --background`: the mount goes back
    (at the same rate) and stops itself inside its 24th region, which is one of the abort's (the forward did
    between 12 and 23). SIGKILLed there with two writers running; the next mount finishes the abort."""
    import signal
    import subprocess
    from test_online import Writers, _mount, _mount_pid, _stopped, assert_disk, at_rest, disk_dek, expected, \
        writes_in
    env = small_regions
    vm, files = make_vm(env.ds)
    if op == "rekey":
        env.run("encrypt", vm)
    old_dek = disk_dek(vm, env) if op == "rekey" else None
    mnt = _mount(env, {"VMFS_CRYPT_TEST_STOP_IN_REGION": "24"})
    pid = _mount_pid(mnt)
    folder = os.path.join(mnt, "vm1")
    disk = os.path.join(folder, "disk-flat.vmdk")
    writers = Writers(env, disk, f"abort-{op}")
    try:
        env.run(*OPS[op], "--background", "--rate", "512K", folder)
        _poll(lambda: _disk_boundary(vm) >= 12 * REGION, "12 forward regions", env)
        out = env.run("abort", "--background", folder)
        assert b"goes back to the old keys" in out.stdout, out.stdout
        _poll(lambda: _stopped(pid), "the stop inside the abort's region", env)
        mid = state(vm)
        assert mid["aborting"] is True and 0 < _disk_state(mid)["boundary"] < 23 * REGION, mid
        new_dek = dek_of(_disk_state(mid)["to"], key_file(env)) if op == "rekey" else None
        os.kill(pid, signal.SIGKILL)
    finally:
        logs = writers.finish()
    subprocess.run(["fusermount", "-uz", mnt], capture_output=True)
    assert writes_in(logs) > 0
    want, maybe = expected(files["disk-flat.vmdk"], logs)
    # Killed inside a region of the abort: FORMAT.md alone reads every acknowledged write (the sidecar under `to`).
    assert os.path.exists(os.path.join(vm, ".vmfs-crypt-region"))
    assert_disk(at_rest(vm, env), want, maybe, "at rest right after the kill in the abort")
    out = env.run("mount", env.ds, mnt, timeout=300)  # the mount goes on back, online, once it serves
    assert f"resuming the interrupted abort of the in-place {'deep rekey' if op == 'rekey' else op} of " \
           f"{os.path.realpath(vm)} online".encode() in out.stdout, out.stdout
    try:
        waited = env.run("operations", "--wait")
        assert f"online {'deep rekey' if op == 'rekey' else op} of {os.path.realpath(vm)}: aborted".encode() \
            in waited.stdout, waited.stdout
        assert state(vm) is None and not os.path.exists(os.path.join(vm, ".vmfs-crypt-region"))
        with open(disk, "rb") as f:
            assert_disk(f.read(), want, maybe, "through the mount after the abort")
        with open(os.path.join(folder, "vm1.nvram"), "rb") as f:
            assert f.read() == files["vm1.nvram"]
    finally:
        env.run("umount", mnt, check=False)
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        backing = f.read()
    if op == "encrypt":  # back to a plain folder: the bytes at rest are the plaintext
        assert not os.path.exists(os.path.join(vm, ".vmfs-crypt.json"))
        assert_disk(backing, want, maybe, "the disk at rest after the aborted encrypt")
    else:
        assert disk_dek(vm, env) == old_dek, "the disk is not keyed by its old DEK after the abort"
        assert_disk(at_rest(vm, env), want, maybe, "at rest (FORMAT.md reader) after the abort")
        plain = read_plaintext(vm, "disk-flat.vmdk", key_file(env))[0]
        assert_old_dek_decrypts_nothing(new_dek, backing, plain, "disk-flat.vmdk")


@pytest.mark.cli
@pytest.mark.fuse
def test_abort_of_a_paused_online_deep_rekey_waits_and_the_rekey_command_fails(small_regions):
    """`vmfs-crypt abort` (waiting) of an online deep rekey that a waiting `rekey --deep` started and `pause`
    paused: abort exits 0 once the folder is under its old keys, the rekey command exits non-zero saying it
    was aborted, the writers' acknowledged data is there; afterwards abort says there is nothing to abort."""
    import subprocess
    from support import CLI
    from test_online import Writers, _mount, assert_disk, at_rest, disk_dek, expected, writes_in
    env = small_regions
    vm, files = make_vm(env.ds)
    env.run("encrypt", vm)
    old_dek = disk_dek(vm, env)
    mnt = _mount(env)
    folder = os.path.join(mnt, "vm1")
    disk = os.path.join(folder, "disk-flat.vmdk")
    writers = Writers(env, disk, "abort-paused")
    rekey = subprocess.Popen(CLI + ["rekey", "--deep", "--rate", "1M", folder], env=env.env, cwd=env.base,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _poll(lambda: _disk_boundary(vm) >= 8 * REGION, "8 forward regions", env)
        env.run("pause", folder)
        ops = json.loads(env.run("operations", "--json").stdout)["operations"]
        assert [o["state"] for o in ops] == ["paused"], ops
        out = env.run("abort", folder, timeout=300)
        assert b"was aborted; the folder is under its old keys" in out.stdout, out.stdout
        _, err = rekey.communicate(timeout=120)
        assert rekey.returncode == 1 and b"was aborted" in err and len(err.strip().splitlines()) == 1, err
        ops = json.loads(env.run("operations", "--json").stdout)["operations"]
        assert [(o["op"], o["state"]) for o in ops] == [("rekey", "aborted")], ops
        assert state(vm) is None and disk_dek(vm, env) == old_dek
    finally:
        if rekey.poll() is None:
            rekey.kill()
            rekey.communicate()
        logs = writers.finish()
    try:
        assert writes_in(logs) > 0
        want, maybe = expected(files["disk-flat.vmdk"], logs)
        assert not maybe
        with open(disk, "rb") as f:
            assert_disk(f.read(), want, maybe, "through the mount after the online abort")
        assert_disk(at_rest(vm, env), want, maybe, "at rest after the online abort")
        again = env.run("abort", folder, check=False)
        assert again.returncode == 2 and b"nothing to abort" in again.stderr, again.stderr
        assert len(again.stderr.strip().splitlines()) == 1
    finally:
        env.run("umount", mnt, check=False)


@pytest.mark.cli
@pytest.mark.fuse
@pytest.mark.parametrize("datapath", ["native", "python"])
def test_the_online_abort_holds_back_only_guest_io_into_its_region_below_the_boundary(small_regions, datapath):
    """The way back uses the hot zone as the forward run does: the engine waits inside the abort's region
    [L, B) with L > 0 (the mount's 22nd region: the forward did 12-21 at 512 KiB/s, the abort's regions are
    counted on; test-only VMFS_CRYPT_TEST_HOLD_IN_REGION);
    reads and writes below L (new key), at B and above (old key) complete meanwhile, I/O into [L, B) only after
    the region is rewritten, and every byte is right at the end (the folder back under its old DEK)."""
    from test_online import BLOCK, _mount, at_rest, disk_dek, engine_held, only_the_zone_waits
    env = small_regions
    vm, files = make_vm(env.ds)
    env.run("encrypt", vm)
    old_dek = disk_dek(vm, env)
    fifo = os.path.join(env.base, "hold")
    os.mkfifo(fifo)
    extra = {"VMFS_CRYPT_TEST_HOLD_IN_REGION": f"22:{fifo}"}
    if datapath == "python":
        extra["VMFS_CRYPT_NATIVE"] = "0"
    mnt = _mount(env, extra)
    folder = os.path.join(mnt, "vm1")
    disk = os.path.join(folder, "disk-flat.vmdk")
    original = files["disk-flat.vmdk"]
    held = None
    try:
        env.run("rekey", "--deep", "--background", "--rate", "512K", folder)
        _poll(lambda: _disk_boundary(vm) >= 12 * REGION, "12 forward regions", env)
        env.run("abort", "--background", folder)
        held = engine_held(fifo, env)  # in its 22nd region
        st = state(vm)
        b = _disk_state(st)["boundary"]
        assert st["aborting"] is True and 2 * REGION <= b <= 11 * REGION, st  # L > 0: some of the disk below
        zone = (b - REGION, b)
        mine = {0: b"a" * BLOCK, 24 << 20: b"b" * BLOCK, zone[0] + 3 * BLOCK: b"c" * BLOCK}
        held = only_the_zone_waits(disk, original, zone, (0, zone[1], 16 << 20), mine, held)  # below L, at B, above
        ops = _poll(lambda: [o for o in json.loads(env.run("operations", "--json").stdout)["operations"]
                             if o["state"] not in ("running", "aborting", "paused")], "the end of the abort", env)
        assert ops[0]["state"] == "aborted", ops
        want = bytearray(original)
        for offset, data in mine.items():
            want[offset:offset + BLOCK] = data
        with open(disk, "rb") as f:
            assert f.read() == want
        assert state(vm) is None and disk_dek(vm, env) == old_dek
        assert at_rest(vm, env) == want
    finally:
        if held is not None:
            os.close(held)
        env.run("umount", mnt, check=False)
