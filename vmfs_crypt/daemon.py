"""What the long-running processes (mount, agent) need from a Linux host: their log (0600 file, rotated, or the journal) and sd_notify."""

import logging
import logging.handlers
import os
import socket
import stat

LOG_MAX_BYTES = 10 << 20  # issue 9: logs were never rotated; VMFS_CRYPT_LOG_MAX_BYTES overrides (tests)
LOG_BACKUPS = 5
_JOURNAL_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def sd_notify(message: str) -> bool:
    """Send `message` (e.g. "READY=1") to systemd's $NOTIFY_SOCKET; False when there is none."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr  # '@': an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(target)
            s.sendall(message.encode("utf-8", "replace"))
        return True
    except OSError:
        return False  # systemd went away: nothing to tell


def under_journal() -> bool:
    """Whether our stderr is the journal (systemd's JOURNAL_STREAM names its device:inode)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
        return bool(stream) and st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


class JournalFormatter(logging.Formatter):
    """"<PRIORITY>message": journald reads the level from the prefix and stamps the time itself."""

    def format(self, record: logging.LogRecord) -> str:
        pri = _JOURNAL_PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{pri}>{line}" for line in super().format(record).splitlines() or [""])


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A RotatingFileHandler whose files are 0600 and opened without following a symlink.

    The current file is also our stderr (fd 2), so what libfuse and Python itself write there
    (a traceback, a libfuse message) lands in the same log, and follows it when it rotates.
    """

    def __init__(self, path: str, max_bytes: int, backups: int, own_stderr: bool) -> None:
        self._own_stderr = own_stderr
        super().__init__(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8", delay=False)

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise OSError(f"{self.baseFilename}: not a regular file of ours; refusing to log there")
            os.fchmod(fd, 0o600)
            if self._own_stderr:
                os.dup2(fd, 1)
                os.dup2(fd, 2)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "a", encoding="utf-8", errors="replace")


def setup_logging(role: str, log_file: str | None = None) -> None:
    """Log INFO and up for the process `role` ("mount", "agent"): to the journal when stderr is it,
    else to `log_file` (rotated, 0600; it becomes our stdout and stderr too), else to stderr."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO)
    plain = logging.Formatter(f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s")
    if under_journal():
        handler: logging.Handler = logging.StreamHandler()
        handler.setFormatter(JournalFormatter(f"{role}: %(levelname)s %(message)s"))
    elif log_file:
        max_bytes = int(os.environ.get("VMFS_CRYPT_LOG_MAX_BYTES") or LOG_MAX_BYTES)
        handler = PrivateRotatingFileHandler(log_file, max_bytes, LOG_BACKUPS, own_stderr=True)
        handler.setFormatter(plain)
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(plain)
    root.addHandler(handler)
