"""The sidecar key agent: holds provider secrets and KEKs in memory, answers key requests on a private Unix socket."""

import argparse
import base64
import json
import logging
import os
import secrets
import select
import socket
import socketserver
import struct
import sys
import threading
import time

from .config import Config, load_config
from .errors import AgentError, ConfigError, ProviderError, VmfsCryptError
from .hardening import disable_core_dumps
from .keysafe import EncryptionData, KeyRecord, KeyRef
from .providers.base import KeyProvider
from .procs import ReadyPipe, error_class, raise_for, spawn_detached
from .providers.native import NativeKeyProvider
from .xts import DEK_SIZE

log = logging.getLogger("vmfs_crypt.agent")
MAX_REQUEST = 1 << 20
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


def build_provider(name: str, settings: dict, config: Config) -> KeyProvider:
    kind = settings.get("type")
    if kind == "native":
        return NativeKeyProvider(name, config.native_key_file(name, settings))
    if kind == "kmip":
        try:
            from .providers.kmip import KmipKeyProvider
        except ImportError as exc:
            raise ConfigError(f"provider {name}: the KMIP provider needs PyKMIP ({exc}); "
                              "install vmfs-crypt[kmip]") from None
        return KmipKeyProvider.from_settings(name, settings, config)
    raise ConfigError(f"provider {name}: unknown type {kind!r} in {config.path} (known: native, kmip)")


def new_dek() -> bytes:
    while True:
        dek = secrets.token_bytes(DEK_SIZE)
        if dek[:32] != dek[32:]:
            return dek


class KeyService:
    """What the agent does, independent of the socket: KEK cache and wrap/unwrap on behalf of clients."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.providers: dict[str, KeyProvider] = {}
        for name, settings in config.providers.items():
            self.providers[name] = build_provider(name, settings, config)
        self._keks: dict[KeyRef, bytes] = {}
        self._lock = threading.Lock()
        # Locked keys: KEKs that could not be fetched (or were revoked), with the disks that asked.
        self._locked: dict[KeyRef, dict] = {}
        self._fetch_locks: dict[KeyRef, threading.Lock] = {}

    def provider(self, name: str | None) -> KeyProvider:
        name, _ = self.config.provider(name)
        return self.providers[name]

    def kek(self, ref: KeyRef, disk: str | None = None) -> bytes:
        with self._lock:
            cached = self._keks.get(ref)
            fetch_lock = self._fetch_locks.setdefault(ref, threading.Lock())
        if cached is not None:
            return cached
        if ref.provider_id not in self.providers:
            raise ProviderError(f"{disk + ': ' if disk else ''}{ref}: provider {ref.provider_id!r} is not configured "
                                f"in {self.config.path}; add it with 'vmfs-crypt provider add'")
        with fetch_lock:  # one fetch per KEK, however many disks ask at once
            with self._lock:
                cached = self._keks.get(ref)
            if cached is not None:
                return cached
            try:
                kek = self.providers[ref.provider_id].get_kek(ref.key_id)
            except ProviderError as exc:
                self._note_locked(ref, [disk] if disk else [], exc)
                if disk:
                    raise type(exc)(f"{disk} is locked: {exc}") from None
                raise
            with self._lock:
                self._keks[ref] = kek
                self._locked.pop(ref, None)
        return kek

    def _note_locked(self, ref: KeyRef, disks: list[str], exc: Exception) -> None:
        with self._lock:
            entry = self._locked.setdefault(ref, {"disks": set(), "since": time.time(), "error": None})
            changed = entry["error"] != str(exc) or not set(disks) <= entry["disks"]
            entry["disks"].update(disks)
            revoked = bool(getattr(exc, "revoked", False))
            lock_open = revoked and getattr(self.providers.get(ref.provider_id), "on_revoke", "keep") == "lock"
            entry.update(error=str(exc), revoked=revoked, lock_open=lock_open, last_try=time.time())
        if changed:  # the periodic retry does not repeat the same line
            log.warning("locked: %s%s: %s", ref, f" ({', '.join(sorted(disks))})" if disks else "", exc)

    def retry_locked(self) -> tuple[list[KeyRef], list[KeyRef]]:
        """Fetch every locked KEK again now; (unlocked, still locked)."""
        for p in self.providers.values():
            getattr(p, "reset_backoff", lambda: None)()
        with self._lock:
            refs = list(self._locked)
        done, still = [], []
        for ref in refs:
            try:
                self.kek(ref)
                done.append(ref)
                log.info("unlocked %s", ref)
            except ProviderError:
                still.append(ref)
        return done, still

    def recheck_revocations(self) -> None:
        """Providers with on_revoke = "lock": drop cached KEKs that were revoked or destroyed meanwhile."""
        with self._lock:
            refs = [r for r in self._keks
                    if getattr(self.providers.get(r.provider_id), "on_revoke", "keep") == "lock"]
        for ref in refs:
            try:
                self.providers[ref.provider_id].check_usable(ref.key_id)
            except ProviderError as exc:
                if not getattr(exc, "revoked", False):
                    continue  # an outage is not a revocation: keep serving
                with self._lock:
                    self._keks.pop(ref, None)
                self._note_locked(ref, [], exc)

    def maintenance_loop(self, stop: threading.Event) -> None:
        """Periodically retry locked KEKs and look for revocations ([agent] retry_interval, seconds)."""
        interval = float(self.config.agent.get("retry_interval", 30))
        while not stop.wait(interval):
            try:
                if self._locked:
                    self.retry_locked()
                self.recheck_revocations()
            except Exception:  # keep the loop alive whatever a provider does
                log.exception("periodic key retry failed")

    # Each op takes and returns JSON-able dicts; secrets travel base64-encoded.
    def op_ping(self, req: dict) -> dict:
        return {"pid": os.getpid()}

    def op_unwrap(self, req: dict) -> dict:
        what = str(req.get("what", "file"))
        record = KeyRecord.parse(req["keySafe"], req["data"], what)
        dek = record.open(self.kek(record.keysafe.kek, what), what)
        return {"dek": base64.b64encode(dek).decode()}

    def op_prefetch(self, req: dict) -> dict:
        """Fetch each listed KEK once (at mount time); failures become locked disks, never an error."""
        wanted: dict[KeyRef, list[str]] = {}
        for item in req["keys"]:
            wanted.setdefault(KeyRef(str(item["provider"]), str(item["keyId"])), []).extend(item.get("disks", []))

        def run() -> None:
            for ref, disks in wanted.items():
                try:
                    self.kek(ref)
                except ProviderError:
                    pass
                with self._lock:
                    if ref in self._locked:
                        self._locked[ref]["disks"].update(disks)

        worker = threading.Thread(target=run, daemon=True, name="prefetch")
        worker.start()
        worker.join(float(req.get("budget_s", 10.0)))  # the mount does not wait longer; the rest goes on
        with self._lock:
            fetched = sum(1 for ref in wanted if ref in self._keks)
        return {"keys": len(wanted), "fetched": fetched, "pending": worker.is_alive(),
                "locked": self.op_locked({})["locked"]}

    def op_locked(self, req: dict) -> dict:
        with self._lock:
            return {"locked": [{"provider": r.provider_id, "keyId": r.key_id, "disks": sorted(e["disks"]),
                                "error": e["error"], "revoked": e["revoked"], "lock_open": e["lock_open"],
                                "since": e["since"],
                                "last_try": e["last_try"]} for r, e in self._locked.items()]}

    def op_unlock(self, req: dict) -> dict:
        done, still = self.retry_locked()
        return {"unlocked": [{"provider": r.provider_id, "keyId": r.key_id} for r in done],
                "locked": self.op_locked({})["locked"]}

    def op_new_kek(self, req: dict) -> dict:
        provider = self.provider(req.get("provider"))
        key_id = provider.new_kek(str(req.get("label", "")))
        return {"provider": provider.name, "keyId": key_id}

    def op_new_file_key(self, req: dict) -> dict:
        ref = KeyRef(req["provider"], req["keyId"])
        dek = new_dek()
        record = KeyRecord.seal(ref, self.kek(ref), dek, EncryptionData.new())
        return dict(record.as_json(), dek=base64.b64encode(dek).decode())

    def op_rewrap(self, req: dict) -> dict:
        """Shallow rekey: the same DEK under another KEK (the data record, and so the binding, stays)."""
        what = str(req.get("what", "file"))
        record = KeyRecord.parse(req["keySafe"], req["data"], what)
        dek = record.open(self.kek(record.keysafe.kek), what)
        ref = KeyRef(req["provider"], req["keyId"])
        return KeyRecord.seal(ref, self.kek(ref), dek, record.data).as_json()

    def op_status(self, req: dict) -> dict:
        warnings = []
        for p in self.providers.values():
            warnings.extend(p.warnings())
        return {"pid": os.getpid(), "providers": [p.describe() for p in self.providers.values()],
                "default_provider": self.config.default_provider, "cached_keks": len(self._keks),
                "locked": len(self._locked), "warnings": warnings}

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if method is None:
            return {"ok": False, "error": f"unknown request {op!r}", "class": "AgentError"}
        try:
            return dict(method(req), ok=True)
        except VmfsCryptError as exc:
            return {"ok": False, "error": str(exc), "class": type(exc).__name__}
        except KeyError as exc:
            return {"ok": False, "error": f"request {op} lacks field {exc}", "class": "AgentError"}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        peer_uid = struct.unpack("3i", self.request.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if peer_uid not in (os.geteuid(), 0):
            log.warning("refused a client of uid %d", peer_uid)
            return
        for line in self.rfile:
            if len(line) > MAX_REQUEST:
                return
            try:
                req = json.loads(line)
            except ValueError:
                return
            if req.get("op") == "stop":
                self.wfile.write(b'{"ok": true}\n')
                self.wfile.flush()
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                return
            resp = self.server.service.handle(req)
            if not resp.get("ok"):
                log.info("request %s failed: %s", req.get("op"), resp.get("error"))
            self.wfile.write(json.dumps(resp).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


def serve(config_path: str, ready_fd: int | None) -> int:
    """Run the agent in this process until asked to stop."""
    disable_core_dumps()
    config = load_config(config_path)
    sock_path = config.agent_socket

    ready = ReadyPipe(ready_fd)
    try:
        service = KeyService(config)
        for p in service.providers.values():
            if hasattr(p, "check"):
                p.check()
        os.makedirs(os.path.dirname(sock_path), mode=0o700, exist_ok=True)
        os.chmod(os.path.dirname(sock_path), 0o700)
        if os.path.exists(sock_path):
            if AgentClient(sock_path).alive():
                raise AgentError(f"an agent is already running on {sock_path}")
            os.unlink(sock_path)
        old_umask = os.umask(0o177)
        try:
            server = _Server(sock_path, _Handler)
        finally:
            os.umask(old_umask)
        os.chmod(sock_path, 0o600)
    except VmfsCryptError as exc:
        ready.error(exc)
        return exc.exit_code
    server.service = service
    log.info("agent %d listening on %s", os.getpid(), sock_path)
    ready.ok()
    stop_maintenance = threading.Event()
    threading.Thread(target=service.maintenance_loop, args=(stop_maintenance,), daemon=True,
                     name="key-retry").start()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        stop_maintenance.set()
        server.server_close()
        try:
            os.unlink(sock_path)
        except FileNotFoundError:
            pass
        for p in service.providers.values():
            p.close()
        log.info("agent %d stopped", os.getpid())
    return 0



class AgentClient:
    """Talks to the agent; one connection per thread, reconnecting after an agent restart."""

    def __init__(self, socket_path: str, timeout_s: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout_s = timeout_s
        self._local = threading.local()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise AgentError(f"no key agent answers on {self.socket_path} ({exc.strerror}); "
                             "start one with 'vmfs-crypt agent start'") from None
        return sock

    def request(self, op: str, **fields) -> dict:
        payload = json.dumps(dict(fields, op=op)).encode() + b"\n"
        for attempt in (0, 1):
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = self._local.conn = (s := self._connect(), s.makefile("rb"))
            sock, rfile = conn
            try:
                sock.sendall(payload)
                line = rfile.readline(MAX_REQUEST)
                if not line:
                    raise ConnectionResetError("agent closed the connection")
                break
            except OSError as exc:
                self._local.conn = None
                sock.close()
                if attempt:
                    raise AgentError(f"the key agent on {self.socket_path} stopped answering ({exc})") from None
        resp = json.loads(line)
        if not resp.get("ok"):
            cls = error_class(str(resp.get("class")), AgentError)
            raise cls(resp.get("error", "the agent refused the request"))
        return resp

    def alive(self) -> bool:
        try:
            self.request("ping")
            return True
        except (AgentError, OSError, ValueError):
            return False

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn:
            conn[0].close()
            self._local.conn = None

    def unwrap(self, record: KeyRecord, what: str) -> bytes:
        resp = self.request("unwrap", what=what, **record.as_json())
        return base64.b64decode(resp["dek"])

    def new_kek(self, provider: str | None, label: str) -> KeyRef:
        resp = self.request("new_kek", provider=provider, label=label)
        return KeyRef(resp["provider"], resp["keyId"])

    def new_file_key(self, kek: KeyRef) -> tuple[KeyRecord, bytes]:
        resp = self.request("new_file_key", provider=kek.provider_id, keyId=kek.key_id)
        record = KeyRecord.from_json({k: resp[k] for k in ("keySafe", "data")}, "new key")
        return record, base64.b64decode(resp["dek"])

    def rewrap(self, record: KeyRecord, kek: KeyRef, what: str) -> KeyRecord:
        resp = self.request("rewrap", what=what, provider=kek.provider_id, keyId=kek.key_id, **record.as_json())
        return KeyRecord.from_json({k: resp[k] for k in ("keySafe", "data")}, what)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask the agent to stop and wait until its process is gone (its keys with it)."""
        try:
            pidfd = os.pidfd_open(int(self.request("ping")["pid"]))
        except (AgentError, OSError):
            self.close()
            return
        try:
            try:
                self.request("stop")
            except AgentError:
                pass
            self.close()
            # Handler threads of open connections outlive the listener until the process exits:
            # only then is no key served any more.
            select.select([pidfd], [], [], timeout_s)
        finally:
            os.close(pidfd)


def start_agent(config: Config) -> int:
    """Start a detached agent process for `config`; return its pid once it listens."""
    sock = config.agent_socket
    log_path = (sock[:-len(".sock")] if sock.endswith(".sock") else sock) + ".log"
    proc, line = spawn_detached([sys.executable, "-m", "vmfs_crypt.agent", "--config", config.path], log_path,
                                START_TIMEOUT_S)
    if line == "ok":
        return proc.pid
    if not line:
        proc.kill()
        raise AgentError(f"the key agent did not start within {START_TIMEOUT_S:.0f} s; see {log_path}")
    proc.wait(timeout=5)
    raise_for(line, AgentError, f"the key agent failed to start; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmfs-crypt-agent")
    parser.add_argument("--config", required=True)
    parser.add_argument("--ready-fd", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s agent[%(process)d] %(levelname)s %(message)s")
    return serve(args.config, args.ready_fd)


if __name__ == "__main__":
    sys.exit(main())
