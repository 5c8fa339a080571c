"""The standard key provider: KEKs held by a cluster of KMIP servers (vSphere's "Standard Key Provider").

KEKs are AES-256 symmetric keys created and kept on the key server; the agent fetches them by
the server-assigned id and keeps them in memory only. DEKs are wrapped locally (keysafe).

Operations used: Create, Activate, Get, GetAttributes, Revoke and Destroy (the last two only
by tests and tools). A provider is a cluster: servers are tried in order, failing over on
connection errors, TLS failures and time-outs; an answer from a server (even a refusal)
does not fail over.

TLS: we open the socket ourselves with an ssl.SSLContext that requires the server to chain
to the configured CA AND to carry the configured host name (PyKMIP's own client checks no
host name), present the client certificate, and hand the connected socket to PyKMIP.

Outages (as in vSphere): open disks keep working (the mount holds their DEKs, the agent its
cached KEKs); a KEK that cannot be fetched locks the disks under it (EACCES, 'vmfs-crypt
status' lists them; 'vmfs-crypt unlock' or the agent's periodic retry brings them back).
Revocation policy, per provider (on_revoke):
  "keep" (default): disks already open, and new opens under a KEK the agent has cached, keep
         working until unmount / agent restart; fetching a revoked KEK fails ("key 17 was revoked").
  "lock": the agent re-checks the state of cached KEKs every [agent] retry_interval seconds
         (default 30) and drops revoked or destroyed ones; the mount asks the agent every 2 s
         and then refuses reads and writes to disks under them. Pages already in the kernel's
         page cache stay readable until evicted (QEMU with cache=none bypasses that cache).
PyKMIP deletes destroyed keys, so a destroyed key and an unknown id look the same to us
(ITEM_NOT_FOUND): the error says "destroyed there, or never existed there".
"""

import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
import warnings

from ..errors import ConfigError, KeyNotFoundError, KeyRevokedError, ProviderError
from .base import KeyProvider

with warnings.catch_warnings():
    # PyKMIP 0.11 imports deprecated SQLAlchemy/cryptography APIs (field notes); nothing we use.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(TripleDES|Camellia|ARC4|CFB|OFB|cache_ok|MovedIn20|PROTOCOL_TLS).*")
    try:
        from cryptography.utils import CryptographyDeprecationWarning
        warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    except ImportError:  # pragma: no cover
        pass
    from kmip import enums
    from kmip.core import exceptions as kmip_core_exceptions
    from kmip.pie import exceptions as kmip_exceptions
    from kmip.pie.client import ProxyKmipClient
    from kmip.services.kmip_protocol import KMIPProtocol, RequestLengthMismatch

log = logging.getLogger("vmfs_crypt.kmip")

DEFAULT_PORT = 5696
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_REQUEST_TIMEOUT_S = 10.0
# After every server of the cluster failed, fail fast for this long (so that prefetching
# 20 KEKs during an outage costs one round of time-outs, not 20); 'unlock' resets it.
DEFAULT_HOLDOFF_S = 10.0
ON_REVOKE = ("keep", "lock")


def parse_server(text: str) -> tuple[str, int]:
    """HOST:PORT, [IPv6]:PORT, or HOST (port 5696)."""
    text = str(text).strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text) or re.fullmatch(r"([^:\[\]\s]+)(?::(\d+))?", text)
    if not m:
        raise ConfigError(f"server {text!r} is not HOST:PORT")
    port = int(m.group(2)) if m.group(2) else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ConfigError(f"server {text!r}: port {port} is out of range")
    return m.group(1), port


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _ServerFailure(Exception):
    """One server could not be used (connection, TLS or time-out): try the next one."""


class KmipKeyProvider(KeyProvider):
    kind = "kmip"

    def __init__(self, name: str, servers: list[tuple[str, int]], cert: str, key: str, ca: str,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
                 request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S,
                 on_revoke: str = "keep", holdoff: float = DEFAULT_HOLDOFF_S) -> None:
        super().__init__(name)
        if not servers:
            raise ConfigError(f"provider {name}: a KMIP provider needs at least one server")
        if on_revoke not in ON_REVOKE:
            raise ConfigError(f"provider {name}: on_revoke must be one of {', '.join(ON_REVOKE)}, not {on_revoke!r}")
        self.servers = list(servers)
        self.cert, self.key, self.ca = cert, key, ca
        self.connect_timeout, self.request_timeout = float(connect_timeout), float(request_timeout)
        self.on_revoke = on_revoke
        self.holdoff = float(holdoff)
        self._lock = threading.Lock()  # PyKMIP's client is not thread-safe: one request at a time
        self._client: ProxyKmipClient | None = None
        self._server: tuple[str, int] | None = None
        self._ctx: ssl.SSLContext | None = None
        self._down_until = self._down_since = 0.0
        self._down_error = ""
        self.counts = {"Create": 0, "Activate": 0, "Get": 0, "GetAttributes": 0, "Revoke": 0, "Destroy": 0,
                       "connections": 0}

    @classmethod
    def from_settings(cls, name: str, settings: dict, config) -> "KmipKeyProvider":
        def need(field: str) -> str:
            value = settings.get(field)
            if not value or not isinstance(value, str):
                raise ConfigError(f"provider {name} in {config.path}: missing {field} (path to a PEM file)")
            return config.resolve_path(value)

        servers = settings.get("servers")
        if isinstance(servers, str):
            servers = [servers]
        if not servers or not isinstance(servers, list):
            raise ConfigError(f"provider {name} in {config.path}: servers must list HOST:PORT entries")
        try:
            return cls(name, [parse_server(s) for s in servers], need("cert"), need("key"), need("ca"),
                       float(settings.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S)),
                       float(settings.get("request_timeout", DEFAULT_REQUEST_TIMEOUT_S)),
                       str(settings.get("on_revoke", "keep")),
                       float(settings.get("holdoff", DEFAULT_HOLDOFF_S)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"provider {name} in {config.path}: {exc}") from None

    # -- connection -------------------------------------------------------------------
    @property
    def server_list(self) -> str:
        return ", ".join(_fmt(h, p) for h, p in self.servers)

    def check(self) -> None:
        """Load the certificates now, so that a wrong path shows when the agent starts."""
        self._context()

    def _context(self) -> ssl.SSLContext:
        if self._ctx is None:
            for what, path in (("cert", self.cert), ("key", self.key), ("ca", self.ca)):
                if not os.path.isfile(path):
                    raise ConfigError(f"provider {self.name}: {what} file {path} does not exist")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname=True
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = True
            ctx.verify_mode = ssl.CERT_REQUIRED
            try:
                ctx.load_verify_locations(cafile=self.ca)
                ctx.load_cert_chain(self.cert, self.key)
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"provider {self.name}: cannot load the client certificate {self.cert}, "
                                  f"its key {self.key} or the CA {self.ca}: {exc}") from None
            self._ctx = ctx
        return self._ctx

    def _connect(self, host: str, port: int) -> ProxyKmipClient:
        """A PyKMIP client on a TLS connection we made and verified (CA and host name)."""
        where = _fmt(host, port)
        try:
            raw = socket.create_connection((host, port), timeout=self.connect_timeout)
        except socket.timeout:
            raise _ServerFailure(f"{where}: no TCP connection within {self.connect_timeout:g} s") from None
        except ConnectionRefusedError:
            raise _ServerFailure(f"{where}: connection refused") from None
        except OSError as exc:
            raise _ServerFailure(f"{where}: cannot connect ({exc.strerror or exc})") from None
        try:
            raw.settimeout(self.connect_timeout)  # bounds the TLS handshake too
            tls = self._context().wrap_socket(raw, server_hostname=host)
        except ssl.SSLCertVerificationError as exc:
            raw.close()
            raise _ServerFailure(f"{where}: server certificate refused: {exc.verify_message} "
                                 f"(expected a certificate for {host!r} issued by the CA in {self.ca})") from None
        except socket.timeout:
            raw.close()
            raise _ServerFailure(f"{where}: no TLS handshake within {self.connect_timeout:g} s "
                                 "(the server accepted the connection but does not answer)") from None
        except (ssl.SSLError, OSError) as exc:
            raw.close()
            raise _ServerFailure(f"{where}: TLS handshake failed ({exc}); does the server accept "
                                 f"the client certificate {self.cert}?") from None
        tls.settimeout(self.request_timeout)
        client = ProxyKmipClient(config_file=os.devnull)  # no PyKMIP config file: everything comes from us
        client.proxy.socket = tls
        client.proxy.protocol = KMIPProtocol(tls)
        client.proxy.host, client.proxy.port = host, port
        client._is_open = True
        self.counts["connections"] += 1
        return client

    def _drop(self) -> None:
        client, self._client, self._server = self._client, None, None
        if client is not None:
            try:
                client.close()
            except Exception:  # closing a broken connection: nothing more to learn
                pass

    def _call(self, op: str, key_id: str | None, fn):
        """Run fn(client) on the cluster: the open connection, else each server in order."""
        with self._lock:
            what = f"{op} of key {key_id}" if key_id else op
            if self._client is None and time.monotonic() < self._down_until:
                raise ProviderError(f"provider {self.name}: {what} failed: no KMS server of the cluster could be "
                                    f"used {time.monotonic() - self._down_since:.0f} s ago (servers tried: "
                                    f"{self._down_error}); not retrying for {self.holdoff:g} s after that "
                                    "('vmfs-crypt unlock' retries now)")
            tried: list[str] = []
            candidates = ([self._server] if self._client is not None else []) + list(self.servers)
            for i, server in enumerate(candidates):
                reused = i == 0 and self._client is not None
                try:
                    if not reused:
                        self._client = self._connect(*server)
                        self._server = server
                    self.counts[op] = self.counts.get(op, 0) + 1
                    result = fn(self._client)
                    self._down_until = 0.0
                    return result
                except _ServerFailure as exc:
                    tried.append(str(exc))
                    self._drop()
                except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError):
                    raise  # the server answered: no failover
                except socket.timeout:
                    tried.append(f"{_fmt(*server)}: no answer to {op} within {self.request_timeout:g} s")
                    self._drop()
                except (EOFError, RequestLengthMismatch, OSError) as exc:
                    tried.append(f"{_fmt(*server)}: connection lost during {op} ({type(exc).__name__}: {exc})")
                    self._drop()
                    if reused:
                        tried.pop()  # a stale kept-alive connection: retry on a fresh one, not an error yet
                        log.info("provider %s: connection to %s lost, reconnecting", self.name, _fmt(*server))
                        continue
                log.warning("provider %s: %s", self.name, tried[-1])
            self._down_error = "; ".join(tried)
            self._down_since = time.monotonic()
            self._down_until = self._down_since + self.holdoff
            raise ProviderError(f"provider {self.name}: {what} failed: no KMS server of the cluster could be used "
                                f"(servers tried: {self._down_error})")

    def reset_backoff(self) -> None:
        """Forget a recent cluster failure (the user asked to retry now)."""
        self._down_until = 0.0

    def _failure(self, exc: Exception, key_id: str, op: str) -> ProviderError:
        reason = getattr(exc, "reason", None)
        where = _fmt(*self._server) if self._server else "the server"
        if reason == enums.ResultReason.ITEM_NOT_FOUND:
            gone = KeyNotFoundError(f"key {key_id} is gone from provider {self.name}: it was destroyed there, or "
                                    f"never existed there ({where} answered ITEM_NOT_FOUND)")
            return gone
        if reason == enums.ResultReason.PERMISSION_DENIED:
            return ProviderError(f"provider {self.name} ({where}) denies {op} of key {key_id}: keys belong to the "
                                 f"client certificate that created them; is {self.cert} that certificate?")
        if reason == enums.ResultReason.AUTHENTICATION_NOT_SUCCESSFUL:
            return ProviderError(f"provider {self.name} ({where}) does not accept the client certificate "
                                 f"{self.cert} (it needs extendedKeyUsage clientAuth and the server's CA)")
        return ProviderError(f"provider {self.name} ({where}): {op} of key {key_id} failed: "
                             f"{getattr(exc, 'message', exc)}")

    # -- the provider interface -------------------------------------------------------
    def key_state(self, key_id: str) -> enums.State:
        """The key's KMIP state (GetAttributes State)."""
        def go(client):
            _, attrs = client.get_attributes(key_id, ["State"])
            return attrs
        try:
            attrs = self._call("GetAttributes", key_id, go)
        except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError) as exc:
            raise self._failure(exc, key_id, "GetAttributes") from None
        for attr in attrs:
            if attr.attribute_name.value == "State":
                return attr.attribute_value.value
        raise ProviderError(f"provider {self.name}: the server gave no State for key {key_id}")

    def check_usable(self, key_id: str) -> None:
        """Raise a clear KeyRevokedError unless the key is active (revoked, destroyed, not yet activated)."""
        state = self.key_state(key_id)
        if state == enums.State.ACTIVE:
            return
        if state in (enums.State.DESTROYED, enums.State.DESTROYED_COMPROMISED):
            exc = KeyNotFoundError(f"key {key_id} was destroyed on provider {self.name}")
        elif state in (enums.State.DEACTIVATED, enums.State.COMPROMISED):
            exc = KeyRevokedError(f"key {key_id} was revoked on provider {self.name} (state {state.name}); "
                                  "disks under it stay locked unless the key is made active again")
        else:
            exc = KeyRevokedError(f"key {key_id} on provider {self.name} is not active (state {state.name})")
        raise exc

    def get_kek(self, key_id: str) -> bytes:
        if not key_id or len(key_id) > 128:
            raise KeyNotFoundError(f"provider {self.name}: {key_id!r} is not a KMIP key id")
        self.check_usable(key_id)
        try:
            obj = self._call("Get", key_id, lambda client: client.get(key_id))
        except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError) as exc:
            raise self._failure(exc, key_id, "Get") from None
        value = getattr(obj, "value", None)
        algorithm = getattr(obj, "cryptographic_algorithm", None)
        if not isinstance(value, bytes) or len(value) != 32 or algorithm != enums.CryptographicAlgorithm.AES:
            raise ProviderError(f"key {key_id} of provider {self.name} is not a 256-bit AES key")
        return value

    def new_kek(self, label: str) -> str:
        label = re.sub(r"[^A-Za-z0-9._-]+", "_", label)[:64] or "kek"
        name = f"vmfs-crypt/{label}/{secrets.token_hex(8)}"
        masks = [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT]
        try:
            uid = self._call("Create", None, lambda client: client.create(
                enums.CryptographicAlgorithm.AES, 256, name=name, cryptographic_usage_mask=masks))
        except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError) as exc:
            raise ProviderError(f"provider {self.name}: Create of a new AES-256 key failed: "
                                f"{getattr(exc, 'message', exc)}") from None
        try:
            self._call("Activate", uid, lambda client: client.activate(uid))
        except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError) as exc:
            raise ProviderError(f"provider {self.name}: key {uid} was created (name {name}) but Activate "
                                f"failed: {getattr(exc, 'message', exc)}") from None
        log.info("provider %s: created key %s (%s)", self.name, uid, name)
        return str(uid)

    def probe(self) -> list[tuple[str, str | None]]:
        """Each server: (address, None) if it takes our certificate and answers a Locate, else (address, why)."""
        results = []
        for host, port in self.servers:
            try:
                client = self._connect(host, port)
            except _ServerFailure as exc:
                results.append((_fmt(host, port), str(exc).split(": ", 1)[1]))
                continue
            try:
                client.locate(maximum_items=1)
                results.append((_fmt(host, port), None))
            except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError) as exc:
                results.append((_fmt(host, port), str(self._failure(exc, "-", "Locate"))))
            except (OSError, EOFError, RequestLengthMismatch) as exc:
                results.append((_fmt(host, port), f"no answer to Locate ({type(exc).__name__}: {exc})"))
            finally:
                try:
                    client.close()
                except Exception:
                    pass
        return results

    def describe(self) -> dict:
        return {"name": self.name, "type": self.kind, "servers": [_fmt(h, p) for h, p in self.servers],
                "cert": self.cert, "ca": self.ca, "connect_timeout": self.connect_timeout,
                "request_timeout": self.request_timeout, "on_revoke": self.on_revoke,
                "connected_to": _fmt(*self._server) if self._server else None, "requests": dict(self.counts)}

    def close(self) -> None:
        with self._lock:
            self._drop()
