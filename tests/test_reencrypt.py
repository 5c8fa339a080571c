"""Issue 10: in-place encrypt, deep rekey and decrypt, SIGKILLed at several points and resumed (FORMAT.md 7.8).

The real CLI runs with a small region size (VMFS_CRYPT_REGION_SIZE) so that a 32 MiB disk has
128 regions; it stops itself at a chosen region (the engine's test-only stop points) and is SIGKILLed there. Between kills
the folder is read with the independent reader of test_format_independent.py (FORMAT.md alone).
"""

import hashlib
import json
import os
import signal
import subprocess
import time

import pytest

from support import CLI
from test_format_independent import decrypt_file, native_kek, parse_data, parse_locator, read_plaintext, unwrap


SECTOR = 512
REGION = 256 << 10  # 128 regions
DISK = 32 << 20
NVRAM = (b"\x5a\xc3\x96\x3c" * 128) * 17 + b"tail"  # a partial last sector
DESCRIPTOR = (b'# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n'
              b'# Extent description\nRW 65536 FLAT "disk-flat.vmdk" 0\n')
HOLE_AT = 20 << 20  # [20 MiB, 28 MiB) of the disk is never written: a hole of the backing file
HOLE_END = 28 << 20


def make_vm(ds: str, name: str = "vm1") -> tuple[str, dict[str, bytes]]:
    vm = os.path.join(ds, name)
    os.makedirs(vm)
    rnd = hashlib.shake_256(b"issue 10").digest(8 << 20)
    with open(os.path.join(vm, "disk-flat.vmdk"), "wb") as f:
        f.truncate(DISK)
        for off in range(0, HOLE_AT, 8 << 20):
            f.seek(off)
            f.write(rnd[:HOLE_AT - off])
        f.seek(HOLE_END)
        f.write(rnd[:2 << 20])
        f.seek(3 << 20)
        f.write(bytes(256 << 10))  # zero sectors in the middle of data: holes once encrypted
    files = {"disk.vmdk": DESCRIPTOR, "vm1.nvram": NVRAM, "vm1.vmx": b'displayName = "vm1"\n'}
    for name, data in files.items():
        with open(os.path.join(vm, name), "wb") as f:
            f.write(data)
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        files["disk-flat.vmdk"] = f.read()
    assert_holes_kept(vm)  # the test's own premise
    return vm, files


def state(vm: str) -> dict | None:
    try:
        with open(os.path.join(vm, ".vmfs-crypt.json"), "rb") as f:
            doc = json.loads(f.read())
    except (FileNotFoundError, ValueError):  # ValueError: never torn (atomic), but be safe
        return None
    return doc.get("reencrypt")


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] == b"T"


def run_killed(env, vm: str, args: list[str], regions: int, mid_region: bool, peak: list[int]) -> dict:
    """Run the CLI until it stops itself at a fault-injection point, SIGKILL it there; the state at the kill.

    `regions`: the Nth region this run rewrites (VMFS_CRYPT_TEST_STOP_AFTER_REGIONS: after its
    boundary is committed; with `mid_region`, VMFS_CRYPT_TEST_STOP_IN_REGION: with its sidecar
    written and half of it rewritten in place).
    """
    run_env = dict(env.env)
    run_env["VMFS_CRYPT_TEST_STOP_IN_REGION" if mid_region else "VMFS_CRYPT_TEST_STOP_AFTER_REGIONS"] = str(regions)
    proc = subprocess.Popen(CLI + args + [vm], env=run_env, cwd=env.base, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not _stopped(proc.pid):
            if proc.poll() is not None:
                raise AssertionError(f"{args} ended ({proc.returncode}) before the stop point: "
                                     f"{proc.stderr.read().decode(errors='replace')}")
            assert time.monotonic() < deadline, "the stop point was not reached"
            time.sleep(0.005)  # polling a real condition (state T), with a deadline
        try:
            peak[0] = max(peak[0], os.stat(os.path.join(vm, ".vmfs-crypt-region")).st_size)
        except FileNotFoundError:
            pass
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    st = state(vm)
    assert st is not None, f"the {args} killed at region {regions} left no state"
    return st


def disk_regions_done(vm: str) -> int:
    st = state(vm)
    disk = next((f for f in st["files"] if f["name"] == "disk-flat.vmdk"), None) if st else None
    return disk["boundary"] // REGION if disk else 0


def key_file(env) -> dict[str, bytes]:
    with open(os.path.join(os.path.dirname(env.config), "native-local.key"), "rb") as f:
        return {"local": f.read()}


def dek_of(entry: dict, key_files: dict[str, bytes]) -> bytes:
    provider, key_id, wrapped = parse_locator(entry["keySafe"])
    return unwrap(native_kek(key_files[provider], key_id), wrapped, parse_data(entry["data"]))


def assert_holes_kept(vm: str) -> None:
    fd = os.open(os.path.join(vm, "disk-flat.vmdk"), os.O_RDONLY)
    try:
        assert os.lseek(fd, HOLE_AT, os.SEEK_DATA) >= HOLE_END, "the unwritten part of the disk was allocated"
    finally:
        os.close(fd)
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        f.seek(3 << 20)
        assert f.read(256 << 10) == bytes(256 << 10), "zero sectors were not stored as holes"


def assert_old_dek_decrypts_nothing(old_dek: bytes, backing: bytes, plain: bytes, name: str) -> None:
    """After a deep rekey, the old DEK gives back no non-zero sector of the file (the independent reader's decrypt)."""
    wrong = decrypt_file(old_dek, backing)
    for s in range(0, len(plain), SECTOR):
        if any(plain[s:s + SECTOR]):
            assert wrong[s:s + SECTOR] != plain[s:s + SECTOR], f"{name}: the old DEK decrypts sector {s // SECTOR}"


def check_plaintext(env, vm: str, files: dict[str, bytes]) -> None:
    for name in ("disk-flat.vmdk", "vm1.nvram"):
        got = env.run("cat", os.path.join(vm, name)).stdout
        assert got == files[name], f"{name}: plaintext differs after the resumed operation"


@pytest.fixture
def small_regions(venv_env):
    venv_env.env["VMFS_CRYPT_REGION_SIZE"] = str(REGION)
    return venv_env


@pytest.mark.cli
def test_killed_in_place_operations_resume(small_regions, tmp_path):
    env = small_regions
    vm, files = make_vm(env.ds)
    keys = key_file(env)
    peak = [0]
    for args, fractions in ((["encrypt"], (0.25, 0.5)), (["rekey", "--deep"], (0.3, 0.6)),
                            (["decrypt"], (0.2, 0.45))):  # second kills outside the holes
        before = old_dek = None
        if args[0] == "rekey":
            with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
                text = f.read().decode()
            before = next(ln for ln in text.splitlines() if ln.startswith("encryption.keySafe"))
            ks = text.split('encryption.keySafe = "')[1].split('"')[0]
            data = text.split('encryption.data = "')[1].split('"')[0]
            old_dek = dek_of({"keySafe": ks, "data": data}, keys)
        for i, fraction in enumerate(fractions):
            # The disk is the operation's first file: the Nth region of this run ends at a known boundary.
            target = int(fraction * DISK / REGION)
            mid = i == 1  # the second kill is inside a region, the crash the sidecar exists for
            st = run_killed(env, vm, args, target - disk_regions_done(vm), mid, peak)
            assert st["op"] == ("rekey" if args[0] == "rekey" else args[0])
            disk = next(f for f in st["files"] if f["name"] == "disk-flat.vmdk")
            assert disk["boundary"] == (target - 1 if mid else target) * REGION, (fraction, disk["boundary"])
            if mid:  # a valid sidecar for the region in flight, half of which is rewritten already
                with open(os.path.join(vm, ".vmfs-crypt-region"), "rb") as f:
                    head, body = f.read().split(b"\n", 1)
                assert json.loads(head)["offset"] == disk["boundary"] and len(body) == REGION
                with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
                    f.seek(disk["boundary"])
                    now = f.read(REGION)
                assert now[REGION // 2:] == body[REGION // 2:] and now[:REGION // 2] != body[:REGION // 2]
            # A reader of FORMAT.md alone decrypts the folder in the middle of the operation: the
            # files of the operation by 7.8, the descriptor's view and the .vmx as 6.3 and 7.2 say.
            for name in files:
                got, where = read_plaintext(vm, name, keys)
                assert got == files[name], f"{name} unreadable after a kill at {fraction}"
                assert (where == "reencrypt") == (name in ("disk-flat.vmdk", "vm1.nvram")), (name, where)
            with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
                assert b"encryption." not in f.read(), "a descriptor keys a file under re-encryption"
            refused = env.run("cat", os.path.join(vm, "disk-flat.vmdk"), check=False)
            assert refused.returncode != 0 and b"interrupted" in refused.stderr
        out = env.run(*args, vm)
        assert state(vm) is None and not os.path.exists(os.path.join(vm, ".vmfs-crypt-region")), out.stderr
        check_plaintext(env, vm, files)
        assert_holes_kept(vm)
        if args[0] == "encrypt":
            with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
                assert b"encryption.keySafe" in f.read()  # the key went back into the descriptor at the commit
        if args[0] == "rekey":
            with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
                assert before.encode() not in f.read()
            with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
                backing = f.read()
            assert_old_dek_decrypts_nothing(old_dek, backing, files["disk-flat.vmdk"], "disk-flat.vmdk")
    assert not os.path.exists(os.path.join(vm, ".vmfs-crypt.json"))
    for name, data in files.items():
        with open(os.path.join(vm, name), "rb") as f:
            assert f.read() == data, f"{name} differs after encrypt, deep rekey and decrypt"
    assert 0 < peak[0] <= REGION + 4096, f"the sidecar took {peak[0]} bytes for {REGION}-byte regions"


@pytest.mark.cli
def test_regions_of_several_chunks_computed_ahead_resume_after_a_kill(venv_env):
    """4 MiB regions: each region's cipher runs on worker threads while its sidecar is written (issue 13)."""
    env = venv_env
    region = 4 << 20  # four WRITE_CHUNKs
    env.env["VMFS_CRYPT_REGION_SIZE"] = str(region)
    vm, files = make_vm(env.ds)
    keys = key_file(env)
    env.run("encrypt", vm)
    with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
        text = f.read().decode()
    old_dek = dek_of({"keySafe": text.split('encryption.keySafe = "')[1].split('"')[0],
                      "data": text.split('encryption.data = "')[1].split('"')[0]}, keys)
    st = run_killed(env, vm, ["rekey", "--deep"], 3, False, [0])
    disk = next(f for f in st["files"] if f["name"] == "disk-flat.vmdk")
    assert disk["boundary"] == 3 * region
    for name in files:
        assert read_plaintext(vm, name, keys)[0] == files[name], f"{name} unreadable after the kill"
    env.run("rekey", "--deep", vm)
    assert state(vm) is None
    check_plaintext(env, vm, files)
    assert_holes_kept(vm)
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        assert_old_dek_decrypts_nothing(old_dek, f.read(), files["disk-flat.vmdk"], "disk-flat.vmdk")
    env.run("decrypt", vm)
    for name, data in files.items():
        with open(os.path.join(vm, name), "rb") as f:
            assert f.read() == data, f"{name} differs after encrypt, deep rekey and decrypt"


@pytest.mark.cli
def test_a_version_1_reader_refuses_a_folder_in_flight(small_regions):
    """The feature fails closed for readers that do not know it; `cat` refuses the folder's files too.

    (The mount now resumes such a folder first; its refusal of one it cannot resume is shown by
    test_the_next_mount_resumes_an_interrupted_encrypt.)
    """
    env = small_regions
    vm, files = make_vm(env.ds)
    run_killed(env, vm, ["encrypt"], 64, False, [0])
    with open(os.path.join(vm, ".vmfs-crypt.json"), "rb") as f:
        doc = json.loads(f.read())
    assert doc["features"] == ["reencrypt"]  # section 1: unknown features are rejected by older readers
    refused = env.run("cat", os.path.join(vm, "disk-flat.vmdk"), check=False)
    assert refused.returncode != 0 and b"interrupted" in refused.stderr
    env.run("encrypt", vm)
    check_plaintext(env, vm, files)


@pytest.mark.cli
@pytest.mark.fuse
def test_the_next_mount_resumes_an_interrupted_encrypt(small_regions):
    """Issue 10: `vmfs-crypt mount` finishes an in-place operation a SIGKILL interrupted, online once it serves.

    vm1 is killed inside a region and resumed by the mount; vm2's resume fails (its disk changed
    size meanwhile): the mount still starts, serves vm1, and refuses vm2's disk; `operations --wait`
    waits for both and names the command for vm2.
    """
    from support.env import is_mounted
    env = small_regions
    vm, files = make_vm(env.ds)
    vm2, files2 = make_vm(env.ds, "vm2")
    run_killed(env, vm, ["encrypt"], 40, True, [0])
    run_killed(env, vm2, ["encrypt"], 10, False, [0])
    os.truncate(os.path.join(vm2, "disk-flat.vmdk"), DISK - SECTOR)  # shrunk: growth is a guest writing online
    mnt = os.path.join(env.base, "mnt")
    os.makedirs(mnt)
    env.mounts.append(mnt)
    out = env.run("mount", env.ds, mnt, check=False, timeout=300)
    try:
        assert out.returncode == 0 and is_mounted(mnt), out.stderr.decode(errors="replace") + env.mount_logs()
        for folder in (vm, vm2):
            assert f"resuming the interrupted in-place encrypt of {os.path.realpath(folder)} online".encode() \
                in out.stdout, out.stdout
        waited = env.run("operations", "--wait", check=False)
        assert waited.returncode != 0, waited.stdout
        assert f"online encrypt of {os.path.realpath(vm)}: done".encode() in waited.stdout, waited.stdout
        assert f"'vmfs-crypt encrypt {os.path.realpath(vm2)}'".encode() in waited.stdout, waited.stdout
        for name in ("disk-flat.vmdk", "vm1.nvram", "vm1.vmx"):
            with open(os.path.join(mnt, "vm1", name), "rb") as f:
                assert f.read() == files[name], f"{name} differs through the mount after the resume"
        with pytest.raises(OSError):
            with open(os.path.join(mnt, "vm2", "disk-flat.vmdk"), "rb") as f:
                f.read(4096)
        with open(os.path.join(mnt, "vm2", "vm1.vmx"), "rb") as f:
            assert f.read() == files2["vm1.vmx"]  # the rest of the folder and the datastore are served
    finally:
        if is_mounted(mnt):
            env.run("umount", mnt)
    assert state(vm) is None and not os.path.exists(os.path.join(vm, ".vmfs-crypt-region"))
    assert state(vm2) is not None  # left as it was, for 'vmfs-crypt encrypt' once the disk is restored
    with open(os.path.join(vm, "disk-flat.vmdk"), "rb") as f:
        backing = f.read()
    plain = files["disk-flat.vmdk"]
    assert all(backing[s:s + SECTOR] != plain[s:s + SECTOR] for s in range(0, DISK, SECTOR)
               if any(plain[s:s + SECTOR])), "a sector of the backing file is plaintext"
    assert_holes_kept(vm)
    with open(os.path.join(vm, "disk.vmdk"), "rb") as f:
        assert b"encryption.keySafe" in f.read()


# -- the MUST-reject rules of FORMAT.md 7.8, on the parser alone --------------------------------
GOLDEN_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "ds", "vm1", ".vmfs-crypt.json")


def in_flight_doc() -> dict:
    with open(GOLDEN_KEYS, "rb") as f:
        doc = json.loads(f.read())
    files = doc["files"]
    doc["features"] = ["reencrypt"]
    doc["reencrypt"] = {"op": "rekey", "regionSize": 1 << 20, "kek": doc["kek"],
                        "files": [{"name": "vm1.nvram", "size": 8708, "boundary": 8708, "from": files["vm1.nvram"],
                                   "to": files["sparse.vmdk"], "descriptor": None},
                                  {"name": "vm1-small.bin", "size": 3 << 20, "boundary": 1 << 20,
                                   "from": files["vm1-small.bin"], "to": files["sparse.vmdk"], "descriptor": None}]}
    return doc


def _parse(doc: dict, allow: bool = True):
    from vmfs_crypt.format.folder import FolderKeys
    return FolderKeys.from_bytes(json.dumps(doc).encode(), "k", allow_reencrypt=allow)


def test_the_state_parses_and_round_trips():
    keys = _parse(in_flight_doc())
    assert keys.reencrypt.current().name == "vm1-small.bin"
    again = _parse(json.loads(keys.to_bytes()))
    assert again.reencrypt.to_json() == keys.reencrypt.to_json()


def _mutations():
    def drop(m):
        return lambda d: d["reencrypt"].pop(m)
    yield "no feature", lambda d: d.__setitem__("features", [])
    yield "feature twice", lambda d: d.__setitem__("features", ["reencrypt", "reencrypt"])
    yield "member missing", lambda d: d.pop("reencrypt")
    yield "op missing", drop("op")
    yield "unknown op", lambda d: d["reencrypt"].__setitem__("op", "shred")
    yield "extra member", lambda d: d["reencrypt"].__setitem__("x", 1)
    yield "region not a sector multiple", lambda d: d["reencrypt"].__setitem__("regionSize", 1000)
    yield "region 1.0", lambda d: d["reencrypt"].__setitem__("regionSize", 1048576.0)
    yield "kek null for rekey", lambda d: d["reencrypt"].__setitem__("kek", None)
    yield "no files", lambda d: d["reencrypt"].__setitem__("files", [])
    yield "boundary past size", lambda d: d["reencrypt"]["files"][1].__setitem__("boundary", 4 << 20)
    yield "boundary off the region grid", lambda d: d["reencrypt"]["files"][1].__setitem__("boundary", 4096)
    yield "later file started first", lambda d: d["reencrypt"]["files"][0].__setitem__("boundary", 0)
    yield "to null for rekey", lambda d: d["reencrypt"]["files"][0].__setitem__("to", None)
    yield "from differs from files", lambda d: d["reencrypt"]["files"][1].__setitem__("from", d["files"]["sparse.vmdk"])
    yield "from without a files entry", lambda d: d["files"].pop("vm1-small.bin")
    yield "name twice", lambda d: d["reencrypt"]["files"][1].__setitem__("name", "vm1.nvram")
    yield "bad name", lambda d: d["reencrypt"]["files"][1].__setitem__("name", "../x")
    yield "size a string", lambda d: d["reencrypt"]["files"][1].__setitem__("size", "3145728")


@pytest.mark.parametrize("what,mutate", list(_mutations()), ids=[m[0] for m in _mutations()])
def test_a_broken_state_is_rejected(what, mutate):
    from vmfs_crypt.errors import FormatError
    doc = in_flight_doc()
    mutate(doc)
    with pytest.raises(FormatError):
        _parse(doc)


def test_readers_outside_the_engine_refuse_a_folder_in_flight():
    from vmfs_crypt.errors import FormatError
    with pytest.raises(FormatError, match="interrupted"):
        _parse(in_flight_doc(), allow=False)


def test_a_journal_cannot_replace_an_unfinished_state(tmp_path):
    """Journal rule of 7.8: keys of files under two keys cannot be swapped by a journal until every region is done."""
    from vmfs_crypt.errors import FormatError
    from vmfs_crypt.format.folder import FolderKeys, VmFolder
    from vmfs_crypt.format.journal import check_journal
    vm = tmp_path / "vm"
    vm.mkdir()
    doc = in_flight_doc()
    (vm / ".vmfs-crypt.json").write_text(json.dumps(doc))
    for name, size in (("vm1.nvram", 8708), ("vm1-small.bin", 3 << 20)):
        (vm / name).write_bytes(b"x" * size)
    current = _parse(doc)
    new = FolderKeys(current.kek, {n: f.to for n, f in ((f.name, f) for f in current.reencrypt.files)})
    journal = {"version": 1, "renames": [], "keys": new.to_bytes().decode()}
    with pytest.raises(FormatError, match="not finished"):
        check_journal(VmFolder(str(vm)), journal, "j")
    doc["reencrypt"]["files"][1]["boundary"] = 3 << 20  # every region done: the commit is allowed
    (vm / ".vmfs-crypt.json").write_text(json.dumps(doc))
    check_journal(VmFolder(str(vm)), journal, "j")
    wrong = FolderKeys(current.kek, {n: current.files[n] for n in current.files})  # keeps the old records
    with pytest.raises(FormatError, match="new key record"):
        check_journal(VmFolder(str(vm)), {"version": 1, "renames": [], "keys": wrong.to_bytes().decode()}, "j")
