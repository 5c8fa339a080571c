"""Detached helper processes (the agent, the FUSE mount) that report readiness over an inherited pipe."""

import os
import select
import subprocess

from . import errors
from .errors import VmfsCryptError


class ReadyPipe:
    """The child's end: one line, "ok" or "error CLASS message", then the pipe closes."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def report(self, line: str) -> None:
        if self.fd is not None:
            os.write(self.fd, line.encode("utf-8", "replace") + b"\n")
            os.close(self.fd)
            self.fd = None

    def ok(self) -> None:
        self.report("ok")

    def error(self, exc: Exception, cls: type | None = None) -> None:
        self.report(f"error {(cls or type(exc)).__name__} {exc}")


def error_class(name: str, default: type) -> type:
    """The VmfsCryptError subclass of that name (so exit codes survive the pipe), else `default`."""
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, VmfsCryptError) else default


def spawn_detached(cmd: list[str], log_path: str, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """Start `cmd` (with "--ready-fd N" appended) in its own session, logging to `log_path`;
    return the process and its first line ("" if it said nothing within `timeout_s`)."""
    read_fd, write_fd = os.pipe()
    os.makedirs(os.path.dirname(log_path), mode=0o700, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd + ["--ready-fd", str(write_fd)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=log, pass_fds=(write_fd,), start_new_session=True, close_fds=True)
    os.close(write_fd)
    try:
        ready, _, _ = select.select([read_fd], [], [], timeout_s)
        line = os.read(read_fd, 4096).decode("utf-8", "replace").strip() if ready else ""
    finally:
        os.close(read_fd)
    return proc, line


def raise_for(line: str, default: type, fallback: str) -> None:
    """Turn a child's "error CLASS message" line into that exception (or `default` with `fallback`)."""
    _, cls_name, text = (line.split(" ", 2) + ["", ""])[:3]
    raise error_class(cls_name, default)(text or fallback)
