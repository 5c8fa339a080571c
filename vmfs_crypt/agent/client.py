"""The agent client: the `KeyAccess` the CLI and the mount use, over the agent's Unix socket.

Before it sends anything it checks who listens (SO_PEERCRED): the agent must run as our own
uid or as root, so a socket planted by another user never receives a request or hands out a
key (issue 7, case 3). Each key request states the client's purpose (issue 11: the agent
checks the privilege of that purpose against our kernel credentials).
"""

import os
import select
import socket
import threading

from ..errors import AgentError, UntrustedAgentError, VmfsCryptError
from ..format.keysafe import KeyRecord, KeyRef
from ..sysutil import peer_credentials
from . import protocol as p

STOP_TIMEOUT_S = 15.0


class AgentClient:
    """Talks to the agent; one connection per thread, reconnecting after an agent restart."""

    def __init__(self, socket_path: str, timeout_s: float = 60.0, purpose: str | None = None) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self.purpose = purpose  # why this client asks for keys: mount, cat, create, encrypt, decrypt, rekey
        self._local = threading.local()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise AgentError(f"no key agent answers on {self.socket_path} ({exc.strerror or exc}); "
                             "start one with 'vmfs-crypt agent start'") from None
        peer = peer_credentials(sock)
        if peer.uid not in (os.geteuid(), 0):
            sock.close()
            raise UntrustedAgentError(
                f"{self.socket_path} is served by process {peer.pid} of uid {peer.uid}, not by you (uid "
                f"{os.geteuid()}) or root: refusing to use it (another user may be trying to catch your keys); "
                "remove the socket (as root if need be) and start your agent again")
        return sock

    def request(self, op: str, **fields) -> dict:
        payload = p.encode(dict(fields, op=op))
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                sock = self._connect()
                conn = self._local.conn = (sock, sock.makefile("rb"))
            sock, rfile = conn
            try:
                sock.sendall(payload)
                line = rfile.readline(p.MAX_MESSAGE + 1)
                if not line:
                    raise ConnectionResetError("agent closed the connection")
                break
            except OSError as exc:
                self._local.conn = None
                sock.close()
                if attempt:
                    raise AgentError(f"the key agent on {self.socket_path} stopped answering ({exc})") from None
        return p.raise_for_response(p.decode(line, f"answer of the agent on {self.socket_path}"))

    def alive(self) -> bool:
        """Whether an agent answers; a socket of another user's process is an error, not "no agent"."""
        try:
            self.request(p.OP_PING)
            return True
        except UntrustedAgentError:
            self.close()
            raise
        except (AgentError, OSError):
            return False

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn:
            conn[0].close()
            self._local.conn = None

    # -- KeyAccess -----------------------------------------------------------------------
    def unwrap(self, record: KeyRecord, what: str) -> bytes:
        resp = self.request(p.OP_UNWRAP, what=what, purpose=self.purpose, **p.record_fields(record))
        return p.secret_from_wire(resp.get("dek"), what)

    def new_kek(self, provider: str | None, label: str) -> KeyRef:
        return p.kek_from(self.request(p.OP_NEW_KEK, provider=provider, label=label, purpose=self.purpose),
                          "new KEK")

    def new_file_key(self, kek: KeyRef, what: str | None = None) -> tuple[KeyRecord, bytes]:
        resp = self.request(p.OP_NEW_FILE_KEY, what=what, purpose=self.purpose, **p.kek_fields(kek))
        return p.record_from(resp, "new key"), p.secret_from_wire(resp.get("dek"), "new key")

    def rewrap(self, record: KeyRecord, kek: KeyRef, what: str) -> KeyRecord:
        resp = self.request(p.OP_REWRAP, what=what, purpose=self.purpose, **p.kek_fields(kek),
                            **p.record_fields(record))
        return p.record_from(resp, what)

    def authorize(self, privilege: str, action: str, target: str | None = None) -> dict:
        """Ask before starting a command: refused at once (and audited) if we lack `privilege`."""
        return self.request(p.OP_AUTHORIZE, privilege=privilege, action=action, target=target, purpose=self.purpose)

    def locked(self) -> list[dict]:
        return self.request(p.OP_LOCKED)["locked"]

    # -- lifetime ------------------------------------------------------------------------
    def hold(self, what: str) -> None:
        """Keep the agent in use while this process runs (a sidecar agent stops after its last holder)."""
        self.request("hold", what=what)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S, force: bool = False) -> None:
        """Ask the agent to stop and wait until its process is gone (its keys with it)."""
        try:
            pidfd = os.pidfd_open(int(self.request(p.OP_PING)["pid"]))
        except (AgentError, OSError):
            self.close()
            return
        try:
            try:
                self.request(p.OP_STOP, force=force)
            except VmfsCryptError as exc:
                if exc.code in ("in-use", "permission"):  # a refusal, not an agent already gone
                    raise
            self.close()
            # Handler threads of open connections outlive the listener until the process exits:
            # only then is no key served any more.
            select.select([pidfd], [], [], timeout_s)
        finally:
            os.close(pidfd)
