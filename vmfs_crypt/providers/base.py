"""The key provider interface that the agent drives."""

from abc import ABC, abstractmethod


class KeyProvider(ABC):
    """A source of KEKs, each named by a provider-assigned key id."""

    kind = "abstract"

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def get_kek(self, key_id: str) -> bytes:
        """The 32-byte KEK with this id; raises KeyNotFoundError / ProviderError."""

    @abstractmethod
    def new_kek(self, label: str) -> str:
        """Create a new KEK (label: a human hint such as the VM folder) and return its id."""

    def warnings(self) -> list[str]:
        """Things the user should fix (e.g. no backup yet)."""
        return []

    def describe(self) -> dict:
        return {"name": self.name, "type": self.kind}

    def close(self) -> None:
        """Release connections; keys held in memory are dropped by the agent."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
