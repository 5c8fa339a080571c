"""The key provider interface that the agent drives, with each capability declared here (not probed with hasattr)."""

from abc import ABC, abstractmethod


class KeyProvider(ABC):
    """A source of KEKs, each named by a provider-assigned key id."""

    kind = "abstract"
    # What the agent does with cached KEKs of this provider when the provider revokes one:
    # "keep" serves open disks until unmount, "lock" re-checks and refuses I/O (README).
    on_revoke = "keep"
    # Whether cached KEKs must be re-checked periodically for revocation (on_revoke = "lock").
    has_backup = False  # a passphrase-sealed backup of the provider's secret (native)

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def get_kek(self, key_id: str) -> bytes:
        """The 32-byte KEK with this id; raises KeyNotFoundError / KeyRevokedError / ProviderError."""

    @abstractmethod
    def new_kek(self, label: str) -> str:
        """Create a new KEK (label: a human hint such as the VM folder) and return its id."""

    def check(self) -> None:
        """Raise now what would make every later request fail (missing credentials, a key file readable by others)."""

    def check_usable(self, key_id: str) -> None:
        """Raise KeyRevokedError if the provider took this key out of service (only for on_revoke = "lock")."""

    def reset_backoff(self) -> None:
        """Forget a recent outage: the user asked to retry now."""

    def warnings(self) -> list[str]:
        """Things the user should fix (e.g. no backup yet)."""
        return []

    def describe(self) -> dict:
        return {"name": self.name, "type": self.kind}

    def close(self) -> None:
        """Release connections; keys held in memory are dropped by the agent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
