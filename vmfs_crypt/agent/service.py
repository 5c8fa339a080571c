"""The key service: providers, the KEK cache and wrap/unwrap on behalf of clients, independent of any socket.

KEKs live only here, in memory. A provider that cannot be built (a missing certificate, a
key file readable by others) is reported when it is used and in `status`; it never stops the
others (issue 9). Locked keys are KEKs that could not be fetched, with the disks that asked.

Provider changes (add, remove, backup, restore) and policy changes are made here too, by the
agent, not by the CLI (issue 11): the agent owns the configuration and the key files, so the
privilege check in front of these requests is the only way to them for other users, and each
one is audited. Who asked is the principal of the request being handled (`handle`).
"""

import logging
import os
import threading
import time

from ..config import Config, check_config_trust, check_provider_settings, load_config
from ..crypto.xts import new_dek
from ..errors import ConfigError, KeyRevokedError, PermissionDeniedError, ProviderError, UsageError, VmfsCryptError
from ..format.atomicio import write_atomic
from ..format.keysafe import EncryptionData, KeyRecord, KeyRef
from ..providers.base import KeyProvider
from ..providers.native import NativeKeyProvider
from ..providers.registry import build_provider
from . import protocol as p
from .audit import AuditLog
from .authz import Principal

log = logging.getLogger("vmfs_crypt.agent")


class KeyService:
    """What the agent does: each op_* takes and returns a JSON-able dict (agent/protocol.py)."""

    def __init__(self, config: Config, audit=None) -> None:
        self.config = config
        self.audit = audit  # an AuditLog (agent/audit.py), or None in process (tests, tools)
        self._request = threading.local()  # .who: the Principal of the request this thread handles
        self._admin_lock = threading.Lock()  # one configuration change at a time
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
        check_config_trust(self.config.path)
        config = load_config(self.config.path)
        # [audit] changed: write the new log from now on
        if self.audit is not None and (config.audit, config.audit_path) != (self.config.audit, self.config.audit_path):
            old, self.audit = self.audit, AuditLog.from_config(config)
            old.close()
        changes = self._load_providers(config)
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
                self._audit("kek_get", "error", provider=ref.provider_id, key_id=ref.key_id, file=disk, error=str(exc))
                self._note_locked(ref, [disk] if disk else [], exc)
                if disk:
                    raise type(exc)(f"{disk} is locked: {exc}") from None
                raise
            # A KMIP Get (or the derivation of a native KEK): audited before the KEK is used
            self._audit("kek_get", "ok", provider=ref.provider_id, key_id=ref.key_id, file=disk)
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

    # -- audit -------------------------------------------------------------------------
    def principal(self) -> Principal:
        return getattr(self._request, "who", None) or Principal.agent_itself()

    def _audit(self, event: str, result: str, **fields) -> None:
        if self.audit is not None:
            self.audit.write(event, result, self.principal().audit_fields(), **fields)

    # -- operations ----------------------------------------------------------------------
    def op_ping(self, req: dict) -> dict:
        return {"pid": os.getpid()}

    def op_unwrap(self, req: dict) -> dict:
        what = str(req.get("what", "file"))
        record = p.record_from(req, what)
        dek = record.open(self.kek(record.keysafe.kek, what), what)
        # The KEK it was under (names, not keys): the audit record says it without parsing the record again
        return {"dek": p.secret_to_wire(dek), "kek": record.keysafe.kek.to_json()}

    def op_prefetch(self, req: dict) -> dict:
        """Fetch each listed KEK once (at mount time); failures become locked disks, never an error."""
        wanted: dict[KeyRef, list[str]] = {}
        items = req.get("keys")
        if not isinstance(items, list):
            raise ConfigError("prefetch: keys must be a list")
        for item in items:
            wanted.setdefault(p.kek_from(item, "prefetch"), []).extend(str(d) for d in item.get("disks", []))

        who = self.principal()

        def run() -> None:
            self._request.who = who  # the KMIP Gets it makes are audited under the mount that asked
            for ref, disks in wanted.items():
                try:
                    self.kek(ref)
                except VmfsCryptError:  # a provider outage (locked), or an audit record that failed
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
        return dict(KeyRecord.seal(ref, self.kek(ref), dek, record.data).as_json(), kek=record.keysafe.kek.to_json())

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

    def handle(self, req: dict, who: Principal | None = None) -> dict:
        """Run one request for `who` (None: in process, the agent's own user)."""
        op = req.get("op")
        method = getattr(self, f"op_{op}", None) if isinstance(op, str) and op.isidentifier() else None
        if method is None:
            return {"ok": False, "error": f"unknown request {op!r}", "code": "agent"}
        self._request.who = who
        try:
            return dict(method(req), ok=True)
        except VmfsCryptError as exc:
            return p.error_response(exc)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return {"ok": False, "error": f"malformed {op} request ({type(exc).__name__}: {exc})", "code": "agent"}
        finally:
            self._request.who = None

    # -- provider and policy changes (issue 11: made by the agent, audited by the server) --------
    def _change_config(self, change) -> dict:
        """Apply `change(config)` to the configuration as it is on disk now, save it, load the providers."""
        with self._admin_lock:
            check_config_trust(self.config.path)
            config = load_config(self.config.path)
            result = change(config)
            rebuild = result.pop("_rebuild", None)
            if rebuild:
                self._settings.pop(rebuild, None)  # e.g. a restored key file: build that provider again
            self._load_providers(config)
            return result

    def _kmip_copies(self, name: str, config: Config, pem: dict) -> dict:
        """A KMIP provider added by another user: the agent keeps copies of the PEM files it was sent.

        The agent never opens a path another user names (it runs as root: a client certificate
        key of another service could be made to sign our TLS handshakes).
        """
        if not isinstance(pem, dict) or set(pem) != {"cert", "key", "ca"} or not all(
                isinstance(v, str) and v for v in pem.values()):
            raise UsageError(f"provider {name}: the certificate files must be sent to the agent (cert, key, ca)")
        folder = os.path.join(config.dir, f"kmip-{name}")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        out = {}
        for what, text in pem.items():
            path = os.path.join(folder, f"{what}.pem")
            write_atomic(path, text.encode("utf-8"), 0o600)
            out[what] = path
        return out

    def op_provider_add(self, req: dict) -> dict:
        who = self.principal()
        name = str(req["name"])
        settings = dict(req["settings"])
        if not name or "/" in name or name.startswith("."):
            raise UsageError(f"provider name {name!r}: use letters, digits, '-' and '_'")

        def change(config: Config) -> dict:
            config.check_new_provider(name)
            kind = settings.get("type")
            out: dict = {"name": name, "type": kind, "probe": []}
            if kind == "native":
                if settings.get("key_file") and who is not None and not who.owner:
                    raise PermissionDeniedError(f"{who.describe()} may not choose where the agent writes a key "
                                                "file; leave out --key-file (the key goes beside the agent's "
                                                "configuration)")
                key_file = os.path.abspath(settings.get("key_file") or config.native_key_file(name))
                os.makedirs(config.dir, mode=0o700, exist_ok=True)
                NativeKeyProvider.generate(name, key_file)
                config.add_provider(name, {"type": "native", "key_file": key_file})
                out["key_file"] = key_file
            elif kind == "kmip":
                if who is not None and not who.owner:
                    settings.update(self._kmip_copies(name, config, req.get("pem")))
                checked = check_provider_settings(name, settings, config.path)
                provider = build_provider(name, checked, config)
                try:
                    provider.check()
                    if req.get("check", True):
                        out["probe"] = [[server, problem] for server, problem in provider.probe()]
                        if all(problem is not None for _, problem in out["probe"]):
                            raise UsageError(f"no server of provider {name} works with these certificates ("
                                             + "; ".join(f"{s}: {pr}" for s, pr in out["probe"])
                                             + "); fix them, or add it anyway with --no-check")
                finally:
                    provider.close()
                config.add_provider(name, checked)
            else:
                raise UsageError(f"provider type {kind!r}: use native or kmip")
            out["default"] = config.default_provider == name
            return out

        return self._change_config(change)

    def op_provider_remove(self, req: dict) -> dict:
        name = str(req["name"])

        def change(config: Config) -> dict:
            _, settings = config.provider(name)
            key_file = config.native_key_file(name, settings) if settings["type"] == "native" else None
            config.remove_provider(name)
            return {"name": name, "type": settings["type"], "key_file": key_file,
                    "default_provider": config.default_provider}

        return self._change_config(change)

    def _native_of(self, config: Config, name: str) -> NativeKeyProvider:
        name, settings = config.provider(name)
        if settings["type"] != "native":
            raise UsageError(f"provider {name} is a {settings['type']} provider; only native providers have a backup")
        return NativeKeyProvider(name, config.native_key_file(name, settings))

    def op_provider_backup(self, req: dict) -> dict:
        """The sealed backup document; the client writes it where it wants (the agent writes no path it is given)."""
        passphrase = str(req["passphrase"]).encode("utf-8")
        with self._admin_lock:
            provider = self._native_of(self.config, str(req["name"]))
            document = provider.sealed_backup(passphrase)
            provider.mark_backed_up(str(req.get("target") or "(sent to a client)"))
        return {"name": provider.name, "backup": document.decode("utf-8")}

    def op_provider_restore(self, req: dict) -> dict:
        name = str(req["name"])
        raw = str(req["backup"]).encode("utf-8")
        source = str(req.get("source") or "the backup")
        passphrase = str(req["passphrase"]).encode("utf-8")

        def change(config: Config) -> dict:
            settings = config.providers.get(name, {"type": "native"})
            if settings.get("type") != "native":
                raise UsageError(f"provider {name} is not a native provider")
            key_file = os.path.abspath(config.native_key_file(name, settings))
            NativeKeyProvider.restore_document(name, key_file, raw, source, passphrase)
            if name not in config.providers:
                config.add_provider(name, {"type": "native", "key_file": key_file})
            return {"name": name, "key_file": key_file, "_rebuild": name}

        return self._change_config(change)

    def op_set_policy(self, req: dict) -> dict:
        """The encryption policy: which provider new disks use; what a revoked KEK does to open disks."""
        def change(config: Config) -> dict:
            if "default_provider" in req:
                name, _ = config.provider(str(req["default_provider"]))
                config.default_provider = name
                config.save()
                return {"setting": "default_provider", "value": name}
            name, settings = config.provider(str(req["provider"]))
            value = str(req["on_revoke"])
            if settings["type"] != "kmip":
                raise UsageError(f"provider {name} is a {settings['type']} provider; on_revoke applies to KMIP")
            config.providers[name] = check_provider_settings(name, dict(settings, on_revoke=value), config.path)
            config.save()
            return {"setting": f"providers.{name}.on_revoke", "value": value}

        return self._change_config(change)
