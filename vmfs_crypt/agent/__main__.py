"""Internal entry point of the agent process (started by vmfs_crypt.agent.launcher; not a user command)."""

import argparse
import logging
import os
import signal
import sys

from ..config import check_config_trust, load_config
from ..daemon import setup_logging
from ..errors import VmfsCryptError
from ..procs import NotifyReady, ReadyPipe
from ..sysutil import disable_core_dumps


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmfs_crypt.agent")
    parser.add_argument("--config", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--sidecar", action="store_true", help="exit when the last holder process exits")
    parser.add_argument("--hold-pid", type=int, action="append", default=[])
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--log-file")
    parser.add_argument("--notify", action="store_true", help="tell systemd when it listens (Type=notify)")
    args = parser.parse_args(argv)
    setup_logging("agent", args.log_file)  # issue 9: 0600, rotated; the journal under systemd
    ready = NotifyReady(f"listening on {args.socket}") if args.notify else ReadyPipe(args.ready_fd)
    try:
        disable_core_dumps()
        from .client import AgentClient
        from .server import serve
        from .service import KeyService
        if AgentClient(args.socket).alive():
            raise VmfsCryptError(f"an agent is already running on {args.socket}")
        if os.path.lexists(args.socket):
            os.unlink(args.socket)
        from .audit import AuditLog
        check_config_trust(args.config)  # the roles are in it: only our own user or root may change it
        config = load_config(args.config)
        try:
            audit = AuditLog.from_config(config)
        except OSError as exc:
            raise VmfsCryptError(f"cannot open the audit log {config.audit_path}: {exc.strerror or exc}") from None
        service = KeyService(config, audit)
    except VmfsCryptError as exc:
        logging.getLogger("vmfs_crypt.agent").error("%s", exc)
        ready.error(exc)
        return exc.exit_code
    signal.signal(signal.SIGHUP, lambda *_: service.reload())
    if args.notify:  # systemctl stop sends SIGTERM: stop as `agent stop` does (socket removed, audited)
        signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        serve(service, args.socket, args.sidecar, args.hold_pid, ready.ok)
    finally:
        ready.stopping()
    return 0


if __name__ == "__main__":
    sys.exit(main())
