"""The agent's wire protocol and the key-access interface the filesystem core and the operations depend on.

One request or response is one line of JSON (UTF-8, at most MAX_MESSAGE bytes). A request is
an object with "op" and the operation's fields; a response has "ok": true and the result's
fields, or "ok": false with "error" (a message for the user) and "code" (the stable code of a
`VmfsCryptError` class, so the client raises the class the agent raised). Secrets (DEKs)
travel base64-encoded, only to peers that passed the agent's credential check.

Key requests (unwrap, new_file_key, new_kek, rewrap) carry "purpose": why the client asks
(agent/authz.py maps (op, purpose) to the privilege the peer must hold; issue 11).
"""

import base64
import json
from typing import Protocol

from ..errors import AgentError, VmfsCryptError, error_for_code
from ..format.keysafe import KeyRecord, KeyRef
from ..format.strict import json_object

MAX_MESSAGE = 1 << 20

# Operations (the "op" field).
OP_PING = "ping"
OP_UNWRAP = "unwrap"  # fields: what, keySafe, data -> dek
OP_NEW_KEK = "new_kek"  # provider, label -> provider, keyId
OP_NEW_FILE_KEY = "new_file_key"  # provider, keyId, what? -> keySafe, data, dek
OP_REWRAP = "rewrap"  # what, keySafe, data, provider, keyId -> keySafe, data
OP_PREFETCH = "prefetch"  # keys: [{provider, keyId, disks}], budget_s -> keys, fetched, pending, locked
OP_LOCKED = "locked"  # -> locked: [...]
OP_UNLOCK = "unlock"  # -> unlocked, locked
OP_STATUS = "status"  # -> pid, providers, default_provider, cached_keks, locked, warnings, clients
OP_RELOAD = "reload"  # -> providers, errors
OP_STOP = "stop"  # force -> (the agent stops)
OP_HOLD = "hold"  # what: a description -> the peer's pid is a holder until it exits
OP_WHOAMI = "whoami"  # -> the peer as the agent sees it: uid, user, groups, roles, privileges, owner
OP_AUTHORIZE = "authorize"  # privilege, action, target -> ok, or refused (a command asks before it starts)
OP_PROVIDER_ADD = "provider_add"  # name, settings, pem?, check -> key_file?, default, probe
OP_PROVIDER_REMOVE = "provider_remove"  # name -> default
OP_PROVIDER_BACKUP = "provider_backup"  # name, passphrase, target -> backup (the sealed document)
OP_PROVIDER_RESTORE = "provider_restore"  # name, backup, passphrase, source -> key_file
OP_SET_POLICY = "set_policy"  # default_provider? | provider + on_revoke -> default_provider, providers
OP_MOUNT_START = "mount_start"  # name (a [mounts.NAME] table) -> mountpoint, message
OP_MOUNT_STOP = "mount_stop"  # name -> mountpoint, message


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


def decode(line: bytes, what: str) -> dict:
    """A message, strictly parsed (no duplicate names, no deep nesting, bounded size)."""
    if len(line) > MAX_MESSAGE:
        raise AgentError(f"{what}: message longer than {MAX_MESSAGE} bytes")
    try:
        return json_object(line, what)
    except VmfsCryptError as exc:
        raise AgentError(str(exc)) from None


def error_response(exc: VmfsCryptError) -> dict:
    return {"ok": False, "error": str(exc), "code": exc.code}


def raise_for_response(resp: dict) -> dict:
    if resp.get("ok") is True:
        return resp
    raise error_for_code(str(resp.get("code")), str(resp.get("error") or "the agent refused the request"), AgentError)


def record_fields(record: KeyRecord) -> dict:
    return record.as_json()


def record_from(resp: dict, what: str) -> KeyRecord:
    return KeyRecord.from_json({k: resp.get(k) for k in ("keySafe", "data")}, what)


def kek_fields(kek: KeyRef) -> dict:
    return kek.to_json()


def kek_from(obj: dict, what: str) -> KeyRef:
    return KeyRef.from_json({k: obj.get(k) for k in ("provider", "keyId")}, what)


def secret_to_wire(secret: bytes) -> str:
    return base64.b64encode(secret).decode("ascii")


def secret_from_wire(text, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError:
        raise AgentError(f"{what}: malformed key in the agent's answer") from None


class KeyAccess(Protocol):
    """What the filesystem core and the operations need from whoever holds the KEKs.

    The agent client (over the socket) and the in-process broker (tests, tools) implement it;
    the core never sees a KEK, only the DEKs it asks for.
    """

    def unwrap(self, record: KeyRecord, what: str) -> bytes: ...

    def new_file_key(self, kek: KeyRef, what: str | None = None) -> tuple[KeyRecord, bytes]: ...

    def new_kek(self, provider: str | None, label: str) -> KeyRef: ...

    def rewrap(self, record: KeyRecord, kek: KeyRef, what: str) -> KeyRecord: ...

    def locked(self) -> list[dict]: ...
