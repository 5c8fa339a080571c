"""The agent's socket server: every request decided from the peer's kernel credentials and audited; holders.

Without [roles] in the configuration a client is served only if the kernel says
(SO_PEERCRED) it runs as the agent's own uid or as root, and the socket is 0600. With roles
(issue 11) the socket is 0666 and every request is decided by agent/authz.py from the
peer's uid, gid and supplementary groups (SO_PEERGROUPS); each key operation and each
refused request becomes a line of the audit log (agent/audit.py) before the answer is sent.
Processes that depend on the agent (a mount, a CLI command that started a private
agent) register as *holders*: the agent watches each holder's pidfd, a sidecar agent exits
when its last holder is gone (no orphan agents with keys), and `agent stop` refuses while a
holder runs unless forced (issue 9).
"""

import logging
import os
import select
import socketserver
import stat
import subprocess
import sys
import threading
import time

from ..config import PRIVILEGES
from ..errors import AgentError, MountError, UsageError, VmfsCryptError
from . import protocol as p
from .authz import Access, Principal
from .service import KeyService

log = logging.getLogger("vmfs_crypt.agent")
OP_HOLD = p.OP_HOLD
MOUNT_COMMAND_TIMEOUT_S = 90.0
REFUSAL_WINDOW_S, REFUSALS_PER_WINDOW = 60.0, 200  # refused requests recorded one by one, per uid
# Requests that are audited when they succeed or fail (every refused request is audited).
AUDITED = {p.OP_UNWRAP, p.OP_NEW_FILE_KEY, p.OP_NEW_KEK, p.OP_REWRAP, p.OP_PREFETCH, p.OP_UNLOCK, p.OP_RELOAD,
           p.OP_STOP, p.OP_HOLD, p.OP_AUTHORIZE, p.OP_PROVIDER_ADD, p.OP_PROVIDER_REMOVE, p.OP_PROVIDER_BACKUP,
           p.OP_PROVIDER_RESTORE, p.OP_SET_POLICY, p.OP_MOUNT_START, p.OP_MOUNT_STOP}


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


def _text(value) -> str | None:
    """A field a client sent, as text for the audit log (clients may send anything)."""
    return None if value is None else str(value)


def _folder_of(what) -> str | None:
    """The VM folder of a file as the client named it (the mount names files relative to its datastore)."""
    return (os.path.dirname(what) or None) if isinstance(what, str) else None


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: AgentServer = self.server
        who = Principal.of_peer(self.request)
        if not who.owner and not server.access().multi_user:
            log.warning("refused a client: pid %d uid %d (%s) is neither uid %d nor root, and no [roles] are "
                        "configured", who.pid, who.uid, who.cmdline, os.geteuid())
            server.audit_quietly("connect", "refused", who, error="no [roles] configured: only the agent's own "
                                 "user and root may connect")
            return
        for line in self.rfile:
            try:
                req = p.decode(line, "request")
            except AgentError:
                return
            resp = server.dispatch(req, who)
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
        self._refusal_lock = threading.Lock()
        self._refusals: dict[int, tuple[float, int, int]] = {}  # uid -> (window start, refusals, not recorded)
        self._apply_socket_mode()

    def access(self) -> Access:
        return Access(self.service.config)

    def _apply_socket_mode(self) -> None:
        """0600 for a single user; 0666 with roles (every request is authorised from peer credentials)."""
        multi = self.access().multi_user
        os.chmod(self.sock_path, 0o666 if multi else 0o600)
        if multi:
            folder = os.path.dirname(os.path.abspath(self.sock_path))
            while True:
                if not os.stat(folder).st_mode & stat.S_IXOTH:
                    log.warning("roles are configured but other users cannot reach %s: %s is not searchable by "
                                "others; set [agent] socket to a path such as /run/vmfs-crypt-agent.sock",
                                self.sock_path, folder)
                    break
                if folder == "/":
                    break
                folder = os.path.dirname(folder)

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
                        self._apply_socket_mode()
                    except VmfsCryptError as exc:
                        log.error("the configuration changed but cannot be used (keeping the old one): %s", exc)
                    self._config_stamp = stamp

    # -- audit ---------------------------------------------------------------------------
    def audit_quietly(self, event: str, result: str, who: Principal, **fields) -> None:
        try:
            self.audit(event, result, who, **fields)
        except AgentError as exc:
            log.error("%s", exc)

    def audit(self, event: str, result: str, who: Principal, **fields) -> None:
        if self.service.audit is not None:
            self.service.audit.write(event, result, who.audit_fields(), owner=who.owner or None, **fields)

    def _request_fields(self, req: dict, resp: dict | None) -> dict:
        """What the audit record says about a request: names and ids, never a key, a passphrase or a backup."""
        try:
            return self._fields_of(req, resp)
        except (VmfsCryptError, TypeError, ValueError, AttributeError, KeyError):  # a malformed request
            return {"purpose": _text(req.get("purpose")), "target": "(malformed request)"}

    def _fields_of(self, req: dict, resp: dict | None) -> dict:
        op = req.get("op")
        resp = resp or {}
        out: dict = {"purpose": _text(req.get("purpose"))}
        what = req.get("what")
        if op in (p.OP_UNWRAP, p.OP_REWRAP):
            if isinstance(resp.get("kek"), dict):  # the service names the KEK it used
                out.update(provider=_text(resp["kek"].get("provider")), key_id=_text(resp["kek"].get("keyId")))
            else:  # refused or failed: read it from the request
                try:
                    ref = p.record_from(req, "audit").keysafe.kek
                    out.update(provider=ref.provider_id, key_id=ref.key_id)
                except VmfsCryptError:
                    pass
            out.update(file=_text(what), folder=_folder_of(what))
            if op == p.OP_REWRAP:
                out.update(to_provider=_text(req.get("provider")), to_key_id=_text(req.get("keyId")))
        elif op == p.OP_NEW_FILE_KEY:
            out.update(provider=_text(req.get("provider")), key_id=_text(req.get("keyId")), file=_text(what),
                       folder=_folder_of(what))
        elif op == p.OP_NEW_KEK:
            out.update(provider=_text(resp.get("provider") or req.get("provider")), key_id=_text(resp.get("keyId")),
                       label=_text(req.get("label")), folder=_text(req.get("folder")))
        elif op == p.OP_PREFETCH:
            keys = req.get("keys") if isinstance(req.get("keys"), list) else []
            out.update(count=len(keys), keys=[f"{k.get('provider')}/{k.get('keyId')}" for k in keys
                                               if isinstance(k, dict)])
        elif op == p.OP_UNLOCK:
            out.update(keys=[f"{k['provider']}/{k['keyId']}" for k in resp.get("unlocked", [])])
        elif op == p.OP_AUTHORIZE:
            out.update(privilege=_text(req.get("privilege")), target=_text(req.get("target")))
        elif op == p.OP_HOLD:
            out.update(target=_text(what))
        elif op in (p.OP_PROVIDER_ADD, p.OP_PROVIDER_REMOVE, p.OP_PROVIDER_BACKUP, p.OP_PROVIDER_RESTORE):
            settings = req.get("settings") if isinstance(req.get("settings"), dict) else {}
            out.update(provider=_text(req.get("name")), type=_text(settings.get("type") or resp.get("type")),
                       target=_text(req.get("target") or req.get("source") or resp.get("key_file")))
        elif op == p.OP_SET_POLICY:
            out.update(setting=_text(resp.get("setting")), value=_text(resp.get("value")),
                       provider=_text(req.get("provider") or req.get("default_provider")))
        elif op in (p.OP_MOUNT_START, p.OP_MOUNT_STOP):
            mount = self.service.config.mounts.get(str(req.get("name")), {})
            out.update(name=_text(req.get("name")), datastore=mount.get("datastore"),
                       mountpoint=mount.get("mountpoint"))
        elif op == p.OP_RELOAD:
            out.update(changes=[str(c) for c in resp.get("changes", [])])
        return out

    def _count_refusal(self, who: Principal) -> bool:
        """Whether to record this refusal: at most REFUSALS_PER_WINDOW per uid per window.

        A user flooding refused requests must not rotate the other records out of the log; what
        is not recorded one by one is counted in a "refusals_suppressed" record.
        """
        now = time.monotonic()
        with self._refusal_lock:
            start, count, suppressed = self._refusals.get(who.uid, (now, 0, 0))
            if now - start >= REFUSAL_WINDOW_S:
                if suppressed:
                    self.audit_quietly("refusals_suppressed", "refused", who, count=suppressed,
                                       error=f"{suppressed} more refused requests in {REFUSAL_WINDOW_S:.0f} s")
                start, count, suppressed = now, 0, 0
            count += 1
            record = count <= REFUSALS_PER_WINDOW
            if not record:
                suppressed += 1
                if suppressed == 1:
                    self.audit_quietly("refusals_suppressed", "refused", who, count=REFUSALS_PER_WINDOW,
                                       error=f"more than {REFUSALS_PER_WINDOW} refused requests in "
                                             f"{REFUSAL_WINDOW_S:.0f} s: the next ones are counted, not recorded")
            self._refusals[who.uid] = (start, count, suppressed)
        return record

    # -- requests ------------------------------------------------------------------------
    def dispatch(self, req: dict, who: Principal) -> dict:
        op = req.get("op")
        self.reload_if_changed()
        try:
            privilege = self.access().check(who, req)
        except VmfsCryptError as exc:
            needed = None
            try:
                needed = self.access().required(req)[0]
            except VmfsCryptError:
                pass
            fields = self._request_fields(req, None)
            fields["privilege"] = fields.get("privilege") or needed
            if self._count_refusal(who):
                log.warning("refused %s from %s: %s", op, who.describe(), exc)
                self.audit_quietly(_text(op) or "?", "refused", who, error=str(exc), **fields)
            return p.error_response(exc)
        resp = self._run(op, req, who)
        if op in AUDITED:
            fields = self._request_fields(req, resp if resp.get("ok") else None)
            fields["privilege"] = fields.get("privilege") or privilege
            try:
                self.audit(str(op), "ok" if resp.get("ok") else "error", who,
                           error=None if resp.get("ok") else _text(resp.get("error")), **fields)
            except AgentError as exc:
                if op != p.OP_STOP:
                    return p.error_response(exc)  # fail closed: no key leaves without its record
                log.error("%s", exc)
        if not resp.get("ok"):
            log.info("request %s failed: %s", op, resp.get("error"))
        return resp

    def _run(self, op, req: dict, who: Principal) -> dict:
        if op == OP_HOLD:
            try:
                self.holders.add(who.pid, str(req.get("what", ""))[:200] or who.cmdline)
            except OSError as exc:
                return {"ok": False, "error": f"cannot watch process {who.pid}: {exc.strerror}", "code": "agent"}
            return {"ok": True, "pid": os.getpid()}
        if op == p.OP_STOP:
            others = self.holders.others_than(who.pid)
            if others and not req.get("force"):
                names = "; ".join(f"pid {h['pid']} ({h['what']})" for h in others)
                return {"ok": False, "code": "in-use",
                        "error": f"the agent is in use by {names}; unmount first, or stop it with --force "
                                 "(their new opens then fail until an agent runs again)"}
            return {"ok": True}
        if op == p.OP_WHOAMI:
            access = self.access()
            return {"ok": True, **who.audit_fields(), "owner": who.owner, "roles": access.roles_of(who),
                    "privileges": sorted(access.privileges(who), key=list(PRIVILEGES).index),
                    "multi_user": access.multi_user, "agent_uid": os.geteuid(), "config": self.service.config.path}
        if op == p.OP_AUTHORIZE:
            return {"ok": True, "privilege": req.get("privilege"), "owner": who.owner}
        if op in (p.OP_MOUNT_START, p.OP_MOUNT_STOP):
            try:
                return dict(self._configured_mount(op, str(req.get("name"))), ok=True)
            except VmfsCryptError as exc:
                return p.error_response(exc)
        resp = self.service.handle(req, who)
        if op == p.OP_STATUS and resp.get("ok"):
            resp["holders"] = self.holders.describe()
            resp["sidecar"] = self.sidecar
        return resp

    def _configured_mount(self, op: str, name: str) -> dict:
        """Start or stop a [mounts.NAME] mount as the agent's user (issue 11: a vm-operator may, and gets no key).

        The mount is the same `vmfs-crypt mount` an administrator would run, with this agent as
        its key agent: the keys stay in processes of the agent's user; the operator reaches the
        plaintext only through the mount's file permissions (allow_other, default_permissions).
        """
        config = self.service.config
        mount = config.mounts.get(name)
        if mount is None:
            raise UsageError(f"no mount {name!r} is configured in {config.path} "
                             f"(configured: {', '.join(sorted(config.mounts)) or 'none'})")
        cli = [sys.executable, "-m", "vmfs_crypt.cli", "--config", config.path]
        if op == p.OP_MOUNT_START:
            cmd = cli + ["mount", mount["datastore"], mount["mountpoint"], "--agent", self.sock_path]
            if mount.get("allow_other"):
                cmd.append("--allow-other")
            if mount.get("options"):
                cmd += ["-o", mount["options"]]
        else:
            cmd = cli + ["umount", mount["mountpoint"]]
        # A command line, not an import: the agent layer does not import the mount code (docs/ARCHITECTURE.md).
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=MOUNT_COMMAND_TIMEOUT_S,
                              text=True, errors="replace")
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        if proc.returncode != 0:
            message = next((line.removeprefix("vmfs-crypt: ") for line in lines if line.startswith("vmfs-crypt: ")),
                           lines[-1] if lines else f"exit status {proc.returncode}")
            raise MountError(f"mount {name}: {message}")
        return {"name": name, "mountpoint": mount["mountpoint"], "message": proc.stdout.strip()}


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
    server.audit_quietly("agent_start", "ok", Principal.agent_itself(), target=sock_path,
                         name="sidecar" if sidecar else "shared")
    on_ready()
    try:
        server.serve_forever(poll_interval=0.1)  # a stopped sidecar exits within 0.1 s (commands wait for it)
    finally:
        stop_maintenance.set()
        server.holders.stop()
        server.server_close()
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        service.close()
        server.audit_quietly("agent_stop", "ok", Principal.agent_itself(), target=sock_path)
        log.info("agent %d stopped", os.getpid())

