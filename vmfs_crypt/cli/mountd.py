"""Internal entry point of the mount process (started by `vmfs-crypt mount`; not a user command): the FUSE mount and its control socket."""

import argparse
import logging
import sys

from ..config import load_config
from ..daemon import setup_logging
from ..errors import VmfsCryptError
from ..procs import ReadyPipe
from ..fuse.serve import run_mount
from ..ops.online import ControlServer


def online_services(core, datastore: str, agent_socket: str) -> ControlServer:
    """What the mount runs besides FUSE: the control socket of online operations (issue 10), which resumes
    the interrupted ones once the mount is live (fuse/serve.py run_mount calls its live() and stop())."""
    return ControlServer(core, datastore, agent_socket).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmfs_crypt.cli.mountd")
    parser.add_argument("--config", required=True)
    parser.add_argument("--agent")
    parser.add_argument("-o", dest="options")
    parser.add_argument("--allow-other", action="store_true")
    parser.add_argument("--ready-fd", type=int)
    parser.add_argument("--log-file")
    parser.add_argument("datastore")
    parser.add_argument("mountpoint")
    args = parser.parse_args(argv)
    setup_logging("mount", args.log_file)  # issue 9: 0600, rotated; the journal under systemd
    try:
        run_mount(load_config(args.config), args.datastore, args.mountpoint, args.agent, args.options,
                  args.allow_other, ReadyPipe(args.ready_fd), services=online_services)
    except VmfsCryptError as exc:
        logging.getLogger("vmfs_crypt.mount").error("%s", exc)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
