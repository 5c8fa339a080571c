"""Key wrapping: a DEK wrapped under a KEK with AES-KW (RFC 3394), bound to the disk's metadata by HKDF."""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ..errors import KeyUnwrapError
from .xts import DEK_SIZE

KEK_SIZE = 32
WRAP_ALGORITHM = "AES-256-KW-HKDF-SHA-256"
WRAPPED_DEK_SIZE = DEK_SIZE + 8  # RFC 3394 adds one 64-bit integrity block
_WRAP_INFO_PREFIX = b"vmfs-crypt dek wrap v1\x00"


def _wrapping_key(kek: bytes, bound_data: bytes) -> bytes:
    """Per-disk wrapping key: HKDF-SHA-256(ikm=KEK, salt=none, info=prefix || encryption.data bytes)."""
    if len(kek) != KEK_SIZE:
        raise ValueError("a KEK is 32 bytes (AES-256)")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_WRAP_INFO_PREFIX + bound_data)
    return hkdf.derive(kek)


def wrap_dek(kek: bytes, dek: bytes, bound_data: bytes) -> bytes:
    """Wrap `dek` under `kek` so that it opens only together with the same `bound_data`."""
    if len(dek) != DEK_SIZE:
        raise ValueError("a DEK is 64 bytes")
    return aes_key_wrap(_wrapping_key(kek, bound_data), dek)


def unwrap_dek(kek: bytes, wrapped: bytes, bound_data: bytes, what: str) -> bytes:
    """Unwrap a DEK; `what` names the disk/key for the error a user sees."""
    if len(wrapped) != WRAPPED_DEK_SIZE:
        raise KeyUnwrapError(f"{what}: the wrapped key is {len(wrapped)} bytes, expected {WRAPPED_DEK_SIZE}; "
                             "the encryption lines were damaged: restore them from a backup")
    try:
        dek = aes_key_unwrap(_wrapping_key(kek, bound_data), wrapped)
    except InvalidUnwrap:
        # RFC 3394's integrity check compares in constant time inside OpenSSL.
        raise KeyUnwrapError(f"{what}: the key does not unwrap: either the KEK is not the one this disk "
                             "was encrypted with, or its encryption lines were altered or copied from "
                             "another disk") from None
    if dek[:32] == dek[32:]:
        raise KeyUnwrapError(f"{what}: the unwrapped key is not a valid XTS key")
    return dek
