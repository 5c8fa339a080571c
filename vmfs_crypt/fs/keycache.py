"""The DEK cache of the mount: one cipher per key record, held while a file under it is open, dropped at its last close."""

import threading

from ..agent.protocol import KeyAccess
from ..crypto.xts import SectorCipher
from ..format.keysafe import KeyRecord, KeyRef


def record_key(record: KeyRecord) -> tuple[str, str]:
    """The cache key of a key record: its exact stored form (wrapped DEK and data record)."""
    return record.keysafe.to_locator(), record.data.encode()


class DekCache:
    """Ciphers by key record with a count of the open files that use each; no DEK outlives its last open."""

    def __init__(self, keys: KeyAccess) -> None:
        self.keys = keys
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], list] = {}  # key -> [cipher, users, kek]

    def acquire(self, record: KeyRecord, what: str, dek: bytes | None = None) -> SectorCipher:
        """The cipher of `record` (asking the agent to unwrap it unless `dek` is given), counted as used."""
        key = record_key(record)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] += 1
                return entry[0]
        cipher = SectorCipher(dek if dek is not None else self.keys.unwrap(record, what))
        with self._lock:
            entry = self._entries.setdefault(key, [cipher, 0, record.keysafe.kek])
            entry[1] += 1
            return entry[0]

    def release(self, record: KeyRecord) -> None:
        key = record_key(record)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def keks_in_use(self) -> set[KeyRef]:
        with self._lock:
            return {e[2] for e in self._entries.values()}
