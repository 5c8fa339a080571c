"""The datastore policy file `.vmfs-crypt-policy.json` at a datastore's root: encrypt new folders (docs/FORMAT.md 7.7; issue 9)."""

import json
import os
from dataclasses import dataclass

from ..errors import FormatError
from .atomicio import NotRegularFile, read_regular, write_atomic
from .strict import check_members, check_version_features, json_object

POLICY_NAME = ".vmfs-crypt-policy.json"
POLICY_FORMAT = "vmfs-crypt-datastore-policy"
POLICY_VERSION = 1
POLICY_MAX_SIZE = 64 << 10
_MEMBERS = {"format", "version", "features", "encrypt_new_folders", "provider"}


@dataclass(frozen=True)
class DatastorePolicy:
    """What a datastore asks of folders made in it: encrypted from their first byte, under `provider`'s keys."""

    encrypt_new_folders: bool = False
    provider: str | None = None  # None: the agent's default provider

    def to_json(self) -> dict:
        return {"format": POLICY_FORMAT, "version": POLICY_VERSION, "features": [],
                "encrypt_new_folders": self.encrypt_new_folders, "provider": self.provider}

    @classmethod
    def from_json(cls, doc: dict, what: str) -> "DatastorePolicy":
        if doc.get("format") != POLICY_FORMAT:
            raise FormatError(f"{what}: not a datastore policy file (format {doc.get('format')!r})")
        check_version_features(doc, POLICY_VERSION, frozenset(), what)
        check_members(doc, _MEMBERS, what)
        if type(doc["encrypt_new_folders"]) is not bool:
            raise FormatError(f"{what}: encrypt_new_folders must be true or false")
        provider = doc["provider"]
        if provider is not None and (not isinstance(provider, str) or not provider):
            raise FormatError(f"{what}: provider must be a non-empty string or null")
        return cls(doc["encrypt_new_folders"], provider)


def policy_path(datastore: str) -> str:
    return os.path.join(datastore, POLICY_NAME)


def read_policy(datastore: str) -> DatastorePolicy:
    """The datastore's policy; no file means the default (nothing is asked). Anything unreadable fails closed."""
    path = policy_path(datastore)
    try:
        raw = read_regular(path, POLICY_MAX_SIZE)
    except FileNotFoundError:
        return DatastorePolicy()
    except NotRegularFile:
        raise FormatError(f"{path}: not a regular file (a datastore policy is never followed through a link)") from None
    except OSError as exc:
        raise FormatError(f"{path}: cannot read the datastore policy ({exc.strerror or exc})") from None
    if len(raw) >= POLICY_MAX_SIZE:
        raise FormatError(f"{path}: longer than {POLICY_MAX_SIZE} bytes: not a datastore policy")
    return DatastorePolicy.from_json(json_object(raw, path), path)


def write_policy(datastore: str, policy: DatastorePolicy) -> None:
    text = json.dumps(policy.to_json(), indent=1, sort_keys=True) + "\n"
    write_atomic(policy_path(datastore), text.encode("utf-8"), 0o644)
