"""The key service: providers, the KEK cache and wrap/unwrap on behalf of clients, independent of any socket.

KEKs live only here, in memory. A provider that cannot be built (a missing certificate, a
key file readable by others) is reported when it is used and in `status`; it never stops the
others (issue 9). Locked keys are KEKs that could not be fetched, with the disks that asked.
"""

import logging
import os
import threading
import time

from ..config import Config, load_config
from ..crypto.xts import new_dek
from ..errors import ConfigError, KeyRevokedError, ProviderError, VmfsCryptError
from ..format.keysafe import EncryptionData, KeyRecord, KeyRef
from ..providers.base import KeyProvider
from ..providers.registry import build_provider
from . import protocol as p

log = logging.getLogger("vmfs_crypt.agent")


class KeyService:
    """What the agent does: each op_* takes and returns a JSON-able dict (agent/protocol.py)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.providers: dict[str, KeyProvider] = {}
        self.broken: dict[str, VmfsCryptError] = {}  # provider name -> why it cannot be used
        self._settings: dict[str, dict] = {}
        self._keks: dict[KeyRef, bytes] = {}
        self._lock = threading.Lock()
        self._locked: dict[KeyRef, dict] = {}
        self._fetch_locks: dict[KeyRef, threading.Lock] = {}
        self._load_providers(config)

    # -- providers ---------------------------------------------------------------------
    def _load_providers(self, config: Config) -> list[str]:
        """(Re)build the providers whose settings changed; keep the KEKs of the others. Returns the changes."""
        changes = []
        for name in list(self.providers) + list(self.broken):
            if config.providers.get(name) != self._settings.get(name):
                old = self.providers.pop(name, None)
                self.broken.pop(name, None)
                self._settings.pop(name, None)
                if old is not None:
                    old.close()
                with self._lock:
                    for ref in [r for r in self._keks if r.provider_id == name]:
                        del self._keks[ref]
                if name not in config.providers:
                    changes.append(f"removed provider {name}")
        for name, settings in config.providers.items():
            if name in self._settings:
                continue
            self._settings[name] = settings
            try:
                provider = build_provider(name, settings, config)
                provider.check()
                self.providers[name] = provider
                changes.append(f"loaded provider {name}")
            except VmfsCryptError as exc:
                self.broken[name] = exc
                log.error("provider %s cannot be used: %s", name, exc)
                changes.append(f"provider {name} is broken: {exc}")
        self.config = config
        return changes

    def reload(self) -> list[str]:
        """Re-read the configuration file (on SIGHUP, 'agent reload', or when the file changed)."""
        changes = self._load_providers(load_config(self.config.path))
        for line in changes:
            log.info("reload: %s", line)
        return changes

    def provider_named(self, name: str, what: str = "") -> KeyProvider:
        provider = self.providers.get(name)
        if provider is not None:
            return provider
        prefix = f"{what}: " if what else ""
        if name in self.broken:
            exc = self.broken[name]  # the class it failed with: a key file readable by others stays exit 3
            raise type(exc)(f"{prefix}provider {name} cannot be used: {exc}")
        raise ProviderError(f"{prefix}provider {name!r} is not configured in {self.config.path}; "
                            "add it with 'vmfs-crypt provider add'")

    def provider(self, name: str | None) -> KeyProvider:
        name, _ = self.config.provider(name)
        return self.provider_named(name)

    # -- KEKs --------------------------------------------------------------------------
    def kek(self, ref: KeyRef, disk: str | None = None) -> bytes:
        with self._lock:
            cached = self._keks.get(ref)
            fetch_lock = self._fetch_locks.setdefault(ref, threading.Lock())
        if cached is not None:
            return cached
        provider = self.provider_named(ref.provider_id, disk or "")
        with fetch_lock:  # one fetch per KEK, however many disks ask at once
            with self._lock:
                cached = self._keks.get(ref)
            if cached is not None:
                return cached
            try:
                kek = provider.get_kek(ref.key_id)
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
        revoked = isinstance(exc, KeyRevokedError)
        provider = self.providers.get(ref.provider_id)
        with self._lock:
            entry = self._locked.setdefault(ref, {"disks": set(), "since": time.time(), "error": None})
            changed = entry["error"] != str(exc) or not set(disks) <= entry["disks"]
            entry["disks"].update(disks)
            lock_open = revoked and provider is not None and provider.on_revoke == "lock"
            entry.update(error=str(exc), revoked=revoked, lock_open=lock_open, last_try=time.time())
        if changed:  # the periodic retry does not repeat the same line
            log.warning("locked: %s%s: %s", ref, f" ({', '.join(sorted(disks))})" if disks else "", exc)

    def retry_locked(self) -> tuple[list[KeyRef], list[KeyRef]]:
        """Fetch every locked KEK again now; (unlocked, still locked)."""
        for provider in self.providers.values():
            provider.reset_backoff()
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
                    if (prov := self.providers.get(r.provider_id)) is not None and prov.on_revoke == "lock"]
        for ref in refs:
            try:
                self.providers[ref.provider_id].check_usable(ref.key_id)
            except KeyRevokedError as exc:
                with self._lock:
                    self._keks.pop(ref, None)
                self._note_locked(ref, [], exc)
            except ProviderError:
                continue  # an outage is not a revocation: keep serving

    def maintenance_loop(self, stop: threading.Event) -> None:
        """Periodically retry locked KEKs and look for revocations ([agent] retry_interval, seconds)."""
        while not stop.wait(self.config.agent.retry_interval):
            try:
                if self._locked:
                    self.retry_locked()
                self.recheck_revocations()
            except Exception as exc:  # keep the loop alive whatever a provider does
                log.error("periodic key retry failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        for provider in self.providers.values():
            provider.close()
        with self._lock:
            self._keks.clear()

    # -- operations ----------------------------------------------------------------------
    def op_ping(self, req: dict) -> dict:
        return {"pid": os.getpid()}

    def op_unwrap(self, req: dict) -> dict:
        what = str(req.get("what", "file"))
        record = p.record_from(req, what)
        dek = record.open(self.kek(record.keysafe.kek, what), what)
        return {"dek": p.secret_to_wire(dek)}

    def op_prefetch(self, req: dict) -> dict:
        """Fetch each listed KEK once (at mount time); failures become locked disks, never an error."""
        wanted: dict[KeyRef, list[str]] = {}
        items = req.get("keys")
        if not isinstance(items, list):
            raise ConfigError("prefetch: keys must be a list")
        for item in items:
            wanted.setdefault(p.kek_from(item, "prefetch"), []).extend(str(d) for d in item.get("disks", []))

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
            return {"locked": [dict(r.to_json(), disks=sorted(e["disks"]), error=e["error"], revoked=e["revoked"],
                                    lock_open=e["lock_open"], since=e["since"], last_try=e["last_try"])
                               for r, e in self._locked.items()]}

    def op_unlock(self, req: dict) -> dict:
        done, _ = self.retry_locked()
        return {"unlocked": [r.to_json() for r in done], "locked": self.op_locked({})["locked"]}

    def op_new_kek(self, req: dict) -> dict:
        provider = self.provider(req.get("provider"))
        key_id = provider.new_kek(str(req.get("label", "")))
        return KeyRef(provider.name, key_id).to_json()

    def op_new_file_key(self, req: dict) -> dict:
        ref = p.kek_from(req, "new file key")
        dek = new_dek()
        record = KeyRecord.seal(ref, self.kek(ref), dek, EncryptionData.new())
        return dict(record.as_json(), dek=p.secret_to_wire(dek))

    def op_rewrap(self, req: dict) -> dict:
        """Shallow rekey: the same DEK under another KEK (the data record, and so the binding, stays)."""
        what = str(req.get("what", "file"))
        record = p.record_from(req, what)
        dek = record.open(self.kek(record.keysafe.kek), what)
        ref = p.kek_from(req, what)
        return KeyRecord.seal(ref, self.kek(ref), dek, record.data).as_json()

    def op_reload(self, req: dict) -> dict:
        return {"changes": self.reload()}

    def op_status(self, req: dict) -> dict:
        warnings = []
        for provider in self.providers.values():
            warnings.extend(provider.warnings())
        providers = [prov.describe() for prov in self.providers.values()]
        providers += [{"name": name, "type": self.config.providers.get(name, {}).get("type"), "error": str(exc)}
                      for name, exc in self.broken.items()]
        return {"pid": os.getpid(), "config": self.config.path, "providers": providers,
                "default_provider": self.config.default_provider, "cached_keks": len(self._keks),
                "locked": len(self._locked), "warnings": warnings}

    def handle(self, req: dict) -> dict:
        op = req.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        if method is None:
            return {"ok": False, "error": f"unknown request {op!r}", "code": "agent"}
        try:
            return dict(method(req), ok=True)
        except VmfsCryptError as exc:
            return p.error_response(exc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return {"ok": False, "error": f"malformed {op} request ({type(exc).__name__}: {exc})", "code": "agent"}
