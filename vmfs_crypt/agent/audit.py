"""The agent's audit log (issue 11): one JSON line per key operation and per refused request, never a key byte.

Written by the agent with Python's logging handlers: a rotating file created 0600 (and kept
0600 across rotations), and syslog (LOG_AUTHPRIV, "/dev/log" when present) as a second copy.
The file is the record: if a line cannot be written there, the request is refused (fail
closed); syslog is best effort. Records hold only the fields listed in FIELDS, each a string,
number, boolean or list of those: request fields are never copied wholesale, so a DEK, a
passphrase or a backup cannot reach the log (a test scans the log for every key it can compute).

Several agents may append to one log (a command's private sidecar beside the shared agent):
each line is one write to an O_APPEND file, a rotation happens under an flock, and an agent
whose file was rotated by another follows the new file.
"""

import datetime as dt
import fcntl
import json
import logging
import logging.handlers
import os
import re
import stat

from ..config import SYSLOG_OFF, Config
from ..errors import AgentError, UsageError

log = logging.getLogger("vmfs_crypt.agent")

AUDIT_VERSION = 1
# Every field a record may carry besides v, time, event, result, agent_pid and principal (README, "Audit log").
FIELDS = frozenset({"purpose", "privilege", "provider", "key_id", "to_provider", "to_key_id", "folder", "file",
                    "label", "name", "type", "count", "keys", "error", "target", "mountpoint", "datastore",
                    "changes", "setting", "value", "owner"})
MAX_FIELD_CHARS = 2000


def _clean(name: str, value):
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value[:MAX_FIELD_CHARS]
    if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
        return [v[:MAX_FIELD_CHARS] if isinstance(v, str) else v for v in value][:1000]
    raise TypeError(f"audit field {name} must be a string, number or list of those, not {type(value).__name__}")


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """RotatingFileHandler whose files are 0600 from their first moment, that refuses a file it does not own."""

    def __init__(self, path: str, max_bytes: int, keep: int) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        super().__init__(path, maxBytes=max_bytes, backupCount=keep, encoding="utf-8", delay=True)

    def _open(self):
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            os.close(fd)
            raise OSError(f"{self.baseFilename} is not a regular file of uid {os.geteuid()}")
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def _rotated_by_another(self) -> bool:
        try:
            st = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        mine = os.fstat(self.stream.fileno())
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def shouldRollover(self, record) -> bool:
        if self.stream is not None and self._rotated_by_another():
            self.stream.close()
            self.stream = None  # reopened (the new file) by the base class
        return bool(super().shouldRollover(record))

    def doRollover(self) -> None:
        lock_fd = os.open(self.baseFilename + ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            if self.stream is not None and self._rotated_by_another():  # while we waited for the lock
                self.stream.close()
                self.stream = None
                return
            super().doRollover()  # renames keep each file's 0600; the new file is made by _open
        finally:
            os.close(lock_fd)

    def handleError(self, record) -> None:
        raise  # noqa: PLE0704 - called inside the handler's except clause: the caller refuses the request


class _BestEffortSyslog(logging.handlers.SysLogHandler):
    def handleError(self, record) -> None:
        pass  # the file holds the record; a full or restarting syslog daemon must not stop key service


class AuditLog:
    """Writes audit records; `write` raises AgentError when the file cannot take the record."""

    def __init__(self, path: str, max_bytes: int, keep: int, syslog: str | None) -> None:
        self.path = path
        self.file = PrivateRotatingFileHandler(path, max_bytes, keep)
        self.file.setFormatter(logging.Formatter("%(message)s"))
        self.syslog: logging.Handler | None = None
        if syslog and syslog != SYSLOG_OFF and os.path.exists(syslog):
            try:
                handler = _BestEffortSyslog(address=syslog,
                                            facility=logging.handlers.SysLogHandler.LOG_AUTHPRIV)
                handler.ident = "vmfs-crypt-audit: "
                handler.setFormatter(logging.Formatter("%(message)s"))
                self.syslog = handler
            except OSError as exc:
                log.warning("audit: syslog at %s cannot be used (%s); writing only %s", syslog, exc, path)

    @classmethod
    def from_config(cls, config: Config) -> "AuditLog":
        a = config.audit
        return cls(config.audit_path, a.max_bytes, a.keep, a.syslog)

    def write(self, event: str, result: str, principal: dict | None = None, **fields) -> dict:
        record = {"v": AUDIT_VERSION, "time": now_iso(), "event": event, "result": result,
                  "agent_pid": os.getpid()}
        if principal is not None:
            record["principal"] = principal
        for name, value in fields.items():
            if name not in FIELDS:
                raise TypeError(f"audit: {name} is not an audit field")
            if value is not None:
                record[name] = _clean(name, value)
        line = logging.makeLogRecord({"msg": json.dumps(record, separators=(",", ":"), sort_keys=False),
                                      "levelno": logging.INFO, "levelname": "INFO"})
        try:
            self.file.handle(line)
        except Exception as exc:
            raise AgentError(f"cannot write the audit log {self.path} ({exc}); the request was refused") from None
        if self.syslog is not None:
            self.syslog.handle(line)
        return record

    def close(self) -> None:
        self.file.close()
        if self.syslog is not None:
            self.syslog.close()


# -- reading (vmfs-crypt audit) ---------------------------------------------------------------
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str, now: dt.datetime | None = None) -> dt.datetime:
    """TIME as ISO 8601 (a time without zone is local time) or relative to now: 90s, 30m, 1h, 2d, 1w."""
    now = now or dt.datetime.now(dt.timezone.utc)
    m = _RELATIVE.fullmatch(text.strip())
    if m:
        return now - dt.timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2).lower()])
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"--since {text!r} is neither a time in ISO 8601 (2025-01-31T14:00) "
                         "nor relative (90s, 30m, 1h, 2d, 1w)") from None
    return when if when.tzinfo else when.astimezone()


def log_files(path: str) -> list[str]:
    """The log and its rotations, oldest first (audit.log.N ... audit.log.1, audit.log)."""
    folder, base = os.path.split(os.path.abspath(path))
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    rotated = sorted((int(n[len(base) + 1:]), n) for n in names
                     if n.startswith(base + ".") and n[len(base) + 1:].isdigit())
    out = [os.path.join(folder, n) for _, n in reversed(rotated)]
    return out + ([os.path.join(folder, base)] if base in names else [])


def read_records(path: str, since: dt.datetime | None = None) -> tuple[list[dict], int]:
    """(records at or after `since`, ordered by time; count of lines that are not records)."""
    records, bad = [], 0
    for name in log_files(path):
        with open(name, "rb") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    when = dt.datetime.fromisoformat(rec["time"])
                except (ValueError, KeyError, TypeError):
                    bad += 1
                    continue
                if since is None or when >= since:
                    records.append((when, rec))
    records.sort(key=lambda item: item[0])
    return [rec for _, rec in records], bad
