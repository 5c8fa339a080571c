"""QEMU through the mount: every VMDK subformat, the create'd disk, cache=none, and no plaintext at rest."""

import os

import pytest

from support import mounted

pytestmark = [pytest.mark.cli, pytest.mark.fuse, pytest.mark.qemu]

PATTERN = bytes([0x5A, 0xC3, 0x96, 0x3C]) * 16  # 64 bytes that will not occur by chance
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]


def make_source(env, path: str) -> None:
    """A 64 MiB raw image with the pattern at several offsets (unaligned ones too) and holes between."""
    env.tool("qemu-img", "create", "-f", "raw", path, "64M")
    with open(path, "r+b") as f:
        for off in (0, 4096 + 17, 1 << 20, (33 << 20) + 511, (64 << 20) - 4096):
            f.seek(off)
            f.write(PATTERN * 32)


def assert_no_plaintext(root: str, needle: bytes = PATTERN) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                assert needle not in f.read(), f"plaintext pattern found in backing file {name}"


@pytest.fixture
def enc_env(venv_env):
    """A datastore with an encrypted folder vm1 (made by `vmfs-crypt create`)."""
    os.makedirs(os.path.join(venv_env.datastore, "vm1"))
    venv_env.run("create", os.path.join(venv_env.datastore, "vm1", "disk.vmdk"), "--size", "16M")
    return venv_env


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_subformat_created_in_mount_is_encrypted_and_correct(enc_env, subformat, tmp_path):
    src = str(tmp_path / "src.raw")
    make_source(enc_env, src)
    with mounted(enc_env) as mnt:
        disk = os.path.join(mnt, "vm1", "d.vmdk")
        enc_env.tool("qemu-img", "convert", "-O", "vmdk", "-o", f"subformat={subformat}", src, disk)
        enc_env.tool("qemu-img", "check", disk)
        enc_env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, disk)
        if subformat != "streamOptimized":  # QEMU writes streamOptimized only sequentially
            enc_env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x11 5000 70000", disk)
            enc_env.tool("qemu-io", "-f", "raw", "-c", "write -P 0x11 5000 70000", src)
            enc_env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, disk)
        info = enc_env.tool("qemu-img", "info", disk).stdout.decode()
        assert "file format: vmdk" in info
    backing = os.path.join(enc_env.datastore, "vm1")
    assert_no_plaintext(backing)
    names = [n for n in os.listdir(backing) if n.startswith("d")]
    for name in names:
        with open(os.path.join(backing, name), "rb") as f:
            head = f.read(4)
        # descriptors stay readable (vSphere's split); sparse/stream files carry no KDMV magic at rest
        assert head != b"KDMV", f"{name} is a plaintext sparse VMDK at rest"
    # data survives umount and remount
    with mounted(enc_env) as mnt:
        enc_env.tool("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, os.path.join(mnt, "vm1", "d.vmdk"))


def test_created_disk_with_qemu_io_cache_none(enc_env):
    backing_desc = os.path.join(enc_env.datastore, "vm1", "disk.vmdk")
    with mounted(enc_env) as mnt:
        disk = os.path.join(mnt, "vm1", "disk.vmdk")
        with open(disk, "rb") as f:
            view = f.read()
        assert b"encryption." not in view and view.startswith(b"# Disk DescriptorFile")
        # -t none: O_DIRECT opens, as QEMU's cache=none
        enc_env.tool("qemu-io", "-t", "none", "-f", "vmdk", "-c", "write -P 0x5a 0 1M",
                     "-c", "write -P 0xa5 1536 4096", "-c", "read -P 0x5a 0 1536", "-c", "read -P 0xa5 1536 4096", disk)
        enc_env.tool("qemu-img", "check", disk)
    with open(backing_desc, "rb") as f:
        raw = f.read()
    assert raw.count(b"encryption.keySafe") == 1 and raw.count(b"encryption.data") == 1, \
        "QEMU's descriptor rewrite lost the key lines"
    with open(os.path.join(enc_env.datastore, "vm1", "disk-flat.vmdk"), "rb") as f:
        extent = f.read(2 << 20)
    assert b"\x5a" * 64 not in extent and b"\xa5" * 64 not in extent
    with mounted(enc_env) as mnt:
        enc_env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 0 1536", "-c", "read -P 0xa5 1536 4096",
                     "-c", "read -P 0x5a 5632 1042944", os.path.join(mnt, "vm1", "disk.vmdk"))


def test_snapshot_delta_created_in_mount(enc_env, tmp_path):
    with mounted(enc_env) as mnt:
        base = os.path.join(mnt, "vm1", "disk.vmdk")
        enc_env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x21 0 64k", base)
        delta = os.path.join(mnt, "vm1", "delta.vmdk")
        enc_env.tool("qemu-img", "create", "-f", "vmdk", "-b", "disk.vmdk", "-F", "vmdk", delta)
        enc_env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x22 4096 4096", delta)
        enc_env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x21 0 4096", "-c", "read -P 0x22 4096 4096",
                     "-c", "read -P 0x21 8192 4096", delta)
        enc_env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x21 4096 4096", base)
    with open(os.path.join(enc_env.datastore, "vm1", "delta.vmdk"), "rb") as f:
        assert f.read(4) != b"KDMV", "the snapshot delta is not encrypted at rest"
    assert_no_plaintext(os.path.join(enc_env.datastore, "vm1"), b"\x22" * 512)


def test_plain_folder_passes_through(venv_env):
    plain = os.path.join(venv_env.datastore, "plainvm")
    os.makedirs(plain)
    venv_env.tool("qemu-img", "create", "-f", "vmdk", os.path.join(plain, "p.vmdk"), "8M")
    with mounted(venv_env) as mnt:
        venv_env.tool("qemu-io", "-f", "vmdk", "-c", "write -P 0x5a 0 64k", os.path.join(mnt, "plainvm", "p.vmdk"))
    venv_env.tool("qemu-io", "-f", "vmdk", "-c", "read -P 0x5a 0 64k", os.path.join(plain, "p.vmdk"))


NASM_BOOT = """
bits 16
org 0x7c00
    mov dx, 0x3f8
    mov si, msg
.next:
    lodsb
    test al, al
    jz .halt
    out dx, al
    jmp .next
.halt:
    cli
    hlt
    jmp .halt
msg: db "VMFS-CRYPT-GUEST-BOOTED", 13, 10, 0
times 510-($-$$) db 0
dw 0xaa55
"""


def test_guest_boots_from_encrypted_disk(enc_env, tmp_path):
    asm = tmp_path / "boot.asm"
    asm.write_text(NASM_BOOT)
    enc_env.tool("nasm", "-f", "bin", "-o", tmp_path / "boot.bin", asm)
    with mounted(enc_env) as mnt:
        disk = os.path.join(mnt, "vm1", "disk.vmdk")
        with open(tmp_path / "boot.bin", "rb") as f:
            boot = f.read()
        assert len(boot) == 512
        with open(os.path.join(mnt, "vm1", "disk-flat.vmdk"), "r+b") as f:
            f.write(boot)
        proc = enc_env.tool("timeout", "60", "qemu-system-x86_64", "-nographic", "-no-reboot", "-m", "32",
                            "-drive", f"file={disk},format=vmdk,if=ide,cache=none",
                            "-serial", "stdio", "-monitor", "none", "-display", "none",
                            "-device", "isa-debug-exit", check=False, timeout=90)
        out = proc.stdout.decode(errors="replace")
        # The guest halts after printing; `timeout` ends QEMU. What matters is the line it printed.
        assert "VMFS-CRYPT-GUEST-BOOTED" in out, out[-2000:] + proc.stderr.decode(errors="replace")[-2000:]
    with open(os.path.join(enc_env.datastore, "vm1", "disk-flat.vmdk"), "rb") as f:
        assert b"VMFS-CRYPT-GUEST-BOOTED" not in f.read(4096)
