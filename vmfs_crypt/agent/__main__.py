"""Internal entry point of the agent process (started by vmfs_crypt.agent.launcher; not a user command)."""

import argparse
import logging
import os
import signal
import sys

from ..config import check_config_trust, load_config
from ..errors import VmfsCryptError
from ..procs import ReadyPipe
from ..sysutil import disable_core_dumps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmfs_crypt.agent")
    parser.add_argument("--config", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--sidecar", action="store_true", help="exit when the last holder process exits")
    parser.add_argument("--hold-pid", type=int, action="append", default=[])
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent[%(process)d] %(levelname)s %(message)s")
    ready = ReadyPipe(args.ready_fd)
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
    serve(service, args.socket, args.sidecar, args.hold_pid, ready.ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
