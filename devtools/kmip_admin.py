"""Development tooling: KMIP administration a key server's operator does (revoke, destroy), for tests and benchmarks.

Not part of the installed package: vmfs-crypt itself never revokes or destroys a key.
"""

import time

from kmip import enums
from kmip.core import exceptions as kmip_core_exceptions
from kmip.pie import exceptions as kmip_exceptions

from vmfs_crypt.providers.kmip import KmipKeyProvider


class KmipAdmin(KmipKeyProvider):
    """A KMIP client with the operator's verbs, on the same connection handling as the provider."""

    # Take a key out of service.
    def revoke(self, key_id: str, compromised: bool = False) -> None:
        reason = (enums.RevocationReasonCode.KEY_COMPROMISE if compromised
                  else enums.RevocationReasonCode.CESSATION_OF_OPERATION)
        kwargs = {"compromise_occurrence_date": int(time.time())} if compromised else {}
        try:
            self._call("Revoke", key_id, lambda client: client.revoke(reason, key_id, **kwargs))
        except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError) as exc:
            raise self._failure(exc, key_id, "Revoke") from None

    def destroy(self, key_id: str) -> None:
        try:
            self._call("Destroy", key_id, lambda client: client.destroy(key_id))
        except (kmip_exceptions.KmipOperationFailure, kmip_core_exceptions.KmipError) as exc:
            raise self._failure(exc, key_id, "Destroy") from None

