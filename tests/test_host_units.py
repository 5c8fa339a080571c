"""The FUSE-free parts of host integration (issue 9): the mount helper's argv and options, sd_notify, log handlers."""

import logging
import os
import socket
import stat

import pytest

from vmfs_crypt.cli import cli
from vmfs_crypt.cli.mount import helper_argv
from vmfs_crypt.daemon import PrivateRotatingFileHandler, sd_notify
from vmfs_crypt.errors import UsageError
from vmfs_crypt.ops.mounting import split_mount_options


def test_helper_argv_is_the_mount_fuse_form_only(tmp_path):
    ds = str(tmp_path)
    assert helper_argv(["mount", ds, "/mnt"], cli.commands) is None
    assert helper_argv(["--config", "c", "status"], cli.commands) is None
    assert helper_argv(["mout", "x"], cli.commands) is None, "a mistyped command is left to click"
    assert helper_argv([ds, "/mnt", "-o", "rw,config=/etc/c.toml,allow_other,agent=/run/a.sock,ro,max_read=65536",
                        "-n"], cli.commands) == \
        ["--config", "/etc/c.toml", "mount", ds, "/mnt", "-o", "ro,max_read=65536", "--agent", "/run/a.sock",
         "--allow-other"]
    assert helper_argv([ds, "/mnt", "-onoauto", "-o", "nofail"], cli.commands) == ["mount", ds, "/mnt"]
    with pytest.raises(UsageError):
        helper_argv([ds, "/a", "/b"], cli.commands)  # three positional arguments
    with pytest.raises(UsageError):
        helper_argv([ds, "/mnt", "--bogus"], cli.commands)


def test_mount_only_options_are_dropped_and_the_rest_reach_libfuse():
    ours, fuse = split_mount_options("defaults,noauto,auto,nofail,_netdev,user,users,owner,group,rw,dev,suid,exec,"
                                     "x-systemd.requires=a.service,X-mount.mkdir,comment=systemd.automount,"
                                     "nodev,noexec,ro,bogusopt,max_read=4096,allow_other,config=/c,agent=/s")
    assert ours == {"allow_other": True, "config": "/c", "agent": "/s"}
    assert fuse == "nodev,noexec,ro,bogusopt,max_read=4096"


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_sd_notify_reaches_a_datagram_socket(tmp_path, monkeypatch, kind):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if kind == "path":
        addr = str(tmp_path / "notify")
        sock.bind(addr)
    else:
        name = f"vmfs-crypt-test-{os.getpid()}"
        sock.bind("\0" + name)
        addr = "@" + name  # systemd's spelling of an abstract socket
    sock.settimeout(10)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", addr)
        assert sd_notify("READY=1\nSTATUS=serving")
        assert sock.recv(100) == b"READY=1\nSTATUS=serving"
    finally:
        sock.close()
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1"), "no NOTIFY_SOCKET: nothing sent, no error"


def test_log_handler_is_0600_rotates_and_refuses_a_symlink(tmp_path):
    path = str(tmp_path / "mount.log")
    handler = PrivateRotatingFileHandler(path, max_bytes=200, backups=2, own_stderr=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        for i in range(20):
            handler.emit(logging.LogRecord("t", logging.INFO, __file__, 1, "line %d " + "x" * 40, (i,), None))
    finally:
        handler.close()
    names = sorted(os.listdir(tmp_path))
    assert names == ["mount.log", "mount.log.1", "mount.log.2"]
    for name in names:
        st = os.lstat(tmp_path / name)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size <= 200
    victim = tmp_path / "victim"
    victim.write_text("precious")
    link = str(tmp_path / "link.log")
    os.symlink(victim, link)
    with pytest.raises(OSError):
        PrivateRotatingFileHandler(link, max_bytes=200, backups=2, own_stderr=False)
    assert victim.read_text() == "precious"
