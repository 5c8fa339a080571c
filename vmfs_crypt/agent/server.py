"""The agent's socket server: peer credentials checked on every connection, holders that keep a sidecar alive.

A client is served only if the kernel says (SO_PEERCRED) it runs as the agent's own uid or
as root. Processes that depend on the agent (a mount, a CLI command that started a private
agent) register as *holders*: the agent watches each holder's pidfd, a sidecar agent exits
when its last holder is gone (no orphan agents with keys), and `agent stop` refuses while a
holder runs unless forced (issue 9).
"""

import logging
import os
import select
import socketserver
import threading

from ..errors import AgentError, VmfsCryptError
from ..sysutil import peer_credentials
from . import protocol as p
from .service import KeyService

log = logging.getLogger("vmfs_crypt.agent")
OP_HOLD = "hold"  # what: a description -> the peer's pid is a holder until it exits


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()[:200]
    except OSError:
        return "?"


class Holders:
    """Processes that keep the agent in use, watched through pidfds."""

    def __init__(self, on_empty) -> None:
        self._lock = threading.Lock()
        self._holders: dict[int, tuple[int, str]] = {}  # pid -> (pidfd, what)
        self._wake_r, self._wake_w = os.pipe()
        self._on_empty = on_empty
        self._stopped = False

    def add(self, pid: int, what: str) -> None:
        pidfd = os.pidfd_open(pid)
        with self._lock:
            old = self._holders.pop(pid, None)
            self._holders[pid] = (pidfd, what)
        if old:
            os.close(old[0])
        os.write(self._wake_w, b"x")

    def describe(self) -> list[dict]:
        with self._lock:
            return [{"pid": pid, "what": what} for pid, (_, what) in sorted(self._holders.items())]

    def others_than(self, pid: int) -> list[dict]:
        return [h for h in self.describe() if h["pid"] != pid]

    def stop(self) -> None:
        self._stopped = True
        os.write(self._wake_w, b"x")

    def watch(self) -> None:
        """Until stopped: drop holders whose process exited; call on_empty when the last one goes."""
        while not self._stopped:
            with self._lock:
                fds = {fd: pid for pid, (fd, _) in self._holders.items()}
            ready, _, _ = select.select([self._wake_r, *fds], [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            gone = [fds[fd] for fd in ready if fd in fds]
            if not gone:
                continue
            with self._lock:
                for pid in gone:
                    fd, what = self._holders.pop(pid)
                    os.close(fd)
                    log.info("holder %d (%s) exited", pid, what)
                empty = not self._holders
            if empty:
                self._on_empty()


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: AgentServer = self.server
        peer = peer_credentials(self.request)
        if peer.uid not in (os.geteuid(), 0):
            log.warning("refused a client: pid %d uid %d (%s) is neither uid %d nor root",
                        peer.pid, peer.uid, _cmdline(peer.pid), os.geteuid())
            return
        for line in self.rfile:
            try:
                req = p.decode(line, "request")
            except AgentError:
                return
            resp = server.dispatch(req, peer)
            self.wfile.write(p.encode(resp))
            self.wfile.flush()
            if req.get("op") == p.OP_STOP and resp.get("ok"):
                threading.Thread(target=server.shutdown, daemon=True).start()
                return


class AgentServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, sock_path: str, service: KeyService, sidecar: bool) -> None:
        old_umask = os.umask(0o177)  # the socket is 0600 from its first moment
        try:
            super().__init__(sock_path, _Handler)
        finally:
            os.umask(old_umask)
        os.chmod(sock_path, 0o600)
        self.sock_path = sock_path
        self.service = service
        self.sidecar = sidecar
        self.holders = Holders(self._last_holder_gone)
        self._config_stamp = self._stamp()
        self._reload_lock = threading.Lock()

    def _last_holder_gone(self) -> None:
        if self.sidecar:
            log.info("the last process using this sidecar agent exited: stopping")
            threading.Thread(target=self.shutdown, daemon=True).start()

    def _stamp(self):
        try:
            st = os.stat(self.service.config.path)
            return st.st_ino, st.st_mtime_ns, st.st_size
        except OSError:
            return None

    def reload_if_changed(self) -> None:
        """The agent follows the configuration file: checked before each request, so no request sees a stale one."""
        stamp = self._stamp()
        if stamp != self._config_stamp:
            with self._reload_lock:
                if stamp != self._config_stamp:
                    try:
                        self.service.reload()
                    except VmfsCryptError as exc:
                        log.error("the configuration changed but cannot be used (keeping the old one): %s", exc)
                    self._config_stamp = stamp

    def dispatch(self, req: dict, peer) -> dict:
        op = req.get("op")
        self.reload_if_changed()
        if op == OP_HOLD:
            try:
                self.holders.add(peer.pid, str(req.get("what", ""))[:200] or _cmdline(peer.pid))
            except OSError as exc:
                return {"ok": False, "error": f"cannot watch process {peer.pid}: {exc.strerror}", "code": "agent"}
            return {"ok": True, "pid": os.getpid()}
        if op == p.OP_STOP:
            others = self.holders.others_than(peer.pid)
            if others and not req.get("force"):
                names = "; ".join(f"pid {h['pid']} ({h['what']})" for h in others)
                return {"ok": False, "code": "in-use",
                        "error": f"the agent is in use by {names}; unmount first, or stop it with --force "
                                 "(their new opens then fail until an agent runs again)"}
            return {"ok": True}
        resp = self.service.handle(req)
        if op == p.OP_STATUS and resp.get("ok"):
            resp["holders"] = self.holders.describe()
            resp["sidecar"] = self.sidecar
        if not resp.get("ok"):
            log.info("request %s failed: %s", op, resp.get("error"))
        return resp


def serve(service: KeyService, sock_path: str, sidecar: bool, hold_pids: list[int], on_ready) -> None:
    """Listen on `sock_path` until stopped (or, for a sidecar, until the last holder exits)."""
    server = AgentServer(sock_path, service, sidecar)
    for pid in hold_pids:
        server.holders.add(pid, _cmdline(pid))
    watcher = threading.Thread(target=server.holders.watch, daemon=True, name="holders")
    watcher.start()
    stop_maintenance = threading.Event()
    threading.Thread(target=service.maintenance_loop, args=(stop_maintenance,), daemon=True,
                     name="key-retry").start()
    log.info("agent %d listening on %s%s", os.getpid(), sock_path, " (sidecar)" if sidecar else "")
    on_ready()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        stop_maintenance.set()
        server.holders.stop()
        server.server_close()
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        service.close()
        log.info("agent %d stopped", os.getpid())

