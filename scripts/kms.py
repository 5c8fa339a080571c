#!/usr/bin/env python3
"""`make kms`: a throw-away PyKMIP key server on 127.0.0.1 with a fresh CA, server and client certificates.

Prints the directory holding the certificates and the `vmfs-crypt provider add kmip` line to use it;
runs in the foreground until Ctrl-C. Keys live in DIR/kms.sqlite (pass --dir to keep using one).
"""

import argparse
import os
import shlex
import signal
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "devtools"))

from kmip_tls import Pki, PyKmipServer  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", help="Directory for certificates, database and logs (default: a new temp dir).")
    parser.add_argument("--port", type=int, default=0, help="Port on 127.0.0.1 (default: a free one).")
    parser.add_argument("--name", default="kms", help="Provider name in the printed command.")
    args = parser.parse_args(argv)
    directory = os.path.abspath(args.dir or tempfile.mkdtemp(prefix="vmfs-crypt-kms-"))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(directory, "ca.pem")):
        pki = Pki(directory, None, *(os.path.join(directory, n) for n in
                                     ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")))
    else:
        pki = Pki.create(directory)
    server = PyKmipServer(directory, pki, port=args.port or None)
    server.start()
    q = shlex.quote
    print(f"PyKMIP server listening on {server.address} (pid {server.proc.pid})")
    print(f"certificates, keys database and log in {directory}  (server log: {server.log_path})")
    print("use it with:")
    print(f"  vmfs-crypt provider add kmip {q(args.name)} --server {server.address} "
          f"--cert {q(pki.client_cert)} --key {q(pki.client_key)} --ca {q(pki.ca_path)}")
    print("Ctrl-C stops the server (keys stay in the database; restart with --dir "
          f"{q(directory)} --port {server.port}).", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (nohup, &)
    try:
        while True:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the KMIP server", flush=True)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
