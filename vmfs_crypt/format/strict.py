"""Strict parsing helpers for on-disk metadata: canonical base64, JSON without duplicate names, exact types."""

import base64
import binascii
import json

from ..errors import FormatError


def b64decode_canonical(text: str, what: str, field: str) -> bytes:
    """Standard base64 with padding, and only its canonical form (re-encoding gives the input back)."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeError, binascii.Error):
        raise FormatError(f"{what}: {field} is not valid base64") from None
    if base64.b64encode(raw).decode("ascii") != text:
        raise FormatError(f"{what}: {field} is not canonical base64")
    return raw


def _no_duplicates(pairs):
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate member {key!r}")
        obj[key] = value
    return obj


def json_object(raw: bytes, what: str) -> dict:
    """A UTF-8 JSON object with no duplicate member names."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeError) as exc:
        raise FormatError(f"{what}: not valid JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{what}: not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise FormatError(f"{what}: not a JSON object")
    return doc


def exact_int(value, expected: int) -> bool:
    """True only for the JSON integer `expected` (not true, 1.0 or "1")."""
    return type(value) is int and value == expected


def check_members(doc: dict, expected: set[str], what: str) -> None:
    if set(doc) != expected:
        raise FormatError(f"{what}: has members {sorted(doc)}, expected exactly {sorted(expected)}")


def check_version_features(doc: dict, version: int, known_features: frozenset, what: str) -> None:
    """Fail closed on another format version or any feature this version does not know."""
    if not exact_int(doc.get("version"), version):
        raise FormatError(f"{what}: format version {doc.get('version')!r} is not supported (this vmfs-crypt "
                          f"reads version {version}); upgrade vmfs-crypt")
    features = doc.get("features")
    if not isinstance(features, list) or any(not isinstance(f, str) or f not in known_features for f in features):
        raise FormatError(f"{what}: features {features!r} are not known to this vmfs-crypt; upgrade vmfs-crypt")
