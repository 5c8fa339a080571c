"""Fixture code for the KMIP tests: real PyKMIP servers with real certificates on loopback ports."""

import os
import re
import socket
import threading
import time


from vmfs_crypt.config import load_config
from kmip_tls import CertificateAuthority, Pki, PyKmipServer, write_pair
from kmip_admin import KmipAdmin


class KmipCluster:
    """Two PyKMIP servers sharing one SQLite file (a replicated cluster), plus misconfigured ones on demand."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.pki = Pki.create(os.path.join(workdir, "pki"))
        db = os.path.join(workdir, "cluster.sqlite")
        self.a = PyKmipServer(os.path.join(workdir, "a"), self.pki, database=db, name="a")
        self.b = PyKmipServer(os.path.join(workdir, "b"), self.pki, database=db, name="b")
        self.extra: list[PyKmipServer] = []

    @property
    def servers(self) -> list[PyKmipServer]:
        return [self.a, self.b]

    def ensure_up(self) -> None:
        """Start whichever cluster server a previous test stopped (one after the other: they share SQLite)."""
        for s in self.servers:
            if s.proc is None or s.proc.poll() is not None:
                s.start()

    def admin(self) -> KmipAdmin:
        """A provider object talking to the cluster directly (same client certificate: same key owner)."""
        return KmipAdmin("admin", [("127.0.0.1", s.port) for s in self.servers], self.pki.client_cert,
                               self.pki.client_key, self.pki.ca_path, connect_timeout=2, request_timeout=5,
                               holdoff=0)

    def odd_server(self, name: str, ca: CertificateAuthority, sans: list[str]) -> PyKmipServer:
        """A server whose certificate is issued by `ca` for `sans` (another CA, or another host name)."""
        d = os.path.join(self.workdir, name)
        os.makedirs(d, exist_ok=True)
        cert = write_pair(d, "server", *ca.issue(sans[0], sans))
        srv = PyKmipServer(d, self.pki, server_cert=cert, name=name).start()
        self.extra.append(srv)
        return srv

    def stop_all(self) -> None:
        for s in self.servers + self.extra:
            s.kill()


class HungListener:
    """A plain TCP listener that accepts connections and never says a word."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        self._stop = True
        self.sock.close()
        for c in self.conns:
            c.close()


def add_kmip_provider(env, name: str, ports: list[int], pki: Pki, *extra, host: str = "127.0.0.1", check=True):
    return env.run("provider", "add", "kmip", name, *sum((["--server", f"{host}:{p}"] for p in ports), []),
                   "--cert", pki.client_cert, "--key", pki.client_key, "--ca", pki.ca_path, *extra, check=check)


def edit_config(env, **agent) -> None:
    """Set [agent] settings (e.g. retry_interval) in the environment's config file."""
    config = load_config(env.config)
    for key, value in agent.items():
        setattr(config.agent, key, value)
    config.save()


def key_id_of(env, disk: str) -> str:
    out = env.run("info", disk).stdout.decode()
    return re.search(r"folder key: (\S+)", out).group(1)


def wait_until(condition, deadline_s: float, what: str):
    """Poll `condition` until it returns something true, or fail after the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        time.sleep(0.1)
