"""Detached helper processes (the agent, the FUSE mount) that report readiness over an inherited pipe.

The child writes one line and closes the pipe: "ok", or "error CODE message" where CODE is
the stable code of a `VmfsCryptError` class (errors.py), so the parent raises the class and
exit code the child failed with.
"""

import os
import select
import subprocess

from .daemon import sd_notify, under_journal
from .errors import VmfsCryptError, error_for_code


class ReadyPipe:
    """The child's end of the readiness pipe."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def report(self, line: str) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, line.replace("\n", " ").encode("utf-8", "replace") + b"\n")
            except OSError:  # the parent gave up waiting: nothing to tell
                pass
            os.close(self.fd)
            self.fd = None

    def ok(self) -> None:
        self.report("ok")

    def error(self, exc: Exception, default: type[VmfsCryptError] = VmfsCryptError) -> None:
        code = exc.code if isinstance(exc, VmfsCryptError) else default.code
        self.report(f"error {code} {exc}")

    def stopping(self) -> None:
        """The service is shutting down (systemd's STOPPING=1; nothing for a pipe)."""

    def update_status(self, extra: str | None) -> None:
        """What the live service is doing besides serving (systemd's STATUS=; nothing for a pipe)."""


class NotifyReady(ReadyPipe):
    """The readiness of a process systemd runs (Type=notify): READY=1 and STATUS= once it serves,
    STOPPING=1 when it ends; a failure before that is only its STATUS (systemd sees the exit)."""

    def __init__(self, status: str) -> None:
        super().__init__(None)
        self.status = status
        self.state = "starting"

    def ok(self) -> None:
        if self.state == "starting":
            self.state = "ready"
            sd_notify(f"READY=1\nSTATUS={self.status}")

    def error(self, exc: Exception, default: type[VmfsCryptError] = VmfsCryptError) -> None:
        if self.state == "starting":
            self.state = "failed"
            sd_notify(f"STATUS=failed: {exc}")

    def stopping(self) -> None:
        if self.state == "ready":
            self.state = "stopping"
            sd_notify("STOPPING=1\nSTATUS=stopping")

    def update_status(self, extra: str | None) -> None:
        if self.state == "ready":  # never before READY=1, nor once stopping
            sd_notify(f"STATUS={self.status}" + (f"; {extra}" if extra else ""))


def spawn_detached(cmd: list[str], log_path: str, timeout_s: float, env: dict | None = None,
                   ) -> tuple[subprocess.Popen, str]:
    """Start `cmd` (with "--ready-fd N" appended) in its own session, logging to `log_path` (0600);
    return the process and its first line ("" if it said nothing within `timeout_s`).

    The child is told its log file (--log-file) and rotates it itself (daemon.setup_logging);
    until it does, its stdout and stderr go there. Under systemd with the journal as our
    stderr, the child inherits that instead and logs to the journal (issue 9). It never
    inherits NOTIFY_SOCKET: only the service's main process speaks to systemd.
    """
    read_fd, write_fd = os.pipe()
    env = dict(os.environ if env is None else env)
    env.pop("NOTIFY_SOCKET", None)
    journal = under_journal()
    log_fd = None if journal else os.open(
        log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        if log_fd is not None:
            os.fchmod(log_fd, 0o600)
        extra = ["--ready-fd", str(write_fd)] + ([] if journal else ["--log-file", log_path])
        proc = subprocess.Popen(cmd + extra, stdin=subprocess.DEVNULL, stdout=log_fd,
                                stderr=log_fd, pass_fds=(write_fd,), start_new_session=True, close_fds=True,
                                env=env)
    finally:
        if log_fd is not None:
            os.close(log_fd)
        os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        line = os.read(read_fd, 4096).decode("utf-8", "replace").strip() if ready else ""
    finally:
        os.close(read_fd)
    return proc, line


def raise_for(line: str, default: type[VmfsCryptError], fallback: str) -> None:
    """Turn a child's "error CODE message" line into that exception (or `default` with `fallback`)."""
    _, code, text = (line.split(" ", 2) + ["", ""])[:3]
    raise error_for_code(code, text or fallback, default)
