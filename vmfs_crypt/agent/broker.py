"""An in-process `KeyAccess` over a `KeyService`: the same key operations without a socket (tests, tools)."""

from ..format.keysafe import KeyRecord, KeyRef
from . import protocol as p
from .service import KeyService


class InProcessKeys:
    def __init__(self, service: KeyService) -> None:
        self.service = service

    def _call(self, op: str, **fields) -> dict:
        return p.raise_for_response(self.service.handle(dict(fields, op=op)))

    def unwrap(self, record: KeyRecord, what: str) -> bytes:
        return p.secret_from_wire(self._call(p.OP_UNWRAP, what=what, **p.record_fields(record))["dek"], what)

    def new_file_key(self, kek: KeyRef, what: str | None = None) -> tuple[KeyRecord, bytes]:
        resp = self._call(p.OP_NEW_FILE_KEY, what=what, **p.kek_fields(kek))
        return p.record_from(resp, "new key"), p.secret_from_wire(resp["dek"], "new key")

    def new_kek(self, provider: str | None, label: str) -> KeyRef:
        return p.kek_from(self._call(p.OP_NEW_KEK, provider=provider, label=label), "new KEK")

    def rewrap(self, record: KeyRecord, kek: KeyRef, what: str) -> KeyRecord:
        return p.record_from(self._call(p.OP_REWRAP, what=what, **p.kek_fields(kek), **p.record_fields(record)), what)

    def locked(self) -> list[dict]:
        return self._call(p.OP_LOCKED)["locked"]
